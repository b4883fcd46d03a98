"""factory.build on a simulated multi-node cluster (`ray.cluster_utils.Cluster`): the generation
pool grows onto a node added mid-build, a node lost mid-build loses no identity, and a cluster
that has no GPU yet (autoscaling from zero) still makes the pools ask for GPUs.

The layout mirrors `cluster.yaml`: a head with no CPU for tasks, and "GPU nodes" with one
(simulated) GPU each. Generation actors ask for one GPU, so each GPU node holds exactly one of
them and nothing else can take its place; placement is deterministic without touching the
factory. The build is `python -m factory.build --set ray.address=<the cluster>`, as a user runs
it; the test adds and removes nodes meanwhile and reads what ran where from Ray's state API.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from core.device import SIMULATED_GPUS_ENV
from core.settings.run import REPO_ROOT
from tests.pipeline_fixtures import save_filter_model, save_tiny_models, small_preset

IDENTITIES = 12
SAMPLES = 4
GPU_NODE = {"num_cpus": 1, "num_gpus": 1}
# The first node also hosts the captioning and filter actors (one CPU each) and has a CPU to spare
# for Ray Data's small metadata tasks.
FIRST_GPU_NODE = {"num_cpus": 4, "num_gpus": 1}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random models, IDENTITIES identities, 4 samples each (threshold 0 keeps them all);
    generation on one GPU per actor, a pool of 1..2 actors; enough fine-tuning steps per identity
    that a node added once the first generation actor works still finds identities to take. At
    100 steps, before the installed packages were byte-compiled (an actor then took twice as
    long to start), the first actor could finish the queue while the added node's actor was
    still starting: 1 failure in 3 CI runs. Measured at 300 steps since: the added actor took
    its first identity 19 s after the first actor started its own, with 16-18 s per identity;
    150 steps keeps the queue (12 identities) several times longer than that start."""
    from core.datasets.config import SourceConfig, SyntheticSpec
    from core.datasets.registry import load_source

    root = tmp_path_factory.mktemp("multinode")
    source = root / "source"
    load_source(SourceConfig(kind="synthetic", root=source, generate=SyntheticSpec(ids=IDENTITIES, cameras=2, seed=5)))
    sd, blip = save_tiny_models(root / "models")
    path = small_preset(root / "preset.yaml", source, sd, blip, save_filter_model(root / "filter", source))
    config = yaml.safe_load(path.read_text())
    config["sources"][0]["generate"].update({"ids": IDENTITIES, "seed": 5})
    config["sequences"]["max_identities"] = IDENTITIES
    config["generation"].update(
        {"samples_per_identity": SAMPLES, "train_steps": 150, "num_gpus": 1.0, "concurrency": {"min": 1, "max": 2}}
    )
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch):
    """A head with no CPU for tasks (as in cluster.yaml); nodes are added by the tests.

    RAY_TMPDIR keeps the cluster's sessions and its address file private: other Ray users on
    this machine (`ray.init()` reads <tmp>/ray/ray_current_cluster) never join it by accident."""
    private = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's socket paths live under it
    monkeypatch.setenv("RAY_TMPDIR", private)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # The nodes' GPUs are scheduling tokens on this CPU machine: actors (started by this cluster's
    # raylets, which inherit the variable) run on the CPU, and the build's cluster check skips CUDA.
    monkeypatch.setenv(SIMULATED_GPUS_ENV, "1")
    if ray.is_initialized():
        ray.shutdown()
    dashboard_port = _free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "gcs_server_port": _free_port(),
            "include_dashboard": True,  # the state API (list_actors) answers through it
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
            "dashboard_agent_listen_port": _free_port(),
            "enable_object_reconstruction": True,  # as `ray start` does
        },
    )
    cluster.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    cluster.builds = []
    try:
        yield cluster
    finally:
        try:
            for build in cluster.builds:
                build.stop()
            ray.shutdown()
            cluster.shutdown()
        finally:
            shutil.rmtree(private, ignore_errors=True)


class Build:
    """`python -m factory.build` as a driver of the cluster (`--set ray.address=...`), in its
    own process group so that a failing test can always stop it."""

    def __init__(self, cluster: Cluster, preset: Path, out: Path) -> None:
        self.out = out
        out.mkdir(parents=True)
        self.log_path = out.parent / f"{out.name}.log"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "factory.build", "--config", str(preset), "--out", str(out),
                 "--set", f"ray.address={cluster.address}"],
                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        cluster.builds.append(self)

    def running(self) -> bool:
        return self.process.poll() is None

    def finish(self, timeout: float = 900) -> dict:
        """Wait for a successful end; the build's summary."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
        tail = self.log_path.read_text()[-4000:]
        assert self.process.returncode == 0, f"the build failed ({self.process.returncode}):\n{tail}"
        return json.loads((self.out / "summary.json").read_text())

    def stop(self) -> None:
        if self.running():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(1.0)


def _done(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["identities"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _generation_actors(cluster: Cluster) -> list:
    """Every actor that asked for a GPU: in these presets, exactly the generation actors.
    Dead ones stay listed with the node they last ran on."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.dashboard_url, detail=True, limit=10_000, raise_on_missing_output=False)
    return [a for a in actors if (a.required_resources or {}).get("GPU", 0) > 0]


