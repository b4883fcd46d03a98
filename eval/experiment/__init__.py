"""The evidence experiment: does pre-training on the factory's images beat the alternatives?

`python -m eval.experiment` runs build -> pre-train -> downstream for a grid of arms x seeds (see
`config.ExperimentConfig`) and reports each arm against the source-only control, paired by seed.
This package holds the grid's config, its statistics and its report; the chain itself, which
runs factory builds, is composed at the top layer (`factory.experiment`).
"""
