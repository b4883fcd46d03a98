"""The BoT baseline (Luo et al., "Bag of Tricks and A Strong Baseline for Deep Person Re-ID"),
as a library: model, losses, PK sampler, transforms, schedule, Ray Train loop, evaluation.

Typical use::

    result = train_reid(dataset, config, out_dir)                     # Ray Train
    model = load_reid_model(result.model_path, config)
    metrics = evaluate_reid(model, dataset, config)                   # mAP, rank1, ...
"""

from trainers.reid.baseline import BaselineReport, run_bot_baseline
from trainers.reid.evaluate import evaluate_reid, extract_features
from trainers.reid.losses import BotLoss, batch_hard_triplet_loss
from trainers.reid.model import ReidBaseline, ReidOutput, build_reid_model, load_reid_model
from trainers.reid.sampler import PKBatchSampler
from trainers.reid.schedule import build_lr_scheduler, build_optimizer
from trainers.reid.train import ReidTrainResult, train_reid
from trainers.reid.transforms import build_eval_transform, build_train_transform

__all__ = [
    "BaselineReport",
    "BotLoss",
    "PKBatchSampler",
    "ReidBaseline",
    "ReidOutput",
    "ReidTrainResult",
    "batch_hard_triplet_loss",
    "build_eval_transform",
    "build_lr_scheduler",
    "build_optimizer",
    "build_reid_model",
    "build_train_transform",
    "evaluate_reid",
    "extract_features",
    "load_reid_model",
    "run_bot_baseline",
    "train_reid",
]
