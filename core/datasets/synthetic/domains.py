"""Capture domains of the procedural dataset: where its cameras hang and what they see.

Real Re-ID datasets differ less in who walks past than in how they were filmed: Market-1501 is
an outdoor campus in daylight, MSMT17 mixes indoor and outdoor cameras, CUHK03 has low, blurry
crops, airport and station footage is dim CCTV shot from above. A `SyntheticDomain` is one such
set of capture conditions: the scene family (wall and floor palette, textures), the light
(brightness, colour, contrast, cast shadows), the viewpoint (how high the camera hangs: person
size, foreshortening, how much floor shows) and the sensor (resolution before resizing to the
128x64 crop, blur, JPEG quality). Identities do not depend on it: the same seed gives the same
people with the same clothes in every domain, so a model trained on one domain and tested on
another meets the same kind of people under new conditions.

Each camera of a dataset samples its `CameraStyle` from its domain's ranges
(`CameraStyle.sample(rng, domain)`), drawing the same random numbers in the same order in every
domain. "campus" holds the ranges the generator had before domains existed, so its datasets are
byte-identical to those. A domain is registered by name in `DOMAINS`; `SyntheticSpec.domain` (the
`generate.domain` of a synthetic source, `--domain` of the CLI) names one.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.registry import Registry

Gain = tuple[float, float, float]  # per-channel factor (R, G, B)
Range = tuple[float, float]  # low, high of a uniform draw

# Scene textures `render` knows how to paint; a domain picks each camera's from its own subset.
TEXTURES = ("plain", "panels", "tiles", "noise", "storefronts", "columns", "platform", "bricks", "skyline")
NEUTRAL: Gain = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class SyntheticDomain:
    """The capture conditions of one synthetic dataset. The defaults are the "campus" domain.

    Ranges are what each camera draws its own value from; the gains, `contrast`, `shadow`,
    `squash` and `render_size` hold for every camera of the domain.
    """

    description: str
    # the words for this domain's scene (what a caption of the wider world says, what Diversity
    # Injection's `generation.variations.scene` phrases ask for)
    scene_words: str = "on a campus"
    suggested_cameras: int = 4  # what a dataset of this domain usually has; `SyntheticSpec.cameras` decides
    # scene family
    textures: tuple[str, ...] = ("plain", "panels", "tiles", "noise")
    wall_range: tuple[int, int] = (50, 210)  # per-channel integer range of the wall colours
    floor_range: tuple[int, int] = (40, 180)
    scene_tint: Gain = NEUTRAL  # gain on wall and floor colours: the palette (beige shops, grey concrete)
    horizon_range: Range = (0.55, 0.8)  # where the floor starts: a camera looking down sees more floor
    # light
    brightness_range: Range = (0.78, 1.18)
    cast_range: Range = (0.88, 1.12)  # per-channel gain of each camera's colour cast
    light_tint: Gain = NEUTRAL  # colour of the domain's light (tungsten, fluorescent, sun), on top of the cast
    contrast: float = 1.0  # around each image's mean: < 1 hazy and flat, > 1 harsh
    shadow: float = 0.0  # darkening of a cast shadow across part of each camera's view (0: none)
    # viewpoint
    person_scale_range: Range = (0.78, 0.92)  # person height as a fraction of the crop height
    squash: float = 1.0  # vertical factor on the person: a camera looking down foreshortens the body
    # sensor
    render_size: tuple[int, int] = (128, 64)  # (H, W) the sensor resolves before resizing to the crop
    blur_range: Range = (0.0, 0.9)  # Gaussian radius in output pixels
    jpeg_range: tuple[int, int] = (60, 93)  # quality, high end exclusive

    def __post_init__(self) -> None:
        unknown = sorted(set(self.textures) - set(TEXTURES))
        if not self.textures or unknown:
            raise ValueError(f"domain textures must be some of {TEXTURES}, got {self.textures}")
        ranges = (self.wall_range, self.floor_range, self.horizon_range, self.brightness_range,
                  self.cast_range, self.person_scale_range, self.blur_range, self.jpeg_range)
        if any(low > high for low, high in ranges):
            raise ValueError(f"domain ranges must be (low, high): {self}")
        if min(self.render_size) < 8 or not 2 <= self.suggested_cameras <= 9:
            raise ValueError(f"render_size {self.render_size} or suggested_cameras {self.suggested_cameras}: out of range")


DOMAINS: Registry[SyntheticDomain] = Registry("synthetic domain", "sources[].generate.domain")

CAMPUS = DOMAINS.add("campus", SyntheticDomain(
    "outdoor campus in daylight, as the generator always drew it: varied walls, mild casts, eye-level cameras",
))
DOMAINS.add("mall", SyntheticDomain(
    "indoor mall: cream shop fronts and glossy floors, warm artificial light, high cameras looking down",
    scene_words="in a shopping mall",
    suggested_cameras=6,
    textures=("storefronts", "panels", "tiles"),
    wall_range=(150, 236),
    floor_range=(120, 220),
    scene_tint=(1.0, 0.92, 0.78),
    horizon_range=(0.35, 0.52),
    brightness_range=(0.92, 1.1),
    cast_range=(0.95, 1.05),
    light_tint=(1.1, 1.0, 0.8),
    contrast=0.9,
    person_scale_range=(0.64, 0.76),
    squash=0.86,
    render_size=(112, 56),
    blur_range=(0.0, 0.5),
    jpeg_range=(70, 93),
))
DOMAINS.add("station", SyntheticDomain(
    "dim station concourse: grey-blue concrete and pillars, cool fluorescent light, flat low-contrast "
    "low-resolution CCTV with strong compression",
    scene_words="in a station hall",
    suggested_cameras=8,
    textures=("columns", "platform", "tiles"),
    wall_range=(60, 150),
    floor_range=(50, 120),
    scene_tint=(0.9, 0.96, 1.06),
    horizon_range=(0.45, 0.68),
    brightness_range=(0.5, 0.7),
    cast_range=(0.93, 1.07),
    light_tint=(0.85, 0.97, 1.15),
    contrast=0.65,
    person_scale_range=(0.74, 0.88),
    squash=0.93,
    render_size=(64, 32),
    blur_range=(0.2, 0.8),
    jpeg_range=(40, 70),
))
DOMAINS.add("street", SyntheticDomain(
    "sunny street: brick facades under open sky and asphalt, strong sun with hard shadows and colour "
    "casts, close eye-level cameras, sharp high-quality images",
    scene_words="on a city street",
    suggested_cameras=5,
    textures=("bricks", "skyline", "noise"),
    wall_range=(80, 200),
    floor_range=(60, 110),
    scene_tint=(1.06, 0.92, 0.8),
    horizon_range=(0.62, 0.85),
    brightness_range=(1.02, 1.3),
    cast_range=(0.82, 1.18),
    light_tint=(1.08, 1.02, 0.88),
    contrast=1.3,
    shadow=0.5,
    person_scale_range=(0.86, 0.93),
    render_size=(128, 64),
    blur_range=(0.0, 0.35),
    jpeg_range=(82, 96),
))
