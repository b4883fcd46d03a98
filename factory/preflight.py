"""The build's check phase: refuse, before anything heavy, every value the models or the data
cannot take.

Pydantic already refuses unknown keys, wrong types and out-of-range numbers when the config
loads. What it cannot see needs context: another key (a threshold means something only for the
chosen filter), the configured model (its VAE's scale factor, its tokenizers' vocabularies) or
the dataset listing (which identities exist, what a filter checkpoint was trained on). Those
rules live here, one small function each, in three phases ordered by what they read:

1. `check_config`  - the resolved config alone (microseconds);
2. `check_models`  - model configs and tokenizer vocabularies: small JSON files of a local
                     folder or of the Hugging Face cache, never weights (milliseconds);
3. `check_sources` - the dataset listing and the filter checkpoints' metadata.

Each phase returns every problem it finds, so a user fixes them in one go; `raise_problems`
turns them into one `PreflightError` naming key, value, reason and the file they came from.
Nothing here imports torch, diffusers, transformers or Ray.
"""

from __future__ import annotations

import importlib
import math
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.storage import Location, resolve
from core.config import ConfigError
from core.datasets.base import ReidDataset
from factory.filters import FILTERS, ImageFilter
from factory.models.locate import read_model_json
from core.settings.run import RunConfig
from factory.sequences import IdentitySequence
from factory.stages.fine_tune_methods import FINETUNE_METHODS
from factory.stages.sample import SAMPLERS
from core.settings.stages import fault_target

# Stable Diffusion's pipelines refuse sizes that are not multiples of 8 (`check_inputs`),
# whatever the VAE; the VAE itself needs multiples of its own downsampling factor.
PIPELINE_SIZE_MULTIPLE = 8
PROMPT_FIELDS = {"caption.prompt_template": {"iir", "caption"}, "caption.reference_template": {"caption"}}
LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class Problem:
    """One refused value: the config key, the value, why, and the file that shows it (if any)."""

    key: str
    value: Any
    reason: str
    file: str | None = None

    def render(self) -> str:
        where = f" [{self.file}]" if self.file else ""
        return f"{self.key} = {self.value!r}: {self.reason}{where}"


class PreflightError(ConfigError):
    """The check phase refused the run; nothing heavy has started and nothing was written."""


def raise_problems(problems: Sequence[Problem], origin: str) -> None:
    """Raise one `PreflightError` listing every problem (capped, with the count), or return."""
    if not problems:
        return
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    lines = [f"  {p.render()}" for p in problems[:LISTED_PROBLEMS]]
    if len(problems) > LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - LISTED_PROBLEMS} more")
    raise PreflightError(f"config check failed ({origin}): {count}, nothing was started:\n" + "\n".join(lines))


# -- phase 1: the config alone -------------------------------------------------------------------
ConfigRule = Callable[[RunConfig], Iterable[Problem]]


def registered_filter(config: RunConfig) -> type[ImageFilter] | None:
    """The class `filter.kind` names, or None when no filter is registered under it."""
    return FILTERS.get(config.filter.kind) if config.filter.kind in FILTERS else None


def filter_kind_is_registered(config: RunConfig) -> Iterable[Problem]:
    if registered_filter(config) is None:
        yield Problem("filter.kind", config.filter.kind, f"no filter is registered under that name (registered: "
                      f"{', '.join(FILTERS.names())})")


def threshold_in_score_range(config: RunConfig) -> Iterable[Problem]:
    """A threshold outside the range of the filter's scores keeps nothing (or everything) and
    cannot be what was meant."""
    f, image_filter = config.filter, registered_filter(config)
    if image_filter is None:
        return
    low, high = image_filter.score_range
    if not low <= f.threshold <= high:
        yield Problem("filter.threshold", f.threshold, f"the {f.kind!r} filter scores in [{low:g}, {high:g}]; a "
                      f"threshold outside keeps {'no image' if f.threshold > high else 'every image'}")


def filter_settings_suit_the_filter(config: RunConfig) -> Iterable[Problem]:
    """The chosen filter's own rules (`ImageFilter.config_problems`: CLIP needs negative prompts)."""
    image_filter = registered_filter(config)
    for key, value, reason in image_filter.config_problems(config.filter) if image_filter else ():
        yield Problem(key, value, reason)


