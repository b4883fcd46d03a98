"""The three initialisations a downstream cell starts from, resolved once in the driver.

- `ours`: the evaluated backbone file (`--backbone`), checked against `train.arch` before any
  trial starts (`WeightsMismatchError` names the missing / unexpected / mis-shaped keys).
- `imagenet`: timm's default pretrained weights for the arch, from the local Hugging Face or
  torch-hub cache, or downloaded when `imagenet_weights: download` and `HF_HUB_OFFLINE=0`. When they
  cannot be had, the backbone file `imagenet_standin` names (pre-trained on another generic
  classification task, e.g. `demo.imagenet_standin`'s procedural objects) takes their place, checked
  against the arch like `ours` and named as a stand-in in every report; without one the cells are
  reported as unavailable, never trained from something else.
- `random`: timm's initialisation under the cell's seed.

Trials receive the weights as state dicts through the Ray object store, so they never touch the
network or need the backbone file on their node.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from core.hub import cached_timm_weights
from core.storage import local_file, resolve

from core.settings.downstream import INIT_IMAGENET, INIT_OURS, INIT_RANDOM
from trainers.weights import (
    WeightsMismatchError,
    WeightsUnavailableError,
    build_backbone,
    check_state_dict_matches,
    create_pretrained,
    load_backbone_safetensors,
)


@dataclass(frozen=True)
class InitWeights:
    """How a backbone is initialised: `state` (None for random) and a `digest` that changes
    whenever the weights do (finished cells are reused only under the same digest)."""

    name: str
    available: bool
    state: dict[str, torch.Tensor] | None = None
    digest: str = ""
    source: str = ""  # the file or pretrained tag, for the report
    reason: str = ""  # why unavailable (for a stand-in: why the weights it stands in for are)
    stand_in: bool = False  # other weights in place of the init's own (the `imagenet` stand-in)


def load_ours(path: str | Path, arch: str) -> InitWeights:
    """The evaluated backbone; raises `WeightsMismatchError` (naming keys) if it does not fit
    `timm.create_model(arch, num_classes=0)`, `WeightsUnavailableError` if the file is missing."""
    location = resolve(path)  # a local file or a URI (fetched once per machine)
    if not location.is_local and not location.is_file():
        raise WeightsUnavailableError(f"backbone weights file not found: {location}")
    path = local_file(location)
    model = build_backbone(arch, INIT_RANDOM, last_stride=2)
    load_backbone_safetensors(model, path)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return InitWeights(INIT_OURS, True, state, digest=f"sha256:{digest}", source=location.uri)


def resolve_imagenet(
    arch: str, mode: str = "download", hf_cache_dir: str | Path | None = None, standin: str | Path | None = None
) -> InitWeights:
    """timm's ImageNet weights for `arch`: from a local cache without any network access, else
    (mode `download`) downloaded where the hub rule allows it (`core.hub`: HF_HUB_OFFLINE=0),
    else the `standin` backbone file when given (`load_standin`), else unavailable with the reason."""
    real = _resolve_timm_imagenet(arch, mode, hf_cache_dir)
    if real.available or standin is None:
        return real
    return load_standin(standin, arch, because=real.reason)


def load_standin(path: str | Path, arch: str, because: str = "") -> InitWeights:
    """The `imagenet` init from a stand-in backbone file (`downstream.imagenet_standin`), checked
    against `arch` like `ours`: a file that does not fit raises `WeightsMismatchError` naming the
    keys, a missing one `WeightsUnavailableError`; `because` says why the real weights are not used."""
    try:
        weights = load_ours(path, arch)
    except (WeightsMismatchError, WeightsUnavailableError) as err:
        raise type(err)(f"downstream.imagenet_standin: {err}") from err
    return replace(weights, name=INIT_IMAGENET, digest=f"standin-{weights.digest}",
                   source=f"stand-in: {weights.source}", reason=because, stand_in=True)


def _resolve_timm_imagenet(arch: str, mode: str, hf_cache_dir: str | Path | None) -> InitWeights:
    tag, cached = cached_timm_weights(arch, hf_cache_dir)
    unavailable = partial(InitWeights, INIT_IMAGENET, False, digest=f"pretrained:{tag}", source=tag)
    if cached is None and mode != "download":
        return unavailable(reason=f"ImageNet weights for {arch!r} ({tag}) are not in the local Hugging Face / "
                           "torch-hub cache and downstream.imagenet_weights is 'cache'")
    try:
        model = create_pretrained(arch, hf_cache_dir)
    except (WeightsUnavailableError, OSError, RuntimeError) as err:
        return unavailable(reason=str(err).splitlines()[0])
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return InitWeights(INIT_IMAGENET, True, state, digest=f"pretrained:{tag}", source=str(cached or tag))


def random_init() -> InitWeights:
    return InitWeights(INIT_RANDOM, True, None, digest="random", source="timm default initialisation")


def build_initialised_backbone(arch: str, init: InitWeights, last_stride: int) -> nn.Module:
    """`arch` as a feature extractor with `init`'s weights (random weights follow the caller's
    torch seed) and BoT's last stride when `last_stride` is 1."""
    if not init.available:
        raise WeightsUnavailableError(f"{init.name} weights are unavailable: {init.reason}")
    backbone = build_backbone(arch, INIT_RANDOM, last_stride)
    if init.state is not None:
        # The stride trick changes no parameter, so the weights load after it just the same.
        check_state_dict_matches(backbone, init.state, what=f"{init.name} weights ({init.source})")
        backbone.load_state_dict(init.state, strict=True)
    return backbone
