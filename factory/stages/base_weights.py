"""The base UNet's weights, kept for the restore after each identity's full fine-tune
(`factory.stages.fine_tune.FullFineTune`), and `module_fingerprint`, which tells bit-identical
weights apart.

With a GPU the copy lives in host memory, pinned, so a restore is one fast host-to-device copy
per tensor and costs no GPU memory. It is one flat buffer, pinned with one `cudaHostRegister`:
pinning tensor by tensor goes through torch's caching host allocator, which rounds every
allocation up to a power of two (SD v1.4's 3.20 GiB of weights took 3.86 GiB pinned), and one
`pin_memory` tensor of the whole size would round 3.20 GiB up to 4 GiB.

On a CPU the model itself already lives in host memory: a second copy there would double the
UNet's footprint (3.4 GB more for SD v1.4 in fp32), so the copy goes to a local safetensors file
and is read back tensor by tensor into the live weights.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import tempfile
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

# Each reopening of the file maps at most this many bytes: the mapped pages count in the
# process's RSS until the file is closed, so one open for the whole UNet would add its full
# size to the peak for the length of the restore.
_MAPPED_BYTES_PER_OPEN = 256 * 2**20
_FOLDER_PREFIX = "reid-factory-base-unet-"
# Held (flock) by the owning actor for its lifetime: the kernel drops the lock when the process
# dies however it dies, so a folder whose lock can be taken belongs to nobody.
_OWNER_LOCK = "owner.lock"
# Each tensor of the flat copy starts at a multiple of this many bytes: a uint8 slice can be
# viewed as any dtype only at an offset its element size divides, and 64 also suits DMA.
_ALIGNMENT = 64


class BaseWeightCopy:
    """A bit-exact copy of `module`'s state at construction, and `restore(module)`."""

    def __init__(self, module: torch.nn.Module, device: str, mapped_bytes_per_open: int = _MAPPED_BYTES_PER_OPEN) -> None:
        state = {name: tensor.detach() for name, tensor in module.state_dict().items()}
        self._in_memory: dict[str, torch.Tensor] | None = None
        self._file: Path | None = None
        if device.startswith("cuda"):
            buffer, self._in_memory = pack_tensors(state, _pinned_buffer)
            self._buffer_bytes = buffer.numel()
            # Unpinned before the buffer is freed: the finalizer holds the buffer until it has run.
            weakref.finalize(self, _unpin, buffer)
            return
        from safetensors.torch import save_file

        # Removed with this object (or at interpreter exit): one file per generation actor. An
        # actor killed by a signal leaves its folder behind (3.4 GB at SD v1.4 size), so each new
        # copy first removes those whose owner is gone.
        for folder in remove_abandoned_copies(Path(tempfile.gettempdir())):
            print(f"[generate] removed {folder}, a base-weight copy left by a killed actor", flush=True)
        self._folder = tempfile.TemporaryDirectory(prefix=_FOLDER_PREFIX)
        folder = Path(self._folder.name)
        # Lock first, then give the lock its name: a sweeper never sees an unlocked live folder.
        pending = folder / (_OWNER_LOCK + ".pending")
        self._owner_lock = pending.open("wb")
        fcntl.flock(self._owner_lock, fcntl.LOCK_EX)
        pending.rename(folder / _OWNER_LOCK)
        self._file = folder / "unet.safetensors"
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(self._file))
        self._groups = _groups_by_bytes(state, mapped_bytes_per_open)

    @property
    def where(self) -> str:
        if self._in_memory is not None:
            return f"pinned host memory (one buffer of {self._buffer_bytes / 2**30:.2f} GiB)"
        return f"a local file ({self._file})"

    @torch.no_grad()
    def restore(self, module: torch.nn.Module) -> None:
        if self._in_memory is not None:
            module.load_state_dict(self._in_memory)
            return
        from safetensors import safe_open

        live = module.state_dict()
        if set(live) != {name for group in self._groups for name in group}:
            raise RuntimeError("the UNet's parameters changed since its base weights were copied")
        for group in self._groups:
            with safe_open(str(self._file), framework="pt", device="cpu") as stored:
                for name in group:
                    live[name].copy_(stored.get_tensor(name))


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer: equal fingerprints mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def pack_tensors(state: Mapping[str, torch.Tensor], allocate: Callable[[int], torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Copy every tensor of `state` into one flat uint8 buffer of `allocate(nbytes)`, each at an
    offset aligned to `_ALIGNMENT`; returns the buffer and, per name, a view of it with the
    tensor's dtype and shape (bit-exact: the bytes are copied, never converted)."""
    offsets: dict[str, int] = {}
    total = 0
    for name, tensor in state.items():
        total = -(-total // _ALIGNMENT) * _ALIGNMENT
        offsets[name] = total
        total += tensor.numel() * tensor.element_size()
    buffer = allocate(total)
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < total:
        raise ValueError(f"allocate({total}) must return a flat uint8 tensor of at least {total} bytes")
    views: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        start = offsets[name]
        view = buffer[start : start + tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor.detach())
        views[name] = view
    return buffer, views


def _pinned_buffer(nbytes: int) -> torch.Tensor:
    """`nbytes` of ordinary host memory, page-locked in place (exactly its size, no rounding)."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        code = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0))
        if code != 0:
            raise RuntimeError(f"cudaHostRegister of {nbytes / 2**30:.2f} GiB for the base weights failed: "
                               f"cudaError {code}")
    return buffer


def _unpin(buffer: torch.Tensor) -> None:
    if buffer.numel():
        # The return code is not checked: at interpreter exit, or after a sticky CUDA error,
        # the runtime may be gone, and the process's memory goes with it anyway.
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


def remove_abandoned_copies(parent: Path) -> list[Path]:
    """Delete the base-weight folders under `parent` whose owning process has died."""
    removed: list[Path] = []
    for folder in parent.glob(_FOLDER_PREFIX + "*"):
        try:
            with (folder / _OWNER_LOCK).open("rb") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        except (BlockingIOError, FileNotFoundError, NotADirectoryError, PermissionError):
            continue  # alive, still being set up, or not ours to remove
    return removed


def _groups_by_bytes(state: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups
