"""A procedural Re-ID dataset in the exact Market-1501 layout (no downloads, deterministic).

Identity lives in attributes sampled per pid (clothing colours and patterns, lower-body type,
shoes, hair, build, carried item); cameras change what an identity looks like (background, light,
colour cast, scale, position, viewpoint, blur, JPEG quality), and consecutive frames of one camera
differ a little (walking pose, position). So matching across cameras needs the identity cues and
ignores the camera ones: a real, if small, Re-ID task.

Output under `out`::

    bounding_box_train/0001_c1s1_000123_00.jpg   train ids 1..N, `images_per_camera` frames/camera
    query/                                       test ids N+1..2N, one image per camera it is in
    bounding_box_test/                           the other test images, plus distractors (0000_*)
                                                 and junk (-1_*) to exercise the conventions
    attributes.jsonl                             per pid: attributes and an English description
    synthetic.json                               the spec that produced the folder

Images are 128x64 (H x W) JPEGs. Every random choice comes from a generator seeded by
(seed, stream, keys...), so the same spec gives byte-identical files, and an identity's
attributes do not depend on how many identities come after it.

CLI: `python -m core.datasets.synthetic --out DIR --ids N --cameras C --seed S`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pydantic import ValidationError

from core.datasets.base import DatasetError
from core.datasets.config import SyntheticSpec
from core.datasets.market import MARKET_SPLIT_DIRS, load_market1501

RGB = tuple[int, int, int]
Point = tuple[float, float]  # (x, y) in person units, see `_Pen`

IMAGE_HEIGHT, IMAGE_WIDTH = 128, 64
SUPERSAMPLE = 2  # draw at 2x and box-downsample: cheap anti-aliasing
ATTRIBUTES_FILE = "attributes.jsonl"
SPEC_FILE = "synthetic.json"
MAX_PID = 9999  # Market names carry 4 pid digits

PALETTE: dict[str, RGB] = {
    "red": (200, 30, 35),
    "blue": (40, 90, 210),
    "green": (40, 150, 60),
    "yellow": (235, 210, 50),
    "black": (25, 25, 28),
    "white": (238, 238, 235),
    "grey": (130, 130, 130),
    "orange": (240, 130, 30),
    "purple": (130, 50, 160),
    "pink": (240, 150, 190),
    "brown": (115, 70, 35),
    "navy": (20, 30, 95),
}
HAIR_COLORS: dict[str, RGB] = {
    "black": (20, 18, 18),
    "brown": (95, 60, 30),
    "blonde": (220, 190, 110),
    "grey": (160, 160, 160),
    "red": (160, 60, 25),
}
SKIN_TONES: dict[str, RGB] = {
    "light": (240, 205, 180),
    "fair": (225, 180, 145),
    "tan": (195, 145, 105),
    "brown": (145, 100, 65),
    "dark": (95, 65, 45),
}
UPPER_PATTERNS = ("solid", "horizontal stripes", "vertical stripes", "checks", "two-tone")
UPPER_PATTERN_WEIGHTS = (0.4, 0.15, 0.15, 0.15, 0.15)
LOWER_TYPES = ("trousers", "shorts", "skirt")
LOWER_TYPE_WEIGHTS = (0.6, 0.2, 0.2)
BAGS = ("none", "backpack", "handbag", "shoulder bag")
BAG_WEIGHTS = (0.4, 0.25, 0.175, 0.175)
VIEWS = ("front", "back", "side")
TEXTURES = ("plain", "panels", "tiles", "noise")

# Independent random streams: (seed, stream, keys...) seeds one generator per decision group.
_ATTRIBUTES, _CAMERA, _SEQUENCE, _IMAGE, _SPLIT, _EXTRA = range(1, 7)


def _rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    # SeedSequence entropy must be non-negative; fold negative seeds into that range.
    return np.random.default_rng([seed % 2**64, stream, *keys])


def _choice(
    rng: np.random.Generator, options: Sequence[str], weights: Sequence[float] | None = None
) -> str:
    p = None if weights is None else np.asarray(weights) / sum(weights)
    index = rng.choice(len(options), p=p)
    return options[int(index)]


# --------------------------------------------------------------------------------------------
# What an identity is, and what a camera does to it


@dataclass(frozen=True)
class PersonAttributes:
    """The appearance that defines one identity; colour fields are names from the palettes."""

    upper_color: str
    upper_pattern: str
    upper_color2: str | None  # second colour of patterned tops, None when solid
    lower_color: str
    lower_type: str
    shoe_color: str
    skin_tone: str
    hair_color: str
    hair_length: str
    height: float  # factor on the camera's person height
    width: float  # factor on body widths
    bag: str
    bag_color: str | None

    @classmethod
    def sample(cls, rng: np.random.Generator) -> PersonAttributes:
        colors = list(PALETTE)
        upper = _choice(rng, colors)
        pattern = _choice(rng, UPPER_PATTERNS, UPPER_PATTERN_WEIGHTS)
        second = _choice(rng, [c for c in colors if c != upper]) if pattern != "solid" else None
        bag = _choice(rng, BAGS, BAG_WEIGHTS)
        return cls(
            upper_color=upper,
            upper_pattern=pattern,
            upper_color2=second,
            lower_color=_choice(rng, colors),
            lower_type=_choice(rng, LOWER_TYPES, LOWER_TYPE_WEIGHTS),
            shoe_color=_choice(rng, colors),
            skin_tone=_choice(rng, list(SKIN_TONES)),
            hair_color=_choice(rng, list(HAIR_COLORS)),
            hair_length=_choice(rng, ("short", "long"), (0.6, 0.4)),
            height=round(float(rng.uniform(0.86, 1.0)), 3),
            width=round(float(rng.uniform(0.85, 1.2)), 3),
            bag=bag,
            bag_color=_choice(rng, colors) if bag != "none" else None,
        )

    @property
    def signature(self) -> tuple[str | None, ...]:
        """The clothing that tells identities apart at a glance; kept unique per dataset."""
        return (
            self.upper_color,
            self.upper_pattern,
            self.upper_color2,
            self.lower_color,
            self.lower_type,
        )

    def describe(self) -> str:
        """Plain English naming the colour of every visible attribute (training text for the
        demo text-to-image and captioning models)."""
        if self.upper_pattern == "solid":
            top = f"a {self.upper_color} shirt"
        else:
            kind = {
                "horizontal stripes": "horizontally striped",
                "vertical stripes": "vertically striped",
                "checks": "checked",
                "two-tone": "two-tone",
            }[self.upper_pattern]
            top = f"a {self.upper_color} and {self.upper_color2} {kind} shirt"
        bottom = f"{self.lower_color} {self.lower_type}"
        if self.lower_type == "skirt":
            bottom = f"a {bottom}"
        text = (
            f"a person with {self.hair_length} {self.hair_color} hair wearing {top}, {bottom} "
            f"and {self.shoe_color} shoes"
        )
        if self.bag != "none":
            text += f", carrying a {self.bag_color} {self.bag}"
        return text


@dataclass(frozen=True)
class CameraStyle:
    """What one camera does to every image it takes."""

    wall_top: RGB
    wall_bottom: RGB
    floor: RGB
    horizon: float  # fraction of the image height where the floor starts
    texture: str
    brightness: float
    cast: tuple[float, float, float]  # per-channel gain: colour temperature of the light
    person_scale: float  # person height as a fraction of the image height
    offset: float  # horizontal offset of the walking lane, fraction of the width
    blur: float  # Gaussian radius in output pixels
    jpeg_quality: int
    view_weights: tuple[float, float, float]  # front, back, side

    @classmethod
    def sample(cls, rng: np.random.Generator) -> CameraStyle:
        def color(low: int, high: int) -> RGB:
            r, g, b = rng.integers(low, high, size=3)
            return int(r), int(g), int(b)

        front, back, side = (round(float(w), 3) for w in rng.dirichlet((1.5, 1.5, 1.5)) * 0.7 + 0.1)
        r, g, b = (round(float(x), 3) for x in rng.uniform(0.88, 1.12, size=3))
        return cls(
            wall_top=color(50, 210),
            wall_bottom=color(50, 210),
            floor=color(40, 180),
            horizon=round(float(rng.uniform(0.55, 0.8)), 3),
            texture=_choice(rng, TEXTURES),
            brightness=round(float(rng.uniform(0.78, 1.18)), 3),
            cast=(r, g, b),
            person_scale=round(float(rng.uniform(0.78, 0.92)), 3),
            offset=round(float(rng.uniform(-0.06, 0.06)), 3),
            blur=round(float(rng.uniform(0.0, 0.9)), 3),
            jpeg_quality=int(rng.integers(60, 93)),
            view_weights=(front, back, side),
        )


@dataclass(frozen=True)
class Shot:
    """Pose and framing of one image."""

    view: str
    facing: int  # +1 or -1: mirrors the person (side views walk left or right)
    phase: float  # walking cycle, radians
    center_x: float  # body axis, fraction of the width
    feet_y: float  # feet line, fraction of the height
    scale: float  # person height, fraction of the image height (before the build factor)
    light: float  # per-image brightness jitter
    shift: int  # background texture shift in pixels (the scene is not pixel-identical)


def sequence_shots(camera: CameraStyle, rng: np.random.Generator, frames: int) -> list[Shot]:
    """Consecutive frames of one identity walking through one camera: the view and lane stay,
    the walking phase advances and the position drifts a little."""
    view = _choice(rng, VIEWS, camera.view_weights)
    facing = int(rng.choice((-1, 1)))
    phase = float(rng.uniform(0, 2 * math.pi))
    step = float(rng.uniform(0.9, 1.6))
    center = 0.5 + camera.offset + float(rng.uniform(-0.05, 0.05))
    scale = camera.person_scale * float(rng.uniform(0.95, 1.05))
    shots = []
    for k in range(frames):
        shots.append(
            Shot(
                view=view,
                facing=facing,
                phase=phase + k * step,
                center_x=center + float(rng.uniform(-0.025, 0.025)),
                feet_y=float(rng.uniform(0.955, 0.985)),
                scale=min(scale * float(rng.uniform(0.97, 1.03)), 0.94),
                light=float(rng.uniform(0.94, 1.06)),
                shift=int(rng.integers(-6, 7)),
            )
        )
    return shots


# --------------------------------------------------------------------------------------------
# Rendering


@lru_cache(maxsize=64)
def _camera_background(camera: CameraStyle) -> np.ndarray:
    """The camera's empty scene at drawing resolution (float32 HxWx3), cached per camera."""
    height, width = IMAGE_HEIGHT * SUPERSAMPLE, IMAGE_WIDTH * SUPERSAMPLE
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    top, bottom = np.array(camera.wall_top, np.float32), np.array(camera.wall_bottom, np.float32)
    wall = (1 - t) * top + t * bottom
    image = np.broadcast_to(wall, (height, width, 3)).copy()
    horizon = int(camera.horizon * height)
    image[horizon:] = np.array(camera.floor, np.float32)
    ys, xs = np.mgrid[0:height, 0:width]
    if camera.texture == "panels":  # shop fronts / pillars on the wall
        image[:horizon][(xs[:horizon] // 22) % 2 == 0] *= 0.8
    elif camera.texture == "tiles":  # floor tiles
        lines = ((ys[horizon:] % 18) < 2) | ((xs[horizon:] % 26) < 2)
        image[horizon:][lines] *= 0.7
    elif camera.texture == "noise":  # gravel, foliage
        grain = np.random.default_rng([*camera.wall_top, *camera.floor])
        image += grain.normal(0.0, 14.0, size=(height, width, 1)).astype(np.float32)
    return np.clip(image, 0, 255)


class _Pen:
    """Draws in person units: x along the body axis times `facing`, y down from the top of the
    head, both as fractions of the person's height, so one drawing serves every size and the
    mirrored side view."""

    def __init__(
        self, draw: ImageDraw.ImageDraw, center_x: float, top: float, height: float, facing: int
    ) -> None:
        self.draw, self.cx, self.top, self.h, self.facing = draw, center_x, top, height, facing

    def xy(self, dx: float, dy: float) -> Point:
        return self.cx + self.facing * dx * self.h, self.top + dy * self.h

    def rect(self, dx0: float, dy0: float, dx1: float, dy1: float, fill: RGB) -> None:
        (x0, y0), (x1, y1) = self.xy(dx0, dy0), self.xy(dx1, dy1)
        self.draw.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), fill=fill)

    def ellipse(self, dx: float, dy: float, rx: float, ry: float, fill: RGB) -> None:
        (x0, y0), (x1, y1) = self.xy(dx - rx, dy - ry), self.xy(dx + rx, dy + ry)
        self.draw.ellipse((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), fill=fill)

    def polygon(self, points: Sequence[Point], fill: RGB) -> None:
        self.draw.polygon([self.xy(dx, dy) for dx, dy in points], fill=fill)

    def limb(self, start: Point, end: Point, width: float, fill: RGB) -> None:
        """A straight limb of `width` (person units) from `start` to `end`."""
        (ax, ay), (bx, by) = start, end
        length = math.hypot(bx - ax, by - ay) or 1.0
        nx, ny = -(by - ay) / length * width / 2, (bx - ax) / length * width / 2
        corners = [(ax + nx, ay + ny), (bx + nx, by + ny), (bx - nx, by - ny), (ax - nx, ay - ny)]
        self.polygon(corners, fill)


