"""Config of backbone pre-training on the factory's shards (`python -m trainers.pretrain`).

The defaults are the paper's recipe (Diffusion-ReID Sec. 4.1): ResNet-50, 300 epochs, AdamW lr 4e-3,
weight decay 0.05, 20-epoch linear warm-up then cosine decay, batch 512, Mixup, CutMix,
RandAugment and Random Erasing. Everything is named the way timm names it, and handed to timm's
factories (`create_model`, `create_optimizer_v2`, `create_scheduler_v2`, `create_transform`,
`Mixup`, `RandomErasing`) unchanged.

This module imports nothing heavy (no torch, no Ray): `core.settings.run` composes it into the
run config.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from core.config import ImageSize, StrictModel


class FaultInjection(StrictModel):
    """Testing hook: rank `rank` kills its own process (`os._exit`) when it is about to start
    epoch `epoch` (0-based), once per output folder (a marker file records that it happened), so
    `FailureConfig` recovery from the last checkpoint can be exercised for real."""

    epoch: int = Field(ge=1, description="the epoch (0-based) at whose start the worker dies")
    rank: int = Field(1, ge=0)
    marker: str = Field("fault_injected.marker", description="file under the output folder")


class PretrainConfig(StrictModel):
    """Identity-classification pre-training over the dense `pid` of the shards."""

    # model
    arch: str = Field("resnet50", description="any timm model name (e.g. swin_tiny_patch4_window7_224)")
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="passed to timm.create_model as is (e.g. drop_path_rate, img_size for ViT/Swin); "
        "the export loads with timm.create_model(arch, num_classes=0, **model_kwargs)",
    )
    image_size: ImageSize = Field((256, 128), description="(height, width) fed to the model")

    # optimisation (timm names)
    epochs: int = Field(300, ge=1)
    optimizer: str = Field("adamw", description="timm.optim.create_optimizer_v2 `opt`")
    lr: float = Field(4e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    scheduler: str = Field("cosine", description="timm.scheduler.create_scheduler_v2 `sched`")
    warmup_epochs: int = Field(20, ge=0, description="linear warm-up from warmup_lr to lr, before the decay")
    warmup_lr: float = Field(1e-6, ge=0)
    min_lr: float = Field(1e-5, ge=0, description="the floor the cosine decays towards (reached at `epochs`)")
    batch_size: int = Field(512, ge=2, description="global batch: images per optimizer step over all workers")
    max_batch_per_step: int | None = Field(
        None, ge=2, description="most images one worker pushes through the model at once; a smaller "
        "value than its share of batch_size means gradient accumulation (None = no limit)",
    )

    # augmentation (timm)
    mixup_alpha: float = Field(0.8, ge=0, description="0 disables Mixup")
    cutmix_alpha: float = Field(1.0, ge=0, description="0 disables CutMix")
    mixup_prob: float = Field(1.0, ge=0, le=1)
    mixup_switch_prob: float = Field(0.5, ge=0, le=1, description="chance of CutMix instead of Mixup")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    # DeiT's RandAugment, with sampled magnitudes capped at 9 instead of 10 (`mmax9`): at 10 timm's
    # increasing posterize keeps 0 bits, which Pillow >= 10 rejects (ValueError, ~1 image in 800).
    rand_augment: str | None = Field("rand-m9-mstd0.5-inc1-mmax9", description="timm RandAugment spec; None disables")
    random_erasing: float = Field(0.25, ge=0, le=1, description="Random Erasing probability; 0 disables")
    random_erasing_mode: Literal["const", "rand", "pixel"] = "pixel"
    hflip: float = Field(0.5, ge=0, le=1)
    # Person crops are 1:2 (w:h); timm's ImageNet crop defaults (area 8-100 %, aspect 3:4-4:3)
    # would cut people into squares of torso, so crops keep most of the person and its shape.
    crop_scale: tuple[float, float] = Field((0.5, 1.0), description="RandomResizedCrop area range")
    crop_ratio: tuple[float, float] = Field((0.375, 0.667), description="RandomResizedCrop w/h range")
    interpolation: str = "bicubic"

    # input pipeline (Ray Data)
    decode_on: Literal["ray_data", "trainer"] = Field(
        "ray_data", description="where images are decoded and augmented: 'ray_data' = a map_batches stage "
        "on any CPU of the cluster (scales out; the paper setting), 'trainer' = in each training worker's "
        "prefetch threads (no extra processes; for small machines, e.g. the CPU demo)",
    )
    cache_shards: bool = Field(
        False, description="read the Parquet shards once and keep the encoded rows in Ray's object store "
        "(saves a read, and its task start-up, per epoch; needs object-store memory about the size of "
        "DIR/shards: right for small data such as the demo, not for Diff-Person)",
    )
    decode_batch_size: int = Field(64, ge=1, description="images per decode/augment task (decode_on: ray_data)")
    decode_cpus: float = Field(1.0, gt=0, description="CPUs each decode/augment task reserves (decode_on: ray_data)")
    decode_concurrency: int | None = Field(None, ge=1, description="most decode/augment tasks at once "
                                           "(decode_on: ray_data)")
    shuffle_buffer: int = Field(4096, ge=0, description="rows of each worker's local shuffle buffer")
    prefetch_batches: int = Field(2, ge=0, description="batches each worker keeps ready ahead of the step "
                                  "(with decode_on: trainer, also the number of decode threads)")

    # Ray Train
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: Literal["auto", True, False] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each training worker reserves "
                                   "(and its torch threads); the rest of the cluster decodes")
    max_failures: int = Field(3, ge=-1, description="worker failures to recover from (-1: unlimited)")
    checkpoints_to_keep: int = Field(2, ge=1)
    seed: int = 0
    fault_injection: FaultInjection | None = Field(None, description="testing hook, see FaultInjection")

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be smaller than epochs={self.epochs}")
        if min(self.image_size) < 8:
            raise ValueError(f"image_size {self.image_size} is too small")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale {self.crop_scale}: need 0 < low <= high <= 1")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio {self.crop_ratio}: need 0 < low <= high")
        plan_batches(self.batch_size, self.num_workers, self.max_batch_per_step, even=self.mixup_enabled)
        if self.rand_augment is not None:
            check_rand_augment(self.rand_augment)
        return self

    @property
    def mixup_enabled(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def check_rand_augment(spec: str) -> None:
    """Reject a timm RandAugment spec that would crash mid-training: with `inc1`, a magnitude of 10
    makes timm's posterize keep 0 bits, which Pillow >= 10 refuses. Magnitudes are `m` (with
    `mstd` > 0 drawn from a Gaussian around it) clipped to `mmax` (default 10)."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"rand_augment {spec!r}: a timm RandAugment spec starts with 'rand-'")
    values: dict[str, float] = {}
    for part in parts[1:]:
        for key in ("mstd", "mmax", "inc", "m", "n", "p", "w", "t"):
            if part.startswith(key):
                try:
                    values[key] = float(part[len(key):])
                except ValueError:
                    raise ValueError(f"rand_augment {spec!r}: cannot read {part!r}") from None
                break
    if not values.get("inc"):
        return
    magnitude, spread = values.get("m", 10.0), values.get("mstd", 0.0)
    reach = magnitude if spread in (0.0, float("inf")) else float("inf")
    if min(reach, values.get("mmax", 10.0)) >= 10:
        raise ValueError(
            f"rand_augment {spec!r} can reach magnitude 10, where timm's increasing posterize keeps 0 bits "
            "and Pillow >= 10 raises; cap it below 10, e.g. append '-mmax9'"
        )


