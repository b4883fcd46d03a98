"""Config of the supervised Re-ID trainer (BoT baseline), shared by the factory's filter model
and the downstream evaluation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from core.config import ImageSize, StrictModel


class ReidTrainConfig(StrictModel):
    """BoT ("bag of tricks", Luo et al. 2019) recipe; defaults follow the paper's Market setting.

    `init` is `random`, `imagenet` (timm pretrained weights; needs them in the HF cache) or a
    path to a backbone `.safetensors` file (e.g. `trainers.pretrain`'s export).
    """

    arch: str = "resnet50"
    init: str = "imagenet"
    last_stride: Literal[1, 2] = 1
    image_size: ImageSize = (256, 128)
    epochs: int = Field(120, ge=1)
    base_lr: float = Field(3.5e-4, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    warmup_epochs: int = Field(10, ge=0)
    warmup_factor: float = Field(0.01, gt=0, le=1)
    milestones: tuple[int, ...] = (40, 70)
    gamma: float = Field(0.1, gt=0, le=1)
    ids_per_batch: int = Field(16, ge=2, description="P of the PK sampler")
    images_per_id: int = Field(4, ge=2, description="K of the PK sampler")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    triplet_margin: float | None = Field(0.3, description="None = soft-margin triplet")
    flip_prob: float = Field(0.5, ge=0, le=1)
    pad: int = Field(10, ge=0)
    random_erasing: float = Field(0.5, ge=0, le=1)
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: Literal["auto", True, False] = "auto"
    eval_batch_size: int = Field(128, ge=1)
    seed: int = 0
    loader_workers: int = Field(
        4, ge=0, description="DataLoader worker processes per Ray Train worker (0 = decode in-process)"
    )
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs each Ray Train worker reserves (and torch threads); "
        "None = the cluster's CPUs shared evenly, capped at one node's"
    )

    @field_validator("init")
    @classmethod
    def _check_init(cls, value: str) -> str:
        if value not in {"random", "imagenet"} and not value.endswith(".safetensors"):
            raise ValueError("init must be 'random', 'imagenet' or a path to a .safetensors file")
        return value
