"""The product's row format, shared by the factory (which writes it) and the trainers (which read
it): one row per kept generated image in `DIR/shards/*.parquet`."""

from __future__ import annotations

import pyarrow as pa

SHARDS_DIR = "shards"
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # as Hugging Face's `Image` feature

# the product: one row per kept generated image (DIR/shards/*.parquet)
SHARD_SCHEMA = pa.schema(
    [
        ("image", IMAGE_STRUCT),
        ("pid", pa.int64()),  # dense over the output: 0..num_identities-1
        ("source", pa.string()),
        ("source_pid", pa.int64()),
        ("identity", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("score", pa.float64()),
        ("index", pa.int64()),  # sample index within the identity
    ]
)
