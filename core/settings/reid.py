"""Config of the supervised Re-ID trainer (BoT baseline), shared by the factory's filter model
and the downstream evaluation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, field_validator, model_serializer, model_validator

from core.config import ImageSize, StrictModel


_LATER_FIELDS = ("optimizer", "momentum", "lr_schedule", "cosine_delay_epochs", "min_lr", "freeze_backbone_epochs",
                 "autoaugment_prob")


class ReidTrainConfig(StrictModel):
    """BoT ("bag of tricks", Luo et al. 2019) recipe; defaults follow the paper's Market setting.

    `init` is `random`, `imagenet` (timm pretrained weights; needs them in the HF cache) or a
    path to a backbone `.safetensors` file (e.g. `trainers.pretrain`'s export).

    `optimizer`, `momentum`, `lr_schedule`, `cosine_delay_epochs`, `min_lr`,
    `freeze_backbone_epochs` and `autoaugment_prob` default to BoT's choices, so a config without
    them trains exactly as before; other methods' recipes select them (MGN's momentum SGD, SBS's
    cosine schedule, backbone freeze and AutoAugment).
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
    optimizer: Literal["adam", "sgd"] = Field("adam", description="sgd: momentum SGD without Nesterov")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD's momentum (unused by Adam)")
    lr_schedule: Literal["step", "cosine"] = Field(
        "step", description="step: warm-up, then x gamma at each milestone (BoT); cosine: warm-up, base_lr "
        "until cosine_delay_epochs, then cosine annealing to min_lr at the last epoch (fast-reid's SBS)"
    )
    cosine_delay_epochs: int = Field(0, ge=0, description="cosine: epochs before annealing starts "
                                     "(at least the warm-up; fast-reid's DELAY_EPOCHS)")
    min_lr: float = Field(0.0, ge=0, description="cosine: the lr annealing ends at")
    freeze_backbone_epochs: int = Field(
        0, ge=0, description="epochs in which the model's `backbone` gets no update, only the head "
        "learns (fast-reid's FREEZE_ITERS, in epochs)"
    )
    ids_per_batch: int = Field(16, ge=2, description="P of the PK sampler")
    images_per_id: int = Field(4, ge=2, description="K of the PK sampler")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    triplet_margin: float | None = Field(0.3, description="None = soft-margin triplet")
    flip_prob: float = Field(0.5, ge=0, le=1)
    pad: int = Field(10, ge=0)
    random_erasing: float = Field(0.5, ge=0, le=1)
    autoaugment_prob: float = Field(0.0, ge=0, le=1, description="chance of an ImageNet AutoAugment policy per "
                                    "training image (fast-reid's SBS: 0.1)")
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

    @model_serializer(mode="wrap")
    def _later_fields_unwritten_at_their_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Fields added after the first release leave dumps at their defaults, so every digest made
        # from a recipe (finished downstream cells, experiment chains) stays valid across versions.
        data = handler(self)
        for name in _LATER_FIELDS:
            if name in data and getattr(self, name) == type(self).model_fields[name].default:
                del data[name]
        return data

    def updated(self, **changes: Any) -> ReidTrainConfig:
        """A copy with `changes`, validated like a config (pydantic's `model_copy(update=...)` is
        not): what a method's recipe sets is checked before anything trains."""
        return type(self).model_validate({**self.model_dump(), **changes})

    @model_validator(mode="after")
    def _check_schedule_fits_the_run(self) -> ReidTrainConfig:
        if self.freeze_backbone_epochs >= self.epochs:
            raise ValueError(f"freeze_backbone_epochs={self.freeze_backbone_epochs} leaves no epoch in which "
                             f"the backbone trains (epochs={self.epochs})")
        annealing_start = max(self.warmup_epochs, self.cosine_delay_epochs)
        if self.lr_schedule == "cosine" and annealing_start >= self.epochs:
            raise ValueError(f"lr_schedule cosine: annealing would start at epoch {annealing_start} "
                             f"(warmup_epochs / cosine_delay_epochs), not before the last (epochs={self.epochs})")
        return self
