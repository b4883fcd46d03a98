"""Diversity of a generated set against its source, read by a probe of capture conditions.

Diversity Injection claims its samples show an identity under conditions its source images lack
(another scene, another pose). Whether they do is read off the images, not the prompts: a
`ConditionProbe` is fitted on the procedural world's own labels (`core.datasets.synthetic`:
freshly rendered images of every domain, each labelled with its domain and the person's pose)
and then predicts those conditions for the generated and the source images; `condition_coverage`
compares the two distributions. The probe is a logistic regression per condition on cheap image
statistics (colour histograms per horizontal band, a coarse colour layout, a coarse gradient
orientation histogram, sharpness): it tells the four domains (about 98 % right) and side from
front/back views (about 93 %) apart on held-out world images (`ConditionProbe.accuracy`), and it
fits in seconds. Carried items were tried too, and left out: on these statistics a bag is predicted no
better than chance (the item is a few pixels of a 128x64 crop).

What the figures mean, and what they cannot: a generated image "covers a condition beyond the
source" when the probe puts it, with at least `min_confidence`, in a condition that the source's
own images (predicted by the same probe) never show, where "show" means at least `min_share` of
them: one misread source image does not count as the source showing a condition, and probe
errors on the source can only lower the figure. The generated images are not world images (a
tiny text-to-image model draws them blurry); the probe is trained on blurred and re-compressed
world images as well so that softness alone does not read as a dim station, but an image the
probe has never seen the like of can still be misread. The per-condition distributions come
with every figure so such a misreading is visible.

`build_condition_coverage` reads a finished build (its kept images in `DIR/shards` and the train
split of the sources its config names); `benchmarks/diversity.py` prints it, and the evidence
experiment writes it per build into its marker (`eval.experiment.builds`).
"""

from __future__ import annotations

import io
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageFilter

from core.datasets.synthetic import DOMAINS, CameraStyle, render_image, sequence_shots
from core.datasets.synthetic.attributes import PersonAttributes, Shot

if TYPE_CHECKING:
    from core.settings.run import RunConfig
    from core.storage import Location

SIDE, FRONT_OR_BACK = "side", "front or back"
# The conditions the probe reads, each a function of what the world drew for one image. Front and
# back views are one class: on these statistics they differ only in a face a few pixels wide.
CONDITIONS: dict[str, Callable[[str, Shot, PersonAttributes], str]] = {
    "domain": lambda domain, shot, person: domain,
    "pose": lambda domain, shot, person: SIDE if shot.view == "side" else FRONT_OR_BACK,
}
UNSURE = "unsure"  # an image the probe reads below `min_confidence`: counted, never as coverage
FEATURE_SIZE = (32, 64)  # (W, H) every image is read at: the crop's aspect, a quarter of its pixels


@dataclass(frozen=True)
class WorldImage:
    image: Image.Image
    labels: dict[str, str]  # condition -> label, as `CONDITIONS` reads the world


def render_world_images(seed: int, images_per_domain: int, domains: Sequence[str] | None = None,
                        cameras_per_domain: int = 30) -> list[WorldImage]:
    """Fresh procedural images of every domain (default: all registered), labelled by
    `CONDITIONS`: random people under `cameras_per_domain` cameras sampled from the domain, each
    JPEG-encoded at its camera's quality as the dataset writer does. Deterministic in `seed`.
    Many cameras, because a probe's errors come by camera (a campus camera with warm bright walls
    looks like a mall): fitted on 6 per domain, 3 of 30 unseen campus cameras were mostly misread,
    on 30 per domain 1."""
    images = []
    for domain in domains or DOMAINS.names():
        rng = np.random.default_rng([seed % 2**32, zlib.crc32(domain.encode())])
        cameras = [CameraStyle.sample(rng, DOMAINS.get(domain)) for _ in range(cameras_per_domain)]
        for _ in range(images_per_domain):
            person = PersonAttributes.sample(rng)
            camera = cameras[int(rng.integers(len(cameras)))]
            shot = sequence_shots(camera, rng, 1)[0]
            image = _jpeg(render_image(person, camera, shot, rng), camera.jpeg_quality)
            images.append(WorldImage(image, {name: read(domain, shot, person) for name, read in CONDITIONS.items()}))
    return images


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def soften(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A blurred, re-compressed copy: what a generator's soft output looks like to the probe."""
    return _jpeg(image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5)))), int(rng.integers(60, 96)))