def _submits(cluster: Cluster, actor_ids: set[str]) -> list:
    """The batches (here: identities) handed to the given actors, one record per attempt."""
    from ray.util.state import list_tasks

    tasks = list_tasks(address=cluster.dashboard_url, detail=True, limit=10_000, raise_on_missing_output=False)
    return [t for t in tasks if t.actor_id in actor_ids and t.type == "ACTOR_TASK" and t.name.endswith(".submit")]


def _start_build_then_add_gpu_node(cluster: Cluster, preset: Path, out: Path) -> tuple[Build, object]:
    """Start the build on the first GPU node; once its generation actor works, add a second
    GPU node (the pool could not grow before: no GPU was free)."""
    build = Build(cluster, preset, out)

    def generating() -> bool:
        return not build.running() or any(a.state == "ALIVE" for a in _generation_actors(cluster))

    _wait(generating, 600, "the first generation actor")
    if not build.running():
        build.finish()  # reports what ended it
    assert _done(out) < IDENTITIES - 2, f"too late to change the cluster ({_done(out)} done)"
    return build, cluster.add_node(**GPU_NODE)


def _assert_complete(out: Path, summary: dict) -> None:
    """Every planned identity exactly once: in the manifest, delivered once to the driver, and
    with exactly its own samples in the shards."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["identities"]) == sorted(f"synthetic/{pid}" for pid in range(1, IDENTITIES + 1))
    assert manifest["failed"] == {}
    assert summary["identities_processed"] == IDENTITIES and summary["identities_failed"] == 0
    rows = pd.read_parquet(out / "shards")
    assert not rows.duplicated(["identity", "index"]).any()
    assert rows.groupby("identity").size().to_dict() == {identity: SAMPLES for identity in manifest["identities"]}


def test_autoscaling_cluster_without_gpus_yet_still_requests_them(cluster: Cluster) -> None:
    """`cluster.yaml` starts with no GPU node (min_workers: 0). The autoscaler publishes its node
    types to the GCS; the factory must read them, or its pools would ask for CPUs only and the
    autoscaler would never start a GPU node."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    from core.cluster import cluster_gpus

    ray.init(address=cluster.address)
    assert ray.cluster_resources().get("GPU", 0) == 0
    assert cluster_gpus() == 0  # a local cluster without an autoscaler: only what is there counts

    config = autoscaler_pb2.ClusterConfig()
    gpu_1x = config.node_group_configs.add(name="gpu-1x", min_count=0, max_count=8)
    gpu_1x.resources.update({"CPU": 8, "GPU": 1})
    gpu_8x = config.node_group_configs.add(name="gpu-8x", min_count=0, max_count=2)
    gpu_8x.resources.update({"CPU": 96, "GPU": 8})
    key, namespace = GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    _internal_kv_put(key, config.SerializeToString(), namespace=namespace)
    try:
        assert cluster_gpus() == 8 * 1 + 2 * 8
    finally:
        _internal_kv_del(key, namespace=namespace)


def test_node_added_mid_build_receives_generation_actors(cluster: Cluster, preset: Path, tmp_path: Path) -> None:
    first = cluster.add_node(**FIRST_GPU_NODE)
    out = tmp_path / "grow"
    build, added = _start_build_then_add_gpu_node(cluster, preset, out)
    summary = build.finish()

    generation = _generation_actors(cluster)
    # Operators (and so progress lines and the dashboard) are named after their stage.
    assert {a.class_name for a in generation} == {"MapWorker(MapBatches(Generate))"}
    actors = {a.actor_id: a.node_id for a in generation}
    hosts = {node for node in actors.values() if node}  # a requested but never placed actor has none
    assert hosts == {first.node_id, added.node_id}, "the pool did not grow onto the added node"
    on_added = [t for t in _submits(cluster, set(actors)) if t.node_id == added.node_id and t.state == "FINISHED"]
    assert on_added, "the actor on the added node generated no identity"
    _assert_complete(out, summary)


@pytest.mark.slow
def test_node_lost_mid_build_loses_no_identity(cluster: Cluster, preset: Path, tmp_path: Path) -> None:
    """A GPU node dies (SIGKILL, as in a spot preemption) while its generation actor holds an
    identity; a replacement node joins (the autoscaler's job on a real cluster, as the actor's
    demand is pending). The actor restarts there, the identities it held are redone, and nothing
    is lost or duplicated."""
    cluster.add_node(**FIRST_GPU_NODE)
    out = tmp_path / "lose"
    build, doomed = _start_build_then_add_gpu_node(cluster, preset, out)

    def doomed_actor_busy() -> bool:
        on_doomed = {a.actor_id for a in _generation_actors(cluster) if a.node_id == doomed.node_id and a.state == "ALIVE"}
        return not build.running() or any(t.state == "RUNNING" for t in _submits(cluster, on_doomed))

    _wait(doomed_actor_busy, 600, "an identity in the works on the added node")
    done_at_loss = _done(out)
    assert build.running() and done_at_loss < IDENTITIES, f"the node must be lost mid-build ({done_at_loss} done)"
    cluster.remove_node(doomed, allow_graceful=False)
    replacement = cluster.add_node(**GPU_NODE)
    summary = build.finish()

    _assert_complete(out, summary)
    moved = [a for a in _generation_actors(cluster) if a.num_restarts > 0]
    assert [a.node_id for a in moved] == [replacement.node_id], "the lost actor did not restart on the new node"
    redone = [t for t in _submits(cluster, {moved[0].actor_id}) if t.attempt_number > 0 and t.state == "FINISHED"]
    assert redone and all(t.node_id == replacement.node_id for t in redone), "no identity was redone after the loss"
