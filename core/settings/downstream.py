"""Config of the downstream evaluation (the `downstream:` section of a run preset).

The grid is dataset x method x init x setting x seed; `fraction_datasets` / `fraction_methods`
narrow where the Fs/Ss settings run (the paper runs them on Market-1501 with AGW only, Table 3,
and the supervised setting everywhere, Table 2). Method names and `method_options` are checked
against the method registry by `eval.downstream.runner.run_downstream` before Ray starts (the
registry imports torch; this module stays light because every preset loads it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from core.config import StrictModel, UriStr, require_unique
from core.datasets.config import SourceConfig, SyntheticSpec
from core.settings.reid import ReidTrainConfig

InitName = Literal["ours", "imagenet", "random"]
INIT_OURS, INIT_IMAGENET, INIT_RANDOM = "ours", "imagenet", "random"
# ReidTrainConfig fields that a downstream grid sets per cell or per trial; setting them under
# `downstream.train` would be silently ignored, so it is an error instead.
_PER_CELL_TRAIN_FIELDS = {
    "init": "downstream.inits",
    "seed": "downstream.seeds",
    "use_gpu": "downstream.gpus_per_trial",
    "cpus_per_worker": "downstream.cpus_per_trial",
    "num_workers": "(one process per trial; scale out with more trials)",
}


def demo_benchmark() -> SourceConfig:
    """The embedded default's held-out benchmark: procedural pedestrians drawn with seed 7, so
    its identities differ from those of the factory's demo source (seed 0)."""
    return SourceConfig(
        kind="synthetic",
        root=Path(".cache/demo-benchmark"),
        name="demo-benchmark",
        generate=SyntheticSpec(ids=48, cameras=4, seed=7, images_per_camera=3),
    )


SettingKind = Literal["supervised", "fs", "ss", "unsupervised", "da", "dg"]
SUPERVISED, UNSUPERVISED, ADAPTATION, GENERALIZATION = "supervised", "unsupervised", "da", "dg"
# Settings that use the whole of their data (no percent in the name).
WHOLE_DATA_SETTINGS = (SUPERVISED, UNSUPERVISED, ADAPTATION, GENERALIZATION)
_SETTING_LABELS = {SUPERVISED: "supervised", UNSUPERVISED: "unsupervised", ADAPTATION: "DA", GENERALIZATION: "DG"}
_SETTING_PATTERN = re.compile(r"^(fs|ss)(\d{1,3})$")


@dataclass(frozen=True, order=True)
class Setting:
    """One evaluation setting of the paper: `supervised` (Table 2), `fs<percent>` / `ss<percent>`
    (Table 3), `unsupervised` (Table 4), `da` (Table 5), `dg` (Table 6)."""

    kind: SettingKind
    percent: int = 100

    def __post_init__(self) -> None:
        if self.kind in WHOLE_DATA_SETTINGS and self.percent != 100:
            raise ValueError(f"the {self.kind} setting uses all data, got percent={self.percent}")
        if not 1 <= self.percent <= 100:
            raise ValueError(f"setting percent must be in 1..100, got {self.percent}")

    @classmethod
    def parse(cls, name: str) -> Setting:
        """`supervised`, `unsupervised`, `da`, `dg`, `fs10` ... `fs100`, `ss10` ... `ss100` (any percent 1-100)."""
        if name in WHOLE_DATA_SETTINGS:
            return cls(name)  # type: ignore[arg-type]
        match = _SETTING_PATTERN.match(name)
        if match is None:
            raise ValueError(f"unknown setting {name!r}: use 'supervised', 'fs<percent>', 'ss<percent>' "
                             "(e.g. fs30), 'unsupervised', 'da' or 'dg'")
        return cls(match.group(1), int(match.group(2)))  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        return self.kind if self.kind in WHOLE_DATA_SETTINGS else f"{self.kind}{self.percent}"

    @property
    def label(self) -> str:
        """As the paper writes it: `supervised`, `Fs 30%`, `Ss 50%`, `unsupervised`, `DA`, `DG`."""
        return _SETTING_LABELS.get(self.kind) or f"{self.kind.capitalize()} {self.percent}%"

    @property
    def trains_with_labels_of_the_dataset(self) -> bool:
        """supervised / Fs / Ss: a supervised method fine-tunes on the dataset's own labels."""
        return self.kind in (SUPERVISED, "fs", "ss")

    def __str__(self) -> str:
        return self.name


class AdaptationPair(StrictModel):
    """One domain-adaptation task: labelled `source` -> unlabelled `target` (names in `datasets`)."""

    source: str
    target: str

    @model_validator(mode="after")
    def _different(self) -> AdaptationPair:
        if self.source == self.target:
            raise ValueError(f"adaptation {self.source} -> {self.target}: source and target must differ")
        return self

    @property
    def name(self) -> str:
        return f"{self.source}->{self.target}"


