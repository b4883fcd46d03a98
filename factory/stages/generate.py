"""The generation stage: the Ray actor body that holds one `DiversityInjectionGenerator` (the
paper's three phases, `factory.stages.diversity_injection`) and runs it per captioned identity,
with retries, injected faults (`generation.debug_fail_identities`) and the row it writes."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from core.device import StickyCudaError, actor_device, is_sticky_cuda_error, node_name
from core.settings.stages import GenerationConfig, OutputConfig, fault_target
from core.shards import encode_image
from core.storage import resolve
from factory.models.shipping import ModelFolders
from factory.schema import CAPTIONED_SCHEMA, GENERATION_FIELDS
from factory.stages.base import RowStage, StageResources, decode_images
from factory.stages.diversity_injection import DiversityInjectionGenerator, IdentityOutput
from factory.stages.reference_set import ReferenceSetStore


def memory_figures(device: str) -> str:
    """Peak memory so far, for failure messages: CUDA peak allocated of the device's total, or
    the process's peak RSS on CPU."""
    if device.startswith("cuda") and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return f"peak allocated {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB of {total / 2**30:.1f} GiB"
    import resource

    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"


def _sibling(location: str, name: str) -> str:
    """`name` beside `location` (a local path or a URI): `<out>/reference_sets` -> `<out>/debug`."""
    parent, slash, _ = location.rstrip("/").rpartition("/")
    return f"{parent}/{name}" if slash else name


def _default_loader(model_id: str, device: str):
    from factory.models.loading import load_text_to_image

    return load_text_to_image(model_id, device, torch.float32)


class GenerationStage(RowStage):
    """Ray actor body for DI: loads the base pipeline once in `setup`, then processes identities."""

    name = "generate"
    reads = CAPTIONED_SCHEMA
    writes = GENERATION_FIELDS

    def __init__(self, config: GenerationConfig, output: OutputConfig, num_gpus: float = 0.0,
                 num_threads: int | None = None, fail_identities: Sequence[str] = (),
                 loader: Callable[[str, str], object] | None = None, reference_dir: str | None = None,
                 folders: ModelFolders | None = None, device: str | None = None) -> None:
        """`reference_dir`: `<build output>/reference_sets`; `device`: the torch device, for a
        caller driving the stage without Ray (a benchmark); by default the one Ray assigned."""
        self.config = config
        self.folders = folders or ModelFolders()
        # The build's output location, where the injected CUDA fault records that it fired.
        self.debug_dir = _sibling(reference_dir, "debug") if reference_dir else None
        self.reference_dir = reference_dir if config.reuse_reference_sets else None
        self.output = output
        self.num_gpus = num_gpus
        self.num_threads = num_threads
        self.device = device
        self.fail_identities = dict(fault_target(entry) for entry in fail_identities)
        self.loader = loader or _default_loader
        self.generator: DiversityInjectionGenerator | None = None
        self.model_loads = 0

    def resources(self) -> StageResources:
        c = self.config.concurrency
        # One identity queued per actor: each takes minutes, and a second one queued behind a busy
        # actor would wait there while an actor the pool scaled up to sits idle.
        return StageResources(1, c.min, c.max, float(self.num_threads or 1), self.num_gpus, tasks_in_flight=1)

    def setup(self) -> None:
        # The IIR token was checked against this model's tokenizer by the build's check phase
        # (factory.preflight), before any model loaded.
        if self.num_threads:
            # Same thread count on every actor keeps CPU results bit-reproducible across reruns.
            torch.set_num_threads(self.num_threads)
        device = self.device or actor_device(self.num_gpus)
        pipeline = self.loader(self.folders.open(self.config.base_model), device)
        self.model_loads += 1
        references = ReferenceSetStore(self.reference_dir) if self.reference_dir else None
        self.generator = DiversityInjectionGenerator(pipeline, self.config, device, references)

    def _fault(self, identity: str) -> Callable[[str], None] | None:
        """The injected failure of `identity` (generation.debug_fail_identities), raised as its
        first phase starts: `RuntimeError`, CUDA's `OutOfMemoryError` for `SOURCE/PID:oom`, or a
        sticky CUDA error for `SOURCE/PID:cuda`. That one fires once per build output (a marker
        under `<out>/debug/` records it), so the identity, retried by a restarted actor,
        succeeds; a stage given no output location raises it every time."""
        kind = self.fail_identities.get(identity)
        if kind is None:
            return None
        marker = None
        if kind == "cuda" and self.debug_dir:
            marker = resolve(self.debug_dir) / "injected_cuda_faults" / identity
            if marker.exists():
                return None

        def fail(phase: str) -> None:
            message = f"injected failure for {identity} in {phase} (generation.debug_fail_identities)"
            if kind == "oom":
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory: {message}")
            if kind == "cuda":
                if marker is not None:  # written first: the process may not outlive the error
                    marker.write_text(f"{message}\n")
                raise RuntimeError(f"CUDA error: an illegal memory access was encountered ({message})")
            raise RuntimeError(message)

        return fail

    def process_row(self, row: dict) -> dict:
        assert self.generator is not None, "call setup() first"
        generator = self.generator
        result, error, attempts = None, "", 0
        for attempts in range(1, self.config.max_retries + 2):
            try:
                generator.fault = self._fault(row["identity"])
                images = decode_images(row["image_bytes"])
                result = generator.process_identity(images, row["prompt"], row["reference_prompt"], row["seed"],
                                                    row["caption"])
                break
            except Exception as err:  # one identity's failure must not end the run ...
                if is_sticky_cuda_error(err):  # ... unless it broke this process's CUDA context
                    # Every later identity here would fail too: the actor ends (the Ray wrapper
                    # catches StickyCudaError), Ray starts a fresh one and retries the identity.
                    raise StickyCudaError(f"generation of identity {row['identity']}, phase {generator.phase}, "
                                          f"node {node_name()}: {err}") from err
                error = f"{type(err).__name__}: {err}"
                if isinstance(err, torch.cuda.OutOfMemoryError):
                    error = f"OutOfMemoryError: {err} (phase {generator.phase}; {memory_figures(generator.device)})"
            # Here, past the `except`, its traceback is gone and with it the failed attempt's frames
            # (activations, optimizer state): the retry starts from the memory of the first try.
            generator.release_training_state()
        out, ok = self.output, result is not None
        result = result or IdentityOutput([], [], [], [])  # a failed identity: nothing generated
        return {
            "model_loads": self.model_loads, "attempts": attempts, "generated_at": time.time(),
            "status": "ok" if ok else "failed", "error": "" if ok else error,
            "generated": [encode_image(i, out.image_size, out.image_format, out.jpeg_quality) for i in result.images],
            "sample_seeds": result.seeds, "sample_prompts": result.prompts,
            "reference_preview": [encode_image(i, out.image_size, "jpeg", 90) for i in result.reference_images],
            "timings": result.timings, "reference_reused": result.reference_reused,
        }
