"""The embedded default's models: tiny real architectures trained on procedural pedestrians.

`ensure_demo_models(config)` makes `config.cache_dir` hold three `save_pretrained` folders that
the factory then loads like hub ids (`configs/demo.yaml` points `generation.base_model`,
`caption.model` and, for the CLIP filter, `filter.clip_model` at them):

    cache_dir/text-to-image/   StableDiffusionPipeline (UNet, AutoencoderKL, CLIPTextModel, ...)
    cache_dir/captioner/       Blip2ForConditionalGeneration + Blip2Processor
    cache_dir/clip/            CLIPModel + CLIPProcessor
    cache_dir/VERSION          written last; a build is complete when it matches DEMO_MODELS_VERSION

Where the weights come from, in order:
1. the cache, if its VERSION matches (returns at once);
2. the weights committed in the package (`factory/demo/weights/`, fp16 safetensors made
   by `python -m factory.demo --out factory/demo/weights --fp16`): loaded through the
   regular loaders, upcast to fp32 and saved into the cache (seconds, no training);
3. otherwise trained here with the default recipe (about 25 minutes of one CPU thread) on a
   procedural training set generated into `config.train_source` (seed 1000, a different seed
   than the demo's own source data). Training within the demo's first-run budget (minutes on
   a 2-core CPU) gives samples without a clear colour response, hence the committed weights.

Builds go into a hidden staging folder and are moved into place component by component before
VERSION is written, so an interrupted build is never mistaken for a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from core.datasets.config import SyntheticSpec
from core.storage import resolve
from factory.models.locate import MARKER_FILES
from core.settings.run import DemoModelsConfig

Log = Callable[[str], None]

# Bump when the architectures, tokenizers or training recipe change: stale caches get rebuilt.
DEMO_MODELS_VERSION = "demo-models-1"
VERSION_FILE = "VERSION"
RECIPE_FILE = "recipe.json"
TEXT_TO_IMAGE, CAPTIONER, CLIP = "text-to-image", "captioner", "clip"
COMPONENTS = (TEXT_TO_IMAGE, CAPTIONER, CLIP)
COMMITTED_WEIGHTS = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class DemoModelPaths:
    """Where the demo models live: pass these wherever a hub id is accepted."""

    text_to_image: Path
    captioner: Path
    clip: Path

    @classmethod
    def under(cls, root: Path) -> DemoModelPaths:
        return cls(root / TEXT_TO_IMAGE, root / CAPTIONER, root / CLIP)


# Seconds per training step of each phase, one CPU thread (measured on the 2-core dev machine).
SECONDS_PER_STEP = {"clip_steps": 0.09, "autoencoder_steps": 0.15, "text_to_image_steps": 0.21, "captioner_steps": 0.45}


@dataclass(frozen=True)
class DemoRecipe:
    """What the demo models are trained on and for how long: step counts, never wall-clock, so
    a build is reproducible. The default is the recipe of the committed weights."""

    seed: int = 1000
    ids: int = 300  # per split; both splits are used: 600 identities
    cameras: int = 9  # as many camera styles as Market names allow: colours must survive new ones
    images_per_camera: int = 2
    clip_steps: int = 400
    autoencoder_steps: int = 1000
    text_to_image_steps: int = 3000
    captioner_steps: int = 1500
    batch_size: int = 32
    autoencoder_batch_size: int = 16

    @property
    def estimated_minutes(self) -> float:
        """Training time on one thread of the reference machine (excluding data and saving)."""
        return sum(getattr(self, k) * seconds for k, seconds in SECONDS_PER_STEP.items()) / 60

    def scaled(self, minutes: float) -> DemoRecipe:
        """This recipe with every phase's steps scaled to take about `minutes` on the reference
        machine. The steps are a function of `minutes` alone, so equal arguments give equal
        weights on any machine."""
        factor = minutes / self.estimated_minutes
        return replace(self, **{k: max(1, round(getattr(self, k) * factor)) for k in SECONDS_PER_STEP})

    @property
    def synthetic_spec(self) -> SyntheticSpec:
        return SyntheticSpec(
            ids=self.ids, cameras=self.cameras, seed=self.seed, images_per_camera=self.images_per_camera
        )


def is_complete(root: Path) -> bool:
    """True when `root` holds every component and a VERSION stamp of this code's version."""
    stamp = root / VERSION_FILE
    return stamp.is_file() and stamp.read_text().strip() == DEMO_MODELS_VERSION and _has_components(root)


def _has_components(root: Path) -> bool:
    return all(any((root / c / m).is_file() for m in MARKER_FILES) for c in COMPONENTS)


def ensure_demo_models(config: DemoModelsConfig, log: Log = print) -> DemoModelPaths:
    """Return the demo models' folders, building them first if the cache lacks a complete,
    current build (from the committed weights when present, else by training)."""
    root = Path(config.cache_dir)
    if is_complete(root):
        return DemoModelPaths.under(root)
    start = time.perf_counter()
    if is_complete(COMMITTED_WEIGHTS):
        log(f"[demo-models] installing the committed weights from {COMMITTED_WEIGHTS} into {root}")
        install_demo_models(COMMITTED_WEIGHTS, root, log=log)
    else:
        recipe = DemoRecipe() if config.train_minutes is None else DemoRecipe().scaled(config.train_minutes)
        log(f"[demo-models] no cached build in {root}: training the tiny models (one-time)")
        build_demo_models(root, Path(config.train_source), recipe, log=log)
    log(f"[demo-models] ready in {time.perf_counter() - start:.0f}s: {root}")
    return DemoModelPaths.under(root)