class GeneralizationConfig(StrictModel):
    """The domain-generalization protocol (the paper's Table 6, after DualNorm / MetaBIN): train on
    the labelled `sources` merged (all their images, as the DG literature does), test on each
    unseen `target` over `splits` random query/gallery splits (`core.datasets.test_splits`)."""

    sources: list[str] = Field(min_length=1, description="dataset names (in `datasets`) trained on together")
    targets: list[str] = Field(min_length=1, description="dataset names tested on; never trained on")
    splits: int = Field(10, ge=1, description="random query/gallery splits per target (10 in the literature)")
    methods: list[str] = Field(
        default_factory=lambda: ["bot"], min_length=1,
        description="supervised methods trained on the merged sources (`bot`: the multi-source baseline)",
    )

    @model_validator(mode="after")
    def _disjoint(self) -> GeneralizationConfig:
        require_unique(self.sources, "generalization.sources")
        require_unique(self.targets, "generalization.targets")
        require_unique(self.methods, "generalization.methods")
        shared = sorted(set(self.sources) & set(self.targets))
        if shared:
            raise ValueError(f"generalization: {shared} are both sources and targets; a DG target must be unseen")
        return self

    @property
    def name(self) -> str:
        """The cell's dataset name: the merged sources."""
        return "+".join(self.sources)


