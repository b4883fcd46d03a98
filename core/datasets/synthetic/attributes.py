"""What a procedural identity and a camera are: attributes sampled per pid and per camera, and
the frames of a walk through one camera. Every draw comes from a generator seeded by
(seed, stream, keys...)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from core.datasets.synthetic.domains import CAMPUS, SyntheticDomain


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
PATTERN_WORDS = {  # how `describe` names a patterned top
    "horizontal stripes": "horizontally striped", "vertical stripes": "vertically striped",
    "checks": "checked", "two-tone": "two-tone",
}
LOWER_TYPES = ("trousers", "shorts", "skirt")
LOWER_TYPE_WEIGHTS = (0.6, 0.2, 0.2)
BAGS = ("none", "backpack", "handbag", "shoulder bag")
BAG_WEIGHTS = (0.4, 0.25, 0.175, 0.175)
VIEWS = ("front", "back", "side")
# The words for each view: how a caption of the wider world says it, and the phrases Diversity
# Injection's `generation.variations.camera_pose` asks for.
VIEW_WORDS = {"front": "seen from the front", "back": "seen from behind", "side": "seen from the side"}

# Independent random streams: (seed, stream, keys...) seeds one generator per decision group.
_ATTRIBUTES, _CAMERA, _SEQUENCE, _IMAGE, _SPLIT, _EXTRA = range(1, 7)
_TRAITS = 7  # identity traits (`traits`): a stream no earlier draw uses, so turning them on changes no other draw


def _rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    # SeedSequence entropy must be non-negative; fold negative seeds into that range.
    return np.random.default_rng([seed % 2**64, stream, *keys])


def _choice(rng: np.random.Generator, options: Sequence[str], weights: Sequence[float] | None = None) -> str:
    p = None if weights is None else np.asarray(weights) / sum(weights)
    return options[int(rng.choice(len(options), p=p))]


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
        return (self.upper_color, self.upper_pattern, self.upper_color2, self.lower_color, self.lower_type)

    def describe(self) -> str:
        """Plain English naming the colour of every visible attribute (training text for the
        demo text-to-image and captioning models)."""
        if self.upper_pattern == "solid":
            top = f"a {self.upper_color} shirt"
        else:
            top = f"a {self.upper_color} and {self.upper_color2} {PATTERN_WORDS[self.upper_pattern]} shirt"
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
    """What one camera does to every image it takes. The fields with defaults hold for the whole
    domain (see `SyntheticDomain`); their defaults are the campus domain's."""

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
    contrast: float = 1.0
    shadow: float = 0.0  # darkening left of `shadow_edge` (0: no shadow)
    shadow_edge: tuple[float, float] = (0.0, 0.0)  # x of the shadow's edge at the top and the bottom (of the width)
    squash: float = 1.0  # vertical factor on the person
    render_size: tuple[int, int] = (IMAGE_HEIGHT, IMAGE_WIDTH)  # (H, W) before resizing to the crop

    @classmethod
    def sample(cls, rng: np.random.Generator, domain: SyntheticDomain = CAMPUS) -> CameraStyle:
        """One camera of `domain`. Every domain draws the same numbers in the same order (a
        shadow's edge last, only where the domain casts shadows), so campus cameras are the
        cameras of the generator before domains; the gains are exact no-ops at 1.0."""

        def color(span: tuple[int, int]) -> RGB:
            channels = rng.integers(span[0], span[1], size=3)
            r, g, b = (int(min(255, c * tint)) for c, tint in zip(channels, domain.scene_tint))
            return r, g, b

        front, back, side = (round(float(w), 3) for w in rng.dirichlet((1.5, 1.5, 1.5)) * 0.7 + 0.1)
        channels = rng.uniform(*domain.cast_range, size=3)
        r, g, b = (round(float(x) * tint, 3) for x, tint in zip(channels, domain.light_tint))
        style = cls(
            wall_top=color(domain.wall_range),
            wall_bottom=color(domain.wall_range),
            floor=color(domain.floor_range),
            horizon=round(float(rng.uniform(*domain.horizon_range)), 3),
            texture=_choice(rng, domain.textures),
            brightness=round(float(rng.uniform(*domain.brightness_range)), 3),
            cast=(r, g, b),
            person_scale=round(float(rng.uniform(*domain.person_scale_range)), 3),
            offset=round(float(rng.uniform(-0.06, 0.06)), 3),
            blur=round(float(rng.uniform(*domain.blur_range)), 3),
            jpeg_quality=int(rng.integers(*domain.jpeg_range)),
            view_weights=(front, back, side),
            contrast=domain.contrast,
            squash=domain.squash,
            render_size=domain.render_size,
        )
        if domain.shadow <= 0:
            return style
        # a building's shadow: its edge crosses each camera's view at its own slant and place
        top = float(rng.uniform(-0.2, 1.2))
        bottom = top + float(rng.uniform(-0.6, 0.6))
        return replace(style, shadow=domain.shadow, shadow_edge=(round(top, 3), round(bottom, 3)))


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
    return [
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
        for k in range(frames)
    ]
