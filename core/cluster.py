"""Reaching Ray, shared by every command: join the cluster a run names (or RAY_ADDRESS), else start
a local one; what GPUs the cluster has or can scale to; a trainer's `use_gpu: auto`."""

from __future__ import annotations

import os

import ray
from pydantic import Field

from core.config import StrictModel


class RayConfig(StrictModel):
    """How to reach Ray: `address` (or RAY_ADDRESS) joins an existing cluster; otherwise a local
    one is started with `num_cpus`."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)


def init_ray(config: RayConfig, progress_bars: bool = True) -> None:
    """Join the cluster named by `ray.address` / RAY_ADDRESS (e.g. inside `ray job submit`), or
    start a local one. Idempotent. `progress_bars`: Ray Data's per-operator bars (the trainers
    turn them off: each epoch's pass over the shards would redraw them under the epoch lines)."""
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
