"""The two figures issue 29 asks of the identity-consistency benchmark, on data whose answer is
known: the fine-tune's paired gain with its 95 % interval (`eval.experiment.consistency`), and the
generated set's coverage of capture conditions its source lacks, read by a probe fitted on the
procedural world's own labels (`eval.experiment.diversity`). The probe must tell the world's
domains and poses apart on images it was not fitted on; coverage must be near zero for more images
of the source's own conditions and high for images of other domains or poses; the interval must
hold a known gain and keep zero out only when the gain is real. Then the report and the build
reader, on a small procedural dataset written as a build."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.datasets.synthetic import DOMAINS, CameraStyle, render_image, sequence_shots
from core.datasets.synthetic.attributes import PersonAttributes
from core.settings.run import load_run_config
from core.storage import resolve
from eval.experiment.builds import CONSISTENCY_KEYS, GAIN_KEYS, MARKER, ensure_diversity
from eval.experiment.consistency import (BOOTSTRAP, T_INTERVAL, PairedGain, PassRate, consistency_entries,
                                         consistency_gain, paired_gain)
from eval.experiment.diversity import (FRONT_OR_BACK, SIDE, ConditionProbe, build_condition_coverage,
                                       condition_coverage, fit_condition_probe, render_world_images)
from eval.experiment.report import results_markdown
from eval.experiment.stats import paired_interval


@pytest.fixture(scope="module")
def probe() -> ConditionProbe:
    return fit_condition_probe(seed=0, images_per_domain=120, heldout_per_domain=40)


def images(seed: int, per_domain: int, domains: list[str]) -> list[Image.Image]:
    return [w.image for w in render_world_images(seed, per_domain, domains)]


def test_probe_tells_domains_and_poses_apart_on_images_it_was_not_fitted_on(probe: ConditionProbe) -> None:
    # Its own held-out figures (another seed: other cameras and people) ...
    assert probe.accuracy["domain"] >= 0.85 and probe.chance["domain"] == pytest.approx(0.25)
    assert probe.accuracy["pose"] >= 0.85 and probe.accuracy["pose"] >= probe.chance["pose"] + 0.1
    # ... and again on a third draw, read through `predict` as coverage reads it.
    fresh = render_world_images(seed=42, images_per_domain=30)
    predicted = probe.predict([w.image for w in fresh])
    for name, floor in (("domain", 0.85), ("pose", 0.85)):
        accuracy = np.mean([p == w.labels[name] for p, w in zip(predicted[name], fresh)])
        print(f"{name}: {100 * accuracy:.1f} % right on a fresh draw "
              f"(held-out at fit {100 * probe.accuracy[name]:.1f} %, chance {100 * probe.chance[name]:.1f} %)")
        assert accuracy >= floor


def test_coverage_is_near_zero_for_the_source_domain_and_high_for_other_domains(probe: ConditionProbe) -> None:
    source = images(10, 80, ["campus"])
    same = condition_coverage(images(11, 60, ["campus"]), source, probe)
    others = condition_coverage(images(12, 30, ["mall", "station", "street"]), source, probe)
    half = condition_coverage(images(11, 45, ["campus"]) + images(12, 15, ["mall", "station", "street"]),
                              source, probe)
    print(f"beyond source: same domain {same['coverage_beyond_source']:.3f}, other domains "
          f"{others['coverage_beyond_source']:.3f}, half and half {half['coverage_beyond_source']:.3f}")
    assert same["conditions"]["domain"]["source_shows"] == ["campus"]
    assert same["coverage_beyond_source"] <= 0.05 and same["conditions"]["domain"]["distinct"] == 1
    assert others["coverage_beyond_source"] >= 0.85 and others["conditions"]["domain"]["distinct"] >= 3
    assert 0.35 <= half["coverage_beyond_source"] <= 0.65  # a share of images, not a yes/no
    assert others["distinct_conditions"] > same["distinct_conditions"]
    assert set(others["conditions"]["domain"]["generated"]) >= {"mall", "station", "street"}


def posed(seed: int, count: int, view: str) -> list[Image.Image]:
    """`count` images of one person under one campus camera, all in `view` (the world's pose, set
    by hand): only the pose differs between calls."""
    person = PersonAttributes.sample(np.random.default_rng(1000))
    camera = CameraStyle.sample(np.random.default_rng(1001), DOMAINS.get("campus"))
    rng = np.random.default_rng(seed)
    return [render_image(person, camera, replace(shot, view=view), rng) for shot in sequence_shots(camera, rng, count)]


def test_coverage_beyond_identity_counts_poses_the_identitys_own_images_lack(probe: ConditionProbe) -> None:
    # The source as a whole shows every pose; identity "a" was only filmed from the front.
    source = posed(1, 8, "front") + posed(2, 8, "side") + posed(3, 8, "back")
    groups = ["a"] * 8 + ["b"] * 16
    generated = posed(4, 12, "side") + posed(5, 12, "back") + posed(6, 4, "side")
    found = condition_coverage(generated, source, probe, ["a"] * 24 + ["stranger"] * 4, groups)
    pose = found["conditions"]["pose"]
    print(f"pose beyond identity {found['coverage_beyond_identity']:.3f}, beyond source "
          f"{found['coverage_beyond_source']:.3f}; kept {pose['generated']}, source {pose['source']}")
    assert sorted(pose["source_shows"]) == sorted([SIDE, FRONT_OR_BACK])
    assert found["identity_images"] == 24  # the stranger has no source images: left out
    # Side views are new for "a", back views are not (front and back are one class): about half.
    assert 0.35 <= found["coverage_beyond_identity"] <= 0.6 and found["coverage_beyond_source"] <= 0.1
    with pytest.raises(ValueError, match="one key per image"):
        condition_coverage(generated, source, probe, ["a"], groups)


def test_t_interval_holds_a_known_paired_gain_and_keeps_zero_out_when_it_is_consistent() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.5, 12)
    tuned = base + 0.3 + rng.normal(0.0, 0.03, 12)
    for method in (T_INTERVAL, BOOTSTRAP):
        gain = paired_gain(base.tolist(), tuned.tolist(), method)
        assert gain.identities == 12 and gain.method == method
        assert gain.low < 0.3 < gain.high and gain.low > 0.2
    assert paired_gain([0.0, 0.5, 0.25], [0.5, 0.5, 0.5]).low == paired_interval([0.5, 0.0, 0.25])[1]


def zero_coverage(identities: int, method: str, draws: int = 200) -> float:
    """Share of `draws` pure-noise experiments (no gain: fine-tuned = base + noise) whose interval holds 0."""
    held = 0
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        base = rng.uniform(0.0, 1.0, identities)
        gain = paired_gain(base.tolist(), (base + rng.normal(0.0, 0.2, identities)).tolist(), method, resamples=2000)
        held += gain.low < 0.0 < gain.high
    return held / draws


def test_without_a_gain_the_t_interval_holds_zero_about_95_percent_of_the_time() -> None:
    t_few, t_more = zero_coverage(3, T_INTERVAL), zero_coverage(10, T_INTERVAL)
    boot_few, boot_more = zero_coverage(3, BOOTSTRAP), zero_coverage(10, BOOTSTRAP)
    print(f"0 inside the 95 % interval under pure noise: t {t_few:.3f} (3 identities), {t_more:.3f} (10); "
          f"bootstrap {boot_few:.3f} (3), {boot_more:.3f} (10)")
    assert t_few >= 0.9 and t_more >= 0.9
    # Why t is the default: a bootstrap of few identities claims a gain that is not there too often.
    assert boot_few < 0.85 and boot_few < t_few


def test_t_is_the_default_because_a_bootstrap_of_few_identities_cannot_be_wider_than_their_range() -> None:
    base, tuned = [0.2, 0.3, 0.1], [0.5, 0.35, 0.2]  # gains 0.3, 0.05, 0.1
    t, boot = paired_gain(base, tuned), paired_gain(base, tuned, BOOTSTRAP)
    assert 0.05 - 1e-9 <= boot.low and boot.high <= 0.3 + 1e-9  # inside the observed gains ...
    assert t.low < 0.0 < t.high  # ... while t, with 2 degrees of freedom, does not claim a gain
    assert paired_gain(base, tuned, BOOTSTRAP) == boot  # a fixed seed: the same interval every time
    one = paired_gain([0.1], [0.4])
    assert one.mean == pytest.approx(0.3) and math.isnan(one.low)
    assert one.as_marker()["consistency_gain_low"] is None  # JSON null, not NaN
    with pytest.raises(ValueError, match="interval method"):
        paired_gain(base, tuned, "z")


def test_consistency_gain_pairs_the_two_models_by_identity() -> None:
    rates = {"base_model": PassRate(0.25, 0.4, 8, ("s/1", "s/2"), (0.0, 0.5)),
             "fine_tuned": PassRate(0.75, 0.6, 12, ("s/2", "s/1", "s/3"), (1.0, 0.5, 1.0))}
    gain = consistency_gain(rates)  # s/3 failed under the base model: no pair
    assert gain.identities == 2 and gain.mean == pytest.approx(0.5)
    assert isinstance(gain, PairedGain) and gain.method == T_INTERVAL
    # What a build's marker keeps: the old keys as they were, the gain's beside them, JSON-safe.
    entries = consistency_entries(rates)
    assert entries["fine_tuned"] == 0.75 and entries["base_model"] == 0.25
    assert entries["consistency_gain"] == pytest.approx(0.5) and entries["consistency_gain_identities"] == 2
    assert set(GAIN_KEYS) <= set(entries) and set(entries) <= set(CONSISTENCY_KEYS)
    assert entries["consistency_per_identity"]["s/1"] == {"base_model": 0.0, "fine_tuned": 0.5}
    assert entries["consistency_per_identity"]["s/3"] == {"fine_tuned": 1.0}
    json.dumps(entries, allow_nan=False)


def test_report_shows_the_gain_and_the_diversity_and_still_reads_old_markers(probe: ConditionProbe) -> None:
    import pandas as pd

    coverage = condition_coverage(images(12, 10, ["mall"]), images(10, 20, ["campus"]), probe)
    old = {"kept": 10, "generated": 12, "identities": 2, "consistency_identities": 2, "fine_tuned": 0.5,
           "base_model": 0.25}
    new = {**old, **paired_gain([0.2, 0.3, 0.1], [0.5, 0.6, 0.4]).as_marker(), "diversity": coverage}
    summary = pd.DataFrame(columns=["dataset", "method", "setting"])
    markdown = results_markdown(summary, "source", {}, {"old": old, "new": new})
    old_row = next(line for line in markdown.splitlines() if line.startswith("| old |"))
    new_row = next(line for line in markdown.splitlines() if line.startswith("| new |"))
    assert old_row.endswith("| 2 | - |") and "+30.0 [+30.0, +30.0] (n=3)" in new_row
    assert "## Diversity of the kept images" in markdown and "| new | 10 | 100.0 % |" in markdown


def test_a_build_is_read_against_its_source_and_its_marker_keeps_the_figures(
        probe: ConditionProbe, tmp_path: Path) -> None:
    """The source's own training images written as a build's shards: nothing beyond the source."""
    from core.datasets.registry import load_source
    from trainers.pretrain.shards import write_shards

    config = load_run_config(None, [f"sources=[{{kind: synthetic, root: {tmp_path / 'source'}, "
                                    "generate: {ids: 4, cameras: 3, seed: 2, images_per_camera: 2}}]"])
    dataset = load_source(config.sources[0])
    build = tmp_path / "build"
    write_shards(dataset.train, build)
    found = build_condition_coverage(build, probe, config)
    assert found["generated_images"] == found["source_images"] == len(dataset.train)
    assert found["coverage_beyond_source"] <= 0.05 and found["coverage_beyond_identity"] <= 0.05
    assert found["source_domains"] == {config.sources[0].source_name: "campus"}
    placed = (resolve(build), config, "digest")
    marker = ensure_diversity("main", placed, {"kept": len(dataset.train)}, lambda: probe, log=print)
    assert marker["diversity"]["generated_images"] == len(dataset.train)
    assert (build / MARKER).is_file()
    assert ensure_diversity("main", placed, marker, lambda: 1 / 0, log=print) is marker  # measured once
