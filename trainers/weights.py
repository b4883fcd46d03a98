"""Backbones by name, with their initial weights: random, timm's ImageNet weights, or a file.

A backbone is `timm.create_model(arch, num_classes=0, global_pool='')`: it returns the last
feature map, and its state dict has exactly the keys of `timm.create_model(arch, num_classes=0)`,
so the `.safetensors` files written here, by `trainers.pretrain` or by anyone with timm are
interchangeable. Weights are loaded before the last stride is changed: the stride trick of BoT
changes no parameter, only how the first block of the last stage moves over its input.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.hub import cached_timm_weights, downloads_allowed, hub_cache_dir
from core.storage import atomic_local_path
from trainers.checkpoint import cpu_state


INIT_RANDOM = "random"
INIT_IMAGENET = "imagenet"
# How many key names an error message lists before it says "... and N more".
_MAX_KEYS_SHOWN = 12


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be found (offline, not in the cache, or no such tag)."""


class WeightsMismatchError(ValueError):
    """A weights file does not fit the backbone; the message names the offending keys."""


class LastStrideUnsupportedError(ValueError):
    """The architecture has no stride-2 last stage that can be turned into stride 1."""


def build_backbone(arch: str, init: str = INIT_RANDOM, last_stride: int = 2) -> nn.Module:
    """A timm feature extractor `arch` (no classifier, no pooling) initialised from `init`.

    `init` is "random", "imagenet" (timm's default pretrained tag for `arch`, read from the
    Hugging Face cache or hub) or a path to a `.safetensors` backbone file. `last_stride=1` applies
    the BoT trick: the last stage keeps the resolution of the one before (see `set_last_stride_one`).
    """
    if last_stride not in (1, 2):
        raise ValueError(f"last_stride must be 1 or 2, got {last_stride!r}")
    if init == INIT_IMAGENET:
        model = create_pretrained(arch)
    else:
        model = create_model(arch, pretrained=False, num_classes=0, global_pool="")
        if init != INIT_RANDOM:
            load_backbone_safetensors(model, init)
    if last_stride == 1:
        set_last_stride_one(model, arch)
    return model


def create_model(arch: str, setting: str = "arch", **kwargs: Any) -> nn.Module:
    """`timm.create_model(arch, **kwargs)`; a misspelt `arch` is a ValueError naming `setting`."""
    try:
        return timm.create_model(arch, **kwargs)
    except RuntimeError as err:
        # timm raises RuntimeError("Unknown model ...") for a misspelt arch; say which setting.
        if "Unknown model" in str(err):
            raise ValueError(f"{setting} {arch!r} is not a timm model ({err})") from None
        raise


def create_pretrained(arch: str, hub_cache: str | Path | None = None) -> nn.Module:
    """`arch` as a feature extractor with timm's default pretrained weights, under the one hub
    rule (`core.hub`): from the local cache (`hub_cache`, else the environment's) without any
    network access, downloaded only where downloads are allowed."""
    tag, cached = cached_timm_weights(arch, hub_cache)
    if cached is None and not downloads_allowed():
        raise WeightsUnavailableError(
            f"ImageNet weights for timm arch {arch!r} are unavailable: {tag} is not in the local "
            f"Hugging Face cache ({hub_cache_dir()}) or torch-hub cache, and downloads are off "
            "(HF_HUB_OFFLINE is unset or true; HF_HUB_OFFLINE=0 allows them).\n" + _PROVIDE_WEIGHTS.format(arch=arch)
        )
    try:
        if cached is not None:
            return timm.create_model(arch, pretrained=True, num_classes=0, global_pool="",
                                     pretrained_cfg_overlay={"file": str(cached)})
        return create_model(arch, pretrained=True, num_classes=0, global_pool="")
    except ValueError:
        raise
    except Exception as err:  # hub/network/cache errors come in many types; all mean "no weights"
        raise WeightsUnavailableError(
            f"ImageNet weights for timm arch {arch!r} are unavailable: {type(err).__name__}: {err}\n"
            + _PROVIDE_WEIGHTS.format(arch=arch)
        ) from err


_PROVIDE_WEIGHTS = (
    "Provide them by downloading once on a machine with internet access "
    "(`HF_HUB_OFFLINE=0 python -c \"import timm; timm.create_model('{arch}', pretrained=True)\"`) and "
    "copying the Hugging Face cache (HF_HOME, default ~/.cache/huggingface) here; or export the "
    "backbone with trainers.weights.save_backbone_safetensors and set init to that .safetensors "
    "file; or use init: random."
)


