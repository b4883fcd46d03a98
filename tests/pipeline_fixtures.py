"""Builders shared by the pipeline integration tests: tiny random models saved with
`save_pretrained`, a saved (untrained) filter model, and a small preset on top of demo.yaml."""

from __future__ import annotations

from pathlib import Path

import yaml

from core.settings.run import REPO_ROOT


def save_tiny_models(root: Path) -> tuple[Path, Path]:
    from demo.tiny import tiny_blip2, tiny_stable_diffusion

    sd, blip = root / "sd", root / "blip2"
    tiny_stable_diffusion(seed=0).save_pretrained(sd)
    model, processor = tiny_blip2(seed=0)
    model.save_pretrained(blip)
    processor.save_pretrained(blip)
    return sd, blip


def save_filter_model(directory: Path, source_root: Path, source: str = "synthetic") -> Path:
    """A fixed (random-weight) filter model, so two builds score with identical weights."""
    import torch

    from core.datasets.market import load_market1501
    from factory.filters.reid import FilterModelSpec
    from core.settings.reid import ReidTrainConfig
    from trainers.reid.data import TrainingSet
    from trainers.reid.model import build_reid_model
    from trainers.weights import save_state_safetensors

    dataset = load_market1501(source_root, source=source)
    training = TrainingSet.from_records(dataset.train)
    config = ReidTrainConfig(arch="resnet18", init="random", image_size=(64, 32))
    torch.manual_seed(0)
    model = build_reid_model(config, training.num_classes).eval()
    directory.mkdir(parents=True, exist_ok=True)
    weights = save_state_safetensors(model, directory / "model.safetensors")
    FilterModelSpec(Path(weights), config, {pid: i for i, pid in enumerate(training.pids)}).save(directory)
    return directory


def small_preset(path: Path, source_root: Path, sd: Path, blip: Path, filter_dir: Path | None, **extra) -> Path:
    """A fast preset inheriting demo.yaml: random tiny models, a handful of identities."""
    preset = {
        "base": str(REPO_ROOT / "configs" / "demo.yaml"),
        "sources": [{"kind": "synthetic", "root": str(source_root), "generate": {"ids": 8, "cameras": 2, "seed": 3}}],
        "sequences": {"max_identities": 5, "max_images": 3},
        "caption": {"model": str(blip), "max_new_tokens": 6},
        "generation": {
            "base_model": str(sd), "resolution": [32, 16], "reference_images": 2, "train_steps": 4,
            "samples_per_identity": 4, "num_inference_steps": 3, "sample_batch_size": 4,
        },
        "filter": {"threshold": 0.0, **({"reid_checkpoints": {"synthetic": str(filter_dir)}} if filter_dir else {})},
        "output": {"image_size": [32, 16], "image_format": "png"},
    }
    for dotted, value in extra.items():
        section, key = dotted.split("__")
        preset.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(preset))
    return path