class DownstreamConfig(StrictModel):
    """Downstream Re-ID evaluation of a pre-trained backbone (the paper's Sec. 4.2).

    `train` is the fine-tuning recipe every cell shares (fields not given keep the BoT defaults of
    core/settings/reid.py: ResNet-50, 256x128, 120 epochs); its `init` and `seed` come from `inits`
    and `seeds`. `ours` is the backbone file given with
    `--backbone` (or `backbone`), which must fit `train.arch`.
    """

    backbone: UriStr | None = Field(None, description="the backbone file or URI to evaluate (`ours`); --backbone overrides")
    out_dir: UriStr = Field("outputs/downstream", description="output folder or URI (s3://, gs://, ...); --out overrides")
    datasets: list[SourceConfig] = Field(default_factory=lambda: [demo_benchmark()], min_length=1)
    methods: list[str] = Field(default_factory=lambda: ["bot", "agw"], min_length=1)
    method_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-method options, validated by the method's options model (when it runs)",
    )
    inits: list[InitName] = Field(default_factory=lambda: ["ours", "imagenet", "random"], min_length=1)
    settings: list[str] = Field(default_factory=lambda: ["supervised"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    # Not cross-checked against `datasets` / `methods`, so `--set downstream.methods=[bot]` works
    # on a preset that names AGW here; the runner says when no Fs/Ss cell is left.
    fraction_datasets: list[str] = Field(
        default_factory=list, description="dataset names the Fs/Ss settings run on; empty = all"
    )
    fraction_methods: list[str] = Field(
        default_factory=list, description="methods the Fs/Ss settings run with; empty = all"
    )
    supervised_datasets: list[str] = Field(
        default_factory=list, description="dataset names the supervised / Fs / Ss settings run on; empty = all"
    )
    unsupervised_datasets: list[str] = Field(
        default_factory=list, description="dataset names the unsupervised setting runs on (labels hidden); "
        "empty = those of the supervised settings"
    )
    unsupervised_methods: list[str] = Field(
        default_factory=lambda: ["cluster_contrast"], min_length=1,
        description="methods of the unsupervised and da settings (eval.downstream.unsupervised.UNSUPERVISED_METHODS)",
    )
    adaptation: list[AdaptationPair] = Field(
        default_factory=list, description="the da setting's tasks: [{source: A, target: B}] (names in `datasets`)"
    )
    adaptation_source_method: str = Field(
        "bot", description="the supervised method trained on the labelled source before adapting to the target"
    )
    generalization: GeneralizationConfig | None = Field(None, description="the dg setting's sources and targets")
    fs_min_images_per_id: int = Field(2, ge=1, description="Fs keeps at least this many images per identity")
    ss_min_identities: int = Field(2, ge=2, description="Ss keeps at least this many identities")
    train: ReidTrainConfig = Field(default_factory=lambda: ReidTrainConfig(init=INIT_RANDOM))
    imagenet_weights: Literal["cache", "download"] = Field(
        "download",
        description="where `imagenet` weights may come from: the local Hugging Face cache only, "
        "or also downloaded when missing where downloads are allowed (HF_HUB_OFFLINE=0, the hub "
        "rule every model follows); unavailable weights are reported, never replaced (unless "
        "`imagenet_standin` names a stand-in)",
    )
    imagenet_standin: UriStr | None = Field(
        None,
        description="a backbone file (or URI) used for the `imagenet` init when timm's real ImageNet weights "
        "are not available (e.g. demo/weights/imagenet-standin/backbone.safetensors: `python -m demo "
        "--components imagenet-standin`); it must fit `train.arch`, and the report names it as the stand-in",
    )
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float | Literal["auto"] = Field(
        "auto", description="GPUs per trial; auto = 1 when the cluster has (or can add) GPUs, else 0"
    )
    max_concurrent_trials: int | None = Field(None, ge=1)
    checkpoint_every: int = Field(
        0, ge=0, description="epochs between trial checkpoints (an interrupted trial resumes from "
        "its last one); 0 = none, an interrupted trial restarts"
    )
    max_failures: int = Field(1, ge=0, description="retries of a failed trial (node loss, OOM)")
    plots: bool = True
    debug_fail_cells: list[str] = Field(
        [], description="cell keys (dataset/method/init/setting/seedK) whose trials raise once their execution "
        "is logged: exercises error reporting and resume, as generation.debug_fail_identities does")

    @field_validator("train", mode="before")
    @classmethod
    def _check_train(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value  # a ReidTrainConfig built in code: per-cell fields are simply overridden
        # The neutral values are accepted, so a saved (resolved) config loads again.
        neutral = {"init": INIT_RANDOM, "seed": 0, "use_gpu": "auto", "cpus_per_worker": None, "num_workers": 1}
        for name in sorted(set(value) & set(_PER_CELL_TRAIN_FIELDS)):
            if value[name] != neutral[name]:
                raise ValueError(f"train.{name} is set per cell; use {_PER_CELL_TRAIN_FIELDS[name]} instead")
        return {**value, "init": INIT_RANDOM}  # placeholder: each cell sets its own

    @field_validator("settings")
    @classmethod
    def _check_settings(cls, names: list[str]) -> list[str]:
        for name in names:
            Setting.parse(name)  # raises ValueError naming the bad entry
        return names

    @field_validator("settings", "methods", "inits", "seeds")
    @classmethod
    def _unique(cls, values: list[Any]) -> list[Any]:
        require_unique(values)
        return values

    @field_validator("gpus_per_trial")
    @classmethod
    def _check_gpus(cls, value: float | str) -> float | str:
        if value != "auto" and value < 0:
            raise ValueError("gpus_per_trial must be >= 0 or 'auto'")
        return value

    @model_validator(mode="after")
    def _check_grid(self) -> DownstreamConfig:
        names = [d.source_name for d in self.datasets]
        require_unique(names, "dataset names", " (set 'name')")
        require_unique(self.unsupervised_methods, "unsupervised_methods")
        require_unique([pair.name for pair in self.adaptation], "adaptation pairs")
        named = {
            "supervised_datasets": self.supervised_datasets,
            "unsupervised_datasets": self.unsupervised_datasets,
            "adaptation": [name for pair in self.adaptation for name in (pair.source, pair.target)],
            "generalization": [*self.generalization.sources, *self.generalization.targets] if self.generalization else [],
        }
        for field_name, used in named.items():
            unknown = sorted(set(used) - set(names))
            if unknown:
                raise ValueError(f"{field_name}: {unknown} are not in downstream.datasets (names: {names})")
        kinds = {s.kind for s in self.setting_list}
        if ADAPTATION in kinds and not self.adaptation:
            raise ValueError("setting 'da' needs downstream.adaptation: [{source: A, target: B}]")
        if GENERALIZATION in kinds and self.generalization is None:
            raise ValueError("setting 'dg' needs downstream.generalization: {sources: [...], targets: [...]}")
        return self

    def datasets_for(self, setting: Setting) -> list[str]:
        """The dataset names (for da: pair names, for dg: the merged sources' name) `setting` runs on."""
        everything = [d.source_name for d in self.datasets]
        supervised = self.supervised_datasets or everything
        if setting.kind == UNSUPERVISED:
            return self.unsupervised_datasets or supervised
        if setting.kind == ADAPTATION:
            return [pair.name for pair in self.adaptation]
        if setting.kind == GENERALIZATION:
            return [self.generalization.name] if self.generalization else []
        if setting.kind in ("fs", "ss") and self.fraction_datasets:
            return [name for name in supervised if name in self.fraction_datasets]
        return supervised

    def methods_for(self, setting: Setting) -> list[str]:
        """The method names `setting` runs with."""
        if setting.kind in (UNSUPERVISED, ADAPTATION):
            return self.unsupervised_methods
        if setting.kind == GENERALIZATION:
            return self.generalization.methods if self.generalization else []
        if setting.kind in ("fs", "ss") and self.fraction_methods:
            return [name for name in self.methods if name in self.fraction_methods]
        return self.methods

    def source_config(self, name: str) -> SourceConfig:
        """The `datasets` entry called `name`."""
        return next(d for d in self.datasets if d.source_name == name)

    def datasets_of_cell(self, dataset: str, setting: Setting) -> list[SourceConfig]:
        """Every dataset a cell of `setting` on `dataset` (a pair / merged name for da / dg) reads."""
        if setting.kind == ADAPTATION:
            pair = next(p for p in self.adaptation if p.name == dataset)
            return [self.source_config(pair.source), self.source_config(pair.target)]
        if setting.kind == GENERALIZATION and self.generalization is not None:
            return [self.source_config(n) for n in (*self.generalization.sources, *self.generalization.targets)]
        return [self.source_config(dataset)]

    @property
    def setting_list(self) -> list[Setting]:
        return [Setting.parse(name) for name in self.settings]