def load_backbone_safetensors(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a backbone `.safetensors` file into `model`, requiring an exact key and shape match."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"backbone weights file not found: {path}")
    state = load_file(str(path))
    check_state_dict_matches(model, state, what=str(path))
    model.load_state_dict(state, strict=True)
    return model


def check_state_dict_matches(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise `WeightsMismatchError` naming missing, unexpected and wrongly shaped keys.

    torch's own strict loading reports the same facts, but as one long RuntimeError whose size
    mismatches stop it before the key lists; this message is complete and readable.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{key} (file {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
        for key in set(expected) & set(state)
        if state[key].shape != expected[key].shape
    )
    if not (missing or unexpected or wrong_shape):
        return
    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches", wrong_shape)):
        if keys:
            shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
            more = f" ... and {len(keys) - _MAX_KEYS_SHOWN} more" if len(keys) > _MAX_KEYS_SHOWN else ""
            parts.append(f"{label} ({len(keys)}): {shown}{more}")
    raise WeightsMismatchError(
        f"{what} does not match the {type(model).__name__} backbone:\n  " + "\n  ".join(parts)
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (or `model` itself)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def save_backbone_safetensors(model: nn.Module, path: str | Path) -> Path:
    """Save the backbone of `model` (a backbone, a Re-ID model with `.backbone`, or either wrapped
    in DDP) so that `timm.create_model(arch, num_classes=0).load_state_dict(...)` accepts it."""
    module = unwrap_model(model)
    backbone = getattr(module, "backbone", module)
    return save_state_safetensors(backbone, path)


def save_state_safetensors(module: nn.Module, path: str | Path) -> Path:
    """Write `module.state_dict()` atomically as safetensors (contiguous CPU copies)."""
    with atomic_local_path(path) as tmp:
        save_file(cpu_state(unwrap_model(module)), str(tmp))
    return Path(path)


def _strided_modules(stage: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(path in the stage, parent module, child name) of each conv and pool with stride 2 in the
    first block of `stage` (the whole stage if it is not a sequence of blocks)."""
    is_sequence = isinstance(stage, nn.Sequential) and len(stage) > 0
    block, prefix = (stage[0], "0.") if is_sequence else (stage, "")
    found = []
    for name, module in block.named_modules():
        stride = getattr(module, "stride", None)
        if isinstance(module, (nn.Conv2d, nn.AvgPool2d, nn.MaxPool2d)) and stride in (2, (2, 2)):
            parent_name, _, child = name.rpartition(".")
            found.append((prefix + name, block.get_submodule(parent_name), child))
    return found


def _feature_hw(model: nn.Module, size: int) -> tuple[int, int]:
    was_training = model.training
    model.eval()  # eval: a probe must not move BatchNorm running statistics
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
    if out.ndim != 4:
        raise LastStrideUnsupportedError(f"expected a (N, C, H, W) feature map, got shape {tuple(out.shape)}")
    return int(out.shape[-2]), int(out.shape[-1])


def set_last_stride_one(model: nn.Module, arch: str = "") -> nn.Module:
    """BoT's last-stride trick, in place: the last stage (timm's `feature_info[-1]`) stops
    downsampling, doubling the final feature map's height and width, with no dilation and no new
    parameters (the trick as the paper does it on ResNet, unlike timm's `output_stride`, which
    dilates).

    Works for stages whose first block downsamples with stride-2 convs/pools (the ResNet family,
    ResNeXt, SE-ResNet, ResNet-D, RegNet, ...); checked by a probe forward pass, so archs where it
    does not simply double the map (ViT, Swin, ConvNeXt's 2x2 patchify, ...) raise
    `LastStrideUnsupportedError` instead of silently training something else.
    """
    name = arch or type(model).__name__
    feature_info = getattr(model, "feature_info", None)
    if not feature_info:
        raise LastStrideUnsupportedError(f"{name}: timm exposes no feature_info; use last_stride: 2")
    stage_name = feature_info[-1]["module"]
    stage = model.get_submodule(stage_name)
    strided = _strided_modules(stage)
    if not strided:
        raise LastStrideUnsupportedError(
            f"{name}: the last stage {stage_name!r} has no stride-2 conv or pool to set to 1 "
            "(last_stride=1 is supported for ResNet-like CNNs); use last_stride: 2"
        )
    probe = 2 * int(feature_info[-1].get("reduction", 32))
    before = _feature_hw(model, probe)
    undo = [_set_stride_one(parent, child) for _, parent, child in strided]
    try:
        after: tuple[int, int] | str = _feature_hw(model, probe)
    except RuntimeError as err:  # e.g. residual branches no longer agree in size
        after = f"an error ({err})"
    if after != (2 * before[0], 2 * before[1]):
        for restore in reversed(undo):
            restore()
        where = ", ".join(f"{stage_name}.{path}" for path, _, _ in strided)
        raise LastStrideUnsupportedError(
            f"{name}: setting stride 1 at {where} gives {after} instead of a feature map twice "
            f"{before}; last_stride=1 is unsupported for this arch, use last_stride: 2"
        )
    return model


def _set_stride_one(parent: nn.Module, child_name: str) -> Callable[[], None]:
    """Make `parent.child_name` stop downsampling; return a function that undoes it.

    A conv keeps its weights with stride 1. A pool whose kernel equals its stride exists only to
    downsample (ResNet-D's average-pool shortcut), so it becomes an Identity, as timm builds it
    for stride-1 blocks; other pools get stride 1.
    """
    module = getattr(parent, child_name)
    is_conv = isinstance(module, nn.Conv2d)
    if not is_conv and module.kernel_size in (2, (2, 2)):
        setattr(parent, child_name, nn.Identity())
        return lambda: setattr(parent, child_name, module)
    old_stride = module.stride
    module.stride = (1, 1) if is_conv else 1
    return lambda: setattr(module, "stride", old_stride)
