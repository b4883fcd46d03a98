"""Pre-training throughput: images/s of the input pipeline alone, of the model step alone, and of
both together (the pipeline feeding the step), on CPU and, when there is one, on the GPU.

    uv run python benchmarks/pretrain_throughput.py                  # ResNet-50, 256x128, batch 512
    uv run python benchmarks/pretrain_throughput.py --arch resnet18 --batch 32 --image-size 128 64 \
        --steps 12 --num-cpus 2 --threads 1 [--decode-on trainer]    # a small CPU machine

- pipeline alone: the input pipeline `trainers.pretrain` trains from (Ray Data: Parquet read ->
  decode + RandAugment, in `map_batches` tasks or, with `--decode-on trainer`, in the iterator's
  prefetch threads -> `iter_torch_batches`), drained without a model: a whole pass, the second
  one (the first starts Ray's worker processes), per-epoch costs included;
- step alone: the training step (device-side normalisation, Random Erasing, Mixup/CutMix,
  forward, backward, AdamW; bf16 autocast and channels_last on GPU) on one synthetic uint8 batch;
- both: the step fed by the pipeline, after one warm-up step.

Without `--data` it writes procedural pedestrian shards (enough for the timed steps) to a temporary
folder. "both" close to the slower of the other two means decoding is off the step's critical
path; well below it means the two compete for the same cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterable, Sequence
from itertools import islice
from pathlib import Path

import core  # noqa: F401  (before Ray: keeps the local cluster off `uv run` env rebuilds)
import ray
import torch

from core.datasets.config import SyntheticSpec
from core.datasets.market import load_market1501
from core.datasets.synthetic import generate_synthetic_dataset
from core.settings.pretrain import PretrainConfig, plan_batches
from trainers.pretrain.data import IMAGE_KEY, LABEL_KEY, build_train_dataset, train_batches
from trainers.pretrain.recipe import BatchAugment, build_loss, build_model, build_optimizer
from trainers.pretrain.shards import inspect_shards, write_shards
from trainers.pretrain.train import train_one_epoch


def make_shards(out: Path, ids: int, image_size: tuple[int, int]) -> Path:
    """Procedural pedestrians (~12 images per identity) as shards of 64 rows, so the pipeline
    streams many blocks (one big block would be decoded whole before the first batch)."""
    source = generate_synthetic_dataset(out / "source", SyntheticSpec(ids=ids, cameras=4, seed=0,
                                                                      images_per_camera=4))
    write_shards(load_market1501(source).train, out / "data", image_size=image_size, rows_per_shard=64)
    return out / "data"


def measure_pipeline(files: Sequence[Path], config: PretrainConfig, batch: int, device: torch.device) -> float:
    """Images/s of a whole pass (the second: the first starts Ray's worker processes), from asking
    for the first batch to the last; includes every per-epoch cost of the pipeline."""
    iterator = build_train_dataset(files, config).iterator()
    for _ in range(2):
        start, seen = time.perf_counter(), 0
        for item in train_batches(iterator, config, batch, device):  # one pass over the shards
            seen += len(item[LABEL_KEY])
        seconds = time.perf_counter() - start
    return seen / seconds


def measure_step(config: PretrainConfig, num_classes: int, batch: int, steps: int, device: torch.device,
                 batches: Iterable[dict[str, torch.Tensor]] | None) -> float:
    """Training-step images/s on `batches` (None: one synthetic uint8 batch, reused)."""
    model = build_model(config, num_classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config)
    augment, loss_fn = BatchAugment(config, num_classes, device), build_loss(config)
    plan = plan_batches(batch, 1, config.max_batch_per_step, even=config.mixup_enabled)
    if batches is None:
        fixed = {IMAGE_KEY: torch.randint(0, 256, (batch, 3, *config.image_size), dtype=torch.uint8, device=device),
                 LABEL_KEY: torch.randint(0, num_classes, (batch,), device=device)}
        batches = (fixed for _ in range(steps + 1))
    iterator = iter(batches)
    # train_one_epoch times itself up to its .tolist(), where the GPU's queued work is done
    train_one_epoch(model, islice(iterator, 1), augment, loss_fn, optimizer, plan, device)  # warm-up
    metrics = train_one_epoch(model, islice(iterator, steps), augment, loss_fn, optimizer, plan, device)
    return metrics["images"] / metrics["epoch_seconds"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="factory output folder (default: procedural shards)")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=512, help="images per step")
    parser.add_argument("--image-size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the step (default: torch's)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    parser.add_argument("--ids", type=int, default=None,
                        help="procedural identities when no --data (default: enough for the timed steps)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--decode-on", choices=["ray_data", "trainer"], default="ray_data",
                        help="where images are decoded and augmented (PretrainConfig.decode_on)")
    parser.add_argument("--prefetch", type=int, default=2, help="prefetch_batches (decode threads with trainer)")
    parser.add_argument("--cache", action="store_true", help="cache_shards: read the Parquet shards once")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    auto = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    devices = [torch.device(name) for name in (auto if args.device == "auto" else [args.device])]
    config = PretrainConfig(arch=args.arch, image_size=tuple(args.image_size), batch_size=args.batch,
                            decode_batch_size=max(16, args.batch // 4), shuffle_buffer=0,
                            decode_on=args.decode_on, prefetch_batches=args.prefetch, cache_shards=args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        ids = args.ids or min(4999, max(16, -(-(args.steps + 2) * args.batch // 11)))
        data = args.data or make_shards(Path(tmp), ids, tuple(args.image_size))
        summary = inspect_shards(data)
        if summary.num_rows < (args.steps + 1) * args.batch:
            parser.error(f"{data} holds {summary.num_rows} images, fewer than {args.steps + 1} batches")
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        print(f"{summary.describe()}; {args.arch} at {args.image_size[0]}x{args.image_size[1]}, batch {args.batch}, "
              f"{args.steps} timed steps, decode on {args.decode_on}{', cached shards' if args.cache else ''}, "
              f"torch threads {torch.get_num_threads()}, "
              f"Ray CPUs {ray.cluster_resources().get('CPU', 0):.0f}")
        print(f"{'device':<8} {'pipeline alone':>15} {'step alone':>12} {'both':>10}  (images/s)")
        for device in devices:
            pipeline = measure_pipeline(summary.files, config, args.batch, device)
            step = measure_step(config, summary.num_classes, args.batch, args.steps, device, None)
            iterator = build_train_dataset(summary.files, config).iterator()
            both = measure_step(config, summary.num_classes, args.batch, args.steps, device,
                                train_batches(iterator, config, args.batch, device))
            label = device.type + (" bf16" if device.type == "cuda" else "")
            print(f"{label:<8} {pipeline:>15.1f} {step:>12.1f} {both:>10.1f}", flush=True)
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