def prompt_templates_have_their_fields(config: RunConfig) -> Iterable[Problem]:
    """P_E must carry the IIR and the caption (LPE); the reference prompt must carry the caption
    and must not carry the IIR (the Attribute Reference Set comes from the base model without it)."""
    for key, required in PROMPT_FIELDS.items():
        template = getattr(config.caption, key.split(".")[1])
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as err:  # an unmatched brace
            yield Problem(key, template, f"not a valid format string ({err})")
            continue
        missing = sorted(required - fields)
        unknown = sorted(fields - required)
        if missing:
            yield Problem(key, template, f"must contain {', '.join('{' + m + '}' for m in missing)}")
        if unknown:
            yield Problem(key, template, f"unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
                                         f"allowed: {', '.join('{' + r + '}' for r in sorted(required))}")


def iir_token_is_one_word(config: RunConfig) -> Iterable[Problem]:
    token = config.caption.iir_token
    if len(token.split()) != 1 or token != token.strip() or any(c in token for c in "{}"):
        yield Problem("caption.iir_token", token, "must be one word without spaces or braces (a single rare token)")


def prior_preservation_has_references(config: RunConfig) -> Iterable[Problem]:
    g = config.generation
    if g.prior_loss_weight <= 0 or g.train_steps == 0:
        return
    if g.reference_images == 0:
        yield Problem("generation.reference_images", 0, f"generation.prior_loss_weight={g.prior_loss_weight} needs an "
                      "Attribute Reference Set; set reference_images > 0, or prior_loss_weight=0 for plain DreamBooth")
    elif g.reference_images < g.train_batch_size:
        yield Problem("generation.reference_images", g.reference_images, "each fine-tune step draws "
                      f"generation.train_batch_size={g.train_batch_size} reference images; the set must hold at least "
                      "that many")


def sequence_bounds_ordered(config: RunConfig) -> Iterable[Problem]:
    s = config.sequences
    if s.min_images > s.max_images:
        yield Problem("sequences.min_images", s.min_images,
                      f"greater than sequences.max_images={s.max_images}: every identity would be skipped")


def eight_bit_adam_loads(config: RunConfig) -> Iterable[Problem]:
    if not config.generation.use_8bit_adam:
        return
    try:
        importlib.import_module("bitsandbytes")
    except Exception as err:  # ImportError, or a broken native library raising anything else
        first_line = (str(err).splitlines() or [""])[0][:160]
        yield Problem("generation.use_8bit_adam", True, f"bitsandbytes cannot be loaded here ({type(err).__name__}: "
                      f"{first_line}); install it (Linux x86_64) or set generation.use_8bit_adam=false")


def filter_checkpoints_name_sources(config: RunConfig) -> Iterable[Problem]:
    names = {s.source_name for s in config.sources}
    for source in sorted(set(config.filter.reid_checkpoints) - names):
        yield Problem(f"filter.reid_checkpoints.{source}", str(config.filter.reid_checkpoints[source]),
                      f"no source is named {source!r} (sources: {sorted(names)})")


def debug_failures_name_identities(config: RunConfig) -> Iterable[Problem]:
    names = {s.source_name for s in config.sources}
    for entry in config.generation.debug_fail_identities:
        identity, kind = fault_target(entry)
        source, _, pid = identity.rpartition("/")
        if source not in names or not pid.lstrip("-").isdigit() or kind not in ("error", "oom", "cuda"):
            yield Problem("generation.debug_fail_identities", entry,
                          f"not an identity 'SOURCE/PID[:oom|:cuda]' of the configured sources {sorted(names)}")


def generation_components_are_registered(config: RunConfig) -> Iterable[Problem]:
    """`generation.scheduler` and `generation.finetune` name a registered sampler and fine-tune method."""
    for registry, name in ((SAMPLERS, config.generation.scheduler), (FINETUNE_METHODS, config.generation.finetune)):
        if name not in registry:
            yield Problem(registry.key, name, registry.unknown(name))


CONFIG_RULES: tuple[ConfigRule, ...] = (
    filter_kind_is_registered, threshold_in_score_range, filter_settings_suit_the_filter,
    prompt_templates_have_their_fields, iir_token_is_one_word,
    prior_preservation_has_references, sequence_bounds_ordered, eight_bit_adam_loads, filter_checkpoints_name_sources,
    debug_failures_name_identities, generation_components_are_registered,
)


def check_config(config: RunConfig) -> list[Problem]:
    """Every problem the resolved config shows on its own."""
    return [problem for rule in CONFIG_RULES for problem in rule(config)]


