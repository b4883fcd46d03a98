"""The one place that picks the torch device, from what Ray assigned, and says loudly when a GPU
cannot be used.

Policy (every actor, task and training worker follows it):
- Ray assigned GPU ids: torch must see them and run on them, else `DeviceUnusable` (the actor
  stops instead of running Stable Diffusion on one CPU thread while it holds a GPU);
- Ray assigned none: "cpu", and CUDA is never touched (Ray 2.60 leaves CUDA_VISIBLE_DEVICES
  alone for zero-GPU actors, so `torch.cuda.is_available()` would find the node's GPUs);
- outside Ray (a benchmark or test driving a stage directly): the GPU when one was asked for and
  torch can use it, else the same clear error.

A CUDA error after which the context is unusable (illegal address, launch failure, Xid) is
"sticky": every later CUDA call of the process fails too. `is_sticky_cuda_error` tells it from
the per-identity errors (out of memory, a bad value), so the actor can end itself and let Ray
start a fresh one instead of failing the rest of the queue one identity at a time.
"""

from __future__ import annotations

import os
import platform
import re
import socket
from collections.abc import Sequence


class DeviceUnusable(RuntimeError):
    """A GPU Ray assigned (or the caller asked for) that torch cannot use on this node."""


class ClusterCheckFailed(RuntimeError):
    """A node cannot do its part: its GPUs, or the run's output location (`core.cluster.check_cluster`).
    Here, not in core.cluster, so commands can name it without importing Ray."""


class StickyCudaError(RuntimeError):
    """This process's CUDA context is broken; only a new process can use the GPU again."""


# Messages of CUDA errors that poison the context (CUDA's own texts, as torch re-raises them).
# Out of memory is not among them: it is a per-identity error the allocator recovers from.
_STICKY_PATTERNS = re.compile(
    r"illegal memory access|illegal instruction|unspecified launch failure|device-side assert"
    r"|misaligned address|an uncorrectable ECC error|uncorrectable NVLink error|Xid"
    r"|CUDA error: (?!out of memory)|CUBLAS_STATUS_EXECUTION_FAILED|CUBLAS_STATUS_INTERNAL_ERROR"
    r"|CUDNN_STATUS_EXECUTION_FAILED|CUDNN_STATUS_INTERNAL_ERROR|NCCL error|GPU is lost"
    r"|device not ready|launch timed out",
    re.IGNORECASE,
)


def is_sticky_cuda_error(err: BaseException) -> bool:
    """True for a CUDA error that leaves the process's CUDA context unusable."""
    import torch

    if isinstance(err, StickyCudaError):
        return True
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises it for CUDA errors
    if accelerator_error is not None and isinstance(err, accelerator_error) and "out of memory" not in str(err):
        return True
    return isinstance(err, RuntimeError) and bool(_STICKY_PATTERNS.search(str(err)))


def node_name() -> str:
    """This node as a person finds it in `ray status`: host name and IP."""
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        address = "?"
    return f"{platform.node()} ({address})"


def driver_version() -> str:
    """The NVIDIA kernel driver's version, or why it is not known (read without CUDA)."""
    try:
        with open("/proc/driver/nvidia/version") as handle:
            match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9.]+)", handle.read())
        return match.group(1) if match else "unknown"
    except OSError:
        return "none (no /proc/driver/nvidia: no NVIDIA kernel driver on this node)"


def cuda_environment() -> str:
    """One line on what torch was built for and what the node provides."""
    import torch

    return (f"torch {torch.__version__} built for CUDA {torch.version.cuda or 'none (CPU build)'}, "
            f"NVIDIA driver {driver_version()}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}")


def cuda_problem(expected: int) -> str | None:
    """Why torch cannot use `expected` GPUs here (it must see exactly that many and run a kernel
    on each), or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return "torch cannot use CUDA (torch.cuda.is_available() is False)"
    seen = torch.cuda.device_count()
    if seen != expected:
        return f"torch sees {seen} GPU(s) where Ray assigned {expected}"
    for index in range(seen):
        try:
            (torch.ones(8, device=f"cuda:{index}") * 2).sum().item()
        except Exception as err:  # a node whose GPU fails its first kernel is as broken as one without
            return f"a kernel on cuda:{index} failed: {type(err).__name__}: {err}"
    return None


# Set to 1 on a machine whose Ray nodes advertise GPUs that are scheduling tokens only (tests of
# placement and autoscaling on CPU machines: `ray start --num-gpus N` without a GPU). Actors then
# run on the CPU and the cluster check skips CUDA; never set it on a real cluster.
SIMULATED_GPUS_ENV = "REID_FACTORY_SIMULATED_GPUS"


def gpus_simulated() -> bool:
    return os.environ.get(SIMULATED_GPUS_ENV) == "1"


CUDA_FIX = ("check the node's image: its NVIDIA driver must run the locked torch's CUDA (docs/cluster.md, "
            "'GPU image'); `ray status` and `nvidia-smi` on that node show what it has")


def device_for(gpu_ids: Sequence[object] | None, requested_gpus: float) -> str:
    """The device policy. `gpu_ids`: what Ray assigned this process (None outside Ray);
    `requested_gpus`: what the caller asked for (decides only outside Ray)."""
    expected = len(gpu_ids) if gpu_ids is not None else (1 if requested_gpus > 0 else 0)
    if expected == 0 or gpus_simulated():
        return "cpu"  # CUDA is never touched: no torch.cuda call at all
    problem = cuda_problem(expected)
    if problem is not None:
        held = f"Ray assigned GPU id(s) {list(gpu_ids)}" if gpu_ids is not None else f"{requested_gpus} GPU(s) were asked for"
        raise DeviceUnusable(f"node {node_name()}: {held}, but {problem}; {cuda_environment()}. Fix: {CUDA_FIX}")
    return "cuda"


def ray_gpu_ids() -> list[object] | None:
    """The GPU ids Ray assigned this worker, or None when not running inside a Ray worker."""
    try:
        import ray
    except ImportError:  # a bare machine driving the stages directly (benchmarks/gpu_check.py)
        return None
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    return list(ray.get_gpu_ids())


def actor_device(requested_gpus: float) -> str:
    """The device of the calling actor, task or training worker (see the module's policy)."""
    return device_for(ray_gpu_ids(), requested_gpus)


def torch_device(use_gpu: bool = True) -> str:
    """The device of code that is handed no Ray assignment (a driver-side evaluation): the GPU
    when asked for and torch can use one, else "cpu". Prefer `actor_device` in actors."""
    if not use_gpu:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
