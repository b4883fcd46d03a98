"""Identity consistency of DI: the Re-ID filter pass rate of samples generated after the
per-identity fine-tune vs samples of the un-fine-tuned base model, with the same prompts and
seeds, scored by the filter model a build trained (`DIR/filter_models/<source>`). Runs the
stages in this process (no Ray); `eval.experiment` reports it per build and
`benchmarks/identity_consistency.py` prints it."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from core.storage import Location
from core.settings.run import RunConfig


@dataclass(frozen=True)
class PassRate:
    rate: float  # share of samples at or above the Re-ID filter's threshold
    mean_score: float
    samples: int


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
        rates[label] = PassRate(kept / len(scores), statistics.mean(scores), len(scores))
    return rates
