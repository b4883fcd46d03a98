"""The one place that picks the torch device: a GPU when the caller holds one and torch sees it."""

from __future__ import annotations


def torch_device(use_gpu: bool = True) -> str:
    """"cuda" when `use_gpu` and a CUDA device is visible, else "cpu". Imports torch only when called."""
    import torch

    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def return_freed_host_memory(collect_cycles: bool = True) -> None:
    """Hand the host memory that freed tensors leave in the C heap back to the OS.

    glibc keeps freed blocks below its (growing) mmap threshold in the heap, so after a
    full fine-tune on a CPU the gradients' and optimizer's gigabytes stay in the process's RSS
    though nothing uses them. `malloc_trim(0)` releases them; elsewhere it is skipped.
    `collect_cycles` first runs the cycle collector, for memory only a cycle still holds (an
    optimizer's state); it costs ~0.35 s in a process holding torch and diffusers, which
    callers that run often on small models skip."""
    import ctypes
    import ctypes.util
    import gc

    if collect_cycles:
        gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return
    trim(0)