# -- phase 2: model configs and vocabularies -------------------------------------------------------
def vae_scale_factor(model_id: str) -> tuple[int, Path] | None:
    """2 ** (number of VAE down blocks - 1), read from `vae/config.json` (diffusers' own rule)."""
    found = read_model_json(model_id, "vae/config.json")
    if found is None:
        return None
    vae, path = found
    return 2 ** (len(vae.get("block_out_channels", [0])) - 1), path


def tokenizer_vocabulary(model_id: str, subfolder: str = "") -> tuple[Mapping[str, int], Path] | None:
    """A tokenizer's vocabulary from `vocab.json` (slow tokenizers) or `tokenizer.json` (fast)."""
    prefix = f"{subfolder}/" if subfolder else ""
    if found := read_model_json(model_id, f"{prefix}vocab.json"):
        return found
    data, path = read_model_json(model_id, f"{prefix}tokenizer.json") or ({}, None)
    vocab = data.get("model", {}).get("vocab")
    return (vocab, path) if isinstance(vocab, dict) else None


def known_word_forms(vocabulary: Mapping[str, int], word: str) -> list[str]:
    """The entries of `vocabulary` that make `word` one known token: CLIP's end-of-word form
    (`sks</w>`), GPT-2/OPT's space-prefixed form (`Ġsks`) or the bare piece."""
    forms = {form for w in {word, word.lower()} for form in (w, f"{w}</w>", f"\u0120{w}")}
    return sorted(form for form in forms if form in vocabulary)


def resolution_fits_the_vae(config: RunConfig) -> Iterable[Problem]:
    g = config.generation
    scale, path = vae_scale_factor(g.base_model) or (1, None)
    multiple = math.lcm(PIPELINE_SIZE_MULTIPLE, scale)
    bad = [side for side in g.resolution if side % multiple]
    if bad:
        why = f"Stable Diffusion pipelines need multiples of {PIPELINE_SIZE_MULTIPLE}"
        if path is not None:
            why += f" and the VAE of {g.base_model} downsamples by {scale}"
        yield Problem("generation.resolution", list(g.resolution),
                      f"height and width must be multiples of {multiple} ({why})", str(path) if path else None)


def iir_token_unknown_to_tokenizers(config: RunConfig) -> Iterable[Problem]:
    """The paper's IIR is 'a meaningless text not in CLIP's vocabulary': a word either tokenizer
    already knows carries prior meaning into P_E (and may come back in captions)."""
    token = config.caption.iir_token
    if not config.caption.use_iir:
        return
    tokenizers = [(config.generation.base_model, "tokenizer", "the text encoder's tokenizer")]
    if config.caption.captions == "lpe":
        tokenizers.append((config.caption.model, "", "the captioner's tokenizer"))
    for model_id, subfolder, what in tokenizers:
        vocabulary, path = tokenizer_vocabulary(model_id, subfolder) or ({}, None)
        if known := known_word_forms(vocabulary, token):
            yield Problem("caption.iir_token", token,
                          f"{what} already knows it ({', '.join(known)}); choose a meaningless string such as 'zwx'",
                          str(path))


MODEL_RULES: tuple[ConfigRule, ...] = (resolution_fits_the_vae, iir_token_unknown_to_tokenizers)


def check_models(config: RunConfig) -> list[Problem]:
    """Problems between the config and the configured models (their small JSON files only).
    Models not on this machine are skipped here: the availability check names them."""
    return [problem for rule in MODEL_RULES for problem in rule(config)]


# -- phase 3: the dataset listing ----------------------------------------------------------------
def check_sources(config: RunConfig, datasets: Sequence[ReidDataset], plan: Sequence[IdentitySequence],
                  filter_models_dir: Location) -> list[Problem]:
    """Problems between the config and the listed data: filter checkpoints that do not exist or
    were not trained on their source, sources too small for the filter model's PK batches,
    fault-injection entries naming no planned identity."""
    problems: list[Problem] = []
    f, image_filter = config.filter, registered_filter(config)
    if image_filter is not None and image_filter.uses_reid_models:
        for dataset in datasets:
            configured = f.reid_checkpoints.get(dataset.name)
            if configured is not None:
                planned_pids = {s.source_pid for s in plan if s.source == dataset.name}
                problems.extend(_checkpoint_problems(dataset.name, resolve(configured), planned_pids))
            elif not (filter_models_dir / dataset.name / "filter_model.json").is_file():
                problems.extend(_trainable_problems(config, dataset))
    planned = {sequence.key for sequence in plan}
    if config.generation.replay_from:
        problems.extend(_replay_problems(config, resolve(config.generation.replay_from), planned))
    for entry in config.generation.debug_fail_identities:
        if fault_target(entry)[0] not in planned:
            problems.append(Problem("generation.debug_fail_identities", entry,
                                    f"not among the {len(planned)} planned identities"))
    return problems