def _lerp(a: Point, b: Point, t: float) -> Point:
    return a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t


def _draw_top(pen: _Pen, person: PersonAttributes, half_width: float) -> None:
    """The torso with its pattern, clipped to the torso box."""
    x0, x1, y0, y1 = -half_width, half_width, 0.15, 0.52
    first = PALETTE[person.upper_color]
    second = PALETTE[person.upper_color2] if person.upper_color2 else first
    pen.rect(x0, y0, x1, y1, first)
    pattern = person.upper_pattern
    if pattern == "two-tone":
        pen.rect(x0, (y0 + y1) / 2, x1, y1, second)
    if pattern == "horizontal stripes":
        for i, y in enumerate(np.arange(y0, y1, 0.025)):
            if i % 2:
                pen.rect(x0, y, x1, min(y + 0.025, y1), second)
    if pattern == "vertical stripes":
        for i, x in enumerate(np.arange(x0, x1, 0.025)):
            if i % 2:
                pen.rect(x, y0, min(x + 0.025, x1), y1, second)
    if pattern == "checks":
        cell = 0.035
        for i, y in enumerate(np.arange(y0, y1, cell)):
            for j, x in enumerate(np.arange(x0, x1, cell)):
                if (i + j) % 2:
                    pen.rect(x, y, min(x + cell, x1), min(y + cell, y1), second)


