"""A procedural stand-in for ImageNet: everyday-object-like things on cluttered backgrounds.

The paper's reference initialisation is a backbone pre-trained on generic (non-person) image
classification. Offline, timm's ImageNet weights cannot be had, so `demo.imagenet_standin` trains
one on this task instead: each class is a shape family (disc, ring, star, arrow, dumbbell, ...)
painted in one colour / texture scheme (solid red, blue with white stripes, yellow with dots, ...).
Everything else is drawn per image and carries no class information: the background's colour,
gradient, texture and clutter, the object's position, scale, aspect, rotation, the lighting and
sensor noise. No people are drawn, so features learnt here know nothing about pedestrians.

A class is a function of its index alone (the same for every seed); an image is a function of
(seed, class, index), drawn with `numpy.random.default_rng([seed, class, index])`, so any subset of
a set can be redrawn and fresh images of the same classes are simply further indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RGB = tuple[int, int, int]
# (polygon in object units: radius about 1, centred on 0; mask value 255 paints, 0 cuts a hole)
Part = tuple[np.ndarray, int]
SUPERSAMPLE = 2  # the shape mask is drawn at twice the size and reduced: smooth edges


def _circle(radius: float = 1.0, center: tuple[float, float] = (0.0, 0.0), points: int = 40) -> np.ndarray:
    angles = np.linspace(0.0, 2 * math.pi, points, endpoint=False)
    return np.stack([center[0] + radius * np.cos(angles), center[1] + radius * np.sin(angles)], axis=1)


def _box(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=np.float64)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    angles = np.arange(2 * points) * math.pi / points - math.pi / 2
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _grid_lines() -> list[Part]:
    lines = [0.85 * t for t in (-1.0, -1 / 3, 1 / 3, 1.0)]
    return [(_box(x - 0.08, -0.93, x + 0.08, 0.93), 255) for x in lines] + \
           [(_box(-0.93, y - 0.08, 0.93, y + 0.08), 255) for y in lines]


# Shape families, distinct under any rotation (no diamond beside the square) and at 64 pixels.
SHAPES: dict[str, list[Part]] = {
    "disc": [(_circle(), 255)],
    "ring": [(_circle(), 255), (_circle(0.58), 0)],
    "square": [(_box(-0.8, -0.8, 0.8, 0.8), 255)],
    "triangle": [(np.array([(0.0, -1.0), (0.93, 0.65), (-0.93, 0.65)]), 255)],
    "star": [(_star(), 255)],
    "cross": [(_box(-1.0, -0.24, 1.0, 0.24), 255), (_box(-0.24, -1.0, 0.24, 1.0), 255)],
    "arrow": [(_box(-1.0, -0.17, 0.15, 0.17), 255), (np.array([(0.1, -0.6), (1.0, 0.0), (0.1, 0.6)]), 255)],
    "crescent": [(_circle(), 255), (_circle(0.82, (0.42, -0.2)), 0)],
    "bars": [(_box(-0.9, y - 0.17, 0.9, y + 0.17), 255) for y in (-0.62, 0.0, 0.62)],
    "frame": [(_box(-0.85, -0.85, 0.85, 0.85), 255), (_box(-0.5, -0.5, 0.5, 0.5), 0)],
    "grid": _grid_lines(),
    "dumbbell": [(_circle(0.4, (-0.6, 0.0)), 255), (_circle(0.4, (0.6, 0.0)), 255),
                 (_box(-0.6, -0.13, 0.6, 0.13), 255)],
}


@dataclass(frozen=True)
class Scheme:
    """How an object is painted: `texture` mixes `first` and `second` in the object's own frame."""

    name: str
    first: RGB
    second: RGB
    texture: str  # a key of `_MIXES`: solid, stripes, dots, checker, gradient, speckle, outline, halves


SCHEMES = (
    Scheme("red", (205, 40, 40), (205, 40, 40), "solid"),
    Scheme("blue-striped", (35, 75, 200), (235, 235, 235), "stripes"),
    Scheme("yellow-dotted", (235, 200, 40), (40, 35, 30), "dots"),
    Scheme("green-checked", (45, 165, 70), (20, 25, 20), "checker"),
    Scheme("purple-to-pink", (110, 40, 150), (245, 150, 200), "gradient"),
    Scheme("orange-speckled", (240, 130, 30), (110, 55, 20), "speckle"),
    Scheme("cyan-outlined", (40, 205, 215), (40, 205, 215), "outline"),
    Scheme("black-and-white", (235, 235, 230), (25, 25, 30), "halves"),
)
MAX_CLASSES = len(SHAPES) * len(SCHEMES)