def _checkpoint_problems(source: str, directory: Location, planned: set[int]) -> list[Problem]:
    key = f"filter.reid_checkpoints.{source}"
    meta_path = directory / "filter_model.json"
    if not meta_path.is_file():
        return [Problem(key, str(directory), "no filter_model.json there (point it at a DIR/filter_models/<source> "
                                            "folder written by a previous build)")]
    try:
        meta = meta_path.read_json()
        weights = directory / meta["weights"]
        trained_on = {int(pid) for pid in meta["labels"]}
    except (ValueError, KeyError, TypeError) as err:
        return [Problem(key, str(directory), f"unreadable filter_model.json ({type(err).__name__}: {err})", str(meta_path))]
    problems = []
    if not weights.is_file():
        problems.append(Problem(key, str(directory), f"its weights file {weights} does not exist", str(meta_path)))
    missing = sorted(planned - trained_on)
    if missing:
        problems.append(Problem(key, str(directory), f"not trained on source {source!r}: {len(missing)} of its "
                                f"{len(planned)} planned identities are not among the model's {len(trained_on)} (e.g. "
                                f"pids {missing[:5]})", str(meta_path)))
    return problems


def _trainable_problems(config: RunConfig, dataset: ReidDataset) -> list[Problem]:
    """The build trains a BoT filter model on this source: its PK sampler needs P identities."""
    reid = config.filter.reid
    identities = len(dataset.train_identities)
    if identities >= reid.ids_per_batch:
        return []
    return [Problem("filter.reid.ids_per_batch", reid.ids_per_batch, f"source {dataset.name!r} has {identities} "
                    "training identities, fewer than one PK batch needs; lower it, or give a trained model in "
                    f"filter.reid_checkpoints.{dataset.name}")]


# Settings that decide how a build runs, not what it generates: a replayed build may differ in them.
EXECUTION_KEYS = {
    "caption": {"concurrency", "num_gpus"},
    "generation": {"replay_from", "concurrency", "num_gpus", "max_retries", "max_failed_identities",
                   "circuit_breaker", "debug_fail_identities"},
}
REPLAYED_SECTIONS = ("sources", "sequences", "caption", "generation")


def _replay_problems(config: RunConfig, build: Location, planned: set[str]) -> list[Problem]:
    """`generation.replay_from` must be a build of the same generation settings that finished
    every planned identity: its samples then are exactly what this build would generate."""
    import yaml

    key = "generation.replay_from"
    try:
        theirs = RunConfig.model_validate(yaml.safe_load((build / "config.yaml").read_text()))
        finished = set(((build / "manifest.json").read_json())["identities"])
    except FileNotFoundError as err:
        return [Problem(key, build.uri, f"not a build folder ({err})")]
    except (ValueError, KeyError, TypeError) as err:
        return [Problem(key, build.uri, f"unreadable build ({type(err).__name__}: {err})")]
    changed = generation_changes(config, theirs)
    problems = []
    if changed:
        problems.append(Problem(key, build.uri, f"that build was made with other settings ({', '.join(changed[:8])}): "
                                                "its samples are not what this config generates", str(build / "config.yaml")))
    missing = sorted(planned - finished)
    if missing:
        problems.append(Problem(key, build.uri, f"{len(missing)} of the {len(planned)} planned identities are not "
                                                f"finished there (e.g. {missing[:3]}); finish that build first",
                                str(build / "manifest.json")))
    return problems


def generation_changes(config: RunConfig, other: RunConfig) -> list[str]:
    """The keys of `other` that make it generate other samples than `config` (empty: the same)."""
    ours = config.model_dump(mode="json", include=set(REPLAYED_SECTIONS))
    theirs = other.model_dump(mode="json", include=set(REPLAYED_SECTIONS))
    return [name for section in REPLAYED_SECTIONS
            for name in _changed_keys(section, ours[section], theirs[section], EXECUTION_KEYS.get(section, set()))]


def _changed_keys(section: str, ours: Any, theirs: Any, ignored: set[str]) -> list[str]:
    if not (isinstance(ours, dict) and isinstance(theirs, dict)):
        return [] if ours == theirs else [section]
    return [f"{section}.{name}" for name in sorted(set(ours) | set(theirs))
            if name not in ignored and ours.get(name) != theirs.get(name)]
