"""Identity traits of the procedural world: off, the world is byte for byte what it was; on, the
words (attributes.jsonl, every description) stay the same while the images gain what no caption
names, the same in every camera, so that two identities with equal attributes are told apart by a
pixel-level probe through their traits alone."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.datasets import DatasetError, SourceConfig, SyntheticSpec, load_market1501, load_source
from core.datasets.synthetic import TRAITS_FILE, IdentityTraits, ensure_synthetic_dataset, generate_synthetic_dataset
from core.datasets.synthetic.attributes import (
    IMAGE_HEIGHT, IMAGE_WIDTH, CameraStyle, PersonAttributes, Shot, _ATTRIBUTES, _CAMERA, _IMAGE, _SEQUENCE, _TRAITS,
    _rng, sequence_shots,
)
from core.datasets.synthetic.dataset import plan_identities
from core.datasets.synthetic.domains import DOMAINS
from core.datasets.synthetic.render import print_box, render_image
from core.datasets.synthetic.traits import GLYPH_CELLS, HEAD_RANGE, SHOULDER_RANGE, WAIST_RANGE
from tests.test_synthetic_domains import PINNED_DIGEST, PINNED_FILES, PINNED_SPEC, tree_digest

REPO = Path(__file__).resolve().parents[1]
SMALL = SyntheticSpec(ids=4, cameras=3, seed=7, images_per_camera=2)
TRAITS_ON = SMALL.model_copy(update={"identity_traits": True})


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    base = tmp_path_factory.mktemp("traits")
    return {on: generate_synthetic_dataset(base / str(on), TRAITS_ON if on else SMALL) for on in (False, True)}


def pixels(image: Image.Image | Path) -> np.ndarray:
    if isinstance(image, Path):
        with Image.open(image) as opened:
            return np.asarray(opened.convert("RGB"), dtype=np.float64)
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def standardised(region: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """`region` resized, each channel to zero mean and unit variance (undoes a camera's gain and
    cast), as a unit vector: dot products are correlations."""
    values = pixels(region.resize(size, Image.Resampling.BILINEAR))
    values = (values - values.mean(axis=(0, 1))) / (values.std(axis=(0, 1)) + 1e-6)
    return values.ravel() / np.sqrt(values.size)


def torso(image: Image.Image, person: PersonAttributes, shot: Shot, camera: CameraStyle) -> np.ndarray:
    """The chest and belly, located from what look-alikes share (attributes, pose, camera), never
    from their traits."""
    height = shot.scale * person.height * IMAGE_HEIGHT
    top = shot.feet_y * IMAGE_HEIGHT - height * camera.squash
    half, x = 0.11 * person.width * height, shot.center_x * IMAGE_WIDTH
    box = (x - half, top + 0.17 * height * camera.squash, x + half, top + 0.45 * height * camera.squash)
    return standardised(image.crop(box), (8, 16))


# ---------------------------------------------------------------------------------------------
# Off: the world as it was; the flag is recorded only when on


def test_off_is_the_world_as_it_was(tmp_path: Path, roots: dict[bool, Path]) -> None:
    assert SyntheticSpec().identity_traits is False
    explicit = PINNED_SPEC.model_copy(update={"identity_traits": False})
    assert explicit.model_dump() == PINNED_SPEC.model_dump() == {"ids": 3, "cameras": 3, "seed": 5,
                                                                 "images_per_camera": 2}
    root = generate_synthetic_dataset(tmp_path / "off", explicit)
    assert tree_digest(root) == (PINNED_FILES, PINNED_DIGEST)  # the bytes of the generator before traits
    assert not (roots[False] / TRAITS_FILE).exists()
    assert "identity_traits" not in json.loads((roots[False] / "synthetic.json").read_text())


def test_spec_file_records_the_flag_and_refuses_the_other_value(tmp_path: Path, roots: dict[bool, Path]) -> None:
    assert json.loads((roots[True] / "synthetic.json").read_text())["identity_traits"] is True
    assert TRAITS_ON.model_dump()["identity_traits"] is True
    assert ensure_synthetic_dataset(roots[True], TRAITS_ON) == roots[True]
    with pytest.raises(DatasetError, match="'identity_traits': True"):
        ensure_synthetic_dataset(roots[True], SMALL)
    with pytest.raises(DatasetError, match="'identity_traits': False"):
        ensure_synthetic_dataset(roots[False], TRAITS_ON)
    # A synthetic source turns them on through its `generate` entry.
    spec = {"ids": 2, "cameras": 2, "seed": 1, "images_per_camera": 1, "identity_traits": True}
    data = load_source(SourceConfig(kind="synthetic", root=tmp_path / "source", generate=spec))
    assert data.train_identities == [1, 2] and (tmp_path / "source" / TRAITS_FILE).is_file()


# ---------------------------------------------------------------------------------------------
# On: the same words, other pixels, a traits file


def test_traits_change_the_images_not_the_words(roots: dict[bool, Path]) -> None:
    off, on = roots[False], roots[True]
    assert (on / "attributes.jsonl").read_bytes() == (off / "attributes.jsonl").read_bytes()
    images = sorted(str(p.relative_to(off)) for p in off.rglob("*.jpg"))
    assert images == sorted(str(p.relative_to(on)) for p in on.rglob("*.jpg"))  # same people, cameras, frames
    person_images = [name for name in images if not name.split("/")[-1].startswith("-1_")]  # junk: mostly outside
    differences = [np.abs(pixels(off / name) - pixels(on / name)).mean() for name in person_images]
    assert min(differences) > 0.3 and np.mean(differences) > 1.5, (min(differences), np.mean(differences))
    data = load_market1501(on)
    assert data.train_identities == list(range(1, SMALL.ids + 1)) and data.query


def test_traits_file(roots: dict[bool, Path]) -> None:
    rows = [json.loads(line) for line in (roots[True] / TRAITS_FILE).read_text().splitlines()]
    assert [row["pid"] for row in rows] == list(range(1, 2 * SMALL.ids + 1))
    planned = {plan.pid: plan.traits for plan in plan_identities(TRAITS_ON)}
    assert all(row == json.loads(json.dumps({"pid": row["pid"], **planned[row["pid"]].to_json()})) for row in rows)
    for row in rows:
        glyph = row["logo"]["glyph"]
        assert len(glyph) == GLYPH_CELLS and all(len(line) == GLYPH_CELLS and set(line) <= {"0", "1"} for line in glyph)
        shape = row["shape"]
        for value, (low, high) in ((shape["shoulders"], SHOULDER_RANGE), (shape["head"], HEAD_RANGE),
                                   (shape["waist"], WAIST_RANGE)):
            assert low <= value <= high
    assert len({tuple(row["logo"]["glyph"]) for row in rows}) == len(rows)
    # An identity's traits come from its own stream: the same with more identities after it.
    more = {plan.pid: plan.traits for plan in plan_identities(TRAITS_ON.model_copy(update={"ids": 6}))}
    assert all(more[pid] == traits for pid, traits in planned.items())
    assert all(plan.traits is None for plan in plan_identities(SMALL))


def test_cli_identity_traits(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "core.datasets.synthetic", "--out", str(out), "--ids", "2", "--cameras", "2",
               "--images-per-camera", "1", "--identity-traits"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "synthetic.json").read_text())["identity_traits"] is True
    assert len((out / TRAITS_FILE).read_text().splitlines()) == 4
    help_text = subprocess.run(command[:3] + ["--help"], cwd=REPO, capture_output=True, text=True, timeout=120).stdout
    assert "--identity-traits" in help_text


# ---------------------------------------------------------------------------------------------
# Look-alikes: equal attributes, told apart by their traits across cameras


def look_alike_images(domain: str, seed: int = 11, pairs: int = 6, cameras: int = 4) -> list[list[tuple]]:
    """Per pair of look-alikes (one `PersonAttributes`, the traits of two identities): every image
    as (identity 0/1, camera, shot, camera style, image, attributes, both traits), `cameras` cameras
    x 2 frames each, JPEG-compressed as the dataset writes them."""
    styles = [CameraStyle.sample(_rng(seed, _CAMERA, c), DOMAINS.get(domain)) for c in range(cameras)]
    found = []
    for pair in range(pairs):
        person = PersonAttributes.sample(_rng(seed, _ATTRIBUTES, pair))
        twins = [IdentityTraits.sample(_rng(seed, _TRAITS, 100 + 2 * pair + k), person) for k in range(2)]
        images = []
        for k, traits in enumerate(twins):
            for c, style in enumerate(styles):
                for f, shot in enumerate(sequence_shots(style, _rng(seed, _SEQUENCE, pair, k, c), 2)):
                    image = render_image(person, style, shot, _rng(seed, _IMAGE, pair, k, c, f), traits)
                    images.append((k, c, shot, style, jpeg(image, style.jpeg_quality), person, twins))
        found.append(images)
    return found


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_without_traits_look_alikes_are_pixel_twins() -> None:
    """The control: with equal attributes and no traits, nothing else separates two identities."""
    style = CameraStyle.sample(_rng(3, _CAMERA, 0))
    person = PersonAttributes.sample(_rng(3, _ATTRIBUTES, 0))
    shot = sequence_shots(style, _rng(3, _SEQUENCE, 0), 1)[0]
    first, second = (render_image(person, style, shot, _rng(3, _IMAGE, 0)) for _ in range(2))
    assert np.array_equal(pixels(first), pixels(second))
    traits = [IdentityTraits.sample(_rng(3, _TRAITS, key), person) for key in (1, 2)]
    assert not np.array_equal(*(pixels(render_image(person, style, shot, _rng(3, _IMAGE, 0), t)) for t in traits))


@pytest.mark.parametrize("domain", ["campus", "station"])  # station: a 64x32 sensor, blur, low contrast, JPEG 40-70
def test_torso_probe_tells_look_alikes_apart_across_cameras(domain: str) -> None:
    """Nearest neighbour by torso correlation, among the other cameras' images of the query's
    identity and its look-alike, finds the query's own identity far above chance (measured
    0.78-0.88; chance about 0.45), and own images correlate clearly more than the look-alike's."""
    hits, own, other = [], [], []
    for images in look_alike_images(domain):
        features = [torso(image, person, shot, style) for _, _, shot, style, image, person, _ in images]
        for q, (identity, camera, *_) in enumerate(images):
            candidates = [g for g, item in enumerate(images) if item[1] != camera]
            best = max(candidates, key=lambda g: features[q] @ features[g])
            hits.append(images[best][0] == identity)
            for g in candidates:
                (own if images[g][0] == identity else other).append(features[q] @ features[g])
    accuracy = float(np.mean(hits))
    assert accuracy > 0.7 and np.mean(own) > np.mean(other) + 0.15, (accuracy, np.mean(own), np.mean(other))


