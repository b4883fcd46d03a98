"""The one place that picks the torch device: a GPU when the caller holds one and torch sees it."""

from __future__ import annotations


def torch_device(use_gpu: bool = True) -> str:
    """"cuda" when `use_gpu` and a CUDA device is visible, else "cpu". Imports torch only when called."""
    import torch

    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
