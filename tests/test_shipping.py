"""Model folders that exist only on the driver reach actors on other nodes through Ray's object
store (`factory.models.shipping`): used in place where the same folder is visible, unpacked once
into the node's cache where it is not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import ray

from factory.models.shipping import ModelFolders, folder_fingerprint


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=1, include_dashboard=False)
    yield
    if started:
        ray.shutdown()


def _model(root: Path) -> Path:
    folder = root / "tiny-sd"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 64)
    return folder


def test_a_local_folder_is_used_in_place_where_visible_and_unpacked_where_not(
    local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "node-cache"))
    folder = _model(tmp_path / "driver")
    files = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    folders = ModelFolders.ship([str(folder), "CompVis/stable-diffusion-v1-4", "s3://bucket/models/blip2"])
    assert list(folders.packed) == [str(folder)]  # hub ids and URIs resolve on each node themselves
    assert folders.open("CompVis/stable-diffusion-v1-4") == "CompVis/stable-diffusion-v1-4"
    assert folders.open(str(folder)) == str(folder)  # this node sees the very folder

    shutil.rmtree(folder)  # as on a node that does not share the driver's filesystem
    opened = Path(folders.open(str(folder)))
    assert opened.is_relative_to(tmp_path / "node-cache" / "reid-factory" / "models")
    assert {p.relative_to(opened): p.read_bytes() for p in opened.rglob("*") if p.is_file()} == files
    stamp = folder_fingerprint(opened)
    assert Path(folders.open(str(folder))) == opened and folder_fingerprint(opened) == stamp  # once per node
