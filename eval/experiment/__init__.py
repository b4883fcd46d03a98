"""The evidence experiment: does pre-training on the factory's images beat the alternatives?

`python -m eval.experiment` runs build -> pre-train -> downstream for a grid of arms x seeds (see
`config.ExperimentConfig`) and reports each arm against the source-only control, paired by seed.
This package holds the chain (`run`: builds, pre-training and downstream cells, composed here
at the top layer, above the factory whose builds it runs), its identity-consistency measurement
(`consistency`), statistics and report; the grid's config is `core.settings.experiment`.
"""
