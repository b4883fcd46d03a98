"""The embedded default's models: tiny real architectures trained on procedural pedestrians.

`build_demo_models(out, ...)` trains them and makes `out` hold three `save_pretrained` folders,
which the factory loads like hub ids (the demo presets point `generation.base_model`,
`caption.model` and, for the CLIP filter, `filter.clip_model` at them):

    out/text-to-image/   StableDiffusionPipeline (UNet, AutoencoderKL, CLIPTextModel, ...)
    out/captioner/       Blip2ForConditionalGeneration + Blip2Processor
    out/clip/            CLIPModel + CLIPProcessor
    out/recipe.json      the `DemoRecipe` they were trained with
    out/imagenet-standin/  only when asked for (`components`): a backbone pre-trained on procedural
                         objects, the downstream `imagenet` init's stand-in (`demo.imagenet_standin`)
    out/VERSION          written last; a build is complete when it matches DEMO_MODELS_VERSION

The weights committed with the package (`demo/weights/`, fp16 safetensors made by
`python -m demo --out demo/weights --fp16`) are such a build; `configs/demo.yaml` loads them in
place, and the loaders' fp32 upcasts them exactly (the state dicts equal those of an fp32 copy).
The build never calls in here: the product sees model folders only. Training with the default
recipe takes about 47 minutes of one CPU thread (`DemoRecipe.estimated_minutes`; about 20 with
`--threads 2`), on a procedural training set generated into `train_source/<domain>` (seeds
1000-1003, other seeds than any preset's data): every capture domain of the world, with identity
traits, as Stable Diffusion's training set is wider than any Re-ID source.

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

Log = Callable[[str], None]

# Bump when the architectures, tokenizers or training recipe change: a folder stamped with
# another version is not a complete build (`is_complete`).
DEMO_MODELS_VERSION = "demo-models-2"
VERSION_FILE = "VERSION"
RECIPE_FILE = "recipe.json"
TEXT_TO_IMAGE, CAPTIONER, CLIP = "text-to-image", "captioner", "clip"
COMPONENTS = (TEXT_TO_IMAGE, CAPTIONER, CLIP)  # the model folders the demo presets load
IMAGENET_STANDIN = "imagenet-standin"
# Everything `build_demo_models` can build: the stand-in is built on request only (a complete
# build, `is_complete`, is the three model folders).
BUILDABLE_COMPONENTS = (*COMPONENTS, IMAGENET_STANDIN)
COMMITTED_WEIGHTS = Path(__file__).resolve().parent / "weights"
# Where the procedural training pedestrians are generated unless told otherwise (a folder per domain).
DEFAULT_TRAIN_SOURCE = Path(".cache/demo-models/world")
# The wider world the demo models learn: every capture domain, though a Re-ID source shows one.
WORLD_DOMAINS = ("campus", "mall", "station", "street")


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
SECONDS_PER_STEP = {"clip_steps": 0.09, "autoencoder_steps": 0.15, "text_to_image_steps": 0.21, "captioner_steps": 0.45,
                    "standin_steps": 0.55}
# The phases of the model folders, timed and scaled together whichever of them are built (so a
# subset built with `--minutes` equals that subset of a full build), and the stand-in's own.
PEDESTRIAN_PHASES = ("clip_steps", "autoencoder_steps", "text_to_image_steps", "captioner_steps")
STANDIN_PHASES = ("standin_steps",)


@dataclass(frozen=True)
class DemoRecipe:
    """What the demo models are trained on and for how long: step counts, never wall-clock, so
    a build is reproducible. The default is the recipe of the committed weights."""

    seed: int = 1000  # the first domain's; each next domain's dataset is drawn with the next seed
    ids: int = 300  # per split, over all domains; both splits are used: 600 identities
    cameras: int = 9  # per domain, as many camera styles as Market names allow: colours must survive new ones
    images_per_camera: int = 2
    domains: tuple[str, ...] = WORLD_DOMAINS
    identity_traits: bool = True  # the base model draws prints, builds and textures; the fine-tune learns whose
    clip_steps: int = 400
    autoencoder_steps: int = 1000
    # twice demo-models-1's: the wider world (four domains, identity traits, scene and view words)
    # took colour words and captions below the quality checks at 3000 / 1500
    text_to_image_steps: int = 6000
    captioner_steps: int = 3000
    batch_size: int = 32
    autoencoder_batch_size: int = 16
    # the ImageNet stand-in (`demo.imagenet_standin`): procedural object classes, seed `seed`
    standin_classes: int = 64
    standin_images_per_class: int = 200
    standin_steps: int = 540

    @property
    def estimated_minutes(self) -> float:
        """Training time of the model folders (`COMPONENTS`) on one thread of the reference
        machine (excluding data and saving)."""
        return self.minutes_for(COMPONENTS)

    def minutes_for(self, components: Sequence[str]) -> float:
        """Training time of the phases behind `components` (all the model folders' if any is
        named, the stand-in's if named) on one thread of the reference machine, excluding data
        and saving; `minutes_for([IMAGENET_STANDIN])` is the stand-in's."""
        return sum(getattr(self, k) * SECONDS_PER_STEP[k] for k in _phases(components)) / 60

    def scaled(self, minutes: float, components: Sequence[str] = COMPONENTS) -> DemoRecipe:
        """This recipe with the steps of the phases behind `components` scaled so that they take
        about `minutes` on the reference machine (the other phases unchanged). The steps are a
        function of the arguments alone, so equal arguments give equal weights on any machine."""
        factor = minutes / self.minutes_for(components)
        return replace(self, **{k: max(1, round(getattr(self, k) * factor)) for k in _phases(components)})

    @property
    def synthetic_specs(self) -> dict[str, SyntheticSpec]:
        """Domain -> the spec of its training dataset: `ids` shared out over the domains, other
        people (another seed) in each."""
        per_domain = max(2, self.ids // len(self.domains))
        return {domain: SyntheticSpec(ids=per_domain, cameras=self.cameras, seed=self.seed + k,
                                      images_per_camera=self.images_per_camera, domain=domain,
                                      identity_traits=self.identity_traits)
                for k, domain in enumerate(self.domains)}


def _phases(components: Sequence[str]) -> tuple[str, ...]:
    pedestrians = PEDESTRIAN_PHASES if set(components) & set(COMPONENTS) else ()
    return pedestrians + (STANDIN_PHASES if IMAGENET_STANDIN in components else ())


def is_complete(root: Path) -> bool:
    """True when `root` holds every component and a VERSION stamp of this code's version."""
    stamp = root / VERSION_FILE
    return stamp.is_file() and stamp.read_text().strip() == DEMO_MODELS_VERSION and _has_components(root)


def _has_components(root: Path) -> bool:
    return all(any((root / c / m).is_file() for m in MARKER_FILES) for c in COMPONENTS)


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
    `IMAGENET_STANDIN` (on request only) needs no pedestrians: built alone, none are generated.
    """
    unknown = sorted(set(components) - set(BUILDABLE_COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {list(BUILDABLE_COMPONENTS)}")
    start = time.perf_counter()
    with _staging(out) as staging:
        if set(components) & set(COMPONENTS):
            _train_pedestrian_models(staging, train_source, recipe, half, components, log)
        if IMAGENET_STANDIN in components:
            # imported on call, like the other training code (torch, timm)
            from demo.imagenet_standin import StandinRecipe, train_imagenet_standin

            log(f"[demo-models] imagenet-standin: ~{recipe.minutes_for([IMAGENET_STANDIN]):.0f} min on one "
                "thread of the reference machine")
            standin = StandinRecipe(classes=recipe.standin_classes, images_per_class=recipe.standin_images_per_class,
                                    steps=recipe.standin_steps, seed=recipe.seed)
            train_imagenet_standin(standin, staging / IMAGENET_STANDIN, half=half, log=log)
        (staging / RECIPE_FILE).write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    log(f"[demo-models] built {', '.join(components)} into {out} in {time.perf_counter() - start:.0f}s")
    return DemoModelPaths.under(out)


def _train_pedestrian_models(
    staging: Path, train_source: Path, recipe: DemoRecipe, half: bool, components: Sequence[str], log: Log
) -> None:
    """The model folders of `components` (of `COMPONENTS`), trained on the procedural pedestrians."""
    # The training code (torch, diffusers, transformers) is imported on call: `DemoRecipe` and
    # `is_complete` stay light for the CLI's argument parsing and the tests that only check folders.
    from core.datasets.synthetic import ensure_synthetic_dataset
    from demo.tiny import tiny_blip2, tiny_clip, tiny_stable_diffusion
    from demo.tokenizers import train_clip_tokenizer, train_opt_tokenizer
    from demo.train_captioner import train_captioner
    from demo.train_clip import train_clip
    from demo.train_text_to_image import pipeline_pixels, train_autoencoder, train_text_to_image
    from demo.training import PedestrianCorpus

    corpora = []
    for domain, spec in recipe.synthetic_specs.items():
        corpora.append(PedestrianCorpus.from_market_folder(ensure_synthetic_dataset(train_source / domain, spec)))
    corpus = PedestrianCorpus.concat(corpora)
    identities = 2 * sum(spec.ids for spec in recipe.synthetic_specs.values())
    log(
        f"[demo-models] training set: {len(corpus)} images of {identities} identities in "
        f"{', '.join(recipe.domains)} under {train_source}; recipe ~{recipe.estimated_minutes:.0f} min on one "
        "thread of the reference machine"
    )
    seed = recipe.seed
    clip_tokenizer = train_clip_tokenizer([*corpus.descriptions, *corpus.context_words])
    if CLIP in components or TEXT_TO_IMAGE in components:
        clip_model, clip_processor = tiny_clip(seed=seed, tokenizer=clip_tokenizer)
        train_clip(
            clip_model, clip_processor, corpus.images, corpus.descriptions, recipe.clip_steps,
            batch_size=recipe.batch_size + recipe.batch_size // 2, seed=seed, log=log,
            contexts=corpus.contexts, domains=recipe.domains,
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
            seed=seed, log=log, contexts=corpus.contexts,
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


def _save(model, directory: Path, half: bool = False) -> None:
    """`save_pretrained` a pipeline or a (model, processor) pair; also write the tokenizers'
    vocab.json/merges.txt, the layout hub repos ship."""
    import torch

    from demo.tokenizers import write_vocab_files

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
        for name in (*BUILDABLE_COMPONENTS, RECIPE_FILE):
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
    "BUILDABLE_COMPONENTS",
    "DEMO_MODELS_VERSION",
    "DemoModelPaths",
    "DemoRecipe",
    "IMAGENET_STANDIN",
    "build_demo_models",
    "is_complete",
]
