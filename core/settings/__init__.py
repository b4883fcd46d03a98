"""Every section of a run preset, validated, at the bottom layer.

One YAML preset configures the whole run (build, pre-training, downstream, experiment), and each
command validates all of it before anything heavy starts. The commands live at different layers
(`python -m trainers.pretrain` below `python -m factory.build`, `python -m eval.downstream` above
both), so the schemas they all read live here, below every command, and no command imports
upward to validate a preset:

- `stages`: the generation pipeline's sections (`sequences`, `caption`, `generation`, `filter`,
  `output`);
- `reid`: the Re-ID trainer (`filter.reid`, `downstream.train`);
- `pretrain`, `downstream`, `experiment`: the other commands' sections;
- `run`: the composed `RunConfig` and `load_run_config`, the one place presets are read.

Pluggable components (filters, sources, samplers, fine-tune methods, downstream methods) are
named here as strings; their registries (`core.registry`) say which names exist.
"""
