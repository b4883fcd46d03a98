"""Reaching Ray, shared by every command: join the cluster a run names (or RAY_ADDRESS), else start
a local one; what GPUs the cluster has or can scale to; a trainer's `use_gpu: auto`; the cluster
check before heavy work. Ray is imported inside the functions: the run config (`RayConfig`) is
read on machines without Ray too (`benchmarks/gpu_check.py`)."""

from __future__ import annotations

import os

from pydantic import Field

from core.config import StrictModel
from core.device import ClusterCheckFailed


class RayConfig(StrictModel):
    """How to reach Ray: `address` (or RAY_ADDRESS) joins an existing cluster; otherwise a local
    one is started with `num_cpus`."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)


def init_ray(config: RayConfig, progress_bars: bool = True) -> None:
    """Join the cluster named by `ray.address` / RAY_ADDRESS (e.g. inside `ray job submit`), or
    start a local one. Idempotent. `progress_bars`: Ray Data's per-operator bars (the trainers
    turn them off: each epoch's pass over the shards would redraw them under the epoch lines)."""
    import ray
    import ray.data

    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local" always starts a fresh cluster; a bare ray.init() would join any cluster a
        # `ray start` left registered on this machine.
        # The dashboard (127.0.0.1 only) serves the State API, which Ray Train's placement-group
        # cleaner polls every second; without it every training second logs a warning.
        ray.init(address="local", num_cpus=config.num_cpus, include_dashboard=None, log_to_driver=True)
    # Progress bars per operator are Ray Data's; keep them, but not the verbose execution plan.
    ray.data.DataContext.get_current().enable_progress_bars = progress_bars


def cluster_gpus() -> float:
    """GPUs the cluster has now, or can scale up to.

    An elastic cluster (`cluster.yaml`: a CPU head, GPU worker types with `min_workers: 0`)
    starts with no GPU at all; its actor pools must still ask for GPUs, or they would run on
    CPUs and the autoscaler would never add a GPU node. The autoscaler (v2, the default of
    `ray up` and KubeRay) publishes its node types to the GCS; Ray Train and Ray Data read the
    same record through `get_max_resources_from_cluster_config`.
    """
    import ray

    now = float(ray.cluster_resources().get("GPU", 0.0))
    try:
        from ray._private.state import state

        reachable = (state.get_max_resources_from_cluster_config() or {}).get("GPU", 0)
    except Exception:  # a private API: without it, the GPUs present now decide
        reachable = 0
    return max(now, float(reachable))


def resolve_use_gpu(setting: bool | str) -> bool:
    """A trainer's `use_gpu`: True/False as given; `auto` means this machine has a GPU, or the
    cluster has or can scale to one (an elastic cluster's GPU nodes start only once asked for)."""
    if setting != "auto":
        return bool(setting)
    import torch  # only the trainers ask; the factory's driver needs no torch for this

    return torch.cuda.is_available() or cluster_gpus() > 0


# A node whose check has not answered by then is reported, not waited for: its GPUs may be held
# by another job's actors (the check asks for all of them), and the build need not stall on it.
NODE_CHECK_TIMEOUT_S = 60.0
_PROBE_FOLDER = ".cluster-check"


def _check_this_node(expected_gpus: int, out: str, probe: str, token: str, own_probe: str) -> tuple[str, list[str], str]:
    """Runs on one node (a Ray task holding all its GPUs): can torch use exactly the GPUs Ray
    advertises, and can this node read what the driver wrote to the output and write its own?"""
    from core.device import cuda_environment, cuda_problem, gpus_simulated, node_name
    from core.storage import resolve

    problems: list[str] = []
    environment = ""
    if expected_gpus and not gpus_simulated():
        environment = cuda_environment()
        problem = cuda_problem(expected_gpus)
        if problem is not None:
            problems.append(f"{problem} ({environment}); fix: the node's image must carry an NVIDIA driver that "
                            "runs the locked torch (docs/cluster.md, 'GPU image')")
    try:
        seen = resolve(probe).read_text()
        if seen != token:
            raise OSError(f"it holds {seen[:40]!r}, not this run's token")
        resolve(own_probe).write_text(token)
    except Exception as err:  # any failure to reach the location is this node's finding
        problems.append(f"cannot read and write the output location {out} "
                        f"({type(err).__name__}: {str(err)[:200]})")
    return node_name(), problems, environment


def check_cluster(out, log=print, timeout_s: float = NODE_CHECK_TIMEOUT_S) -> None:
    """Before heavy work: every live node of the cluster, in parallel, checks that torch sees and
    runs on exactly the GPUs Ray advertises for it, and reads a probe the driver wrote under `out`
    (a `core.storage.Location`) and writes one back that the driver then reads: a local path on a
    cluster without a shared filesystem fails here in seconds, not inside a training run.
    Raises `ClusterCheckFailed` naming each node's problem and the fix."""
    import ray

    import time
    import uuid

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    token = uuid.uuid4().hex
    folder = out / _PROBE_FOLDER / token
    probe = folder / "driver"
    probe.write_text(token)
    check = ray.remote(_check_this_node)
    pending = {}
    started = time.perf_counter()
    for node in nodes:
        gpus = int(node["Resources"].get("GPU", 0))
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ref = check.options(num_cpus=0, num_gpus=gpus, scheduling_strategy=strategy, max_retries=0).remote(
            gpus, out.uri, probe.uri, token, (folder / node["NodeID"]).uri)
        pending[ref] = node
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    problems: list[str] = []
    for ref in ready:
        node = pending[ref]
        try:
            name, found, environment = ray.get(ref)
        except Exception as err:  # the check itself could not run there (import error, node died)
            name, found, environment = node.get("NodeManagerAddress", node["NodeID"]), [f"{type(err).__name__}: {err}"], ""
        if not found:
            try:
                if (folder / node["NodeID"]).read_text() != token:
                    found = ["the driver reads something else than this node wrote under the output location"]
            except Exception as err:
                found = [f"the driver cannot read what this node wrote under the output location "
                         f"({type(err).__name__}: {str(err)[:200]})"]
        problems.extend(f"node {name} [{node['NodeID'][:8]}]: {problem}" for problem in found)
        if environment and not found:
            log(f"[cluster] node {name}: {int(node['Resources']['GPU'])} GPU(s) usable; {environment}")
    for ref in late:
        ray.cancel(ref, force=True)
        node = pending[ref]
        log(f"[cluster] node {node.get('NodeManagerAddress')} did not answer within {timeout_s:.0f} s (its GPUs may be "
            "in use by another job); its actors check their own GPU when they start")
    try:
        folder.delete_dir()
    except Exception:  # the probes are a few bytes; a location that refused them is reported above
        pass
    if problems:
        storage = any("output location" in problem for problem in problems)
        raise ClusterCheckFailed(
            "cluster check failed before any heavy work:\n  " + "\n  ".join(problems) +
            ("\nThe output location must be one every node reaches (s3://..., gs://..., or a filesystem every "
             "node mounts at the same path); a local folder works on one machine only." if storage else ""))
    log(f"[cluster] {len(nodes)} node(s) checked in {time.perf_counter() - started:.1f} s: GPUs usable, "
        f"output location {out} shared")
