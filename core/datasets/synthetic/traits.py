"""Identity beyond words: traits of one person that no caption of the procedural world names.

`PersonAttributes.describe()` names every colour, pattern, garment and bag, so without traits two
identities with equal attributes are pixel twins. Real people differ in ways no caption states (a
logo, a build, the weave of their trousers); `IdentityTraits` gives each identity such cues:

- a print on the upper garment: a small random glyph (`GLYPH_CELLS` x `GLYPH_CELLS` cells, half of
  them mirror-symmetric like many logos) in a colour picked to contrast with the top, on the chest
  and, the same, on the back; seen foreshortened from the side;
- proportions (`BodyShape`): shoulder width, head size, and where the waist sits (the leg / torso
  ratio), within modest ranges on top of the captioned build;
- a fine texture on the lower garment: thin hatching at the identity's own angle and spacing.

They are drawn from the identity's own random stream (`_TRAITS`), never from one the attributes,
cameras or frames use, so an identity's attributes, description and every other draw are those of
its traits-off version. Traits are fixed per identity, so every camera shows the same ones (under
its own pose, scale and light). `describe()` and `attributes.jsonl` never mention them; the dataset
writes them to `traits.jsonl` for probes and tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from core.datasets.synthetic.attributes import PALETTE, RGB, PersonAttributes


TRAITS_FILE = "traits.jsonl"
GLYPH_CELLS = 5

# Ranges, in person heights where they are lengths. The print's side is 0.11-0.14 person heights:
# 9-16 px for the campus's 86-118 px tall people in the 128x64 crop (about 2-3 px a cell).
SHOULDER_RANGE = (0.88, 1.14)  # factor on the torso's half width
HEAD_RANGE = (0.86, 1.16)  # factor on the head's size
WAIST_RANGE = (-0.03, 0.03)  # waist line shift: leg / torso ratio from about 1.55 down to 1.15 (1.33 at 0)
PRINT_SIZE_RANGE = (0.11, 0.14)
PRINT_HEIGHT_RANGE = (0.27, 0.33)  # the print's centre below the top of the head
HATCH_ANGLE_RANGE = (25.0, 65.0)  # degrees from horizontal, rising to the right or (as often) to the left
HATCH_SPACING_RANGE = (0.035, 0.06)
HATCH_WIDTH_RANGE = (0.012, 0.018)
HATCH_STRENGTH_RANGE = (0.35, 0.55)


@dataclass(frozen=True)
class BodyShape:
    """Proportions beyond the captioned build. The defaults are exact no-ops (factor 1.0, shift
    0.0): the traits-off world draws every body with them, as it always did."""

    shoulders: float = 1.0  # factor on the torso's half width; the arms hang from it
    head: float = 1.0  # factor on the head and hair, the chin staying where it is
    waist: float = 0.0  # where the torso ends and the legs start, person heights down (> 0: shorter legs)


NEUTRAL_SHAPE = BodyShape()


@dataclass(frozen=True)
class GarmentPrint:
    """A logo on the upper garment, the same on the chest and on the back."""

    glyph: tuple[str, ...]  # rows of "0"/"1", top row first, as seen from the front
    color: RGB
    size: float  # side of the square print, person heights
    x: float  # centre in [-1, 1] of the room the torso leaves either side of its axis
    y: float  # centre, person heights below the top of the head


@dataclass(frozen=True)
class Hatching:
    """Thin parallel lines across the lower garment, fixed in the image plane."""

    angle: float  # degrees from horizontal, counter-clockwise
    spacing: float  # between lines, person heights
    width: float  # of a line, person heights
    strength: float  # how far a line goes from the garment's colour toward black or white (0..1)


@dataclass(frozen=True)
class IdentityTraits:
    """What tells one identity from another with the same attributes."""

    shape: BodyShape
    logo: GarmentPrint
    hatching: Hatching

    @classmethod
    def sample(cls, rng: np.random.Generator, person: PersonAttributes) -> IdentityTraits:
        """Traits for `person` from `rng` (the identity's own stream). `person` only decides the
        print's colour (contrasting with the top), never whether or how much is drawn."""

        def uniform(span: tuple[float, float]) -> float:
            return round(float(rng.uniform(*span)), 3)

        shape = BodyShape(shoulders=uniform(SHOULDER_RANGE), head=uniform(HEAD_RANGE), waist=uniform(WAIST_RANGE))
        glyph = _sample_glyph(rng)
        logo = GarmentPrint(
            glyph=glyph,
            color=_contrasting_color(rng, person),
            size=uniform(PRINT_SIZE_RANGE),
            x=uniform((-1.0, 1.0)),
            y=uniform(PRINT_HEIGHT_RANGE),
        )
        angle = uniform(HATCH_ANGLE_RANGE)
        hatching = Hatching(
            angle=angle if rng.random() < 0.5 else round(180.0 - angle, 3),
            spacing=uniform(HATCH_SPACING_RANGE),
            width=uniform(HATCH_WIDTH_RANGE),
            strength=uniform(HATCH_STRENGTH_RANGE),
        )
        return cls(shape, logo, hatching)

    def to_json(self) -> dict[str, object]:
        """The trait parameters as one `traits.jsonl` row holds them (without the pid)."""
        return asdict(self)


def _sample_glyph(rng: np.random.Generator) -> tuple[str, ...]:
    """A random binary glyph that fills its square's extent (every row and column has a filled
    cell, so `size` is the print's real size) and is neither a speck nor a block."""
    half = (GLYPH_CELLS + 1) // 2
    while True:  # about two in three draws pass
        if rng.random() < 0.5:  # mirror-symmetric, as many logos are
            left = rng.random((GLYPH_CELLS, half)) < 0.5
            cells = np.concatenate([left, left[:, GLYPH_CELLS - half - 1::-1]], axis=1)
        else:
            cells = rng.random((GLYPH_CELLS, GLYPH_CELLS)) < 0.5
        filled = int(cells.sum())
        if 0.35 * cells.size <= filled <= 0.7 * cells.size and cells.any(axis=0).all() and cells.any(axis=1).all():
            return tuple("".join("1" if cell else "0" for cell in row) for row in cells)


def _contrasting_color(rng: np.random.Generator, person: PersonAttributes, candidates: int = 12) -> RGB:
    """The candidate colour furthest (RGB distance) from every colour of the top: any hue, but
    one that stands out on the garment."""
    garment = np.array([PALETTE[c] for c in (person.upper_color, person.upper_color2) if c is not None], float)
    options = rng.integers(0, 256, size=(candidates, 3))
    distance = np.linalg.norm(options[:, None, :] - garment[None], axis=-1).min(axis=1)
    r, g, b = (int(v) for v in options[int(distance.argmax())])
    return r, g, b
