"""The evidence experiment's builds: one per distinct build config (`main`, the preset as it is,
and one per ablation) into `OUT/builds/<name>`, checked before the first starts, skipped when its
`experiment.json` holds the same config digest (a build resumes by itself too; digests hash
locations under OUT relative to it, so a moved experiment folder reuses its work). An ablation
shares what it would make alike with the main build: its Re-ID filter model, or its very samples
when only the filter changed. Each build's identity consistency (with its paired gain) and the
diversity of its kept images against its source are measured once, into its marker.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from core.config import ConfigError, apply_overrides, validate_config
from core.settings.experiment import ARM_BOTH, ARM_GENERATED
from core.settings.run import RunConfig
from core.storage import Location
from factory.filters import FILTERS

MAIN_BUILD = "main"
MARKER = "experiment.json"
# What a build's marker adds: the pass rates, then (since the paired gain) the gain and its interval.
GAIN_KEYS = ("consistency_gain", "consistency_gain_low", "consistency_gain_high", "consistency_gain_identities",
             "consistency_gain_method", "consistency_per_identity")
CONSISTENCY_KEYS = ("consistency_identities", "fine_tuned", "base_model", *GAIN_KEYS)
DIVERSITY_KEY = "diversity"  # `eval.experiment.diversity.build_condition_coverage`, per build (its own kept images)


def digest(payload: Any, out: Location | None = None) -> str:
    """With `out`, locations under it are hashed relative to it: an experiment folder moved or
    copied elsewhere (another path, another bucket) keeps its digests and reuses its work."""
    text = json.dumps(payload, sort_keys=True, default=str)
    if out is not None:
        text = re.sub(re.escape(out.uri.rstrip("/")) + r'(?=/|")', "$OUT", text)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _build_payload(config: RunConfig) -> dict[str, Any]:
    return config.model_dump(mode="json", exclude={"experiment", "pretrain", "downstream"})


def build_configs(config: RunConfig, origin: str) -> dict[str, RunConfig]:
    """The builds the arms need: `main` (the preset as it is; also the data-scale study's source)
    and one per ablation, validated."""
    exp = config.experiment
    builds = {}
    if {ARM_GENERATED, ARM_BOTH} & set(exp.arms) or exp.data_scale is not None:
        builds[MAIN_BUILD] = config
    base = config.model_dump(mode="json")
    for name, overrides in exp.ablations.items():
        builds[name] = validate_config(RunConfig, apply_overrides(base, overrides),
                                       f"{origin}, experiment.ablations.{name}")
    return builds


def share_filter_models(ablation: RunConfig, main: RunConfig, out: Location) -> RunConfig:
    """An ablation whose Re-ID filter model (filters declaring `uses_reid_models`, `reid` and
    `cctf`, score with it) would be trained exactly as the main build's (same sources, same
    trainer settings) uses the main build's model instead of training its own."""
    same = (FILTERS.get(ablation.filter.kind).uses_reid_models and ablation.filter.reid == main.filter.reid
            and ablation.sources == main.sources and not ablation.filter.reid_checkpoints)
    if not same:
        return ablation
    shared = {s.source_name: (out / "builds" / MAIN_BUILD / "filter_models" / s.source_name).uri for s in main.sources}
    return ablation.model_copy(update={"filter": ablation.filter.model_copy(update={"reid_checkpoints": shared})})


def share_samples(ablation: RunConfig, main: RunConfig, out: Location) -> RunConfig:
    """An ablation that changes only the filter scores the main build's samples again
    (`generation.replay_from`) instead of generating the same images a second time."""
    from factory.preflight import generation_changes

    if generation_changes(ablation, main):
        return ablation
    replay = (out / "builds" / MAIN_BUILD).uri
    return ablation.model_copy(update={"generation": ablation.generation.model_copy(update={"replay_from": replay})})


def check_builds(builds: Mapping[str, RunConfig], origin: str, log: Callable[[str], None]) -> None:
    """The build's check phase for every build, before the first one starts."""
    from factory.build import check_config_and_models

    for name, build in builds.items():
        check_config_and_models(build, origin if name == MAIN_BUILD else f"{origin}, experiment.ablations.{name}", log)


def place_build(name: str, config: RunConfig, out: Location) -> tuple[Location, RunConfig, str]:
    """Where build `name` goes, its config writing there, and the digest of what it makes."""
    location = out / "builds" / name
    config = config.model_copy(update={"output": config.output.model_copy(update={"dir": location.uri})})
    return location, config, digest(_build_payload(config), out)


def refuse_changed_builds(placed: Mapping[str, tuple[Location, RunConfig, str]]) -> None:
    """A build folder started under another config would be resumed over (done identities are
    not redone): refused before any work, naming the folder. A marker of the same config under its
    absolute locations (written before digests were relative to OUT) is rewritten, not refused."""
    for name, (location, config, wanted) in placed.items():
        marker = location / MARKER
        if not marker.exists():
            continue
        found = marker.read_json()
        if found.get("digest") == digest(_build_payload(config)):
            marker.write_json({**found, "digest": wanted})
        elif found.get("digest") != wanted:
            raise ConfigError(
                f"experiment build {name!r}: {location} holds a build of another config (its generation, "
                "caption, filter, sequences or source settings changed); a build resumes rather than redoes "
                "finished identities, so use another --out, or delete that folder to rebuild it")