def _draw_legs(pen: _Pen, person: PersonAttributes, shot: Shot, half_width: float) -> None:
    """Legs (walking), shoes and the lower garment."""
    skin, lower = SKIN_TONES[person.skin_tone], PALETTE[person.lower_color]
    shoes = PALETTE[person.shoe_color]
    width = 0.085 * person.width
    swing = math.sin(shot.phase)
    if shot.view == "side":
        angle = 0.38 * swing
        legs = [
            ((0.0, 0.5), (0.465 * math.sin(a), 0.5 + 0.465 * math.cos(a))) for a in (angle, -angle)
        ]
    else:  # front/back: the stepping foot lifts a little
        spread = 0.055 * person.width
        legs = [
            ((-spread, 0.5), (-spread * 1.1, 0.965 - 0.03 * max(0.0, swing))),
            ((spread, 0.5), (spread * 1.1, 0.965 - 0.03 * max(0.0, -swing))),
        ]
    for hip, foot in legs:
        if person.lower_type == "trousers":
            pen.limb(hip, foot, width, lower)
        else:
            pen.limb(hip, foot, width * 0.85, skin)
            if person.lower_type == "shorts":
                pen.limb(hip, _lerp(hip, foot, 0.42), width * 1.05, lower)
        toe = 0.05 if shot.view == "side" else 0.0  # shoes point where the person walks
        pen.rect(foot[0] - 0.04, foot[1] - 0.012, foot[0] + 0.04 + toe, foot[1] + 0.03, shoes)
    if person.lower_type == "skirt":
        flare = 1.35 if shot.view != "side" else 1.6
        waist, hem = half_width * 0.95, half_width * flare
        pen.polygon([(-waist, 0.49), (waist, 0.49), (hem, 0.73), (-hem, 0.73)], lower)