def image_features(image: Image.Image) -> np.ndarray:
    """Cheap statistics of the capture conditions (float32, fixed length): per-channel colour
    histograms of four horizontal bands (wall, person, floor), the mean colour of an 8x4 grid
    (where the horizon and the person sit), a gradient orientation histogram per cell of the same
    grid (textures, the body's outline) and global sharpness and brightness."""
    pixels = np.asarray(image.convert("RGB").resize(FEATURE_SIZE, Image.Resampling.BILINEAR), np.float32) / 255.0
    height, width = pixels.shape[:2]
    parts = [np.histogram(band[..., c], bins=8, range=(0.0, 1.0))[0] / band[..., c].size
             for band in np.array_split(pixels, 4, axis=0) for c in range(3)]
    parts.append(pixels.reshape(8, height // 8, 4, width // 4, 3).mean(axis=(1, 3)).ravel())
    gray = pixels.mean(axis=-1)
    dy, dx = np.gradient(gray)
    magnitude = np.hypot(dx, dy)
    orientation = np.minimum((np.mod(np.arctan2(dy, dx), np.pi) / np.pi * 8).astype(int), 7)
    for rows in np.array_split(np.arange(height), 8):
        for cols in np.array_split(np.arange(width), 4):
            cell = np.bincount(orientation[np.ix_(rows, cols)].ravel(), magnitude[np.ix_(rows, cols)].ravel(), 8)
            parts.append(cell / (np.linalg.norm(cell) + 1e-6))
    laplacian = np.abs(gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:] - 4 * gray[1:-1, 1:-1])
    parts.append(np.array([magnitude.mean(), magnitude.std(), laplacian.mean(), laplacian.std(),
                           pixels.mean(), pixels.std()]))
    return np.concatenate([np.ravel(p) for p in parts]).astype(np.float32)


def _features(images: Sequence[Image.Image]) -> np.ndarray:
    return np.stack([image_features(image) for image in images])


@dataclass(frozen=True)
class ConditionProbe:
    """One classifier (standardised features -> logistic regression) per condition."""

    classifiers: Mapping[str, Any]  # condition -> fitted sklearn pipeline
    accuracy: Mapping[str, float]  # condition -> accuracy on held-out world images (another seed)
    chance: Mapping[str, float]  # condition -> share of the held-out set's most common label

    @property
    def conditions(self) -> list[str]:
        return list(self.classifiers)

    def predict(self, images: Sequence[Image.Image], min_confidence: float = 0.0) -> dict[str, list[str]]:
        """Condition -> one label per image; `UNSURE` where the probe's probability of its best
        label is below `min_confidence`."""
        if not images:
            return {name: [] for name in self.classifiers}
        features = _features(images)
        predicted = {}
        for name, classifier in self.classifiers.items():
            probabilities = classifier.predict_proba(features)
            best = classifier.classes_[probabilities.argmax(axis=1)]
            predicted[name] = [str(label) if p >= min_confidence else UNSURE
                               for label, p in zip(best, probabilities.max(axis=1))]
        return predicted


def fit_condition_probe(seed: int = 0, images_per_domain: int = 300, heldout_per_domain: int = 75,
                        domains: Sequence[str] | None = None, soften_share: float = 0.5,
                        regularisation: float = 0.05) -> ConditionProbe:
    """Fit the probe on `images_per_domain` fresh world images of every domain (a `soften_share`
    of them softened, see `soften`) and measure it on `heldout_per_domain` more, rendered from
    another seed (other cameras, other people). `regularisation`: the logistic regression's C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = render_world_images(seed, images_per_domain, domains)
    heldout = render_world_images(seed + 1, heldout_per_domain, domains)
    rng = np.random.default_rng([seed % 2**32, 17])
    train_features = _features([soften(w.image, rng) if rng.random() < soften_share else w.image for w in train])
    heldout_features = _features([w.image for w in heldout])
    classifiers, accuracy, chance = {}, {}, {}
    for name in CONDITIONS:
        labels = np.array([w.labels[name] for w in train])
        truth = np.array([w.labels[name] for w in heldout])
        classifier = make_pipeline(StandardScaler(), LogisticRegression(C=regularisation, max_iter=3000))
        classifiers[name] = classifier.fit(train_features, labels)
        accuracy[name] = float((classifier.predict(heldout_features) == truth).mean())
        chance[name] = max(Counter(truth.tolist()).values()) / len(truth)
    return ConditionProbe(classifiers, accuracy, chance)


def _shares(labels: Sequence[str]) -> dict[str, float]:
    counts = Counter(labels)
    return {label: counts[label] / len(labels) for label in sorted(counts)}


def _shown(labels: Sequence[str], min_share: float) -> set[str]:
    """The conditions a set of images shows: those of at least `min_share` of them (and one image)."""
    return {label for label, share in _shares(labels).items() if label != UNSURE and share >= min_share}


def condition_coverage(generated_images: Sequence[Image.Image], source_images: Sequence[Image.Image],
                       probe: ConditionProbe, generated_groups: Sequence[Any] | None = None,
                       source_groups: Sequence[Any] | None = None, min_share: float = 0.05,
                       min_confidence: float = 0.5) -> dict[str, Any]:
    """How far the generated images reach beyond their source, per condition the probe reads.

    Returns `coverage_beyond_source`: the share of generated images that the probe puts (with at
    least `min_confidence`) in some condition the source images do not show (see `_shown`);
    `distinct_conditions` / `source_distinct_conditions`: how many (condition, label) pairs each
    set shows; and per condition (`conditions[name]`) the predicted distributions of both sets,
    what the source shows, its own `beyond_source` share, and the probe's held-out accuracy and
    chance level. With `generated_groups` and `source_groups` (an identity key per image),
    `coverage_beyond_identity` is the same share with each generated image compared only with
    its own identity's source images (a pose this person was never filmed in); generated images
    of an identity without source images are left out of it (`identity_images` counts the rest).
    """
    if not generated_images or not source_images:
        raise ValueError(f"need generated and source images, got {len(generated_images)} and {len(source_images)}")
    grouped = generated_groups is not None and source_groups is not None
    if grouped and (len(generated_groups) != len(generated_images) or len(source_groups) != len(source_images)):
        raise ValueError("generated_groups and source_groups need one key per image")
    generated = probe.predict(generated_images, min_confidence)
    source = probe.predict(source_images, min_confidence)
    beyond_source = np.zeros(len(generated_images), bool)
    beyond_identity = np.zeros(len(generated_images), bool)
    has_identity = np.zeros(len(generated_images), bool)
    per_condition: dict[str, dict[str, Any]] = {}
    for name in probe.conditions:
        shown = _shown(source[name], min_share)
        beyond = np.array([label != UNSURE and label not in shown for label in generated[name]])
        beyond_source |= beyond
        entry = {"generated": _shares(generated[name]), "source": _shares(source[name]),
                 "source_shows": sorted(shown), "beyond_source": float(beyond.mean()),
                 "distinct": len(_shown(generated[name], min_share)),
                 "probe_accuracy": probe.accuracy[name], "chance": probe.chance[name]}
        if grouped:
            by_identity: dict[Any, list[str]] = {}
            for key, label in zip(source_groups, source[name]):
                by_identity.setdefault(key, []).append(label)
            identity_shows = {key: _shown(labels, min_share) for key, labels in by_identity.items()}
            new = np.array([key in identity_shows and label != UNSURE and label not in identity_shows[key]
                            for key, label in zip(generated_groups, generated[name])])
            has_identity = np.array([key in identity_shows for key in generated_groups])
            beyond_identity |= new
            entry["beyond_identity"] = float(new.sum() / has_identity.sum()) if has_identity.any() else None
        per_condition[name] = entry
    result = {
        "generated_images": len(generated_images), "source_images": len(source_images),
        "coverage_beyond_source": float(beyond_source.mean()),
        "distinct_conditions": sum(entry["distinct"] for entry in per_condition.values()),
        "source_distinct_conditions": sum(len(entry["source_shows"]) for entry in per_condition.values()),
        "min_share": min_share, "min_confidence": min_confidence, "conditions": per_condition,
    }
    if grouped:
        result["identity_images"] = int(has_identity.sum())
        result["coverage_beyond_identity"] = (float(beyond_identity.sum() / has_identity.sum())
                                              if has_identity.any() else None)
    return result


def _subsample(items: list[Any], limit: int, seed: int) -> list[Any]:
    """At most `limit` of `items`, a fixed random choice in their order (a big build stays cheap)."""
    if len(items) <= limit:
        return items
    chosen = np.sort(np.random.default_rng(seed).choice(len(items), size=limit, replace=False))
    return [items[i] for i in chosen]


def build_condition_coverage(build_dir: str | Location, probe: ConditionProbe, config: RunConfig | None = None,
                             max_images: int = 2000, **options: Any) -> dict[str, Any]:
    """`condition_coverage` of a finished build: its kept images (`DIR/shards`) against the train
    split of the sources its config names (`config`, default the build's own `DIR/config.yaml`),
    grouped by identity; at most `max_images` of each side (a fixed subsample). `options` go to
    `condition_coverage`. Adds the sources' own domains where the world labels them."""
    import yaml

    from core.config import validate_config
    from core.datasets.registry import load_source
    from core.settings.run import RunConfig
    from core.storage import resolve
    from trainers.pretrain.shards import read_shard_table

    build = resolve(build_dir)
    if config is None:
        config = validate_config(RunConfig, yaml.safe_load((build / "config.yaml").read_text()),
                                 str(build / "config.yaml"))
    table = read_shard_table(build).select(["image", "source", "source_pid"]).to_pylist()
    rows = _subsample(table, max_images, seed=0)
    generated = [Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB") for row in rows]
    records = [r for source in config.sources for r in load_source(source).train if not r.distractor]
    records = _subsample(records, max_images, seed=1)
    source_images = []
    for record in records:
        with Image.open(record.path) as image:
            source_images.append(image.convert("RGB"))
    result = condition_coverage(generated, source_images, probe,
                                generated_groups=[(row["source"], row["source_pid"]) for row in rows],
                                source_groups=[(r.source, r.pid) for r in records], **options)
    result["source_domains"] = {s.source_name: s.generate.domain for s in config.sources
                                if s.kind == "synthetic" and s.generate is not None}
    return result
