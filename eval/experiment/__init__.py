"""The evidence experiment: does pre-training on the factory's images beat the alternatives?

`python -m eval.experiment` runs build -> pre-train -> downstream for a grid of arms x seeds (see
`core.settings.experiment.ExperimentConfig`) and reports each arm against the source-only control,
paired by seed; with `experiment.data_scale`, also the paper's Table 8 (pre-training on shares of
the main build's images and identities). Composed here at the top layer, above the factory whose
builds it runs: the driver (`run`), the builds (`builds`) with their identity-consistency
measurement (`consistency`), the pre-training sets and the chains that pre-train and fine-tune
(`chains`), the data-scale study's subsets (`scale`), statistics (`stats`) and report (`report`).
"""
