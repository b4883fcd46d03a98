"""Worker-side logging shared by the Ray Train loops (`trainers.reid`, `trainers.pretrain`)."""

from __future__ import annotations

import logging


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
