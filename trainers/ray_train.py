"""What the Ray Train loops (`trainers.reid`, `trainers.pretrain`) share: the driver's run, the
workers' logging, and (with the downstream Tune trials) reporting and reading checkpoints."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from core.cluster import RayConfig, check_cluster, init_ray, resolve_use_gpu
from core.config import config_to_yaml
from core.storage import Location
from trainers.checkpoint import CONFIG_FILE, TrainingState, load_rng_state, load_training_state


def start_run(out: Location, config: Any) -> bool:
    """Write the resolved `config.yaml` into `out`, then join the Ray cluster of `RAY_ADDRESS` (e.g.
    inside `ray job submit`) or the one already initialised, else start a local one. Returns
    whether the workers get a GPU (`config.use_gpu`). A process that joins or starts Ray here
    first checks every node (`core.cluster.check_cluster`: GPUs usable, `out` reachable); one that
    already had Ray (the build, which checked its cluster) does not check again."""
    (out / CONFIG_FILE).write_text(config_to_yaml(config))
    joining = not ray.is_initialized()
    init_ray(RayConfig(), progress_bars=False)
    if joining:
        check_cluster(out)
    return resolve_use_gpu(config.use_gpu)


def fit(loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], scaling: ScalingConfig,
        out: Location, run_name: str, keep: int, max_failures: int, **trainer_kwargs: Any) -> Checkpoint:
    """`loop` on the workers under `TorchTrainer`, checkpoints under `out/run_name` (the last
    `keep`; up to `max_failures` worker failures recovered); returns the final checkpoint."""
    run_config = RunConfig(storage_path=out.uri, name=run_name, checkpoint_config=CheckpointConfig(num_to_keep=keep),
                           failure_config=FailureConfig(max_failures=max_failures))
    result = TorchTrainer(loop, train_loop_config=loop_config, scaling_config=scaling, run_config=run_config,
                          **trainer_kwargs).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {out / run_name} ended without a checkpoint")
    return result.checkpoint


def quiet_ray_train_reports() -> None:
    """Drop Ray Train's two INFO lines per `ray.train.report` (the checkpoint path, then the whole
    metrics dict) in this worker: the loops log one line per epoch from rank 0 instead, which
    keeps a build's or a pre-training run's output readable. Warnings and errors still show."""
    try:  # Ray-internal module paths; if they move, the lines simply come back
        from ray.train.v2._internal.execution import context, storage
    except ImportError:
        return
    # `context` logs under its file path (logging.getLogger(__file__)), `storage` under its name.
    for name in (context.__file__, storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


def report_checkpoint(metrics: dict[str, Any], write: Callable[[Path], None] | None,
                      report: Callable[..., None] = ray.train.report, checkpoint_class: type = Checkpoint) -> None:
    """`report(metrics, checkpoint=...)` with a checkpoint of the files `write` puts into a fresh
    temporary folder; no checkpoint when `write` is None. Tune trials pass `tune.report` and
    `tune.Checkpoint` (Ray Train v2 and Tune each take only their own checkpoint class)."""
    if write is None:
        return report(metrics, checkpoint=None)
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        report(metrics, checkpoint=checkpoint_class.from_directory(tmp))


def read_checkpoint(checkpoint: Checkpoint | None, rank: int = 0) -> tuple[TrainingState | None, Any]:
    """The training state in `checkpoint` and `rank`'s RNG states (None where there are none)."""
    if checkpoint is None:
        return None, None
    with checkpoint.as_directory() as directory:
        return load_training_state(directory), load_rng_state(directory, rank)
