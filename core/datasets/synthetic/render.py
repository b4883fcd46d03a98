"""Drawing one person seen by one camera: at the camera's sensor resolution (128x64 unless its
domain's sensor is coarser), supersampled, then lit and resized to the 128x64 crop. An identity's
traits (`traits.IdentityTraits`), where it has them, change its proportions and add a print on its
top and hatching on its lower garment; without them every body is drawn as it always was."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache, partial

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from core.datasets.synthetic.attributes import (
    CameraStyle, HAIR_COLORS, IMAGE_HEIGHT, IMAGE_WIDTH, PALETTE, PersonAttributes, Point, RGB, SKIN_TONES,
    SUPERSAMPLE, Shot,
)
from core.datasets.synthetic.traits import NEUTRAL_SHAPE, BodyShape, GarmentPrint, Hatching, IdentityTraits


SKYLIGHT = (0.9, 0.97, 1.12)  # colour of a shadow: lit by the blue sky only, not the sun


def _sensor_pixels(camera: CameraStyle, pixels: float) -> int:
    """`pixels` of the 128x64 crop at the camera's sensor resolution (identity for a full-size sensor)."""
    return max(1, round(pixels * camera.render_size[0] / IMAGE_HEIGHT))


@lru_cache(maxsize=64)
def _camera_background(camera: CameraStyle) -> np.ndarray:
    """The camera's empty scene at drawing resolution (float32 HxWx3), cached per camera. Texture
    sizes are in drawing pixels of a full-size sensor and shrink with a coarser one."""
    height, width = camera.render_size[0] * SUPERSAMPLE, camera.render_size[1] * SUPERSAMPLE
    px = partial(_sensor_pixels, camera)
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    top, bottom = np.array(camera.wall_top, np.float32), np.array(camera.wall_bottom, np.float32)
    wall = (1 - t) * top + t * bottom
    image = np.broadcast_to(wall, (height, width, 3)).copy()
    horizon = int(camera.horizon * height)
    image[horizon:] = np.array(camera.floor, np.float32)
    ys, xs = np.mgrid[0:height, 0:width]
    wall_ys, wall_xs = ys[:horizon], xs[:horizon]
    if camera.texture == "panels":  # shop fronts / pillars on the wall
        image[:horizon][(wall_xs // px(22)) % 2 == 0] *= 0.8
    elif camera.texture == "tiles":  # floor tiles
        lines = ((ys[horizon:] % px(18)) < px(2)) | ((xs[horizon:] % px(26)) < px(2))
        image[horizon:][lines] *= 0.7
    elif camera.texture == "noise":  # gravel, foliage
        grain = np.random.default_rng([*camera.wall_top, *camera.floor])
        image += grain.normal(0.0, 14.0, size=(height, width, 1)).astype(np.float32)
    elif camera.texture == "storefronts":  # lit shop windows between pillars over a glossy floor
        windows = (wall_xs % px(40) >= px(8)) & (wall_ys >= 0.12 * height) & (wall_ys < horizon - 0.06 * height)
        image[:horizon][windows] = image[:horizon][windows] * 0.45 + 130.0
        image[horizon:] *= np.linspace(1.25, 1.0, height - horizon, dtype=np.float32)[:, None, None]
    elif camera.texture == "columns":  # dark concrete pillars along the concourse
        image[:horizon][wall_xs % px(48) < px(12)] *= 0.55
    elif camera.texture == "platform":  # the yellow safety line along a platform edge
        line = horizon + int(0.15 * (height - horizon))
        image[line:line + px(4)] = np.array((200, 170, 40), np.float32)
    elif camera.texture == "bricks":  # light mortar between brick courses of a facade
        course = wall_ys // px(8)
        joints = (wall_xs + (course % 2) * px(10)) % px(20) < px(2)
        mortar = (wall_ys % px(8) < px(2)) | joints
        image[:horizon][mortar] = image[:horizon][mortar] * 0.6 + 80.0
    elif camera.texture == "skyline":  # open sky above rooftops of varying height
        roofs = np.random.default_rng([*camera.wall_top, *camera.floor]).uniform(0.1, 0.55, width // px(24) + 1)
        sky = wall_ys < roofs[wall_xs // px(24)] * horizon
        t = (wall_ys / max(1, horizon))[..., None]
        gradient = np.array((150, 190, 240), np.float32) * (1 - t) + np.array((205, 220, 235), np.float32) * t
        image[:horizon][sky] = gradient[sky]
    elif camera.texture != "plain":
        raise ValueError(f"unknown scene texture {camera.texture!r}")
    return np.clip(image, 0, 255)


@lru_cache(maxsize=64)
def _shadow_gain(camera: CameraStyle) -> np.ndarray:
    """Per-pixel gain (float32 HxWx3 at sensor resolution) of the camera's cast shadow: 1 in the
    sun, darker and bluer left of the slanted edge, which is soft over about a pixel."""
    height, width = camera.render_size
    top, bottom = camera.shadow_edge
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    edge = (top + (bottom - top) * ys / max(1, height - 1)) * width
    inside = np.clip(edge - xs + 0.5, 0.0, 1.0)[..., None]
    shade = (1.0 - camera.shadow) * np.array(SKYLIGHT, np.float32)
    return (1.0 + inside * (shade - 1.0)).astype(np.float32)


class _Pen:
    """Draws in person units: x along the body axis times `facing`, y down from the top of the
    head, both as fractions of the person's height, so one drawing serves every size and the
    mirrored side view."""

    def __init__(
        self, draw: ImageDraw.ImageDraw, center_x: float, top: float, height: float, facing: int,
        squash: float = 1.0,
    ) -> None:
        self.draw, self.cx, self.top, self.h, self.facing = draw, center_x, top, height, facing
        self.squash = squash
        self.v = height * squash  # a camera looking down shortens the body, not its width

    def unmirrored(self) -> _Pen:
        """This pen drawing as if facing +1: for what reads the same whichever way the person
        walks (a print)."""
        return _Pen(self.draw, self.cx, self.top, self.h, 1, self.squash)

    def xy(self, dx: float, dy: float) -> Point:
        return self.cx + self.facing * dx * self.h, self.top + dy * self.v

    def rect(self, dx0: float, dy0: float, dx1: float, dy1: float, fill: RGB) -> None:
        (x0, y0), (x1, y1) = self.xy(dx0, dy0), self.xy(dx1, dy1)
        self.draw.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), fill=fill)

    def ellipse(self, dx: float, dy: float, rx: float, ry: float, fill: RGB) -> None:
        (x0, y0), (x1, y1) = self.xy(dx - rx, dy - ry), self.xy(dx + rx, dy + ry)
        self.draw.ellipse((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), fill=fill)

    def polygon(self, points: Sequence[Point], fill: RGB) -> None:
        self.draw.polygon([self.xy(dx, dy) for dx, dy in points], fill=fill)

    def limb(self, start: Point, end: Point, width: float, fill: RGB) -> list[Point]:
        """A straight limb of `width` (person units) from `start` to `end`; returns its corners."""
        (ax, ay), (bx, by) = start, end
        length = math.hypot(bx - ax, by - ay) or 1.0
        nx, ny = -(by - ay) / length * width / 2, (bx - ax) / length * width / 2
        corners = [(ax + nx, ay + ny), (bx + nx, by + ny), (bx - nx, by - ny), (ax - nx, ay - ny)]
        self.polygon(corners, fill)
        return corners

    def hatch(self, polygon: Sequence[Point], hatching: Hatching, garment: RGB) -> None:
        """Lines of `hatching` across the convex `polygon` (person units) of a `garment`-coloured
        area. The lines lie at the same angle in the image whichever way the person faces, on a grid
        anchored at the person's axis, so they move and scale with the person."""
        corners = [self.xy(dx, dy) for dx, dy in polygon]
        angle = math.radians(hatching.angle)
        normal = (math.sin(angle), math.cos(angle))  # of lines rising at `angle` (image y points down)
        spacing = max(1.0, hatching.spacing * self.h)
        origin = self.cx * normal[0] + self.top * normal[1]
        reach = [x * normal[0] + y * normal[1] - origin for x, y in corners]
        target = 0.0 if sum(garment) > 300 else 255.0  # darker lines on light cloth, lighter on dark
        line = tuple(round(c + hatching.strength * (target - c)) for c in garment)
        width = max(1, round(hatching.width * self.h))
        for k in range(math.floor(min(reach) / spacing), math.ceil(max(reach) / spacing) + 1):
            segment = _clip_line(corners, normal, origin + k * spacing)
            if segment is not None:
                self.draw.line(segment, fill=line, width=width)


def _clip_line(polygon: Sequence[Point], normal: Point, offset: float) -> tuple[Point, Point] | None:
    """Where the line {p: normal . p = offset} crosses the convex `polygon`, if it does."""
    crossings = []
    for (ax, ay), (bx, by) in zip(polygon, [*polygon[1:], polygon[0]]):
        a = ax * normal[0] + ay * normal[1] - offset
        b = bx * normal[0] + by * normal[1] - offset
        if (a < 0) != (b < 0):
            t = a / (a - b)
            crossings.append((ax + t * (bx - ax), ay + t * (by - ay)))
    return (crossings[0], crossings[1]) if len(crossings) >= 2 else None


def _draw_top(pen: _Pen, person: PersonAttributes, half_width: float, shape: BodyShape) -> None:
    """The torso with its pattern, clipped to the torso box."""
    x0, x1, y0, y1 = -half_width, half_width, 0.15, 0.52 + shape.waist
    first = PALETTE[person.upper_color]
    second = PALETTE[person.upper_color2] if person.upper_color2 else first
    pen.rect(x0, y0, x1, y1, first)
    pattern = person.upper_pattern
    if pattern == "two-tone":
        pen.rect(x0, (y0 + y1) / 2, x1, y1, second)
    # stripes are checks one cell wide or high (1.0 exceeds the torso, so that side stays whole)
    cells = {"horizontal stripes": (1.0, 0.025), "vertical stripes": (0.025, 1.0), "checks": (0.035, 0.035)}
    if pattern in cells:
        width, height = cells[pattern]
        for i, y in enumerate(np.arange(y0, y1, height)):
            for j, x in enumerate(np.arange(x0, x1, width)):
                if (i + j) % 2:
                    pen.rect(x, y, min(x + width, x1), min(y + height, y1), second)


def _draw_legs(
    pen: _Pen, person: PersonAttributes, shot: Shot, half_width: float, shape: BodyShape,
    hatching: Hatching | None,
) -> None:
    """Legs (walking), shoes and the lower garment (hatched where the identity's traits say so)."""
    skin, lower = SKIN_TONES[person.skin_tone], PALETTE[person.lower_color]
    shoes = PALETTE[person.shoe_color]
    width = 0.085 * person.width
    swing = math.sin(shot.phase)
    waist, length = 0.5 + shape.waist, 0.465 - shape.waist  # the feet stay on the ground
    if shot.view == "side":
        angle = 0.38 * swing
        legs = [((0.0, waist), (length * math.sin(a), waist + length * math.cos(a))) for a in (angle, -angle)]
    else:  # front/back: the stepping foot lifts a little
        spread = 0.055 * person.width
        legs = [
            ((-spread, waist), (-spread * 1.1, 0.965 - 0.03 * max(0.0, swing))),
            ((spread, waist), (spread * 1.1, 0.965 - 0.03 * max(0.0, -swing))),
        ]
    for hip, foot in legs:
        if person.lower_type == "trousers":
            garment = pen.limb(hip, foot, width, lower)
        else:
            pen.limb(hip, foot, width * 0.85, skin)
            garment = []
            if person.lower_type == "shorts":
                knee = hip[0] + (foot[0] - hip[0]) * 0.42, hip[1] + (foot[1] - hip[1]) * 0.42
                garment = pen.limb(hip, knee, width * 1.05, lower)
        if hatching is not None and garment:
            pen.hatch(garment, hatching, lower)
        toe = 0.05 if shot.view == "side" else 0.0  # shoes point where the person walks
        pen.rect(foot[0] - 0.04, foot[1] - 0.012, foot[0] + 0.04 + toe, foot[1] + 0.03, shoes)
    if person.lower_type == "skirt":
        flare = 1.35 if shot.view != "side" else 1.6
        top, hem = half_width * 0.95, half_width * flare
        y0, y1 = 0.49 + shape.waist, 0.73 + shape.waist
        skirt = [(-top, y0), (top, y0), (hem, y1), (-hem, y1)]
        pen.polygon(skirt, lower)
        if hatching is not None:
            pen.hatch(skirt, hatching, lower)


CHIN = 0.144  # where the face ends: a bigger or smaller head grows or shrinks about it


def _head_y(y: float, scale: float) -> float:
    """Height `y` of a head `scale` times the usual size (exactly `y` at 1.0)."""
    return y + (1.0 - scale) * (CHIN - y)


def _draw_head(pen: _Pen, person: PersonAttributes, view: str, scale: float = 1.0) -> None:
    skin, hair = SKIN_TONES[person.skin_tone], HAIR_COLORS[person.hair_color]
    pen.rect(-0.025, 0.12, 0.025, 0.16, skin)  # neck

    def ellipse(dx: float, dy: float, rx: float, ry: float, fill: RGB) -> None:
        pen.ellipse(dx * scale, _head_y(dy, scale), rx * scale, ry * scale, fill)

    if view == "back":
        ellipse(0.0, 0.075, 0.056, 0.068, hair)
        if person.hair_length == "long":
            pen.rect(-0.06 * scale, _head_y(0.07, scale), 0.06 * scale, 0.25, hair)
    elif view == "front":
        ellipse(0.0, 0.07, 0.058, 0.068, hair)
        ellipse(0.0, 0.088, 0.05, 0.056, skin)
    else:
        ellipse(-0.008, 0.07, 0.056, 0.066, hair)
        ellipse(0.014, 0.088, 0.046, 0.054, skin)


def print_rect(logo: GarmentPrint, view: str, half_width: float) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the print in person units as an unmirrored pen draws it, on a torso of
    `half_width`: seen from the side it is foreshortened to 60 % of its width."""
    width = logo.size * (0.6 if view == "side" else 1.0)
    room = max(0.0, half_width - width / 2 - 0.012)  # a hem's width clear of the torso's edge
    x = logo.x * room
    return x - width / 2, logo.y - logo.size / 2, x + width / 2, logo.y + logo.size / 2


def _draw_print(pen: _Pen, logo: GarmentPrint, view: str, half_width: float) -> None:
    """The glyph, cell by cell, reading the same whichever way the person faces."""
    x0, y0, x1, y1 = print_rect(logo, view, half_width)
    rows, columns = len(logo.glyph), len(logo.glyph[0])
    cell_w, cell_h = (x1 - x0) / columns, (y1 - y0) / rows
    flat = pen.unmirrored()
    for i, row in enumerate(logo.glyph):
        for j, cell in enumerate(row):
            if cell == "1":
                x, y = x0 + j * cell_w, y0 + i * cell_h
                flat.rect(x, y, x + cell_w, y + cell_h, logo.color)


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
        hands = [(-(half_width + 0.04), 0.46 - 0.015 * swing), (half_width + 0.04, 0.46 + 0.015 * swing)]
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


def _person_pen(
    draw: ImageDraw.ImageDraw | None, person: PersonAttributes, shot: Shot, size: tuple[int, int], squash: float
) -> _Pen:
    width, height = size
    person_height = shot.scale * person.height * height
    top = shot.feet_y * height - person_height * squash
    return _Pen(draw, shot.center_x * width, top, person_height, shot.facing, squash)  # type: ignore[arg-type]


def _hip_half_width(person: PersonAttributes, view: str) -> float:
    return (0.085 if view == "side" else 0.13) * person.width


def draw_person(
    draw: ImageDraw.ImageDraw, person: PersonAttributes, shot: Shot, size: tuple[int, int], squash: float = 1.0,
    traits: IdentityTraits | None = None,
) -> None:
    """Paint `person` in `shot` onto a canvas of `size` (width, height), back to front, its
    height times `squash` (the camera's foreshortening), with its `traits` where it has them."""
    pen = _person_pen(draw, person, shot, size, squash)
    shape = NEUTRAL_SHAPE if traits is None else traits.shape
    hips = _hip_half_width(person, shot.view)
    half_width = hips * shape.shoulders  # the torso, the arms and what hangs from the shoulders
    hair = HAIR_COLORS[person.hair_color]
    if person.hair_length == "long" and shot.view != "back":
        behind = (-0.065 if shot.view == "side" else -0.068) * shape.head
        pen.rect(behind, _head_y(0.05, shape.head), (0.0 if shot.view == "side" else 0.068) * shape.head, 0.24, hair)
    _draw_bag(pen, person, shot.view, half_width, (0.0, 0.0), behind=True)
    _draw_legs(pen, person, shot, hips, shape, None if traits is None else traits.hatching)
    _draw_top(pen, person, half_width, shape)
    if traits is not None:
        _draw_print(pen, traits.logo, shot.view, half_width)
    hand = _draw_arms(pen, person, shot, half_width)
    _draw_head(pen, person, shot.view, shape.head)
    _draw_bag(pen, person, shot.view, half_width, hand, behind=False)


def print_box(
    person: PersonAttributes, traits: IdentityTraits, shot: Shot, camera: CameraStyle
) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the identity's print in pixels of the 128x64 crop `render_image` makes
    of `person` in `shot` by `camera` (where a probe looks for it; an arm or a bag may cover part)."""
    height, width = camera.render_size
    pen = _person_pen(None, person, shot, (width * SUPERSAMPLE, height * SUPERSAMPLE), camera.squash).unmirrored()
    half_width = _hip_half_width(person, shot.view) * traits.shape.shoulders
    x0, y0, x1, y1 = print_rect(traits.logo, shot.view, half_width)
    (left, upper), (right, lower) = pen.xy(x0, y0), pen.xy(x1, y1)
    sx, sy = IMAGE_WIDTH / (width * SUPERSAMPLE), IMAGE_HEIGHT / (height * SUPERSAMPLE)
    return left * sx, upper * sy, right * sx, lower * sy


def render_image(
    person: PersonAttributes | None, camera: CameraStyle, shot: Shot, rng: np.random.Generator,
    traits: IdentityTraits | None = None,
) -> Image.Image:
    """One camera image (128x64) of `person` (None: the empty scene) with its identity `traits`
    (None: none, the world without traits) before JPEG encoding.

    Drawn at the camera's sensor resolution; the light (gain, cast shadow, contrast) acts on the
    sensor's pixels, and a coarser sensor's image is then upsampled to the crop (soft, blocky).
    """
    height, width = camera.render_size
    shift = round(shot.shift * height / IMAGE_HEIGHT)  # the scene's jitter, in sensor pixels
    background = np.roll(_camera_background(camera), shift, axis=1)
    canvas = Image.fromarray(background.astype(np.uint8))
    if person is not None:
        draw_person(ImageDraw.Draw(canvas), person, shot, canvas.size, camera.squash, traits)
    small = canvas.resize((width, height), Image.Resampling.BOX)
    gain = np.array(camera.cast, np.float32) * camera.brightness * shot.light
    sensor_noise = rng.normal(0.0, 3.0, size=(height, width, 1))
    pixels = np.asarray(small, np.float32) * gain + sensor_noise
    if camera.shadow > 0:
        pixels *= _shadow_gain(camera)
    if camera.contrast != 1.0:  # around the image's own mean, so contrast does not shift brightness
        mean = pixels.mean()
        pixels = mean + camera.contrast * (pixels - mean)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if (height, width) != (IMAGE_HEIGHT, IMAGE_WIDTH):
        image = image.resize((IMAGE_WIDTH, IMAGE_HEIGHT), Image.Resampling.BILINEAR)
    radius = camera.blur * float(rng.uniform(0.8, 1.2))
    return image.filter(ImageFilter.GaussianBlur(radius)) if radius > 0.15 else image
