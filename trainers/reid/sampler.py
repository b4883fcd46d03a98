"""PK identity sampler: every batch holds P identities with K images each, so the batch-hard
triplet loss always finds positives and negatives."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class PKBatchSampler(Sampler[list[int]]):
    """Batches of `ids_per_batch` (P) x `images_per_id` (K) dataset indices, for a DataLoader's
    `batch_sampler`.

    Per epoch (as BoT's `RandomIdentitySampler`): each identity's images are shuffled and cut into
    chunks of K (an identity with fewer than K images is sampled with replacement up to K; a
    remainder shorter than K is dropped); batches draw P distinct identities that still have
    chunks, until fewer than P remain. The order depends only on (seed, epoch): every DDP rank
    computes the same global list and takes every `world_size`-th batch from `rank`, truncated so
    all ranks run the same number of steps (DDP would hang otherwise). Call `set_epoch` each epoch.
    """

    def __init__(
        self,
        labels: Sequence[int],
        ids_per_batch: int,
        images_per_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if ids_per_batch < 2 or images_per_id < 1:
            raise ValueError(f"need P >= 2 and K >= 1, got P={ids_per_batch}, K={images_per_id}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        label_array = np.asarray(labels)
        self.indices_by_label = {int(label): np.flatnonzero(label_array == label) for label in np.unique(label_array)}
        if len(self.indices_by_label) < ids_per_batch:
            raise ValueError(
                f"ids_per_batch (P) = {ids_per_batch} but the data has only "
                f"{len(self.indices_by_label)} identities"
            )
        self.ids_per_batch = ids_per_batch
        self.images_per_id = images_per_id
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of `epoch`, before sharding."""
        rng = np.random.default_rng([self.seed, epoch])
        k = self.images_per_id
        chunks: dict[int, list[list[int]]] = {}
        for label, indices in self.indices_by_label.items():
            order = rng.choice(indices, size=k, replace=True) if len(indices) < k else rng.permutation(indices)
            chunks[label] = [order[i : i + k].tolist() for i in range(0, len(order) - k + 1, k)]
        available = sorted(chunks)
        batches = []
        while len(available) >= self.ids_per_batch:
            chosen = rng.choice(len(available), size=self.ids_per_batch, replace=False)
            batch: list[int] = []
            for position in chosen:
                batch.extend(chunks[available[position]].pop())
            batches.append(batch)
            available = [label for label in available if chunks[label]]
        return batches

    def _batches(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            batches = self.global_batches(self.epoch)
            per_rank = len(batches) // self.world_size
            self._cache = (self.epoch, batches[self.rank : per_rank * self.world_size : self.world_size])
        return self._cache[1]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
