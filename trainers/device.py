"""How a training process uses its device: the GPU Ray assigned it, checked before use, and the
mixed precision and memory layout a GPU step runs fastest in (the Re-ID trainer, the downstream
trials and pre-training share them). Ray is imported only by `train_worker_device`: the GPU check
(`benchmarks/gpu_check.py`) uses `Precision` on machines without Ray."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from core.device import device_for


def autocast_dtype(device_type: str, bf16_supported: bool) -> torch.dtype | None:
    """The autocast dtype of training on `device_type`: bf16 on a GPU that runs it natively (fp32's
    range: no loss scaling), else fp16 (with a `GradScaler`); None = fp32 without autocast on a CPU,
    where mixed precision gains little and the results stay exactly those of an fp32 run."""
    if device_type != "cuda":
        return None
    return torch.bfloat16 if bf16_supported else torch.float16


@dataclass
class Precision:
    """How a training step uses its device: the autocast dtype (None: fp32), the fp16 loss scaler
    (kept across epochs: its scale adapts over the run) and the `channels_last` layout (NHWC, what
    the tensor cores' convolutions read without transposing)."""

    device_type: str = "cpu"
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False

    @classmethod
    def for_device(cls, device: torch.device | str, mixed: bool | None = None) -> Precision:
        """The fast setting of `device`; a CPU gets fp32 and never touches `torch.cuda`. `mixed`
        overrides the choice (the GPU check compares both): True on a CPU is bf16 autocast."""
        device = torch.device(device)
        if mixed is False:
            return cls(device.type)
        if device.type != "cuda":
            return cls(device.type, torch.bfloat16, channels_last=True) if mixed else cls(device.type)
        # Without `including_emulation=False` a pre-Ampere GPU reports bf16 it only emulates, slowly.
        dtype = autocast_dtype("cuda", torch.cuda.is_bf16_supported(including_emulation=False))
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        return cls("cuda", dtype, scaler, channels_last=True)

    @property
    def label(self) -> str:
        return "fp32" if self.dtype is None else f"{str(self.dtype).removeprefix('torch.')} autocast + channels_last"

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.preserve_format

    def autocast(self) -> AbstractContextManager[Any]:
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step; with fp16 skipped when the gradients overflowed (the scaler then backs off)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()


def train_worker_device() -> torch.device:
    """This Ray Train worker's device (`ray.train.torch.get_device()`), after checking that torch can
    use the GPU Ray assigned it: else `DeviceUnusable`, naming the node, driver and CUDA, instead of
    a run on the CPU while the GPU is held, or a death later inside NCCL. A worker without GPU ids
    never touches CUDA."""
    import ray
    import ray.train.torch

    gpu_ids = ray.get_gpu_ids()
    if gpu_ids:
        # Ray Train shows each worker all the GPUs its node's workers hold (NCCL needs them), so
        # torch must see exactly those: CUDA_VISIBLE_DEVICES, a superset of this worker's ids.
        visible = [i for i in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if i and i != "NoDevFiles"]
        device_for(visible or list(gpu_ids), len(gpu_ids))
    return ray.train.torch.get_device()