def _draw_head(pen: _Pen, person: PersonAttributes, view: str) -> None:
    skin, hair = SKIN_TONES[person.skin_tone], HAIR_COLORS[person.hair_color]
    pen.rect(-0.025, 0.12, 0.025, 0.16, skin)  # neck
    if view == "back":
        pen.ellipse(0.0, 0.075, 0.056, 0.068, hair)
        if person.hair_length == "long":
            pen.rect(-0.06, 0.07, 0.06, 0.25, hair)
    elif view == "front":
        pen.ellipse(0.0, 0.07, 0.058, 0.068, hair)
        pen.ellipse(0.0, 0.088, 0.05, 0.056, skin)
    else:
        pen.ellipse(-0.008, 0.07, 0.056, 0.066, hair)
        pen.ellipse(0.014, 0.088, 0.046, 0.054, skin)


def _draw_arms(pen: _Pen, person: PersonAttributes, shot: Shot, half_width: float) -> Point:
    """Sleeves and hands; returns the carrying hand's position (handbags hang from it)."""
    sleeve, skin = PALETTE[person.upper_color], SKIN_TONES[person.skin_tone]
    swing = math.sin(shot.phase)
    if shot.view == "side":
        angle = -0.45 * swing  # the near arm swings against the near leg
        shoulders = [(0.0, 0.17)]
        hands = [(0.30 * math.sin(angle), 0.17 + 0.30 * math.cos(angle))]
    else:
        shoulders = [(-(half_width + 0.025), 0.17), (half_width + 0.025, 0.17)]
        hands = [
            (-(half_width + 0.04), 0.46 - 0.015 * swing),
            (half_width + 0.04, 0.46 + 0.015 * swing),
        ]
    for shoulder, hand in zip(shoulders, hands):
        pen.limb(shoulder, hand, 0.055 * person.width, sleeve)
        pen.ellipse(hand[0], hand[1], 0.022, 0.022, skin)
    return hands[-1]


