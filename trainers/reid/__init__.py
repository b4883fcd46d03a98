"""The BoT baseline (Luo et al., "Bag of Tricks and A Strong Baseline for Deep Person Re-ID"),
as a library: model, losses, PK sampler, transforms, schedule, Ray Train loop, evaluation
(`run_bot_baseline`, train-and-evaluate in one call, is `trainers.reid.baseline`'s).

Typical use::

    result = train_reid(dataset, config, out_dir)                     # Ray Train
    model = load_reid_model(result.model_path, config)
    metrics = evaluate_reid(model, dataset, config)                   # mAP, rank1, ...
"""

from trainers.reid.evaluate import evaluate_reid, extract_features
from trainers.reid.losses import BotLoss, batch_hard_triplet_loss
from trainers.reid.model import ReidOutput, build_reid_model, load_reid_model
from trainers.reid.sampler import PKBatchSampler
from trainers.reid.schedule import build_lr_scheduler, build_optimizer
from trainers.reid.transforms import build_eval_transform, build_train_transform


def __getattr__(name: str):
    # `train_reid` (Ray Train) on first use: the model, losses and schedule import without Ray,
    # as the GPU check on a machine without Ray needs them.
    if name == "train_reid":
        from trainers.reid.train import train_reid

        return train_reid
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "BotLoss",
    "PKBatchSampler",
    "ReidOutput",
    "batch_hard_triplet_loss",
    "build_eval_transform",
    "build_lr_scheduler",
    "build_optimizer",
    "build_reid_model",
    "build_train_transform",
    "evaluate_reid",
    "extract_features",
    "load_reid_model",
    "train_reid",
]
