"""Arrow schemas of every stage boundary, in one place.

Rows between stages are *identities* (one row per identity with list columns), because every
stage works per identity: captions merge over a sequence, fine-tuning is per identity, the filter
compares generated images with the identity's own source images. Only the writer explodes them
into one row per generated image (`SHARD_SCHEMA`).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from core.shards import SHARD_SCHEMA


# read sources -> identity sequences
SEQUENCE_SCHEMA = pa.schema(
    [
        ("identity", pa.string()),  # "<source>/<source_pid>", unique over the run
        ("source", pa.string()),
        ("source_pid", pa.int64()),
        ("camid", pa.int64()),
        ("image_paths", pa.list_(pa.string())),
        ("image_bytes", pa.list_(pa.binary())),
        ("frames", pa.list_(pa.int64())),
        ("seed", pa.int64()),  # identity seed: every image is reproducible from (config, identity, seed)
    ]
)

# LPE captioning adds
CAPTION_FIELDS = [
    ("captions", pa.list_(pa.string())),  # one per source image
    ("caption", pa.string()),  # merged description of the sequence
    ("prompt", pa.string()),  # P_E with the IIR token
    ("reference_prompt", pa.string()),  # LPE prompt without the IIR (Attribute Reference Set)
    ("caption_seconds", pa.float64()),
]
CAPTIONED_SCHEMA = pa.schema(list(SEQUENCE_SCHEMA) + [pa.field(n, t) for n, t in CAPTION_FIELDS])

# DI fine-tune + sample adds
GENERATION_FIELDS = [
    ("status", pa.string()),  # "ok" | "failed"
    ("error", pa.string()),
    ("generated", pa.list_(pa.binary())),  # encoded images at the output size
    ("sample_seeds", pa.list_(pa.int64())),
    ("sample_prompts", pa.list_(pa.string())),
    ("reference_preview", pa.list_(pa.binary())),  # a few Attribute Reference Set images
    ("timings", pa.map_(pa.string(), pa.float64())),  # phase -> seconds
    ("model_loads", pa.int64()),  # base-model loads by the actor so far (must stay 1)
    ("attempts", pa.int64()),
    ("reference_reused", pa.bool_()),  # the Attribute Reference Set was shared with an earlier identity
    ("generated_at", pa.float64()),  # Unix time the identity's generation ended (the build's log shows it)
]
GENERATED_SCHEMA = pa.schema(list(CAPTIONED_SCHEMA) + [pa.field(n, t) for n, t in GENERATION_FIELDS])

# filter adds
FILTER_FIELDS = [
    ("scores", pa.list_(pa.float64())),
    ("kept", pa.list_(pa.bool_())),
    ("reasons", pa.list_(pa.string())),  # why each image was rejected ("" when kept)
    ("filter_kind", pa.string()),
    ("filter_seconds", pa.float64()),
]
FILTERED_SCHEMA = pa.schema(list(GENERATED_SCHEMA) + [pa.field(n, t) for n, t in FILTER_FIELDS])

# per-identity staging files hold every generated image, kept or not (resume + reports)
STAGED_SCHEMA = pa.schema(
    [f for f in SHARD_SCHEMA if f.name != "pid"] + [pa.field("kept", pa.bool_()), pa.field("reason", pa.string())]
)


def require_columns(table: pa.Table, schema: pa.Schema, stage: str) -> None:
    """Fail loudly when a stage receives a batch without the columns it reads."""
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise KeyError(f"{stage}: input batch lacks columns {missing}")


def with_fields(schema: pa.Schema, fields: Sequence[tuple[str, pa.DataType]]) -> pa.Schema:
    """`schema` with `fields` appended (replacing same-named ones): what `append_columns` makes."""
    for name, dtype in fields:
        field = pa.field(name, dtype)
        index = schema.get_field_index(name)
        schema = schema.set(index, field) if index >= 0 else schema.append(field)
    return schema


def append_columns(table: pa.Table, fields: Sequence[tuple[str, pa.DataType]], values: dict[str, list]) -> pa.Table:
    """Return `table` with `fields` appended (replacing same-named ones), typed as declared."""
    for name, dtype in fields:
        field = pa.field(name, dtype)
        column = pa.array(values[name], type=dtype)
        index = table.schema.get_field_index(name)
        table = table.set_column(index, field, column) if index >= 0 else table.append_column(field, column)
    return table


# the write stage's output: what the driver receives per identity (no images: workers wrote them)
STATUS_SCHEMA = pa.schema(
    [
        ("identity", pa.string()),
        ("source", pa.string()),
        ("source_pid", pa.int64()),
        ("seed", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("attempts", pa.int64()),
        ("caption", pa.string()),
        ("caption_seconds", pa.float64()),
        ("timings", pa.map_(pa.string(), pa.float64())),
        ("filter_kind", pa.string()),
        ("filter_seconds", pa.float64()),
        ("reference_reused", pa.bool_()),
        ("generated_at", pa.float64()),
        ("generated_count", pa.int64()),
        ("kept_count", pa.int64()),
        ("staged_file", pa.string()),  # relative to DIR; "" when the identity failed
        ("write_seconds", pa.float64()),
    ]
)
