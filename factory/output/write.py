"""Write stage, the pipeline's last: the worker that finished an identity writes its staging file
(and, for the first few identities, its contact-sheet strip) straight to the output URI, and hands
the driver a status row. No generated image travels to the driver. It lives beside the store whose
staging layout it writes (`factory.output.store`)."""

from __future__ import annotations

import io
import time

import pyarrow as pa

from core.storage import resolve
from factory.schema import FILTERED_SCHEMA, STAGED_SCHEMA, STATUS_SCHEMA, require_columns
from factory.stages.base import Stage, StageResources
from factory.output.store import safe_file_stem, write_staged_identity


def staged_rows(row: dict) -> pa.Table:
    """Explode one filtered identity row into one staged row per generated image."""
    n = len(row["generated"])
    stem = safe_file_stem(row["identity"])
    columns = {
        "image": [{"bytes": b, "path": f"{stem}_{i:04d}.jpg"} for i, b in enumerate(row["generated"])],
        **{name: [row[name]] * n for name in ("source", "source_pid", "identity")},
        "prompt": row["sample_prompts"], "seed": row["sample_seeds"], "score": row["scores"], "index": list(range(n)),
        "kept": row["kept"], "reason": row["reasons"],
    }
    return pa.table(columns, schema=STAGED_SCHEMA)


def status_row(row: dict, staged_file: str, seconds: float) -> dict:
    ok = row["status"] == "ok"
    return {
        **{name: row[name] for name in ("identity", "source", "source_pid", "seed", "status", "error", "attempts",
                                        "caption", "caption_seconds", "timings", "filter_kind", "filter_seconds",
                                        "reference_reused", "generated_at")},
        "generated_count": len(row["generated"] or []) if ok else 0,
        "kept_count": sum(row["kept"] or []) if ok else 0,
        "staged_file": staged_file,
        "write_seconds": seconds,
    }


class WriteStage(Stage):
    """`out`: the output URI; `previews`: identities whose strip goes to DIR/previews/."""

    name = "write"
    reads = FILTERED_SCHEMA

    def __init__(self, out: str, previews: frozenset[str] = frozenset(), max_actors: int = 2) -> None:
        self.out = out
        self.previews = previews
        self.max_actors = max_actors

    def resources(self) -> StageResources:
        # I/O-bound: a fraction of a CPU, so it never waits behind the model stages' actors.
        return StageResources(1, 1, self.max_actors, 0.25, 0.0)

    def setup(self) -> None:
        self.root = resolve(self.out)

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        return STATUS_SCHEMA  # one status row per identity: its images are in its staging file

    def process_batch(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, FILTERED_SCHEMA, self.name)
        statuses = []
        for row in batch.to_pylist():
            start = time.perf_counter()
            staged = ""
            if row["status"] == "ok":
                staged = write_staged_identity(self.root, row["identity"], staged_rows(row))
                if row["identity"] in self.previews:
                    from factory.output.report import identity_strip

                    buffer = io.BytesIO()
                    identity_strip(row).save(buffer, format="PNG")
                    (self.root / "previews" / f"{safe_file_stem(row['identity'])}.png").write_bytes(buffer.getvalue())
            statuses.append(status_row(row, staged, time.perf_counter() - start))
        return pa.Table.from_pylist(statuses, schema=STATUS_SCHEMA)