@dataclass(frozen=True)
class ObjectClass:
    shape: str
    scheme: Scheme

    @property
    def name(self) -> str:
        return f"{self.scheme.name} {self.shape}"


def object_class(index: int) -> ObjectClass:
    """Class `index` (0 <= index < MAX_CLASSES): shape `index % 12` in scheme `(5q + shape) % 8`
    (q = index // 12). Each shape meets every scheme once over the 96 classes, and any prefix of
    the list spreads over all schemes instead of using the first ones only."""
    if not 0 <= index < MAX_CLASSES:
        raise ValueError(f"object class {index} out of range: there are {MAX_CLASSES} classes")
    shapes = list(SHAPES)
    row, shape = divmod(index, len(shapes))
    return ObjectClass(shapes[shape], SCHEMES[(5 * row + shape) % len(SCHEMES)])


def object_class_names(num_classes: int) -> list[str]:
    return [object_class(i).name for i in range(num_classes)]


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) pixel-centre coordinates of a size x size image, float32."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return ys, xs


def _jitter(color: RGB, rng: np.random.Generator, spread: float = 14.0) -> np.ndarray:
    return np.clip(np.array(color, np.float32) + rng.normal(0.0, spread, 3), 0, 255).astype(np.float32)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A scene with nothing of any class in it: a tinted gradient, one of a few surface textures,
    and a handful of thin strokes and small blobs of random colours (clutter) (float32 HxWx3)."""
    ys, xs = _pixel_grid(size)
    base, other = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    angle = rng.uniform(0, 2 * math.pi)
    t = ((xs * math.cos(angle) + ys * math.sin(angle)) / size * 0.7 + 0.5).clip(0, 1)[..., None]
    image = (1 - t) * base + t * other
    surface = rng.integers(0, 4)
    if surface == 1:  # grain
        image = image + rng.normal(0.0, rng.uniform(5, 18), (size, size, 1))
    elif surface == 2:  # planks / tiles
        period = rng.uniform(5, 14)
        image = image * np.where((xs % period) < 1.2, 0.8, 1.0)[..., None]
    elif surface == 3:  # soft blotches
        coarse = rng.uniform(-25, 25, (4, 4, 1)).astype(np.float32)
        image = image + np.kron(coarse, np.ones((math.ceil(size / 4), math.ceil(size / 4), 1)))[:size, :size]
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(2, 7)):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            length, direction = rng.uniform(0.2, 0.7) * size, rng.uniform(0, math.pi)
            end = (x + length * math.cos(direction), y + length * math.sin(direction))
            draw.line([(x, y), end], fill=color, width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(0.02, 0.07) * size
            draw.ellipse((x - r, y - r * rng.uniform(0.5, 1.5), x + r, y + r), fill=color)
    return np.asarray(canvas, dtype=np.float32)


@dataclass(frozen=True)
class Pose:
    """Where the object lies: centre and radius in pixels, rotation, aspect (x stretch)."""

    cx: float
    cy: float
    radius: float
    angle: float
    aspect: float

    def to_image(self, points: np.ndarray, scale: float = 1.0) -> list[tuple[float, float]]:
        """Object units to (supersampled) image pixels."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        x, y = points[:, 0] * self.aspect, points[:, 1]
        xs = (self.cx + self.radius * (c * x - s * y)) * scale
        ys = (self.cy + self.radius * (s * x + c * y)) * scale
        return list(zip(xs.tolist(), ys.tolist()))

    def object_frame(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Every pixel's (u, v) in object units (rotated with the object, 1 = its radius)."""
        ys, xs = _pixel_grid(size)
        dx, dy = (xs - self.cx) / self.radius, (ys - self.cy) / self.radius
        c, s = math.cos(self.angle), math.sin(self.angle)
        return c * dx + s * dy, -s * dx + c * dy


def shape_mask(shape: str, pose: Pose, size: int) -> np.ndarray:
    """Coverage of `shape` (a key of `SHAPES`) at `pose` in a size x size image (float32 HxW in
    0..1), antialiased by supersampling."""
    mask = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(mask)
    for polygon, value in SHAPES[shape]:
        draw.polygon(pose.to_image(polygon, SUPERSAMPLE), fill=value)
    return np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


# How much of the second colour each pixel takes, from its (u, v) in object units, a phase in 0..1
# (where the pattern starts) and the image's generator.
Mix = Callable[[np.ndarray, np.ndarray, float, np.random.Generator], np.ndarray]
_MIXES: dict[str, Mix] = {
    "solid": lambda u, v, phase, rng: np.zeros_like(u),
    "outline": lambda u, v, phase, rng: np.zeros_like(u),  # the shape's rim is drawn instead of its area
    "stripes": lambda u, v, phase, rng: ((v / 0.45 + phase) % 1.0 < 0.5).astype(np.float32),
    "dots": lambda u, v, phase, rng: (((u / 0.5 + phase) % 1 - 0.5) ** 2 + ((v / 0.5 + phase) % 1 - 0.5) ** 2
                                      < 0.07).astype(np.float32),
    "checker": lambda u, v, phase, rng: ((np.floor(u / 0.5 + phase) + np.floor(v / 0.5 + phase)) % 2)
    .astype(np.float32),
    "gradient": lambda u, v, phase, rng: ((u + 1) / 2).clip(0, 1),
    "speckle": lambda u, v, phase, rng: (rng.random(u.shape) < 0.3).astype(np.float32),
    "halves": lambda u, v, phase, rng: (u > 0).astype(np.float32),
}


def _texture(scheme: Scheme, pose: Pose, size: int, rng: np.random.Generator) -> np.ndarray:
    """The paint (float32 HxWx3): `first` and `second` mixed by the scheme's texture, laid out in
    the object's frame so that stripes and checks turn with it."""
    first, second = _jitter(scheme.first, rng), _jitter(scheme.second, rng)
    u, v = pose.object_frame(size)
    mix = _MIXES[scheme.texture](u, v, rng.uniform(0, 1), rng)[..., None]
    return (1 - mix) * first + mix * second


def _outline(mask: np.ndarray, pose: Pose) -> np.ndarray:
    """The rim of `mask`, about a fifth of the object's radius wide: an outline-only scheme."""
    width = max(3, int(round(pose.radius * 0.2)) * 2 + 1)
    inner = Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.MinFilter(width))
    return np.clip(mask - np.asarray(inner, dtype=np.float32) / 255.0, 0.0, 1.0)


