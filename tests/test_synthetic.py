"""The procedural Re-ID dataset: layout, determinism, CLI, attributes, and that it is a real
Re-ID task (hand-crafted colour features beat random features by a wide margin)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.datasets import (
    DatasetError,
    ReidDataset,
    SourceConfig,
    SyntheticSpec,
    load_market1501,
    load_source,
)
from core.datasets.synthetic import PALETTE, generate_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^(\d{4}|-1)_c(\d)s1_(\d{6})_00\.jpg$")
SMALL = SyntheticSpec(ids=6, cameras=3, seed=7, images_per_camera=2)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("syn") / "small", SMALL)


def read_attributes(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "attributes.jsonl").read_text().splitlines()]


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_layout_and_names(small_dataset: Path) -> None:
    folders = {"bounding_box_train", "bounding_box_test", "query"}
    assert folders <= {p.name for p in small_dataset.iterdir() if p.is_dir()}
    for folder in folders:
        files = list((small_dataset / folder).iterdir())
        assert files
        for path in files:
            match = NAME.match(path.name)
            assert match, path.name
            assert 1 <= int(match[2]) <= SMALL.cameras
    sample = next((small_dataset / "query").iterdir())
    with Image.open(sample) as image:
        assert (image.format, image.size, image.mode) == ("JPEG", (64, 128), "RGB")
    gallery_names = [p.name for p in (small_dataset / "bounding_box_test").iterdir()]
    assert any(n.startswith("0000_") for n in gallery_names)
    assert any(n.startswith("-1_") for n in gallery_names)


def test_market_adapter_counts(small_dataset: Path) -> None:
    rows = read_attributes(small_dataset)
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    k = SMALL.images_per_camera
    data = load_market1501(small_dataset, source="synthetic")
    assert data.train_identities == list(range(1, SMALL.ids + 1))
    assert len(data.train) == sum(len(r["cameras"]) * k for r in train)
    assert len(data.query) == sum(len(r["cameras"]) for r in test)
    distractors = [r for r in data.gallery if r.distractor]
    assert len(distractors) == 2  # max(2, ids // 10)
    assert len(data.gallery) - len(distractors) == sum(len(r["cameras"]) * k for r in test)
    assert {r.pid for r in data.query} == {r["pid"] for r in test}
    assert all(0 <= r.camid < SMALL.cameras for r in data.train + data.query + data.gallery)
    for row in rows:  # every id in >= 2 cameras, one query per camera for test ids
        assert len(row["cameras"]) >= 2
        split = data.train if row["split"] == "train" else data.query
        assert sorted({r.camid + 1 for r in split if r.pid == row["pid"]}) == row["cameras"]


def test_consecutive_frames_within_camera(small_dataset: Path) -> None:
    data = load_market1501(small_dataset)
    frames = sorted(r.frame for r in data.train if r.pid == 1 and r.camid == data.train[0].camid)
    assert len(frames) == SMALL.images_per_camera and 0 < frames[1] - frames[0] < 20


def test_attributes_jsonl(small_dataset: Path) -> None:
    rows = read_attributes(small_dataset)
    assert [r["pid"] for r in rows] == list(range(1, 2 * SMALL.ids + 1))
    assert {r["split"] for r in rows} == {"train", "test"}
    for row in rows:
        text = row["description"]
        assert text.startswith("a person with")
        for key in ("upper_color", "upper_color2", "lower_color", "shoe_color", "hair_color"):
            if row[key] is not None:
                assert row[key] in text, (key, text)
        assert row["upper_color"] in PALETTE and row["lower_type"] in text
        assert (row["bag"] == "none") == (row["bag_color"] is None)
        if row["bag"] != "none":
            assert f"carrying a {row['bag_color']} {row['bag']}" in text


def test_deterministic(tmp_path: Path) -> None:
    spec = SyntheticSpec(ids=3, cameras=2, seed=11, images_per_camera=2)
    first = tree_digest(generate_synthetic_dataset(tmp_path / "a", spec))
    second = tree_digest(generate_synthetic_dataset(tmp_path / "b", spec))
    assert first == second and len(first) > 10
    reseeded = spec.model_copy(update={"seed": 12})
    other = tree_digest(generate_synthetic_dataset(tmp_path / "c", reseeded))
    assert other != first


def test_refuses_non_empty_out(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate_synthetic_dataset(tmp_path / "out", SMALL)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left over


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "core.datasets.synthetic", "--out", str(out), "--ids", "3",
               "--cameras", "2", "--seed", "5", "--images-per-camera", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "train" in result.stdout and str(out) in result.stdout
    assert "RuntimeWarning" not in result.stderr
    assert load_market1501(out).train_identities == [1, 2, 3]
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "not empty" in again.stderr
    bad_command = command[:4] + ["--cameras", "12"]
    bad = subprocess.run(bad_command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--cameras" in bad.stderr


def test_load_source_generates_once(tmp_path: Path) -> None:
    spec = SyntheticSpec(ids=3, cameras=2, seed=1, images_per_camera=1)
    config = SourceConfig(kind="synthetic", root=tmp_path / "demo", name="demo", generate=spec)
    data = load_source(config)
    assert isinstance(data, ReidDataset) and data.train_identities == [1, 2, 3]
    assert {r.source for r in data.train + data.gallery} == {"demo"}
    marker = tmp_path / "demo" / "synthetic.json"
    stamp = marker.stat().st_mtime_ns
    assert len(load_source(config).train) == len(data.train) and marker.stat().st_mtime_ns == stamp
    reseeded = spec.model_copy(update={"seed": 2})
    changed = SourceConfig(kind="synthetic", root=tmp_path / "demo", generate=reseeded)
    with pytest.raises(DatasetError, match="different|generated with"):
        load_source(changed)


# ---------------------------------------------------------------------------------------------
# It is a Re-ID task: identity cues survive the cameras


def colour_feature(path: str) -> np.ndarray:
    """Joint 4x4x4 RGB histograms of the upper and lower body (central columns), Hellinger.
    Grey-world normalisation first: it undoes most of a camera's brightness and colour cast."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    pixels = pixels / pixels.reshape(-1, 3).mean(axis=0) * 110.0
    pixels = np.clip(pixels[:, 16:48], 0, 255).astype(np.int64) // 64
    codes = pixels[..., 0] * 16 + pixels[..., 1] * 4 + pixels[..., 2]
    regions = ((20, 64), (64, 115))  # rows of the upper and the lower body
    parts = [np.bincount(codes[a:b].ravel(), minlength=64).astype(float) for a, b in regions]
    return np.concatenate([np.sqrt(h / h.sum()) for h in parts])