def _draw_bag(
    pen: _Pen, person: PersonAttributes, view: str, half_width: float, hand: Point, behind: bool
) -> None:
    """The carried item: a backpack shows as a block from the back, straps from the front and a
    bump behind in side views; handbags hang from the hand; shoulder bags have a diagonal strap."""
    if person.bag == "none" or person.bag_color is None:
        return
    color = PALETTE[person.bag_color]
    if person.bag == "backpack":
        if behind and view == "side":
            pen.rect(-(half_width + 0.075), 0.17, -half_width + 0.01, 0.42, color)
        elif not behind and view == "back":
            pen.rect(-half_width * 0.8, 0.18, half_width * 0.8, 0.42, color)
        elif not behind and view == "front":
            for x in (-half_width * 0.55, half_width * 0.55):
                pen.rect(x - 0.013, 0.15, x + 0.013, 0.36, color)
        elif not behind:  # side view: the strap over the shoulder
            pen.rect(-0.02, 0.15, 0.01, 0.33, color)
    elif behind:
        return
    elif person.bag == "handbag":
        hx, hy = hand
        pen.rect(hx - 0.04, hy + 0.01, hx + 0.04, hy + 0.1, color)
    else:  # shoulder bag
        pen.limb((-half_width * 0.9, 0.16), (half_width * 0.9, 0.43), 0.02, color)
        pen.rect(half_width * 0.55, 0.40, half_width + 0.07, 0.51, color)


def draw_person(
    draw: ImageDraw.ImageDraw, person: PersonAttributes, shot: Shot, size: tuple[int, int]
) -> None:
    """Paint `person` in `shot` onto a canvas of `size` (width, height), back to front."""
    width, height = size
    person_height = shot.scale * person.height * height
    top = shot.feet_y * height - person_height
    pen = _Pen(draw, shot.center_x * width, top, person_height, shot.facing)
    half_width = (0.085 if shot.view == "side" else 0.13) * person.width
    hair = HAIR_COLORS[person.hair_color]
    if person.hair_length == "long" and shot.view != "back":
        behind = -0.065 if shot.view == "side" else -0.068
        pen.rect(behind, 0.05, 0.0 if shot.view == "side" else 0.068, 0.24, hair)
    _draw_bag(pen, person, shot.view, half_width, (0.0, 0.0), behind=True)
    _draw_legs(pen, person, shot, half_width)
    _draw_top(pen, person, half_width)
    hand = _draw_arms(pen, person, shot, half_width)
    _draw_head(pen, person, shot.view)
    _draw_bag(pen, person, shot.view, half_width, hand, behind=False)


