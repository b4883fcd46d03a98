"""Replay stage: the generation stage's output read back from a finished build's staging files
(`generation.replay_from`), so a variant that changes only the filter scores the very samples
that build generated instead of generating them again. No diffusion model loads."""

from __future__ import annotations

import time

import pyarrow as pa

from core.storage import resolve
from factory.schema import CAPTIONED_SCHEMA, GENERATION_FIELDS
from factory.stages.base import RowStage, StageResources


class ReplayStage(RowStage):
    """`source`: the finished build's folder or URI; its manifest is read once per actor."""

    # It stands in for the generation stage (same columns) under a name of its own, so that Ray's
    # progress lines and the dashboard read MapBatches(Replay), never a generation that is not running.
    name = "replay"
    reads = CAPTIONED_SCHEMA
    writes = GENERATION_FIELDS

    def __init__(self, source: str) -> None:
        self.source = source
        self.identities: dict[str, dict] = {}

    def resources(self) -> StageResources:
        # Reads one parquet file per identity: I/O, not compute.
        return StageResources(1, 1, 1, 0.25, 0.0)

    def setup(self) -> None:
        self.root = resolve(self.source)
        self.identities = (self.root / "manifest.json").read_json()["identities"]

    def replay(self, row: dict) -> tuple[pa.Table | None, str]:
        """The identity's staged samples in generation order, or the reason there are none."""
        entry = self.identities.get(row["identity"])
        if entry is None:
            return None, f"{row['identity']} is not among the finished identities of the replayed build {self.source}"
        if entry["caption"] != row["caption"]:
            # The samples were generated from another prompt: scoring them as this one's would lie.
            return None, (f"{row['identity']}: caption {row['caption']!r} differs from the replayed build's "
                          f"{entry['caption']!r}; generate instead (unset generation.replay_from)")
        return (self.root / entry["file"]).read_parquet(["image", "prompt", "seed", "index"]).sort_by("index"), ""

    def process_row(self, row: dict) -> dict:
        start = time.perf_counter()
        staged, error = self.replay(row)
        ok = staged is not None
        return {
            "status": "ok" if ok else "failed", "error": error,
            "generated": [image["bytes"] for image in staged.column("image").to_pylist()] if ok else [],
            "sample_seeds": staged.column("seed").to_pylist() if ok else [],
            "sample_prompts": staged.column("prompt").to_pylist() if ok else [],
            "reference_preview": [], "timings": {"replay": time.perf_counter() - start} if ok else {},
            "model_loads": 0, "attempts": 1, "reference_reused": False, "generated_at": time.time(),
        }