def market_map(query: np.ndarray, gallery: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray,
               q_cams: np.ndarray, g_cams: np.ndarray) -> float:
    """mAP under the Market protocol (same id + same camera gallery entries removed)."""
    distances = ((query[:, None, :] - gallery[None, :, :]) ** 2).sum(-1)
    aps = []
    for i in range(len(query)):
        keep = ~((g_pids == q_pids[i]) & (g_cams == q_cams[i]))
        matches = g_pids[keep][np.argsort(distances[i][keep], kind="stable")] == q_pids[i]
        if matches.any():
            ranks = np.flatnonzero(matches) + 1
            aps.append(float((np.arange(1, len(ranks) + 1) / ranks).mean()))
    return float(np.mean(aps))


def test_handcrafted_features_beat_random(tmp_path: Path) -> None:
    spec = SyntheticSpec(ids=30, cameras=3, seed=0, images_per_camera=2)
    root = generate_synthetic_dataset(tmp_path / "reid", spec)
    data = load_market1501(root)
    q_pids, g_pids = np.array([r.pid for r in data.query]), np.array([r.pid for r in data.gallery])
    q_cams = np.array([r.camid for r in data.query])
    g_cams = np.array([r.camid for r in data.gallery])
    q_feat = np.stack([colour_feature(r.path) for r in data.query])
    g_feat = np.stack([colour_feature(r.path) for r in data.gallery])
    rng = np.random.default_rng(0)
    q_random, g_random = rng.normal(size=q_feat.shape), rng.normal(size=g_feat.shape)
    random_map = market_map(q_random, g_random, q_pids, g_pids, q_cams, g_cams)
    colour_map = market_map(q_feat, g_feat, q_pids, g_pids, q_cams, g_cams)
    assert random_map < 0.15
    assert colour_map > 0.3 and colour_map > 4 * random_map, (colour_map, random_map)