class BatchPlan(StrictModel):
    """How a global batch is split: each of `num_workers` ranks takes `per_worker` images per
    optimizer step, in `accumulation_steps` forward/backward passes of `micro_batch` images."""

    global_batch: int
    num_workers: int
    per_worker: int
    micro_batch: int
    accumulation_steps: int


def plan_batches(
    global_batch: int, num_workers: int, max_batch_per_step: int | None = None, even: bool = False
) -> BatchPlan:
    """Split `global_batch` over `num_workers` ranks, accumulating gradients over the fewest
    equal micro-batches of at most `max_batch_per_step` images (`even`: each micro-batch has an
    even size, as Mixup/CutMix pair images within a batch).

    The effective batch of an optimizer step is `num_workers * micro_batch * accumulation_steps`
    = `global_batch`, exactly, whatever the worker count; impossible splits raise ValueError.
    """
    if global_batch < 1 or num_workers < 1:
        raise ValueError(f"global batch {global_batch} and workers {num_workers} must be positive")
    if global_batch % num_workers:
        raise ValueError(f"batch_size={global_batch} is not divisible by num_workers={num_workers}")
    per_worker = global_batch // num_workers
    limit = per_worker if max_batch_per_step is None else min(per_worker, max_batch_per_step)
    for steps in range(-(-per_worker // limit), per_worker + 1):
        micro, rest = divmod(per_worker, steps)
        if rest == 0 and micro <= limit and (not even or micro % 2 == 0):
            return BatchPlan(global_batch=global_batch, num_workers=num_workers, per_worker=per_worker,
                             micro_batch=micro, accumulation_steps=steps)
    raise ValueError(
        f"cannot split batch_size={global_batch} over {num_workers} workers into equal micro-batches of at "
        f"most {limit} images{' of even size (Mixup/CutMix pair images)' if even else ''}; "
        "choose a batch_size with more factors of 2"
    )
