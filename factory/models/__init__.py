"""Models of the factory: loading hub ids or local folders offline (`loading`), tiny seeded
instances of the real architectures (`tiny`), and the embedded default's trained demo models
(`demo`)."""

from factory.models.loading import (
    ModelNotAvailableError,
    check_model_available,
    load_captioner,
    load_clip,
    load_text_to_image,
)

__all__ = [
    "ModelNotAvailableError",
    "check_model_available",
    "load_captioner",
    "load_clip",
    "load_text_to_image",
]
