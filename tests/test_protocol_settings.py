"""The unsupervised, da and dg settings of the downstream grid: their config, the cells they plan,
and their digests (pure: no Ray, no training)."""

from __future__ import annotations

import pytest

from core.config import ConfigError, validate_config
from core.settings.downstream import DownstreamConfig, Setting
from eval.downstream.cells import cell_digest, plan_cells
from eval.downstream.inits import random_init


def _datasets(*names: str) -> list[dict]:
    return [{"kind": "synthetic", "root": f"/tmp/never-made/{name}", "name": name,
             "generate": {"ids": 4, "cameras": 2, "seed": index}} for index, name in enumerate(names)]


def _config(**overrides) -> DownstreamConfig:
    raw = {"datasets": _datasets("a", "b", "c", "d"), "inits": ["random"], "seeds": [0], "methods": ["bot"],
           **overrides}
    return validate_config(DownstreamConfig, raw, "downstream")


@pytest.mark.parametrize("name, label", [("unsupervised", "unsupervised"), ("da", "DA"), ("dg", "DG"),
                                         ("supervised", "supervised"), ("fs30", "Fs 30%")])
def test_settings_parse_with_the_papers_labels(name: str, label: str) -> None:
    setting = Setting.parse(name)
    assert (setting.name, setting.label) == (name, label)


def test_whole_data_settings_take_no_percent() -> None:
    with pytest.raises(ValueError, match="uses all data"):
        Setting("dg", 50)
    with pytest.raises(ValueError, match="unknown setting 'dg10'"):
        Setting.parse("dg10")


def test_each_setting_plans_its_own_datasets_and_methods() -> None:
    config = _config(
        settings=["supervised", "unsupervised", "da", "dg"], supervised_datasets=["a"], methods=["bot", "agw"],
        adaptation=[{"source": "a", "target": "b"}],
        generalization={"sources": ["a", "b"], "targets": ["c", "d"], "methods": ["bot"]},
    )
    keys = [cell.key for cell in plan_cells(config)]
    assert keys == [
        "a/bot/random/supervised/seed0", "a/agw/random/supervised/seed0",
        "a/cluster_contrast/random/unsupervised/seed0",
        "a->b/cluster_contrast/random/da/seed0",
        "a+b/bot/random/dg/seed0",
    ]
    directory = plan_cells(config)[3].directory("/tmp/out")
    assert "a-to-b" in directory.uri and ">" not in directory.uri


def test_unsupervised_datasets_default_to_the_supervised_ones() -> None:
    config = _config(settings=["unsupervised"], supervised_datasets=["b", "c"])
    assert [c.dataset for c in plan_cells(config)] == ["b", "c"]
    config = _config(settings=["unsupervised"], supervised_datasets=["b"], unsupervised_datasets=["d"])
    assert [c.dataset for c in plan_cells(config)] == ["d"]


@pytest.mark.parametrize("overrides, message", [
    ({"settings": ["da"]}, "setting 'da' needs downstream.adaptation"),
    ({"settings": ["dg"]}, "setting 'dg' needs downstream.generalization"),
    ({"adaptation": [{"source": "a", "target": "x"}]}, r"adaptation: \['x'\] are not in downstream.datasets"),
    ({"adaptation": [{"source": "a", "target": "a"}]}, "source and target must differ"),
    ({"generalization": {"sources": ["a"], "targets": ["a"]}}, "both sources and targets"),
    ({"supervised_datasets": ["zz"]}, r"supervised_datasets: \['zz'\]"),
    ({"generalization": {"sources": ["a"], "targets": ["b"], "splits": 0}}, "splits"),
])
def test_bad_protocol_configs_are_refused_naming_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(**overrides)


def test_da_and_dg_digests_follow_every_dataset_they_read() -> None:
    base = dict(settings=["da", "dg"], adaptation=[{"source": "a", "target": "b"}],
                generalization={"sources": ["a", "b"], "targets": ["c"]})
    config = _config(**base)
    changed_target = _config(**base, datasets=_datasets("a", "b", "x", "d")[:2] + [
        {**_datasets("c")[0], "generate": {"ids": 5, "cameras": 2, "seed": 2}}] + _datasets("d"))
    init = random_init()
    first = {c.key: cell_digest(c, config, init) for c in plan_cells(config)}
    second = {c.key: cell_digest(c, changed_target, init) for c in plan_cells(changed_target)}
    assert first["a->b/cluster_contrast/random/da/seed0"] == second["a->b/cluster_contrast/random/da/seed0"]
    assert first["a+b/bot/random/dg/seed0"] != second["a+b/bot/random/dg/seed0"]  # target c changed
    more_splits = _config(**{**base, "generalization": {**base["generalization"], "splits": 3}})
    assert cell_digest(plan_cells(more_splits)[1], more_splits, init) != first["a+b/bot/random/dg/seed0"]
    other_source_method = _config(**base, adaptation_source_method="agw")
    assert cell_digest(plan_cells(other_source_method)[0], other_source_method, init) != \
        first["a->b/cluster_contrast/random/da/seed0"]
