"""The first day on a GPU cluster, as far as a CPU machine can show it: the device policy, sticky
CUDA errors ending an actor, the generation pool's one identity in flight, the cluster check."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest
import ray
import torch
import yaml

from core.device import DeviceUnusable, StickyCudaError, device_for, is_sticky_cuda_error
from core.settings.run import REPO_ROOT


# -- the device policy -----------------------------------------------------------------------------
def test_no_assigned_gpu_means_cpu_without_touching_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    def touched(*_args, **_kwargs):
        raise AssertionError("a zero-GPU worker asked CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", touched)
    monkeypatch.setattr(torch.cuda, "device_count", touched)
    assert device_for([], requested_gpus=1) == "cpu"  # inside Ray, none assigned: whatever was asked
    assert device_for(None, requested_gpus=0) == "cpu"  # outside Ray, none asked


def test_an_assigned_gpu_torch_cannot_use_stops_the_worker_naming_node_and_cuda() -> None:
    assert not torch.cuda.is_available()  # this machine: a GPU Ray may advertise, torch cannot use
    with pytest.raises(DeviceUnusable) as caught:
        device_for(["0"], requested_gpus=1)
    message = str(caught.value)
    assert "node " in message and "Ray assigned GPU id(s) ['0']" in message
    assert "torch.cuda.is_available() is False" in message and "driver" in message and "Fix:" in message
    with pytest.raises(DeviceUnusable, match="were asked for"):  # outside Ray: asked for, not usable
        device_for(None, requested_gpus=1)


def test_simulated_gpus_are_scheduling_tokens_run_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.device import SIMULATED_GPUS_ENV

    def touched(*_args, **_kwargs):
        raise AssertionError("a simulated GPU asked CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", touched)
    monkeypatch.setenv(SIMULATED_GPUS_ENV, "1")
    assert device_for(["0"], requested_gpus=1) == "cpu"


def test_an_assigned_gpu_torch_can_use_is_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import core.device

    seen: list[int] = []
    monkeypatch.setattr(core.device, "cuda_problem", lambda expected: seen.append(expected))  # usable: no problem
    assert device_for(["3", "5"], requested_gpus=2) == "cuda"
    assert seen == [2], "torch must see exactly the GPUs Ray assigned"


@pytest.mark.parametrize(("error", "sticky"), [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (RuntimeError("CUDA error: unspecified launch failure"), True),
    (RuntimeError("CUDA error: device-side assert triggered"), True),
    (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`"), True),
    (StickyCudaError("the context is gone"), True),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    (RuntimeError("CUDA error: out of memory"), False),
    (RuntimeError("Expected all tensors to be on the same device"), False),
    (ValueError("height must be divisible by 8"), False),
])
def test_sticky_cuda_errors_are_told_from_per_identity_errors(error: BaseException, sticky: bool) -> None:
    assert is_sticky_cuda_error(error) is sticky


# -- stage resources --------------------------------------------------------------------------------
def _preset(name: str) -> dict:
    return yaml.safe_load((REPO_ROOT / "configs" / name).read_text())


def test_caption_actors_ask_for_no_gpu_when_no_captioner_loads() -> None:
    from core.settings.stages import CaptionConfig
    from factory.stages.caption import CaptionStage

    assert CaptionStage(CaptionConfig(captions="lpe"), num_gpus=0.5).resources().num_gpus == 0.5
    assert CaptionStage(CaptionConfig(captions="category"), num_gpus=0.5).resources().num_gpus == 0.0


def test_paper_preset_shares_caption_gpus_and_bounds_filter_training_cpus() -> None:
    paper = _preset("paper.yaml")
    assert 0 < paper["caption"]["num_gpus"] < 1, "BLIP-2 fits twice on a 24 GB GPU"
    assert paper["filter"]["reid"]["cpus_per_worker"] <= 8, "unset, a filter worker reserves a node's CPUs"
    assert paper["generation"]["vae_batch_size"] >= 4, "sized for a GPU, not a CPU"


def test_generation_actors_take_one_identity_at_a_time() -> None:
    from core.settings.stages import GenerationConfig, OutputConfig
    from factory.stages.generate import GenerationStage

    assert GenerationStage(GenerationConfig(), OutputConfig()).resources().tasks_in_flight == 1


# -- the actor pool on Ray ----------------------------------------------------------------------------
class _Once:
    """A stage (the test's own, a real `Stage`) whose first call on a build raises `error`: a
    marker file says it fired, as a broken GPU would fail once and a fresh process would not."""

    def __init__(self, marker: str, sticky: bool) -> None:
        from factory.stages.base import RowStage, StageResources

        class OnceStage(RowStage):
            name = "once"
            reads = pa.schema([("identity", pa.string())])
            writes = (("pid_seen", pa.int64()), ("status", pa.string()))

            def resources(self) -> StageResources:
                return StageResources(tasks_in_flight=1)

            def process_row(self, row: dict) -> dict:
                if row["identity"] == "b" and not os.path.exists(marker):
                    Path(marker).write_text(str(os.getpid()))
                    if sticky:
                        raise StickyCudaError("CUDA error: an illegal memory access was encountered")
                    return {"pid_seen": os.getpid(), "status": "failed"}
                return {"pid_seen": os.getpid(), "status": "ok"}

        self.make = OnceStage


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("sticky", [True, False])
def test_a_sticky_cuda_error_ends_the_actor_and_the_identity_is_retried(local_ray, tmp_path: Path, sticky: bool) -> None:
    from factory.ray_pipeline import iter_rows, stage_pipeline

    marker = tmp_path / "fired"
    table = pa.table({"identity": ["a", "b", "c"]})
    rows = {r["identity"]: r for r in iter_rows(stage_pipeline(table, [_Once(str(marker), sticky).make], False))}
    assert set(rows) == {"a", "b", "c"}
    failed_in = int(marker.read_text())
    if sticky:  # the row of "b" came from a new process: the broken one ended itself
        assert rows["b"]["status"] == "ok" and rows["b"]["pid_seen"] != failed_in
    else:  # an ordinary error fails its identity only, on the same actor
        assert rows["b"]["status"] == "failed" and rows["b"]["pid_seen"] == failed_in
        assert {r["pid_seen"] for r in rows.values()} == {failed_in}


def test_the_pool_asks_ray_for_the_stage_in_flight_limit_and_bounded_restarts(local_ray) -> None:
    from factory.ray_pipeline import ACTOR_RESTARTS, stage_pipeline

    dataset = stage_pipeline(pa.table({"identity": ["a"]}), [_Once("/nonexistent/marker", False).make], False)
    operator = dataset._logical_plan.dag  # Ray Data's MapBatches operator of the stage (a private API)
    assert operator.compute.max_tasks_in_flight_per_actor == 1
    assert operator.ray_remote_args["max_restarts"] == ACTOR_RESTARTS
    # ... and a pool of one task per actor can grow: Ray Data's default threshold (1.75 tasks in
    # flight per actor) would keep it at its minimum size for the whole run.
    threshold = ray.data.DataContext.get_current().autoscaling_config.actor_pool_util_upscaling_threshold
    assert threshold <= operator.compute.max_tasks_in_flight_per_actor


# -- the cluster check ----------------------------------------------------------------------------------
CHECK = textwrap.dedent("""
    import sys, ray
    from core.cluster import check_cluster
    from core.device import ClusterCheckFailed
    from core.storage import resolve
    ray.init(address="local", num_cpus=1, num_gpus=int(sys.argv[2]), include_dashboard=False, log_to_driver=False)
    try:
        check_cluster(resolve(sys.argv[1]))
    except ClusterCheckFailed as err:
        print(err)
        sys.exit(3)
""")


@pytest.mark.parametrize("gpus", [0, 1])
def test_the_cluster_check_names_a_node_whose_advertised_gpu_torch_cannot_use(tmp_path: Path, gpus: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path / "out"), str(gpus)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=180)
    if gpus == 0:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "1 node(s) checked" in result.stdout and "output location" in result.stdout
        assert not (tmp_path / "out" / ".cluster-check").exists() or not any((tmp_path / "out" / ".cluster-check").iterdir())
    else:
        assert result.returncode == 3, result.stdout + result.stderr
        assert "cluster check failed" in result.stdout and "torch cannot use CUDA" in result.stdout
        assert "node " in result.stdout and "NVIDIA driver" in result.stdout
