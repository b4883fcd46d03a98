"""Config of one source dataset (a `sources:` entry in a preset)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.storage import is_remote

from core.config import StrictModel, UriStr

SourceKind = Literal["market1501", "msmt17", "cuhk03", "airport", "folder", "csv", "synthetic"]


class SyntheticSpec(StrictModel):
    """Parameters of the procedural Re-ID dataset (`python -m core.datasets.synthetic`)."""

    ids: int = Field(120, ge=2, description="identities in the training split (test split gets as many)")
    cameras: int = Field(4, ge=2, le=9, description="cameras; Market-style names allow c1..c9")
    seed: int = 0
    images_per_camera: int = Field(3, ge=1, description="consecutive frames per identity per camera")


class SourceConfig(StrictModel):
    """Where a source dataset lives and how to read it.

    - `market1501`, `cuhk03` (CUHK03-NP, Market layout; `variant: labeled|detected`),
      `synthetic` (Market layout; generated into `root` from `generate` when absent)
    - `msmt17` (`variant: v1` with `list_*.txt`, or `v2` with `mask_train_v2/` folders)
    - `airport` (ALERT; `list_file` names the image list)
    - `folder` (root/<pid>/<images>) and `csv` (`list_file` with columns path,pid,camid[,split])
    """

    kind: SourceKind
    root: UriStr = Field(description="a local folder, or a URI (s3://, gs://, ...) the driver fetches once")
    name: str | None = Field(None, description="source name stored with every row; defaults to kind")
    variant: str | None = None
    list_file: UriStr | None = Field(None, description="a local path or URI; relative ones are under root")
    generate: SyntheticSpec | None = None

    @model_validator(mode="after")
    def _check_kind_options(self) -> SourceConfig:
        allowed_variants = {"msmt17": {"v1", "v2"}, "cuhk03": {"labeled", "detected"}}
        if self.variant is not None and self.variant not in allowed_variants.get(self.kind, set()):
            raise ValueError(
                f"variant {self.variant!r} is not valid for kind {self.kind!r} "
                f"(valid: {sorted(allowed_variants.get(self.kind, set())) or 'none'})"
            )
        if self.generate is not None and self.kind != "synthetic":
            raise ValueError(f"'generate' only applies to kind 'synthetic', not {self.kind!r}")
        if self.kind == "synthetic" and is_remote(self.root):
            raise ValueError("kind 'synthetic' generates into a local root; give a local folder")
        return self

    @property
    def source_name(self) -> str:
        return self.name or self.kind
