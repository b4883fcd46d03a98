"""Reading a dataset's image files once, on the machine that has them: each file's bytes, proven
to decode, or the reason it cannot be read. The bytes then travel to the workers (the pipeline's
sequence table, the filter model's and the downstream trials' training sets), which need no access
to the dataset's filesystem."""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image


def _try_read(path: str) -> bytes | str:
    """The file's bytes, proven to decode fully (a truncated JPEG fails `load()`), or why not."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.width < 2 or image.height < 2:
                raise ValueError(f"degenerate image size {image.size}")
        return data
    except Exception as err:  # any decode/IO failure quarantines the file, never the run
        return f"{type(err).__name__}: {err}"


def read_images(paths: Sequence[str], threads: int = 8) -> dict[str, bytes | str]:
    """Each path's encoded bytes, proven to decode, or the reason it cannot be read."""
    unique = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return dict(zip(unique, pool.map(_try_read, unique)))