def build_demo_models(
    out: Path,
    train_source: Path,
    recipe: DemoRecipe = DemoRecipe(),
    half: bool = False,
    components: Sequence[str] = COMPONENTS,
    log: Log = print,
) -> DemoModelPaths:
    """Generate the training pedestrians (if absent), train the models and save them into `out`.

    Order follows Stable Diffusion's design: CLIP is trained first and its text tower becomes
    the text-to-image model's text encoder (SD v1 uses CLIP's), so the UNet learns colour words
    from features that already separate them. `components` rebuilds a subset (each component is
    trained from the same seed whatever else is built, so subsets built separately equal a full
    build); VERSION is written once all components are present. `half` saves fp16 weights.
    """
    # Training code only when training: a build that finds its demo models installed imports none of it.
    from core.datasets.synthetic import ensure_synthetic_dataset
    from factory.demo.tiny import tiny_blip2, tiny_clip, tiny_stable_diffusion
    from factory.demo.tokenizers import train_clip_tokenizer, train_opt_tokenizer
    from factory.demo.training import (
        PedestrianCorpus,
        pipeline_pixels,
        train_autoencoder,
        train_captioner,
        train_clip,
        train_text_to_image,
    )

    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {list(COMPONENTS)}")
    start = time.perf_counter()
    ensure_synthetic_dataset(train_source, recipe.synthetic_spec)
    corpus = PedestrianCorpus.from_market_folder(train_source)
    log(
        f"[demo-models] training set: {len(corpus)} images of {2 * recipe.ids} identities in {train_source}; "
        f"recipe ~{recipe.estimated_minutes:.0f} min on one thread of the reference machine"
    )
    seed = recipe.seed
    with _staging(out) as staging:
        clip_tokenizer = train_clip_tokenizer(corpus.descriptions)
        if CLIP in components or TEXT_TO_IMAGE in components:
            clip_model, clip_processor = tiny_clip(seed=seed, tokenizer=clip_tokenizer)
            train_clip(
                clip_model, clip_processor, corpus.images, corpus.descriptions, recipe.clip_steps,
                batch_size=recipe.batch_size + recipe.batch_size // 2, seed=seed, log=log,
            )
            if CLIP in components:
                _save((clip_model, clip_processor), staging / CLIP, half)
        if TEXT_TO_IMAGE in components:
            pipeline = tiny_stable_diffusion(seed=seed, tokenizer=clip_tokenizer)
            pipeline.text_encoder.load_state_dict(clip_model.text_model.state_dict())
            pixels = pipeline_pixels(corpus)
            train_autoencoder(
                pipeline.vae, pixels, recipe.autoencoder_steps, recipe.autoencoder_batch_size, seed=seed, log=log
            )
            train_text_to_image(
                pipeline, pixels, corpus.descriptions, recipe.text_to_image_steps, recipe.batch_size,
                seed=seed, log=log,
            )
            _save(pipeline, staging / TEXT_TO_IMAGE, half)
            del pixels, pipeline
        if CAPTIONER in components:
            model, processor = tiny_blip2(seed=seed, tokenizer=train_opt_tokenizer(corpus.descriptions))
            train_captioner(
                model, processor, corpus.images, corpus.descriptions, recipe.captioner_steps, recipe.batch_size,
                attributes=corpus.attributes, seed=seed, log=log,
            )
            _save((model, processor), staging / CAPTIONER, half)
        (staging / RECIPE_FILE).write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    log(f"[demo-models] built {', '.join(components)} into {out} in {time.perf_counter() - start:.0f}s")
    return DemoModelPaths.under(out)


def install_demo_models(source: Path, out: Path, log: Log = print) -> DemoModelPaths:
    """Load a complete build (e.g. the committed fp16 weights) through the regular loaders and
    save it into `out` in fp32, stamped with VERSION."""
    import torch

    from factory.models.loading import load_captioner, load_clip, load_text_to_image

    with _staging(out) as staging:
        for name, load in ((TEXT_TO_IMAGE, load_text_to_image), (CAPTIONER, load_captioner), (CLIP, load_clip)):
            _save(load(str(source / name), "cpu", torch.float32), staging / name)
        if (source / RECIPE_FILE).is_file():
            shutil.copy2(source / RECIPE_FILE, staging / RECIPE_FILE)
    log(f"[demo-models] installed {source} into {out}")
    return DemoModelPaths.under(out)


def _save(model, directory: Path, half: bool = False) -> None:
    """`save_pretrained` a pipeline or a (model, processor) pair; also write the tokenizers'
    vocab.json/merges.txt, the layout hub repos ship."""
    import torch

    from factory.demo.tokenizers import write_vocab_files

    if isinstance(model, tuple):
        model, processor = model
        processor.save_pretrained(directory)
        tokenizer, tokenizer_dir = processor.tokenizer, directory
    else:
        tokenizer, tokenizer_dir = model.tokenizer, directory / "tokenizer"
    if half:
        model = model.to(torch.float16)
    model.save_pretrained(directory)
    if half:
        model.to(torch.float32)
    write_vocab_files(tokenizer, tokenizer_dir)


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A hidden build folder next to `out`'s components; on success each component replaces its
    old folder and VERSION is written last; on failure it is removed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".build-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        (out / VERSION_FILE).unlink(missing_ok=True)  # incomplete from here on
        for name in (*COMPONENTS, RECIPE_FILE):
            target, built = out / name, staging / name
            if not built.exists():
                continue
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(built, target)
        if _has_components(out):
            resolve(out / VERSION_FILE).write_text(DEMO_MODELS_VERSION + "\n")  # atomic, like every local write
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = [
    "DEMO_MODELS_VERSION",
    "DemoModelPaths",
    "DemoRecipe",
    "build_demo_models",
    "ensure_demo_models",
    "install_demo_models",
    "is_complete",
]
