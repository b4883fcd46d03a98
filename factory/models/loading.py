"""Load the factory's models from a hub id or a local directory, without touching the network.

One code path serves both: `CompVis/stable-diffusion-v1-4` (read from the Hugging Face cache) and
`demo/weights/text-to-image` (a `save_pretrained` folder) go through the same
`from_pretrained` call.

Offline by default: every `from_pretrained` gets `local_files_only=True`, so a missing model fails
in milliseconds with `ModelNotAvailableError` instead of hanging on a download inside a Ray
actor. Downloads are allowed only when the environment says so explicitly with
`HF_HUB_OFFLINE=0` (or `false`/`no`/`off`); an unset variable means offline. The lookup itself,
without reading weights, is `factory.models.locate.check_model_available`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from transformers import Blip2ForConditionalGeneration, Blip2Processor, CLIPModel, CLIPProcessor

from core.hub import downloads_allowed, hub_cache_dir  # noqa: F401  (re-exported)
from factory.models.locate import (  # noqa: F401  (re-exported: the loaders' public API)
    ModelNotAvailableError, _looks_like_path, _not_available, check_model_available, local_model)

DTypeLike = torch.dtype | str | None
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: DTypeLike, device: str | torch.device) -> torch.dtype:
    """`torch.float32`/`"float32"`/... as given; `None` or `"auto"`: fp16 on CUDA, fp32 otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {['auto', *_DTYPES]}") from None


def load_text_to_image(model_id: str, device: str | torch.device = "cpu", dtype: DTypeLike = None,
                       config_key: str = "generation.base_model") -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` from a hub id or `save_pretrained` folder, on `device`.

    The NSFW safety checker is not loaded (`safety_checker=None`): it would black out
    generated person crops it misjudges, and the factory filters its outputs with Re-ID anyway.
    """
    pipeline = _from_pretrained(model_id, config_key, lambda path, kwargs: StableDiffusionPipeline.from_pretrained(
        path, dtype=resolve_dtype(dtype, device), safety_checker=None, requires_safety_checker=False, **kwargs))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def load_captioner(model_id: str, device: str | torch.device = "cpu", dtype: DTypeLike = None,
                   config_key: str = "caption.model") -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """BLIP-2 (`Blip2ForConditionalGeneration`, eval mode, on `device`) and its processor."""
    return _load_model_and_processor(Blip2ForConditionalGeneration, Blip2Processor, model_id, device, dtype, config_key)


def load_clip(model_id: str, device: str | torch.device = "cpu", dtype: DTypeLike = None,
              config_key: str = "filter.clip_model") -> tuple[CLIPModel, CLIPProcessor]:
    """`CLIPModel` (eval mode, on `device`) and its `CLIPProcessor`."""
    return _load_model_and_processor(CLIPModel, CLIPProcessor, model_id, device, dtype, config_key)


def _load_model_and_processor(model_class, processor_class, model_id: str, device: str | torch.device,
                              dtype: DTypeLike, config_key: str):
    model, processor = _from_pretrained(model_id, config_key, lambda path, kwargs: (
        model_class.from_pretrained(path, dtype=resolve_dtype(dtype, device), **kwargs),
        processor_class.from_pretrained(path, **kwargs)))
    return model.to(device).eval(), processor


def _from_pretrained(model_id: str, config_key: str, load: Callable[[str, dict], Any]) -> Any:
    """`load(path, from_pretrained kwargs)` with the availability check and the named error of
    every loader here."""
    model_id = local_model(model_id, config_key)  # a URI: this node's copy
    check_model_available(model_id, config_key)
    kwargs: dict = {"local_files_only": not downloads_allowed()}
    if not _looks_like_path(model_id):
        kwargs["cache_dir"] = str(hub_cache_dir())
    try:
        return load(model_id, kwargs)
    except OSError as err:  # partial cache or folder: some component file is missing
        raise _not_available(model_id, f"loading failed ({err})", config_key) from err
