"""Seconds per identity by phase (reference set, fine-tune, sample, filter) and how many times
the base model was loaded.

    uv run python benchmarks/identity_cost.py                       # tiny demo models, CPU
    uv run python benchmarks/identity_cost.py --random-init --device cuda --identities 2
        # real SD v1.4 architecture, random weights (same compute as the hub model), paper recipe

The stages run as they do inside the Ray actors (one `setup`, then identities), without Ray, so
the figures are the per-identity work alone.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from factory.run_config import REPO_ROOT, load_run_config  # noqa: E402
from factory.schema import CAPTIONED_SCHEMA  # noqa: E402


def _rows(n: int, images: list[bytes]) -> pa.Table:
    rows = {
        "identity": [f"bench/{i}" for i in range(n)], "source": ["bench"] * n, "source_pid": list(range(n)),
        "camid": [0] * n, "image_paths": [["-"] * len(images)] * n, "image_bytes": [images] * n,
        "frames": [list(range(len(images)))] * n, "seed": list(range(n)), "captions": [["a person"] * len(images)] * n,
        "caption": ["a person in a red shirt and blue trousers"] * n,
        "prompt": ["a photo of zwx person, a person in a red shirt and blue trousers"] * n,
        "reference_prompt": ["a photo of a person, a person in a red shirt and blue trousers"] * n,
        "caption_seconds": [0.0] * n,
    }
    return pa.table(rows, schema=CAPTIONED_SCHEMA)


def _source_images(count: int) -> list[bytes]:
    from PIL import Image

    out = []
    for i in range(count):
        image = Image.new("RGB", (64, 128), (90 + 10 * i, 90, 90))
        image.paste((200, 30, 30), (16, 20, 48, 64))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG")
        out.append(buffer.getvalue())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="preset (default: demo.yaml; paper.yaml with --random-init)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides")
    parser.add_argument("--identities", type=int, default=3)
    parser.add_argument("--random-init", action="store_true", help="real SD v1.4 architecture with random weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from factory.stages.generate import GenerationStage

    preset = args.config or (REPO_ROOT / "configs" / ("paper.yaml" if args.random_init else "demo.yaml"))
    config = load_run_config(preset, args.overrides)
    num_gpus = 1.0 if args.device.startswith("cuda") else 0.0

    if args.random_init:
        from factory.models.full_size import random_stable_diffusion_v1_4
        from factory.models.tokenizers import train_clip_tokenizer

        tokenizer = train_clip_tokenizer()

        def loader(model_id: str, device: str):
            return random_stable_diffusion_v1_4(tokenizer).to(device)
    else:
        from factory.models.loading import load_text_to_image

        if config.demo_models.enabled:
            from factory.models.demo import ensure_demo_models

            ensure_demo_models(config.demo_models)

        def loader(model_id: str, device: str):
            return load_text_to_image(model_id, device, torch.float32)

    stage = GenerationStage(config.generation, config.output, num_gpus, args.threads, loader=loader)
    start = time.perf_counter()
    stage.setup()
    setup_seconds = time.perf_counter() - start
    table = _rows(args.identities, _source_images(config.sequences.max_images))

    per_phase: dict[str, list[float]] = {}
    filter_seconds: list[float] = []
    filter_stage = None
    if not args.random_init:
        filter_stage = _demo_filter(config)
    for i in range(args.identities):
        row = stage.process_batch(table.slice(i, 1))
        for phase, seconds in json.loads(row.column("timings")[0].as_py()).items():
            per_phase.setdefault(phase, []).append(seconds)
        if filter_stage is not None:
            start = time.perf_counter()
            filter_stage.process_batch(row)
            filter_seconds.append(time.perf_counter() - start)
    if filter_seconds:
        per_phase["filter"] = filter_seconds

    g = config.generation
    print(f"preset {preset.name} | {'random-init SD v1.4' if args.random_init else g.base_model} | device {args.device}")
    print(f"recipe: {g.resolution[0]}x{g.resolution[1]}, {g.reference_images} reference images, {g.train_steps} steps, "
          f"{g.samples_per_identity} samples x {g.num_inference_steps} denoising steps")
    print(f"setup (model load + base-weight copy): {setup_seconds:.2f} s")
    total = 0.0
    for phase, values in per_phase.items():
        mean = sum(values) / len(values)
        total += mean
        print(f"  {phase:<14} {mean:8.2f} s/identity   (n={len(values)})")
    print(f"  {'total':<14} {total:8.2f} s/identity")
    print(f"base model loads: {stage.model_loads} for {args.identities} identities")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return 0


def _demo_filter(config):
    """A filter stage with a randomly initialised demo-size Re-ID model (timing only)."""
    from factory.stages.filter import FilterModelSpec, FilterStage
    from trainers.reid.model import build_reid_model
    from trainers.weights import save_state_safetensors

    directory = Path(tempfile.mkdtemp())
    model = build_reid_model(config.filter.reid, 1, init="random")
    weights = save_state_safetensors(model, directory / "model.safetensors")
    spec = FilterModelSpec(Path(weights), config.filter.reid, {0: 0})
    stage = FilterStage(config.filter.model_copy(update={"kind": "reid"}), {"bench": spec})
    stage.setup()
    return stage


if __name__ == "__main__":
    sys.exit(main())
