"""Identity consistency of DI: the Re-ID filter pass rate of samples generated after the
per-identity fine-tune vs samples of the un-fine-tuned base model, with the same prompts and
seeds, scored by the filter model a build trained (`DIR/filter_models/<source>`). Runs the
stages in this process (no Ray); `eval.experiment` reports it per build and
`benchmarks/identity_consistency.py` prints it.

The gain (`consistency_gain`) is paired twice over: each sample seed gives one base-model and one
fine-tuned image of the same prompt, and each identity's gain is its fine-tuned pass rate minus
its base-model pass rate over the same seeds (the mean of its per-seed differences). The
interval is over identities, the independent units: an identity's samples share one fine-tune,
so its seeds are not independent draws and treating them so would narrow the interval falsely.
It is Student's t (`stats.paired_interval`, as the experiment's other paired differences) by
default: with the few identities the experiment measures (2 to 8) a percentile bootstrap cannot
be wider than the range of the observed gains and under-covers, while t widens with 1/n. The
paired bootstrap over identities (fixed seed) is there for many identities and skewed gains."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.storage import Location
from core.settings.run import RunConfig
from eval.experiment.stats import paired_interval

T_INTERVAL, BOOTSTRAP = "t", "bootstrap"


@dataclass(frozen=True)
class PassRate:
    rate: float  # share of samples at or above the Re-ID filter's threshold
    mean_score: float
    samples: int
    identities: tuple[str, ...] = ()  # the identities measured, in plan order
    per_identity: tuple[float, ...] = ()  # each identity's pass rate over its samples (its seeds)


@dataclass(frozen=True)
class PairedGain:
    """Fine-tuned minus base-model pass rate: the mean over identities of each one's gain, and
    its 95 % interval (NaN below two identities)."""

    mean: float
    low: float
    high: float
    identities: int
    method: str  # T_INTERVAL or BOOTSTRAP

    def as_marker(self) -> dict[str, float | int | str | None]:
        """The marker's keys (JSON: an interval that does not exist is null, not NaN)."""
        def number(value: float) -> float | None:
            return None if math.isnan(value) else value

        return {"consistency_gain": number(self.mean), "consistency_gain_low": number(self.low),
                "consistency_gain_high": number(self.high), "consistency_gain_identities": self.identities,
                "consistency_gain_method": self.method}


def paired_gain(base: Sequence[float], fine_tuned: Sequence[float], method: str = T_INTERVAL,
                resamples: int = 10_000, seed: int = 0) -> PairedGain:
    """The mean of `fine_tuned[i] - base[i]` over identities i with a 95 % interval: Student's t
    (`T_INTERVAL`) or the 2.5 / 97.5 percentiles of the mean over `resamples` resamplings of the
    identities with replacement (`BOOTSTRAP`, generator seeded by `seed`). See the module doc."""
    if len(base) != len(fine_tuned):
        raise ValueError(f"paired rates need one base and one fine-tuned rate per identity, got "
                         f"{len(base)} and {len(fine_tuned)}")
    differences = [f - b for b, f in zip(base, fine_tuned)]
    if method == T_INTERVAL:
        mean, low, high = paired_interval(differences)
    elif method == BOOTSTRAP:
        mean, low, high = _bootstrap_interval(np.asarray(differences, float), resamples, seed)
    else:
        raise ValueError(f"interval method must be {T_INTERVAL!r} or {BOOTSTRAP!r}, got {method!r}")
    return PairedGain(mean, low, high, len(differences), method)


def _bootstrap_interval(differences: np.ndarray, resamples: int, seed: int) -> tuple[float, float, float]:
    n = len(differences)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = float(differences.mean())
    if n < 2:
        return mean, math.nan, math.nan
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    low, high = np.percentile(differences[draws].mean(axis=1), [2.5, 97.5])
    return mean, float(low), float(high)


def consistency_gain(rates: dict[str, PassRate], method: str = T_INTERVAL) -> PairedGain:
    """The gain of `identity_consistency`'s result, paired by identity (an identity whose samples
    failed in one of the two models has no pair and is left out)."""
    base = dict(zip(rates["base_model"].identities, rates["base_model"].per_identity))
    tuned = dict(zip(rates["fine_tuned"].identities, rates["fine_tuned"].per_identity))
    paired = [identity for identity in tuned if identity in base]
    return paired_gain([base[i] for i in paired], [tuned[i] for i in paired], method)


def consistency_entries(rates: dict[str, PassRate], method: str = T_INTERVAL) -> dict[str, Any]:
    """What a build's marker keeps of `identity_consistency`'s result (JSON): both pass rates,
    the paired gain with its interval (`PairedGain.as_marker`) and each identity's two rates."""
    base, tuned = rates["base_model"], rates["fine_tuned"]
    per_identity: dict[str, dict[str, float]] = {}
    for label, rate in (("base_model", base), ("fine_tuned", tuned)):
        for identity, value in zip(rate.identities, rate.per_identity):
            per_identity.setdefault(identity, {})[label] = value
    return {"fine_tuned": tuned.rate, "base_model": base.rate, **consistency_gain(rates, method).as_marker(),
            "consistency_per_identity": per_identity}


def identity_consistency(config: RunConfig, filter_models: Location, identities: int) -> dict[str, PassRate]:
    """{"base_model": ..., "fine_tuned": ...} over the first `identities` planned identities, scored
    by the Re-ID models in `filter_models/<source>` (a build's `DIR/filter_models`)."""
    from factory.build import load_sources, resolve_models
    from factory.sequences import plan_identities, read_sequences
    from factory.stages.caption import CaptionStage
    from factory.filters import FilterStage
    from factory.filters.reid import FilterModelSpec
    from factory.stages.generate import GenerationStage

    config = resolve_models(config, log=lambda _: None)
    datasets = load_sources(config, log=lambda _: None)
    plan = plan_identities(datasets, config.sequences)[:identities]
    table, _ = read_sequences(plan, config.sequences, config.generation.seed)
    models = {d.name: FilterModelSpec.load(filter_models / d.name) for d in datasets}
    caption = CaptionStage(config.caption)
    caption.setup()
    captioned = caption.process_batch(table)
    # Always the Re-ID filter: consistency is about identity, whatever filter the build kept by.
    filtering = FilterStage(config.filter.model_copy(update={"kind": "reid"}), models)
    filtering.setup()
    rates = {}
    for label, steps in (("base_model", 0), ("fine_tuned", config.generation.train_steps)):
        stage = GenerationStage(config.generation.model_copy(update={"train_steps": steps}), config.output,
                                num_threads=1)
        stage.setup()
        rows = filtering.process_batch(stage.process_batch(captioned)).to_pylist()
        scores = [s for row in rows for s in row["scores"]]
        kept = sum(k for row in rows for k in row["kept"])
        # Samples of one identity come from the same seeds in both models (the identity's seed):
        # its two rates are paired, seed by seed.
        measured = [row for row in rows if row["kept"]]
        rates[label] = PassRate(kept / len(scores), statistics.mean(scores), len(scores),
                                tuple(row["identity"] for row in measured),
                                tuple(sum(row["kept"]) / len(row["kept"]) for row in measured))
    return rates