def _light(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Exposure, a colour cast, a light gradient across the scene and sensor noise."""
    ys, xs = _pixel_grid(size)
    angle = rng.uniform(0, 2 * math.pi)
    slope = rng.uniform(0.0, 0.35)
    gradient = 1 + slope * ((xs * math.cos(angle) + ys * math.sin(angle)) / size - 0.5)
    gain = rng.uniform(0.7, 1.2) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    noise = rng.normal(0.0, rng.uniform(0, 6), (size, size, 1))
    return image * gradient[..., None] * gain + noise


def object_image(class_index: int, index: int, size: int = 64, seed: int = 0) -> Image.Image:
    """Image `index` of class `class_index` (RGB, size x size), a function of (seed, class, index)."""
    kind = object_class(class_index)
    rng = np.random.default_rng([seed, class_index, index])
    radius = rng.uniform(0.22, 0.42) * size
    margin = 0.8 * radius  # up to a fifth of the object may leave the frame
    pose = Pose(
        cx=rng.uniform(margin, size - margin), cy=rng.uniform(margin, size - margin), radius=radius,
        angle=rng.uniform(0, 2 * math.pi), aspect=rng.uniform(0.8, 1.2),
    )
    background = _background(size, rng)
    mask = shape_mask(kind.shape, pose, size)
    if kind.scheme.texture == "outline":
        mask = _outline(mask, pose)
    paint = _texture(kind.scheme, pose, size, rng)
    image = _light(background * (1 - mask[..., None]) + paint * mask[..., None], size, rng)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def object_images(
    num_classes: int = 64, per_class: int = 100, size: int = 64, seed: int = 0, start: int = 0
) -> tuple[list[Image.Image], list[int]]:
    """`per_class` images of each of the first `num_classes` classes (indices `start` ..
    `start + per_class - 1`, so a later `start` gives fresh draws of the same classes), with their
    labels, class by class."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    object_class(num_classes - 1)  # range check before drawing anything
    images, labels = [], []
    for label in range(num_classes):
        for index in range(start, start + per_class):
            images.append(object_image(label, index, size, seed))
            labels.append(label)
    return images, labels


__all__ = [
    "MAX_CLASSES", "Pose", "SCHEMES", "SHAPES", "object_class", "object_class_names", "object_image", "object_images",
    "shape_mask",
]
