"""The ImageNet stand-in: the procedural object classes (`demo.objects`), the classifier trained on
them (`demo.imagenet_standin`, built as the demo component `imagenet-standin`) and the downstream
`imagenet` init that falls back to it when timm's real ImageNet weights are unavailable."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from core.settings.downstream import DownstreamConfig
from demo.imagenet_standin import BACKBONE_FILE, CARD_FILE, StandinRecipe, train_imagenet_standin
from demo.models import IMAGENET_STANDIN, VERSION_FILE, DemoRecipe, build_demo_models
from demo.objects import MAX_CLASSES, SHAPES, Pose, object_class, object_images, shape_mask
from eval.downstream.inits import load_ours, resolve_imagenet
from eval.downstream.runner import imagenet_meta, resolve_inits
from trainers.weights import WeightsMismatchError, WeightsUnavailableError


def _arrays(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


# --- the object classes --------------------------------------------------------------------------


def test_object_images_are_a_function_of_seed_class_and_index() -> None:
    images, labels = object_images(num_classes=6, per_class=4, size=32, seed=3)
    assert labels == [c for c in range(6) for _ in range(4)]
    assert images[0].size == (32, 32) and images[0].mode == "RGB"
    again, _ = object_images(num_classes=6, per_class=4, size=32, seed=3)
    assert np.array_equal(_arrays(images), _arrays(again))
    # a later `start` redraws exactly the same images: fresh draws are further indices
    tail, tail_labels = object_images(num_classes=6, per_class=2, size=32, seed=3, start=2)
    assert np.array_equal(_arrays(tail), _arrays(images)[[i for i in range(24) if i % 4 >= 2]])
    assert tail_labels == [c for c in range(6) for _ in range(2)]
    other, _ = object_images(num_classes=6, per_class=4, size=32, seed=4)
    assert not np.array_equal(_arrays(other), _arrays(images))
    with pytest.raises(ValueError, match="out of range"):
        object_images(num_classes=MAX_CLASSES + 1, per_class=1, size=16)


def test_every_class_is_its_own_shape_and_scheme() -> None:
    kinds = [object_class(i) for i in range(MAX_CLASSES)]
    assert len({(k.shape, k.scheme.name) for k in kinds}) == MAX_CLASSES
    assert len({k.name for k in kinds}) == MAX_CLASSES
    # the default 64 classes use every shape and every scheme
    assert {k.shape for k in kinds[:64]} == set(SHAPES)
    assert len({k.scheme.name for k in kinds[:64]}) == len({k.scheme.name for k in kinds})


def test_shapes_differ_under_any_rotation() -> None:
    """Rotation is drawn per image, so two shape families must not coincide at any angle."""
    size = 48
    masks = {
        shape: [shape_mask(shape, Pose(size / 2, size / 2, size * 0.4, angle, 1.0), size) > 0.5
                for angle in np.linspace(0, 2 * math.pi, 36, endpoint=False)]
        for shape in SHAPES
    }
    for shape, rotations in masks.items():
        assert rotations[0].mean() > 0.08, f"{shape} is (almost) empty"
    names = list(SHAPES)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            reference = masks[first][0]
            best = max((reference & m).sum() / (reference | m).sum() for m in masks[second])
            assert best < 0.85, f"{first} and {second} overlap {best:.2f} at some rotation"


# --- training the stand-in -----------------------------------------------------------------------


TINY = StandinRecipe(classes=2, images_per_class=16, steps=20, image_size=32, batch_size=16, held_out_per_class=4,
                     seed=0)


def test_a_tiny_standin_lowers_its_loss_and_saves_a_backbone_of_the_arch(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    card = train_imagenet_standin(TINY, tmp_path / "a", log=lambda line: None)
    assert card["final_loss"] < card["first_loss"]
    assert card["steps"] == 20 and card["images"] == 32 and card["held_out_images"] == 8
    assert card["classes"] == ["red disc", "blue-striped ring"]
    assert 0.0 <= card["held_out_accuracy"] <= 1.0
    assert json.loads((tmp_path / "a" / CARD_FILE).read_text()) == card
    weights = load_ours(tmp_path / "a" / BACKBONE_FILE, "resnet18")  # the downstream loader accepts it
    assert weights.available and "fc.weight" not in weights.state
    assert set(weights.state) == set(timm.create_model("resnet18", num_classes=0).state_dict())
    with pytest.raises(WeightsMismatchError, match="unexpected keys"):
        load_ours(tmp_path / "a" / BACKBONE_FILE, "resnet10t")
    # the same recipe gives the same weights (step counts and seeds, never the clock)
    train_imagenet_standin(TINY, tmp_path / "b", log=lambda line: None)
    first, second = load_file(tmp_path / "a" / BACKBONE_FILE), load_file(tmp_path / "b" / BACKBONE_FILE)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_the_demo_component_builds_the_standin_without_pedestrians(tmp_path: Path) -> None:
    recipe = DemoRecipe(standin_classes=2, standin_images_per_class=4, standin_steps=2)
    logs: list[str] = []
    build_demo_models(tmp_path / "weights", tmp_path / "pedestrians", recipe, half=True,
                      components=[IMAGENET_STANDIN], log=logs.append)
    folder = tmp_path / "weights" / IMAGENET_STANDIN
    assert load_file(folder / BACKBONE_FILE)["conv1.weight"].dtype == torch.float16
    assert load_ours(folder / BACKBONE_FILE, "resnet18").state["conv1.weight"].dtype == torch.float32
    assert json.loads((folder / CARD_FILE).read_text())["recipe"]["seed"] == recipe.seed
    assert not (tmp_path / "pedestrians").exists()  # no pedestrians generated for it
    assert not (tmp_path / "weights" / VERSION_FILE).exists()  # the model folders are not there
    assert any("[imagenet-standin] step 2/2" in line for line in logs)
    assert abs(DemoRecipe().scaled(2, [IMAGENET_STANDIN]).minutes_for([IMAGENET_STANDIN]) - 2) < 0.05
    assert DemoRecipe().scaled(2, [IMAGENET_STANDIN]).clip_steps == DemoRecipe().clip_steps


# --- the downstream `imagenet` init --------------------------------------------------------------


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("standin")
    torch.manual_seed(5)
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), str(root / "standin.safetensors"))
    save_file(timm.create_model("resnet34", num_classes=0).state_dict(), str(root / "resnet34.safetensors"))
    return {"root": root, "standin": root / "standin.safetensors", "wrong": root / "resnet34.safetensors"}


def _config(**fields) -> DownstreamConfig:
    return DownstreamConfig(inits=["imagenet", "random"], train={"arch": "resnet18"}, **fields)


@pytest.mark.parametrize("mode", ["cache", "download"])
def test_the_standin_takes_the_place_of_unavailable_imagenet_weights(
    backbones: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # offline: no download either way
    config = _config(imagenet_weights=mode, imagenet_standin=str(backbones["standin"]))
    init = resolve_inits(config, None, hf_cache_dir=tmp_path / "empty")["imagenet"]
    assert init.available and init.stand_in
    assert init.source == f"stand-in: {backbones['standin']}"
    assert init.digest.startswith("standin-sha256:")
    assert init.reason  # why timm's weights were not used
    expected = load_file(backbones["standin"])
    assert set(init.state) == set(expected)
    assert torch.equal(init.state["layer4.1.conv2.weight"], expected["layer4.1.conv2.weight"])
    assert "stand-in" in imagenet_meta(init) and "in place of timm's ImageNet weights" in imagenet_meta(init)


def test_without_a_standin_imagenet_stays_unavailable(tmp_path: Path) -> None:
    init = resolve_inits(_config(imagenet_weights="cache"), None, hf_cache_dir=tmp_path / "empty")["imagenet"]
    assert not init.available and not init.stand_in and "not in the local" in init.reason
    assert imagenet_meta(init) == "unavailable"


def test_real_imagenet_weights_win_over_the_standin(backbones: dict[str, Path], tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (tmp_path / "hub" / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("abc123")
    reference = timm.create_model("resnet18", num_classes=1000)
    save_file(reference.state_dict(), str(snapshot / "model.safetensors"))
    init = resolve_imagenet("resnet18", "cache", tmp_path / "hub", standin=backbones["standin"])
    assert init.available and not init.stand_in and init.digest.startswith("pretrained:")
    assert torch.equal(init.state["conv1.weight"], reference.state_dict()["conv1.weight"])


def test_a_standin_that_does_not_fit_the_arch_fails_naming_keys(backbones: dict[str, Path], tmp_path: Path) -> None:
    config = _config(imagenet_weights="cache", imagenet_standin=str(backbones["wrong"]))
    with pytest.raises(WeightsMismatchError, match=r"(?s)downstream.imagenet_standin: .*unexpected keys .*layer1\.2\."):
        resolve_inits(config, None, hf_cache_dir=tmp_path / "empty")
    missing = _config(imagenet_weights="cache", imagenet_standin=str(backbones["root"] / "absent.safetensors"))
    with pytest.raises(WeightsUnavailableError, match="downstream.imagenet_standin"):
        resolve_inits(missing, None, hf_cache_dir=tmp_path / "empty")
