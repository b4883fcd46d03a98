"""Load the factory's models from a hub id or a local directory, without touching the network.

One code path serves both: `CompVis/stable-diffusion-v1-4` (read from the Hugging Face cache) and
`.cache/demo-models/text-to-image` (a `save_pretrained` folder) go through the same
`from_pretrained` call.

Offline by default: every `from_pretrained` gets `local_files_only=True`, so a missing model fails
in milliseconds with `ModelNotAvailableError` instead of hanging on a download inside a Ray
actor. Downloads are allowed only when the environment says so explicitly with
`HF_HUB_OFFLINE=0` (or `false`/`no`/`off`); an unset variable means offline.

`check_model_available` does the same lookup without reading any weights, so a build can
validate every model id before it starts Ray or loads anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from transformers import Blip2ForConditionalGeneration, Blip2Processor, CLIPModel, CLIPProcessor

DTypeLike = torch.dtype | str | None
# Files whose presence marks a loadable folder: a diffusers pipeline or a transformers model.
MARKER_FILES = ("model_index.json", "config.json")
_ALLOW_VALUES = {"0", "false", "no", "off"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotAvailableError(RuntimeError):
    """A model id is neither a usable local directory nor in the Hugging Face cache (and
    downloads are not allowed). The message names the id and how to provide it."""


def downloads_allowed() -> bool:
    """True only when `HF_HUB_OFFLINE` is explicitly set to a false value (`0`, `false`, ...)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _ALLOW_VALUES


def hub_cache_dir() -> Path:
    """The hub cache the loaders read, resolved from the environment at call time
    (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _looks_like_path(model_id: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a separator, or that exists, is a path.
    return (
        model_id.startswith(("/", "./", "../", "~", "\\"))
        or model_id.count("/") > 1
        or Path(model_id).expanduser().exists()
    )


def _not_available(model_id: str, reason: str, config_key: str | None) -> ModelNotAvailableError:
    key = config_key or "<section>.<model key>"
    return ModelNotAvailableError(
        f"model {model_id!r} is not available: {reason}. No download was attempted "
        f"(offline unless HF_HUB_OFFLINE=0). Provide it in one of these ways:\n"
        f"  - point the config at a local copy (a save_pretrained folder): --set {key}=/path/to/model\n"
        f"  - pre-populate the Hugging Face cache: on a machine with internet run "
        f"`hf download {model_id}` (formerly `huggingface-cli download {model_id}`), then copy "
        f"~/.cache/huggingface to this machine (or point HF_HOME at the copy)\n"
        f"  - or allow downloads with HF_HUB_OFFLINE=0"
    )


def check_model_available(model_id: str, config_key: str | None = None) -> None:
    """Raise `ModelNotAvailableError` unless `model_id` can be loaded without the network.

    Cheap: looks for `model_index.json` / `config.json` in a local directory or in the hub
    cache's snapshot of the id, reading no weights. With downloads allowed (HF_HUB_OFFLINE=0) a
    hub id that is not cached passes (it will be downloaded). `config_key` (e.g.
    `generation.base_model`) is named in the error message.
    """
    if _looks_like_path(model_id):
        path = Path(model_id).expanduser()
        if not path.is_dir():
            raise _not_available(model_id, f"no directory at {path.resolve()}", config_key)
        if not any((path / marker).is_file() for marker in MARKER_FILES):
            raise _not_available(
                model_id, f"{path.resolve()} has neither {' nor '.join(MARKER_FILES)}", config_key
            )
        return
    cache = hub_cache_dir()
    try:
        cached = [try_to_load_from_cache(model_id, marker, cache_dir=cache) for marker in MARKER_FILES]
    except HFValidationError as err:
        raise _not_available(model_id, f"neither a directory nor a valid hub id ({err})", config_key) from err
    if any(isinstance(found, str) for found in cached) or downloads_allowed():
        return
    raise _not_available(model_id, f"not a local directory and not in the Hugging Face cache at {cache}", config_key)


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


def _load_kwargs(model_id: str) -> dict:
    kwargs: dict = {"local_files_only": not downloads_allowed()}
    if not _looks_like_path(model_id):
        kwargs["cache_dir"] = str(hub_cache_dir())
    return kwargs


def load_text_to_image(
    model_id: str,
    device: str | torch.device = "cpu",
    dtype: DTypeLike = None,
    config_key: str = "generation.base_model",
) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` from a hub id or `save_pretrained` folder, on `device`.

    The NSFW safety checker is not loaded (`safety_checker=None`): it would black out
    generated person crops it misjudges, and the factory filters its outputs with Re-ID anyway.
    """
    check_model_available(model_id, config_key)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(
            model_id,
            dtype=torch_dtype,
            safety_checker=None,
            requires_safety_checker=False,
            **_load_kwargs(model_id),
        )
    except OSError as err:  # partial cache or folder: some component file is missing
        raise _not_available(model_id, f"loading failed ({err})", config_key) from err
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def load_captioner(
    model_id: str,
    device: str | torch.device = "cpu",
    dtype: DTypeLike = None,
    config_key: str = "caption.model",
) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """BLIP-2 (`Blip2ForConditionalGeneration`, eval mode, on `device`) and its processor."""
    return _load_model_and_processor(Blip2ForConditionalGeneration, Blip2Processor, model_id, device, dtype, config_key)


def load_clip(
    model_id: str,
    device: str | torch.device = "cpu",
    dtype: DTypeLike = None,
    config_key: str = "filter.clip_model",
) -> tuple[CLIPModel, CLIPProcessor]:
    """`CLIPModel` (eval mode, on `device`) and its `CLIPProcessor`."""
    return _load_model_and_processor(CLIPModel, CLIPProcessor, model_id, device, dtype, config_key)


def _load_model_and_processor(model_class, processor_class, model_id: str, device: str | torch.device,
                              dtype: DTypeLike, config_key: str):
    """`model_class.from_pretrained` (eval mode, on `device`) and `processor_class.from_pretrained`,
    with the availability check and the named error of every loader here."""
    check_model_available(model_id, config_key)
    kwargs = _load_kwargs(model_id)
    try:
        model = model_class.from_pretrained(model_id, dtype=resolve_dtype(dtype, device), **kwargs)
        processor = processor_class.from_pretrained(model_id, **kwargs)
    except OSError as err:
        raise _not_available(model_id, f"loading failed ({err})", config_key) from err
    return model.to(device).eval(), processor
