"""Where a model lives, found without loading it: a local `save_pretrained` folder or a snapshot
in the Hugging Face cache. Light on purpose (no torch, diffusers or transformers import), so the
build's check phase can read model configs and tokenizer vocabularies in milliseconds.

Offline by default (`core.hub`): a model that is neither a local folder nor cached is reported
as not available; downloads are allowed only with `HF_HUB_OFFLINE=0`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError

from core.hub import downloads_allowed, hub_cache_dir
from core.storage import cache_dir, is_remote, mirror_folder, resolve

# Files whose presence marks a loadable folder: a diffusers pipeline or a transformers model.
MARKER_FILES = ("model_index.json", "config.json")


class ModelNotAvailableError(RuntimeError):
    """A model id is neither a usable local directory nor in the Hugging Face cache (and
    downloads are not allowed). The message names the id and how to provide it."""


def local_model(model_id: str, config_key: str | None = None) -> str:
    """`model_id` as this machine loads it: a folder on an object store (`s3://`, `gs://`, ...)
    is mirrored into this node's cache (`cache_dir("models")`, fetched once: a later call lists
    it and fetches only what changed); hub ids and local paths come back unchanged."""
    if not is_remote(model_id):
        return model_id
    try:
        return str(mirror_folder(resolve(model_id), cache_dir("models")))
    except OSError as err:
        raise _not_available(model_id, f"cannot fetch it ({err})", config_key) from None


def _looks_like_path(model_id: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a separator, or that exists, is a path.
    return (model_id.startswith(("/", "./", "../", "~", "\\")) or model_id.count("/") > 1
            or Path(model_id).expanduser().exists())


def _not_available(model_id: str, reason: str, config_key: str | None) -> ModelNotAvailableError:
    key = config_key or "<section>.<model key>"
    return ModelNotAvailableError(
        f"model {model_id!r} is not available: {reason}. No download was attempted "
        f"(offline unless HF_HUB_OFFLINE=0). Provide it in one of these ways:\n"
        f"  - point the config at a local copy (a save_pretrained folder): --set {key}=/path/to/model\n"
        f"  - pre-populate the Hugging Face cache: on a machine with internet run "
        f"`hf download {model_id}` (formerly `huggingface-cli download {model_id}`), then copy "
        f"~/.cache/huggingface to this machine (or point HF_HOME at the copy)\n"
        f"  - or allow downloads with HF_HUB_OFFLINE=0")


def check_model_available(model_id: str, config_key: str | None = None) -> None:
    """Raise `ModelNotAvailableError` unless `model_id` can be loaded without the network.

    Cheap: looks for `model_index.json` / `config.json` in a local directory or in the hub
    cache's snapshot of the id, reading no weights. With downloads allowed (HF_HUB_OFFLINE=0) a
    hub id that is not cached passes (it will be downloaded). `config_key` (e.g.
    `generation.base_model`) is named in the error message. A URI is fetched first (`local_model`).
    """
    model_id = local_model(model_id, config_key)
    if _looks_like_path(model_id):
        path = Path(model_id).expanduser()
        if not path.is_dir():
            raise _not_available(model_id, f"no directory at {path.resolve()}", config_key)
        if not any((path / marker).is_file() for marker in MARKER_FILES):
            raise _not_available(model_id, f"{path.resolve()} has neither {' nor '.join(MARKER_FILES)}", config_key)
        return
    cache = hub_cache_dir()
    try:
        cached = [try_to_load_from_cache(model_id, marker, cache_dir=cache) for marker in MARKER_FILES]
    except HFValidationError as err:
        raise _not_available(model_id, f"neither a directory nor a valid hub id ({err})", config_key) from err
    if any(isinstance(found, str) for found in cached) or downloads_allowed():
        return
    raise _not_available(model_id, f"not a local directory and not in the Hugging Face cache at {cache}", config_key)


def model_file(model_id: str, relative: str) -> Path | None:
    """The local path of `relative` (e.g. `vae/config.json`) inside `model_id`'s folder or its
    hub-cache snapshot; None when it is not on this machine. Reads nothing but a URI's listing."""
    model_id = local_model(model_id)
    if _looks_like_path(model_id):
        path = Path(model_id).expanduser() / relative
        return path if path.is_file() else None
    try:
        found = try_to_load_from_cache(model_id, relative, cache_dir=hub_cache_dir())
    except HFValidationError:
        return None
    return Path(found) if isinstance(found, str) else None


def read_model_json(model_id: str, relative: str) -> tuple[dict[str, Any], Path] | None:
    """`relative` of `model_id` parsed as JSON, with its path; None when the file is absent."""
    path = model_file(model_id, relative)
    return None if path is None else (json.loads(path.read_text()), path)
