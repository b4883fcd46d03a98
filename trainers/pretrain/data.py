"""The input pipeline, split the way timm's prefetching loader splits it:

- `DecodeAugment` (per image, CPU): JPEG/PNG bytes -> random resized crop, flip, RandAugment ->
  uint8 CHW arrays (4x less to move than float). Off the training step's critical path, in one
  of two places (`decode_on`):
  `ray_data` - a Ray Data `map_batches` stage in Ray worker processes on any CPU of the cluster
  (scales out to CPU nodes; what a GPU run needs), or
  `trainer` - `DecodeCollate`, the `collate_fn` of `iter_torch_batches`, which runs in the training
  worker's `prefetch_batches` background threads while the step computes (no extra processes,
  no per-epoch worker start-up: the better choice on a small CPU machine).
- `BatchAugment` (`trainers.pretrain.recipe`, per batch, on the training device): float conversion, normalisation, Random
  Erasing, Mixup/CutMix, as timm's `PrefetchLoader` does them on the GPU.

`DecodeAugment` is a plain class testable on an in-memory `pyarrow.Table`; this module is the
only one that knows Ray Data.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray.data
import torch
from PIL import Image
from ray.data.collate_fn import ArrowBatchCollateFn
from timm.data import create_transform

from core.settings.pretrain import PretrainConfig

IMAGE_KEY = "image"
LABEL_KEY = "label"

# Ray reuses worker processes across tasks; each gets its own entropy once (torch's default
# generator starts from the same fixed seed in every new process, so without this every decode
# process would draw the same "random" flips).
_SEEDED_PROCESS: int | None = None


def _seed_process_once() -> None:
    global _SEEDED_PROCESS
    if _SEEDED_PROCESS == os.getpid():
        return
    entropy = int.from_bytes(os.urandom(8), "little")
    random.seed(entropy)
    np.random.seed(entropy % 2**32)
    torch.manual_seed(entropy % 2**63)
    _SEEDED_PROCESS = os.getpid()


def build_train_transform(config: PretrainConfig) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> augmented uint8 CHW tensor of `image_size`: timm's training transform in its
    prefetcher form (`use_prefetcher=True`: no float conversion, no normalisation, no erasing;
    those happen per batch on the device, see `BatchAugment`)."""
    return create_transform(
        input_size=(3, *config.image_size),
        is_training=True,
        use_prefetcher=True,
        scale=config.crop_scale,
        ratio=config.crop_ratio,
        hflip=config.hflip,
        auto_augment=config.rand_augment,
        interpolation=config.interpolation,
    )


class DecodeAugment:
    """A batch of shard rows (`image` struct with `bytes`, `pid`) -> `image` uint8 (N, 3, H, W) and
    `label` int64 (N,), the labels being the dense pids. Augmentation draws differ on every call.

    `seed_process`: give each process fresh entropy on first use (Ray Data's task processes)."""

    def __init__(self, config: PretrainConfig, seed_process: bool = True) -> None:
        self.transform = build_train_transform(config)
        self.seed_process = seed_process

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        if self.seed_process:
            _seed_process_once()
        encoded = batch.column("image").combine_chunks().field("bytes").to_pylist()
        images = []
        for data in encoded:
            with Image.open(io.BytesIO(data)) as image:
                images.append(np.asarray(self.transform(image.convert("RGB"))))
        return {
            IMAGE_KEY: np.stack(images).astype(np.uint8, copy=False),
            LABEL_KEY: batch.column("pid").to_numpy().astype(np.int64),
        }


class DecodeCollate(ArrowBatchCollateFn):
    """`DecodeAugment` as the `collate_fn` of `iter_torch_batches` (`decode_on: trainer`): Ray runs
    it in the training worker's prefetch threads; returns CPU tensors, Ray moves them to the device.
    It never reseeds the process RNGs: they belong to the training step and its checkpoints."""

    def __init__(self, config: PretrainConfig) -> None:
        super().__init__()
        self.stage = DecodeAugment(config, seed_process=False)

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        return {key: torch.from_numpy(value) for key, value in self.stage(batch).items()}


def build_train_dataset(files: Sequence[str | Path], config: PretrainConfig) -> ray.data.Dataset:
    """The shards as a Ray Data stream that Ray Train splits between the workers: read only
    `image` and `pid`, visit the Parquet blocks in a new random order each epoch and, with
    `decode_on: ray_data`, decode + augment in `map_batches` tasks of `decode_cpus` CPUs each
    (with `decode_on: trainer` the stream stays encoded; see `train_batches`). With `cache_shards`
    the encoded rows are read here, once, and later epochs start from the object store."""
    dataset = ray.data.read_parquet([str(f) for f in files]).select_columns(["image", "pid"])  # pushed down
    if config.cache_shards:
        dataset = dataset.materialize()
    dataset = dataset.randomize_block_order()
    if config.decode_on == "trainer":
        return dataset
    return dataset.map_batches(
        DecodeAugment(config),
        batch_format="pyarrow",
        batch_size=config.decode_batch_size,
        num_cpus=config.decode_cpus,
        concurrency=config.decode_concurrency,
    )


def train_batches(
    shard: ray.data.DataIterator, config: PretrainConfig, batch_size: int, device: torch.device
) -> Iterable[dict[str, torch.Tensor]]:
    """One epoch of this worker's batches of `batch_size` augmented uint8 images (`IMAGE_KEY`) and
    labels (`LABEL_KEY`) on `device`, prefetched, locally shuffled, incomplete last batch dropped
    (every rank takes the same number of steps: Ray Train splits the stream equally)."""
    common = dict(
        batch_size=batch_size,
        device=device,
        drop_last=True,
        local_shuffle_buffer_size=config.shuffle_buffer or None,
        prefetch_batches=config.prefetch_batches,
        pin_memory=device.type == "cuda",
    )
    if config.decode_on == "trainer":
        return shard.iter_torch_batches(collate_fn=DecodeCollate(config), **common)
    return shard.iter_torch_batches(dtypes={IMAGE_KEY: torch.uint8, LABEL_KEY: torch.int64}, **common)
