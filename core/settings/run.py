"""The composed run config: one YAML preset configures the whole factory run.

`load_run_config` is the single place presets are read; everything it returns is validated, so
an unknown key or wrong type fails before Ray starts or a model loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import Field, model_validator

from core.settings.downstream import DownstreamConfig
from core.settings.experiment import ExperimentConfig
from core.cluster import RayConfig
from core.config import StrictModel, load_config, require_unique
from core.datasets.config import SourceConfig
from core.settings.stages import CaptionConfig, FilterConfig, GenerationConfig, OutputConfig, SequenceConfig
from core.settings.pretrain import PretrainConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PRESET = REPO_ROOT / "configs" / "demo.yaml"


class RunConfig(StrictModel):
    sources: list[SourceConfig] = Field(min_length=1)
    sequences: SequenceConfig = SequenceConfig()
    caption: CaptionConfig = CaptionConfig()
    generation: GenerationConfig = GenerationConfig()
    filter: FilterConfig = FilterConfig()
    output: OutputConfig = OutputConfig()
    ray: RayConfig = RayConfig()
    downstream: DownstreamConfig = DownstreamConfig()
    pretrain: PretrainConfig = PretrainConfig()
    experiment: ExperimentConfig = ExperimentConfig()

    @model_validator(mode="after")
    def _unique_source_names(self) -> RunConfig:
        require_unique([s.source_name for s in self.sources], "source names", " (set 'name')")
        return self


def load_run_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a preset (default: `configs/demo.yaml`) with `--set` overrides, validated."""
    return load_config(RunConfig, path if path is not None else DEFAULT_PRESET, overrides)