def render_image(
    person: PersonAttributes | None, camera: CameraStyle, shot: Shot, rng: np.random.Generator
) -> Image.Image:
    """One camera image (128x64) of `person` (None: the empty scene) before JPEG encoding."""
    background = np.roll(_camera_background(camera), shot.shift, axis=1)
    canvas = Image.fromarray(background.astype(np.uint8))
    if person is not None:
        draw_person(ImageDraw.Draw(canvas), person, shot, canvas.size)
    small = canvas.resize((IMAGE_WIDTH, IMAGE_HEIGHT), Image.Resampling.BOX)
    gain = np.array(camera.cast, np.float32) * camera.brightness * shot.light
    sensor_noise = rng.normal(0.0, 3.0, size=(IMAGE_HEIGHT, IMAGE_WIDTH, 1))
    pixels = np.asarray(small, np.float32) * gain + sensor_noise
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    radius = camera.blur * float(rng.uniform(0.8, 1.2))
    return image.filter(ImageFilter.GaussianBlur(radius)) if radius > 0.15 else image


# --------------------------------------------------------------------------------------------
# The dataset


@dataclass(frozen=True)
class IdentityPlan:
    """Which cameras one identity walks through."""

    pid: int
    split: str  # "train" or "test"
    cameras: tuple[int, ...]  # 0-based
    attributes: PersonAttributes


@dataclass(frozen=True)
class PlannedImage:
    """One file to write: where, and what it shows."""

    folder: str
    filename: str
    person: PersonAttributes | None
    camera: int
    shot: Shot
    seed_keys: tuple[int, ...]


def plan_identities(spec: SyntheticSpec) -> list[IdentityPlan]:
    """Train ids 1..N and test ids N+1..2N; each appears in a random subset of >= 2 cameras.
    Clothing signatures are unique so no two identities are indistinguishable twins."""
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
        plans.append(IdentityPlan(pid, "train" if pid <= spec.ids else "test", cameras, attributes))
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
            if plan.split == "train":
                folder = MARKET_SPLIT_DIRS["train"]
            else:
                folder = MARKET_SPLIT_DIRS["query" if k == query_index else "gallery"]
            name = _market_name(plan.pid, camera, start + k * step)
            yield PlannedImage(folder, name, plan.attributes, camera, shot, (plan.pid, camera, k))


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
        yield PlannedImage(gallery, name, PersonAttributes.sample(rng), camera, shot, keys)


def _write_images(out: Path, spec: SyntheticSpec, plans: list[IdentityPlan]) -> None:
    cameras = [CameraStyle.sample(_rng(spec.seed, _CAMERA, c)) for c in range(spec.cameras)]
    for folder in MARKET_SPLIT_DIRS.values():
        (out / folder).mkdir(parents=True, exist_ok=True)
    images = [image for plan in plans for image in _identity_images(plan, spec, cameras)]
    for item in images + list(_extra_images(spec, cameras)):
        style = cameras[item.camera]
        rng = _rng(spec.seed, _IMAGE, *item.seed_keys)
        image = render_image(item.person, style, item.shot, rng)
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
        found = json.loads(spec_file.read_text())
        if found != spec.model_dump():
            raise DatasetError(
                f"{root} holds a synthetic dataset generated with {found}, but the config asks for "
                f"{spec.model_dump()}; delete the folder or point 'root' elsewhere"
            )
    return root


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    defaults = SyntheticSpec()
    parser = argparse.ArgumentParser(
        prog="python -m core.datasets.synthetic",
        description="Generate a procedural person Re-ID dataset in the Market-1501 layout.",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (must be absent or empty)"
    )
    parser.add_argument(
        "--ids", type=int, default=defaults.ids, help="train identities (test gets as many)"
    )
    parser.add_argument(
        "--cameras", type=int, default=defaults.cameras, help="number of cameras (2-9)"
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="random seed; same seed, same bytes"
    )
    parser.add_argument(
        "--images-per-camera", type=int, default=defaults.images_per_camera,
        help="consecutive frames per identity and camera",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, generate, print a one-line summary."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        spec = SyntheticSpec(
            ids=args.ids,
            cameras=args.cameras,
            seed=args.seed,
            images_per_camera=args.images_per_camera,
        )
    except ValidationError as err:
        problems = [
            f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" for e in err.errors()
        ]
        parser.error("; ".join(problems))
    try:
        out = generate_synthetic_dataset(args.out, spec)
    except (FileExistsError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}: {load_market1501(out, source='synthetic').summary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
