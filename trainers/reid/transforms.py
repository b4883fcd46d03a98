"""BoT's image pipelines (torchvision v2), from PIL images to normalised float tensors.

Normalisation uses timm's ImageNet mean/std, which is what the ResNet-family backbones (and
`init: imagenet` weights) expect; Random Erasing comes after normalisation, so its zero fill is the
mean colour, as in BoT's erasing with the dataset mean.
"""

from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2

from core.settings.reid import ReidTrainConfig


def _to_normalised_tensor() -> list[v2.Transform]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(IMAGENET_DEFAULT_MEAN), std=list(IMAGENET_DEFAULT_STD)),
    ]


def build_train_transform(config: ReidTrainConfig) -> v2.Compose:
    """Resize, (AutoAugment when `autoaugment_prob`), random horizontal flip, pad + random crop
    back to size, normalise, Random Erasing."""
    size = list(config.image_size)
    steps: list[v2.Transform] = [v2.Resize(size)]
    if config.autoaugment_prob > 0:  # fast-reid's SBS: the ImageNet policy on 10 % of the images
        steps.append(v2.RandomApply([v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)], p=config.autoaugment_prob))
    steps.append(v2.RandomHorizontalFlip(p=config.flip_prob))
    if config.pad > 0:
        steps += [v2.Pad(config.pad), v2.RandomCrop(size)]
    steps += _to_normalised_tensor()
    if config.random_erasing > 0:
        # BoT's erasing area (2-40 %) and aspect ratio range (0.3-3.3).
        steps.append(v2.RandomErasing(p=config.random_erasing, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=0))
    return v2.Compose(steps)


def build_eval_transform(config: ReidTrainConfig) -> v2.Compose:
    """Resize and normalise."""
    return v2.Compose([v2.Resize(list(config.image_size)), *_to_normalised_tensor()])