def ensure_build(name: str, placed: tuple[Location, RunConfig, str], log: Callable[[str], None],
                 start_ray: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Run (or resume, or skip) one build; returns its marker (config digest, counts)."""
    from factory.build import run

    location, config, wanted = placed
    marker = location / MARKER
    done = marker.read_json() if marker.exists() else {}
    if done.get("finished"):
        log(f"[build {name}] done before: {done['kept']} kept of {done['generated']} generated")
        return done
    log(f"[build {name}] {location}")
    marker.write_json({"digest": wanted, "finished": False})  # claims the folder for this config
    start_ray()  # the experiment's own `ray:` settings win over the build's defaults
    summary = run(config, location.uri, log=lambda line: log(f"[build {name}] {line}"))
    done = {"digest": wanted, "finished": True, "generated": summary.total_generated, "kept": summary.total_kept,
            "identities": summary.output_identities, "images": summary.output_images}
    marker.write_json(done)
    return done


def measure_consistency(placed: Mapping[str, tuple[Location, RunConfig, str]], build_markers: dict[str, Any],
                        identities: int, log: Callable[[str], None]) -> None:
    """Every build's identity consistency (`ensure_consistency`) into its marker in
    `build_markers`; a build replaying the main build's samples takes the main build's rates.
    With it (seconds more) the diversity of every build's kept images (`ensure_diversity`)."""
    if identities and placed:
        judge = placed[MAIN_BUILD if MAIN_BUILD in placed else next(iter(placed))][0] / "filter_models"
        for name, place in placed.items():
            if place[1].generation.replay_from:  # the main build's very samples: its rates are this build's
                rates = {k: build_markers[MAIN_BUILD][k] for k in CONSISTENCY_KEYS if k in build_markers[MAIN_BUILD]}
                build_markers[name] = {**build_markers[name], **rates, "consistency_source": MAIN_BUILD}
                continue
            build_markers[name] = ensure_consistency(name, place, judge, build_markers[name], identities, log)
        for name, place in placed.items():
            build_markers[name] = ensure_diversity(name, place, build_markers[name], condition_probe, log)


def ensure_consistency(name: str, placed: tuple[Location, RunConfig, str], judge: Location, marker: dict[str, Any],
                       identities: int, log: Callable[[str], None]) -> dict[str, Any]:
    """The build's fine-tuned vs base-model pass rates, scored by the Re-ID models in `judge` (the
    main build's, so every build is judged alike), computed once and kept in its marker. A
    failure here is reported in the table, never the end of the experiment."""
    # A marker from before the paired gain is measured again (same seeds: the same rates), for its gain.
    if marker.get("consistency_identities") == identities and "consistency_gain_identities" in marker:
        return marker
    from eval.experiment.consistency import consistency_entries, identity_consistency

    location, config, _ = placed
    try:
        rates = identity_consistency(config, judge, identities)
    except Exception as err:  # noqa: BLE001 - a side measurement: the chains still run
        log(f"[build {name}] identity consistency not measured: {type(err).__name__}: {err}")
        return marker
    marker = {**marker, "consistency_identities": identities, **consistency_entries(rates)}
    low, high = marker["consistency_gain_low"], marker["consistency_gain_high"]
    interval = f" [{100 * low:+.1f}, {100 * high:+.1f}]" if low is not None else " (one identity: no interval)"
    gain = marker["consistency_gain"]
    log(f"[build {name}] Re-ID pass rate over {identities} identities: fine-tuned "
        f"{100 * marker['fine_tuned']:.1f} %, base model {100 * marker['base_model']:.1f} %"
        + (f", gain {100 * gain:+.1f} points{interval}" if gain is not None else ""))
    (location / MARKER).write_json(marker)
    return marker


@functools.cache
def condition_probe() -> Any:
    """The diversity probe (`fit_condition_probe`), fitted once per process, when a build first needs it."""
    from eval.experiment.diversity import fit_condition_probe

    return fit_condition_probe()


def ensure_diversity(name: str, placed: tuple[Location, RunConfig, str], marker: dict[str, Any],
                     probe: Callable[[], Any], log: Callable[[str], None]) -> dict[str, Any]:
    """The build's kept images against its source (`build_condition_coverage`, read by `probe()`),
    computed once and kept in its marker. Like consistency, a failure is logged, never the
    experiment's end."""
    if DIVERSITY_KEY in marker or not marker.get("kept"):
        return marker
    from eval.experiment.diversity import build_condition_coverage

    location, config, _ = placed
    try:
        coverage = build_condition_coverage(location, probe(), config)
    except Exception as err:  # noqa: BLE001 - a side measurement: the chains still run
        log(f"[build {name}] diversity not measured: {type(err).__name__}: {err}")
        return marker
    marker = {**marker, DIVERSITY_KEY: coverage}
    beyond_identity = coverage.get("coverage_beyond_identity")
    log(f"[build {name}] diversity: {100 * coverage['coverage_beyond_source']:.1f} % of kept images in a condition "
        f"the source lacks" + (f", {100 * beyond_identity:.1f} % in a condition their identity's source images lack"
                               if beyond_identity is not None else ""))
    (location / MARKER).write_json(marker)
    return marker
