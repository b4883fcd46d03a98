"""The product's row format, shared by the factory (which writes it) and the trainers (which read
it): one row per kept generated image in `DIR/shards/*.parquet`."""

from __future__ import annotations

import io
from collections.abc import Callable, Hashable, Iterable
from typing import Any, TypeVar

import pyarrow as pa
from PIL import Image

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


K = TypeVar("K", bound=Hashable)


def dense_labels(keys: Iterable[K], order: Callable[[K], Any] | None = None) -> dict[K, int]:
    """Class labels 0..N-1, one per distinct key, in sorted order (`order`: the sort key): the one
    rule that turns identities into training labels everywhere (Re-ID trainer, shards, pre-training sets)."""
    return {key: label for label, key in enumerate(sorted(set(keys), key=order))}


def encode_image(image: Image.Image, size: tuple[int, int] | None = None, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """`image` in RGB as the bytes of a shard row: resized to `size` (height, width) when given,
    then JPEG at `quality` or PNG."""
    image = image.convert("RGB")
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, **({"format": "JPEG", "quality": quality} if fmt == "jpeg" else {"format": "PNG"}))
    return buffer.getvalue()