def test_print_is_the_same_in_every_camera() -> None:
    """The print region (where `print_box` says it is) of one identity correlates across cameras
    and frames (front and back views, where it faces the camera); its look-alike's images hold
    nothing like it there. Prints are at least 8 px a side in the 128x64 campus crop."""
    own, other, sides = [], [], []
    for images in look_alike_images("campus", pairs=4):
        fronts = [item for item in images if item[2].view != "side"]
        for identity, camera, shot, style, image, person, twins in fronts:
            box = print_box(person, twins[identity], shot, style)
            sides.append(min(box[2] - box[0], box[3] - box[1]))
            mine = standardised(image.crop(box), (10, 10))
            for other_identity, other_camera, other_shot, other_style, other_image, *_ in fronts:
                if other_camera != camera:
                    there = standardised(other_image.crop(print_box(person, twins[identity], other_shot, other_style)),
                                         (10, 10))
                    (own if other_identity == identity else other).append(mine @ there)
    assert min(sides) >= 8.0, min(sides)
    assert np.mean(own) > 0.5 and np.mean(other) < 0.25, (np.mean(own), np.mean(other))


def test_traits_follow_the_body() -> None:
    """Proportions move what they should: broader shoulders widen the shirt, a lower waist
    lengthens it (and shortens the legs: the feet stay), and the print sits where `print_box` says."""
    style = replace(CameraStyle.sample(_rng(5, _CAMERA, 0)), blur=0.0, brightness=1.0, cast=(1.0, 1.0, 1.0))
    person = replace(PersonAttributes.sample(_rng(5, _ATTRIBUTES, 0)), upper_pattern="solid", upper_color2=None,
                     upper_color="white", bag="none", bag_color=None, lower_type="trousers", lower_color="navy")
    shot = replace(sequence_shots(style, _rng(5, _SEQUENCE, 0), 1)[0], view="front", center_x=0.5)
    base = IdentityTraits.sample(_rng(5, _TRAITS, 1), person)

    def shirt(shape: dict[str, float]) -> tuple[float, int]:
        """(median width, lowest row) of the white shirt, without the print."""
        logo = replace(base.logo, color=(238, 238, 235))
        traits = replace(base, shape=replace(base.shape, **shape), logo=logo)
        white = pixels(render_image(person, style, shot, _rng(5, _IMAGE, 0), traits)).min(axis=-1) > 200
        per_row = white.sum(axis=1)
        return float(np.median(per_row[per_row > 0])), int(np.flatnonzero(per_row).max())

    (narrow, _), (broad, _) = (shirt({"shoulders": s}) for s in SHOULDER_RANGE)
    (_, high), (_, low) = (shirt({"waist": w}) for w in WAIST_RANGE)
    assert broad > narrow + 2 and low > high + 3, (narrow, broad, high, low)
    image = render_image(person, style, shot, _rng(5, _IMAGE, 0), base)
    x0, y0, x1, y1 = (round(v) for v in print_box(person, base, shot, style))
    inside = pixels(image)[y0:y1, x0:x1]
    printed = np.abs(inside - np.array(base.logo.color)).sum(axis=-1) < 90
    assert 0.2 < printed.mean() < 0.8, printed.mean()  # the glyph's cells, between cells the white shirt
