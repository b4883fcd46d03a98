"""The filter phase: score every generated image, keep those at or above the threshold.

- `base`: `ImageFilter` (what a filter is and declares), the `FILTERS` registry that
  `filter.kind` names, and the `FilterStage` that runs the chosen filter;
- `reid`: the `reid` and `cctf` filters (a Re-ID model per source dataset);
- `reid_models`: finding or training those Re-ID models before the pipeline starts (Ray);
- `clip`: the `clip` filter.

A new filter is one `ImageFilter` subclass in one file, registered once with
`@FILTERS.register("name")`. Importing this package registers the built-in ones (without
importing torch or Ray), so the registry is complete whenever `factory.filters` is imported.
"""

from factory.filters.base import FILTERS, FilterStage, ImageFilter
from factory.filters import clip, reid  # noqa: F401  (register the built-in filters)

__all__ = ["FILTERS", "FilterStage", "ImageFilter"]
