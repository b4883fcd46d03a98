"""The Hugging Face hub, one rule for every package: offline unless told otherwise.

Pipelines, captioners and timm backbones alike are read from a local folder or the hub cache;
the network is used only with `HF_HUB_OFFLINE=0` (or `false`/`no`/`off`). An unset variable means
offline, so a cluster node never starts a multi-gigabyte download nobody asked for.
"""

from __future__ import annotations

import os
from pathlib import Path

def downloads_allowed() -> bool:
    """True only when `HF_HUB_OFFLINE` is explicitly set to a false value (`0`, `false`, ...)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"0", "false", "no", "off"}


def hub_cache_dir() -> Path:
    """The hub cache the loaders read, resolved from the environment at call time
    (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def cached_timm_weights(arch: str, hub_cache: str | Path | None = None) -> tuple[str, Path | None]:
    """(timm's default pretrained tag for `arch`, a local file holding those weights or None),
    looked up in the hub cache (`hub_cache`, else `hub_cache_dir()`) and torch-hub's checkpoint
    folder without touching the network."""
    import timm
    import torch
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        return arch, None
    tag = cfg.hf_hub_id or cfg.url or arch
    if cfg.file and Path(cfg.file).is_file():
        return tag, Path(cfg.file)
    if cfg.hf_hub_id:
        for filename in dict.fromkeys([cfg.hf_hub_filename or "model.safetensors", "model.safetensors",
                                       "pytorch_model.bin"]):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=hub_cache or hub_cache_dir())
            if isinstance(found, str) and Path(found).is_file():
                return tag, Path(found)
    if cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if candidate.is_file():
            return tag, candidate
    return tag, None
