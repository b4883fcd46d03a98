"""Typed configuration: YAML presets with inheritance, `--set a.b=value` overrides, validation.

Every command loads its settings through `load_config` before any model or dataset is touched,
so a typo fails in milliseconds with the key and the file named, not an hour into a run. Presets
may inherit with `base: other.yaml` (resolved relative to the preset). The resolved config is
saved beside every output with `save_config`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, PositiveInt, ValidationError

from core.storage import atomic_local_path

BASE_KEY = "base"
# (height, width) everywhere in this project; a zero or negative side is refused at load time.
ImageSize = tuple[PositiveInt, PositiveInt]
# A location in a config: a local path or a URI (s3://, gs://, ...), kept as text, since
# pathlib would fold "s3://bucket/x" into "s3:/bucket/x". Path objects are accepted.
UriStr = Annotated[str, BeforeValidator(lambda value: os.fspath(value) if isinstance(value, os.PathLike) else value)]
M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override is invalid. The message names the key, the value and the file."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on creation,
    instances are immutable so a component cannot quietly change settings another one reads."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def require_unique(values: Sequence[Any], what: str = "entries", hint: str = "") -> None:
    """Raise a ValueError naming the values that occur more than once (a validator's check)."""
    repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
    if repeated:
        raise ValueError(f"{what} repeat: {repeated}{hint}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain {' -> '.join(map(str, seen))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: '{BASE_KEY}' must be a file name, got {base!r}")
    return deep_merge(_read_yaml(path.parent / base, seen + (path,)), data)


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge `update` into a copy of `base`; mappings merge, everything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_path(node: Any, path: list[str], value: Any, override: str) -> Any:
    """Return a copy of `node` with `value` at `path`; integer parts index into lists
    (`sources.0.root=...`), missing mapping keys create sections."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(node, list):
        if not head.lstrip("-").isdigit() or not -len(node) <= int(head) < len(node):
            raise ConfigError(f"--set {override!r}: {head!r} is not an index of a list of {len(node)} entries")
        key, copy, child = int(head), list(node), node[int(head)]
    else:
        node = {} if node is None else node
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: cannot descend into {head!r}: its parent is a value, not a section")
        key, copy, child = head, dict(node), node.get(head)
    copy[key] = _set_path(child, rest, value, override)
    return copy


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `--set a.b.c=value` overrides in order; later ones win. The value is read as YAML so
    `lr=2e-6`, `flag=true`, `ids=[1,2]` get their natural types."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {override!r}: expected KEY.PATH=VALUE")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {override!r}: value is not valid YAML: {err}") from err
        data = _set_path(data, [part.strip() for part in key.split(".")], value, override)
    return data


def config_origin(path: str | Path | None, overrides: Sequence[str] = ()) -> str:
    """Where a config came from, as error messages name it: `configs/demo.yaml with --set a=1`."""
    origin = str(path) if path is not None else "defaults"
    if overrides:
        origin += " with --set " + " ".join(overrides)
    return origin


def load_config(model: type[M], path: str | Path | None = None, overrides: Sequence[str] = ()) -> M:
    """Load `path` (or the model's defaults when None), apply `--set` overrides, validate.

    Raises `ConfigError` naming the file, the key and the offending value.
    """
    data = _read_yaml(Path(path)) if path is not None else {}
    return validate_config(model, apply_overrides(data, overrides), config_origin(path, overrides))


def validate_config(model: type[M], data: Mapping[str, Any], origin: str) -> M:
    """`model` from plain data; `ConfigError` naming `origin`, the key and the value otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = []
        for item in err.errors():
            key = ".".join(str(p) for p in item["loc"]) or "<root>"
            if item["type"] == "extra_forbidden":
                lines.append(f"  unknown key '{key}'")
            elif item["type"] == "missing":
                lines.append(f"  missing required key '{key}'")
            else:
                lines.append(f"  '{key}': {item['msg']} (got {item.get('input')!r})")
        raise ConfigError(f"invalid config ({origin}):\n" + "\n".join(lines)) from None


def config_to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_config(config: BaseModel, path: str | Path) -> Path:
    """Write the resolved config as YAML (loadable again with `load_config`)."""
    with atomic_local_path(path) as tmp:
        tmp.write_text(config_to_yaml(config))
    return Path(path)
