"""Config of one source dataset (a `sources:` entry in a preset).

`kind` names a registered source adapter (`core.datasets.registry.SOURCES`); the adapter class
says which options of the entry apply to it. The registry module imports no adapter, so this
module loads without a cycle; the adapters register when `core.datasets` is imported, which
importing this module does first.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator

from core.storage import is_remote

from core.config import StrictModel, UriStr
from core.datasets.registry import SOURCES


DEFAULT_DOMAIN = "campus"


class SyntheticSpec(StrictModel):
    """Parameters of the procedural Re-ID dataset (`python -m core.datasets.synthetic`)."""

    ids: int = Field(120, ge=2, description="identities in the training split (test split gets as many)")
    cameras: int = Field(4, ge=2, le=9, description="cameras; Market-style names allow c1..c9")
    seed: int = 0
    images_per_camera: int = Field(3, ge=1, description="consecutive frames per identity per camera")
    domain: str = Field(
        DEFAULT_DOMAIN,
        description="capture conditions (scene, light, viewpoint, sensor): a registered synthetic domain "
        "(core.datasets.synthetic.domains.DOMAINS); same seed, same identities in every domain. A domain "
        "suggests a camera count (its `suggested_cameras`); `cameras` sets it",
    )
    identity_traits: bool = Field(
        False,
        description="give every identity traits no caption names (a print on the top, body proportions, a fine "
        "texture on the lower garment; core.datasets.synthetic.traits), stable across its cameras, so identities "
        "with equal descriptions still differ; written per pid to traits.jsonl. Off: the world as it was",
    )

    @field_validator("domain")
    @classmethod
    def _registered_domain(cls, domain: str) -> str:
        # imported on use: the synthetic package imports this module
        from core.datasets.synthetic.domains import DOMAINS

        return DOMAINS.check(domain)

    @model_serializer(mode="wrap")
    def _earlier_world_unwritten(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The default domain without identity traits is the world of earlier versions: leaving those
        # defaults out of dumps keeps every digest made from a spec (finished downstream cells, builds,
        # experiment chains) valid.
        data = handler(self)
        if data.get("domain") == DEFAULT_DOMAIN:
            del data["domain"]
        if data.get("identity_traits") is False:
            del data["identity_traits"]
        return data


class SourceConfig(StrictModel):
    """Where a source dataset lives and how to read it.

    - `market1501`, `cuhk03` (CUHK03-NP, Market layout; `variant: labeled|detected`),
      `synthetic` (Market layout; generated into `root` from `generate` when absent)
    - `msmt17` (`variant: v1` with `list_*.txt`, or `v2` with `mask_train_v2/` folders)
    - `airport` (ALERT; `list_file` names the image list)
    - DG sources read whole into train: `personx` (Market layout per background subset;
      `variant: 1..6`, default all), `cuhk02` (`variant: all|p5-test`), `cuhk_sysu`
      (`cropped_images/`), and the small test datasets `viper`, `prid`, `grid`, `ilids`, whose
      random query/gallery splits `core.datasets.test_splits` draws by the adapter's `test_protocol`
    - `folder` (root/<pid>/<images>) and `csv` (`list_file` with columns path,pid,camid[,split])
    - any other kind a module registered in `SOURCES`
    """

    kind: str = Field(description="a registered source adapter (core.datasets.registry.SOURCES)")
    root: UriStr = Field(description="a local folder, or a URI (s3://, gs://, ...) the driver fetches once")
    name: str | None = Field(None, description="source name stored with every row; defaults to kind")
    variant: str | None = None
    list_file: UriStr | None = Field(None, description="a local path or URI; relative ones are under root")
    generate: SyntheticSpec | None = None

    @field_validator("kind")
    @classmethod
    def _registered_kind(cls, kind: str) -> str:
        return SOURCES.check(kind)

    @model_validator(mode="after")
    def _check_kind_options(self) -> SourceConfig:
        adapter = SOURCES.get(self.kind)
        if self.variant is not None and self.variant not in adapter.variants:
            raise ValueError(
                f"variant {self.variant!r} is not valid for kind {self.kind!r} "
                f"(valid: {sorted(adapter.variants) or 'none'})"
            )
        if self.generate is not None and not adapter.accepts_generate:
            generating = [name for name, source in SOURCES.items() if source.accepts_generate]
            raise ValueError(f"'generate' only applies to kind {' or '.join(map(repr, generating))}, not {self.kind!r}")
        if adapter.local_root_only and is_remote(self.root):
            raise ValueError(f"kind {self.kind!r} generates into a local root; give a local folder")
        return self

    @property
    def source_name(self) -> str:
        return self.name or self.kind
