"""Planning the identities of a spec and writing them in the Market-1501 layout."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from core.datasets.base import DatasetError
from core.datasets.config import SyntheticSpec
from core.datasets.market import MARKET_SPLIT_DIRS
from core.datasets.synthetic.attributes import (
    ATTRIBUTES_FILE, CameraStyle, MAX_PID, PersonAttributes, SPEC_FILE, Shot, _ATTRIBUTES, _CAMERA, _EXTRA,
    _IMAGE, _SEQUENCE, _SPLIT, _TRAITS, _rng, sequence_shots,
)
from core.datasets.synthetic.domains import DOMAINS
from core.datasets.synthetic.render import render_image
from core.datasets.synthetic.traits import TRAITS_FILE, IdentityTraits


@dataclass(frozen=True)
class IdentityPlan:
    """Which cameras one identity walks through."""

    pid: int
    split: str  # "train" or "test"
    cameras: tuple[int, ...]  # 0-based
    attributes: PersonAttributes
    traits: IdentityTraits | None = None  # what no caption names; None where the spec turns traits off


@dataclass(frozen=True)
class PlannedImage:
    """One file to write: where, and what it shows."""

    folder: str
    filename: str
    person: PersonAttributes | None
    camera: int
    shot: Shot
    seed_keys: tuple[int, ...]
    traits: IdentityTraits | None = None


def _traits(spec: SyntheticSpec, key: int, person: PersonAttributes) -> IdentityTraits | None:
    """The traits of the person drawn under `key` (a pid, or an extra image's key), from a stream
    of their own: whether the spec turns them on changes no other draw."""
    return IdentityTraits.sample(_rng(spec.seed, _TRAITS, key), person) if spec.identity_traits else None


def plan_identities(spec: SyntheticSpec) -> list[IdentityPlan]:
    """Train ids 1..N and test ids N+1..2N; each appears in a random subset of >= 2 cameras.
    Clothing signatures are unique so no two identities are indistinguishable twins (with identity
    traits on, equal signatures would still differ; they stay unique so the words do not change)."""
    plans: list[IdentityPlan] = []
    seen: set[tuple[str | None, ...]] = set()
    for pid in range(1, 2 * spec.ids + 1):
        rng = _rng(spec.seed, _ATTRIBUTES, pid)
        attributes = PersonAttributes.sample(rng)
        for _ in range(50):  # resample a twin; the bound only matters for absurd id counts
            if attributes.signature not in seen:
                break
            attributes = PersonAttributes.sample(rng)
        seen.add(attributes.signature)
        split_rng = _rng(spec.seed, _SPLIT, pid)
        count = int(split_rng.integers(2, spec.cameras + 1))
        chosen = split_rng.choice(spec.cameras, size=count, replace=False)
        cameras = tuple(sorted(int(c) for c in chosen))
        split = "train" if pid <= spec.ids else "test"
        plans.append(IdentityPlan(pid, split, cameras, attributes, _traits(spec, pid, attributes)))
    return plans


def _market_name(pid: int, camera: int, frame: int) -> str:
    pid_text = f"{pid:04d}" if pid >= 0 else str(pid)  # junk is `-1_...`, not `-001_...`
    return f"{pid_text}_c{camera + 1}s1_{frame:06d}_00.jpg"


def _identity_images(
    plan: IdentityPlan, spec: SyntheticSpec, cameras: list[CameraStyle]
) -> Iterator[PlannedImage]:
    """Train ids: `images_per_camera` consecutive frames per camera. Test ids: one more frame per
    camera, one of which goes to query, so every query has gallery matches in other cameras."""
    frames = spec.images_per_camera + (1 if plan.split == "test" else 0)
    for camera in plan.cameras:
        rng = _rng(spec.seed, _SEQUENCE, plan.pid, camera)
        start, step = int(rng.integers(1, 90000)), int(rng.integers(3, 13))
        query_index = int(rng.integers(frames)) if plan.split == "test" else -1
        for k, shot in enumerate(sequence_shots(cameras[camera], rng, frames)):
            split = "query" if k == query_index else "train" if plan.split == "train" else "gallery"
            folder = MARKET_SPLIT_DIRS[split]
            name = _market_name(plan.pid, camera, start + k * step)
            yield PlannedImage(folder, name, plan.attributes, camera, shot, (plan.pid, camera, k), plan.traits)


def _extra_images(spec: SyntheticSpec, cameras: list[CameraStyle]) -> Iterator[PlannedImage]:
    """Distractors (0000: strangers) and junk (-1: a person mostly outside the crop) in the
    gallery, so the distractor and junk conventions of every reader get exercised."""
    gallery = MARKET_SPLIT_DIRS["gallery"]
    distractors, junk = max(2, spec.ids // 10), max(2, spec.ids // 20)
    for i in range(distractors + junk):
        rng = _rng(spec.seed, _EXTRA, i)
        camera = int(rng.integers(spec.cameras))
        shot = sequence_shots(cameras[camera], rng, 1)[0]
        pid = 0 if i < distractors else -1
        if pid < 0:  # a bad detection: the body axis sits at the crop's border
            shot = Shot(**{**asdict(shot), "center_x": float(rng.choice((-0.1, 1.1)))})
        name = _market_name(pid, camera, 100000 + i * 10)
        keys = (MAX_PID + 1 + i, camera, 0)  # clear of every identity's image keys
        person = PersonAttributes.sample(rng)
        # strangers have traits too, so a print does not tell an identity from a distractor
        yield PlannedImage(gallery, name, person, camera, shot, keys, _traits(spec, keys[0], person))


def _cameras(spec: SyntheticSpec) -> list[CameraStyle]:
    domain = DOMAINS.get(spec.domain)
    return [CameraStyle.sample(_rng(spec.seed, _CAMERA, c), domain) for c in range(spec.cameras)]


def planned_identity_images(spec: SyntheticSpec) -> list[PlannedImage]:
    """Every identity image the spec's dataset holds (distractors and junk left out), with what it
    shows: the world's own labels of each file (its view, camera, person), for corpora and probes."""
    cameras = _cameras(spec)
    return [image for plan in plan_identities(spec) for image in _identity_images(plan, spec, cameras)]


def _write_images(out: Path, spec: SyntheticSpec, plans: list[IdentityPlan]) -> None:
    cameras = _cameras(spec)
    for folder in MARKET_SPLIT_DIRS.values():
        (out / folder).mkdir(parents=True, exist_ok=True)
    images = [image for plan in plans for image in _identity_images(plan, spec, cameras)]
    for item in images + list(_extra_images(spec, cameras)):
        style = cameras[item.camera]
        rng = _rng(spec.seed, _IMAGE, *item.seed_keys)
        image = render_image(item.person, style, item.shot, rng, item.traits)
        image.save(out / item.folder / item.filename, "JPEG", quality=style.jpeg_quality)


def _write_attributes(out: Path, plans: list[IdentityPlan]) -> None:
    with (out / ATTRIBUTES_FILE).open("w", encoding="utf-8") as handle:
        for plan in plans:
            row = {
                "pid": plan.pid,
                "split": plan.split,
                "description": plan.attributes.describe(),
                **asdict(plan.attributes),
                "cameras": [c + 1 for c in plan.cameras],
            }
            handle.write(json.dumps(row) + "\n")


def _write_traits(out: Path, plans: list[IdentityPlan]) -> None:
    """Per pid, the trait parameters (for probes and tests; no caption names them)."""
    with (out / TRAITS_FILE).open("w", encoding="utf-8") as handle:
        for plan in plans:
            if plan.traits is not None:
                handle.write(json.dumps({"pid": plan.pid, **plan.traits.to_json()}) + "\n")


def _is_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def generate_synthetic_dataset(out: Path, spec: SyntheticSpec) -> Path:
    """Write the dataset of `spec` to `out` (absent or empty) and return `out`.

    Files are written to a hidden sibling folder and renamed into place, so a crash or a
    concurrent generator never leaves a half-written dataset that looks complete.
    """
    out = Path(out)
    if 2 * spec.ids > MAX_PID:
        raise DatasetError(
            f"synthetic ids={spec.ids}: Market names allow at most {MAX_PID // 2} ids per split"
        )
    if not _is_empty(out):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        plans = plan_identities(spec)
        _write_images(staging, spec, plans)
        _write_attributes(staging, plans)
        if spec.identity_traits:
            _write_traits(staging, plans)
        (staging / SPEC_FILE).write_text(json.dumps(spec.model_dump(), sort_keys=True) + "\n")
        try:
            os.replace(staging, out)  # onto an absent or empty directory: atomic
        except OSError:
            if _is_empty(out):
                raise
            # another process generated the same folder first; keep theirs
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def ensure_synthetic_dataset(root: Path, spec: SyntheticSpec) -> Path:
    """Generate the dataset into `root` unless it is already there; refuse a folder generated
    from a different spec rather than silently reading other data."""
    root = Path(root)
    if _is_empty(root):
        return generate_synthetic_dataset(root, spec)
    spec_file = root / SPEC_FILE
    if spec_file.is_file():
        # A folder written before a field existed was generated as that field's default does (the
        # default domain draws what the generator drew before domains): a missing key reads as it.
        defaults = {name: field.default for name, field in SyntheticSpec.model_fields.items()}
        found = {**defaults, **json.loads(spec_file.read_text())}
        wanted = {**defaults, **spec.model_dump()}  # the defaults of earlier worlds are left out of dumps
        if found != wanted:
            raise DatasetError(
                f"{root} holds a synthetic dataset generated with {found}, but the config asks for "
                f"{wanted}; delete the folder or point 'root' elsewhere"
            )
    return root
