"""Image-path datasets and loaders for the Re-ID trainer (PIL decoding, plain torch DataLoader).

`TrainingSet` is the plain-data form of a training split (lists of paths and ints) that travels
to Ray Train workers in `train_loop_config`: small, picklable, no dataset classes needed there.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from core.datasets.base import ImageRecord
from core.shards import dense_labels
from core.settings.reid import ReidTrainConfig
from trainers.reid.sampler import PKBatchSampler
from trainers.reid.transforms import build_eval_transform, build_train_transform


@dataclass(frozen=True)
class TrainingSet:
    """Training images with dense labels 0..num_classes-1 (`pids[label]` is the source pid)."""

    paths: list[str]
    labels: list[int]
    camids: list[int]
    pids: list[int]
    # The encoded images, when the caller read them (they then travel with the set, so training
    # workers on other nodes never open the paths).
    images: list[bytes] | None = None

    @classmethod
    def from_records(cls, records: Sequence[ImageRecord], images: Mapping[str, bytes] | None = None) -> TrainingSet:
        """Distractors are dropped; labels follow the sorted (source, pid) pairs, so several
        sources with overlapping pid numbers stay distinct identities. `images` (path -> encoded
        bytes) makes a self-contained set that needs no filesystem where it trains."""
        kept = [r for r in records if not r.distractor]
        if not kept:
            raise ValueError("no training images (after dropping distractors)")
        label_of = dense_labels((r.source, r.pid) for r in kept)
        identities = list(label_of)
        return cls(
            paths=[r.path for r in kept],
            labels=[label_of[(r.source, r.pid)] for r in kept],
            camids=[r.camid for r in kept],
            pids=[pid for _, pid in identities],
            images=[images[r.path] for r in kept] if images is not None else None,
        )

    @property
    def num_classes(self) -> int:
        return len(self.pids)


class ImageListDataset(Dataset[tuple[torch.Tensor, int, int]]):
    """(image tensor, label, camid) for each path (or its encoded bytes, when given); images
    decoded with PIL as RGB."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        camids: Sequence[int],
        transform: Callable[[Image.Image], torch.Tensor],
        images: Sequence[bytes] | None = None,
    ) -> None:
        if not len(paths) == len(labels) == len(camids):
            raise ValueError(f"lengths differ: {len(paths)} paths, {len(labels)} labels, {len(camids)} camids")
        self.paths = list(paths)
        self.labels = list(labels)
        self.camids = list(camids)
        self.transform = transform
        self.images = images

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        source = io.BytesIO(self.images[index]) if self.images is not None else self.paths[index]
        with Image.open(source) as image:
            rgb = image.convert("RGB")
        return self.transform(rgb), self.labels[index], self.camids[index]


def pins_memory(device: torch.device | str) -> bool:
    """Page-locked batches only for a CUDA device (its host-to-device copies then run async); a
    process Ray gave no GPU must not touch CUDA, though `torch.cuda.is_available()` may see the
    node's GPUs."""
    return torch.device(device).type == "cuda"


def make_train_loader(
    training: TrainingSet, config: ReidTrainConfig, rank: int = 0, world_size: int = 1,
    device: torch.device | str = "cpu",
) -> DataLoader:
    """This rank's PK batches of augmented training images for `device`; call
    `loader.batch_sampler.set_epoch(epoch)` before each epoch."""
    dataset = ImageListDataset(training.paths, training.labels, training.camids, build_train_transform(config),
                               training.images)
    sampler = PKBatchSampler(
        training.labels, config.ids_per_batch, config.images_per_id,
        seed=config.seed, rank=rank, world_size=world_size,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=config.loader_workers,
        pin_memory=pins_memory(device),
        persistent_workers=config.loader_workers > 0,
    )


def make_eval_loader(
    records: Sequence[ImageRecord], config: ReidTrainConfig, batch_size: int | None = None,
    images: Mapping[str, bytes] | None = None, device: torch.device | str = "cpu",
) -> DataLoader:
    """Records in order, resized and normalised, for `device`; yields (images, pids, camids).
    `images` (path -> encoded bytes) when the caller read them: the files are then never opened here."""
    dataset = ImageListDataset(
        [r.path for r in records], [r.pid for r in records], [r.camid for r in records],
        build_eval_transform(config), [images[r.path] for r in records] if images is not None else None,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size or config.eval_batch_size,
        shuffle=False,
        num_workers=config.loader_workers,
        pin_memory=pins_memory(device),
    )
