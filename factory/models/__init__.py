"""The product's model loading: where a model lives (`locate`, light: no torch), loading hub ids,
URIs or local folders offline (`loading`), and local folders shipped to the actors of other nodes
(`shipping`). The embedded default's tiny models live apart, in `factory.demo`.

The loaders are imported lazily, so `factory.models.locate` (used by the build's check phase)
does not pull torch, diffusers and transformers in with the package.
"""

from __future__ import annotations

from typing import Any

from factory.models.locate import ModelNotAvailableError, check_model_available

_LOADERS = ("load_captioner", "load_clip", "load_text_to_image")

__all__ = ["ModelNotAvailableError", "check_model_available", *_LOADERS]


def __getattr__(name: str) -> Any:
    if name in _LOADERS:
        from factory.models import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'factory.models' has no attribute {name!r}")
