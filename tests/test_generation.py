"""Diversity Injection on tiny real diffusers models: Eq. 1, weight restore, one load per actor."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from PIL import Image

from factory.schema import CAPTIONED_SCHEMA
from core.settings.stages import GenerationConfig, OutputConfig
from factory.stages.base_weights import module_fingerprint
from factory.stages.diversity_injection import DiversityInjectionGenerator
from factory.stages.fine_tune import PriorPreservationLoss
from factory.stages.generate import GenerationStage


def test_prior_preservation_loss_matches_eq1() -> None:
    torch.manual_seed(0)
    inst_pred, inst_target = torch.randn(2, 4, 8, 4), torch.randn(2, 4, 8, 4)
    prior_pred, prior_target = torch.randn(2, 4, 8, 4), torch.randn(2, 4, 8, 4)
    mse_inst = ((inst_pred - inst_target) ** 2).mean()
    mse_prior = ((prior_pred - prior_target) ** 2).mean()
    for lam in (0.0, 0.5, 1.0, 2.5):
        terms = PriorPreservationLoss(lam)(inst_pred, inst_target, prior_pred, prior_target)
        torch.testing.assert_close(terms.total, mse_inst + lam * mse_prior)
        torch.testing.assert_close(terms.instance, mse_inst)
        torch.testing.assert_close(terms.prior, mse_prior)
    # lambda = 0 is plain DreamBooth: only the instance term counts.
    plain = PriorPreservationLoss(0.0)(inst_pred, inst_target, prior_pred, prior_target)
    torch.testing.assert_close(plain.total, mse_inst)
    with pytest.raises(ValueError):
        PriorPreservationLoss(-1.0)


def _tiny_config(**overrides) -> GenerationConfig:
    values = dict(
        resolution=(32, 16), reference_images=2, train_steps=3, learning_rate=1e-3,
        samples_per_identity=3, num_inference_steps=2, guidance_scale=2.0, sample_batch_size=2,
    )
    values.update(overrides)
    return GenerationConfig(**values)


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from demo.tiny import tiny_stable_diffusion

    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_stable_diffusion(seed=0).save_pretrained(path)
    return path


def _person(colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (16, 32), (90, 90, 90))
    image.paste(colour, (4, 6, 12, 18))
    return image


def test_base_weights_bit_identical_after_identity(tiny_sd_dir: Path) -> None:
    from factory.models.loading import load_text_to_image

    generator = DiversityInjectionGenerator(load_text_to_image(str(tiny_sd_dir), "cpu", torch.float32), _tiny_config())
    before = module_fingerprint(generator.unet)
    images = [_person((200, 30, 30)), _person((190, 40, 40))]
    reference = generator.sample_latents(["a photo of a person"] * 2, [1, 2], steps=2)
    generator.fine_tune(images, "a photo of zwx person", reference, "a photo of a person", seed=1)
    assert module_fingerprint(generator.unet) != before, "fine-tuning must change the UNet"
    generator.restore_base_weights()
    assert module_fingerprint(generator.unet) == before
    output = generator.process_identity(images, "a photo of zwx person", "a photo of a person", identity_seed=7)
    assert module_fingerprint(generator.unet) == before
    assert len(output.images) == 3 and len(output.reference_images) == 2
    assert set(output.timings) == {"reference_set", "fine_tune", "sample"}
    assert output.images[0].size == (16, 32)


def test_lora_fine_tune_changes_the_output_and_leaves_the_base_bit_identical(tiny_sd_dir: Path) -> None:
    """`generation.finetune: lora`: a peft adapter trained per identity, dropped afterwards; no
    CPU copy of the base weights is kept, none is needed."""
    from factory.models.loading import load_text_to_image

    config = _tiny_config(finetune="lora", lora={"rank": 4, "alpha": 4, "learning_rate": 1e-2})
    generator = DiversityInjectionGenerator(load_text_to_image(str(tiny_sd_dir), "cpu", torch.float32), config)
    assert not hasattr(generator.finetune_method, "base_copy")
    before = module_fingerprint(generator.unet)
    base_images = generator.generate_images(["a photo of zwx person"], [5], steps=2)
    images = [_person((200, 30, 30)), _person((190, 40, 40))]
    reference = generator.sample_latents(["a photo of a person"] * 2, [1, 2], steps=2)
    losses = generator.fine_tune(images, "a photo of zwx person", reference, "a photo of a person", seed=1)
    assert len(losses) == config.train_steps
    assert "identity" in generator.unet.peft_config and any("lora" in n for n, _ in generator.unet.named_parameters())
    tuned = generator.generate_images(["a photo of zwx person"], [5], steps=2)
    assert tuned[0].tobytes() != base_images[0].tobytes(), "the adapter must change what is sampled"
    generator.restore_base_weights()
    assert not getattr(generator.unet, "peft_config", {}), "the adapter is dropped"
    assert module_fingerprint(generator.unet) == before
    assert generator.generate_images(["a photo of zwx person"], [5], steps=2)[0].tobytes() == base_images[0].tobytes()


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "dpmsolver++", "unipc", "euler_a"])
def test_scheduler_choice_samples_and_training_keeps_ddpm_noise(tiny_sd_dir: Path, scheduler: str) -> None:
    import diffusers

    from factory.models.loading import load_text_to_image
    from factory.stages.sample import SAMPLERS

    generator = DiversityInjectionGenerator(
        load_text_to_image(str(tiny_sd_dir), "cpu", torch.float32), _tiny_config(scheduler=scheduler)
    )
    train_scheduler = generator.dreambooth.train_scheduler
    assert type(generator.pipe.scheduler) is getattr(diffusers, SAMPLERS.get(scheduler).class_name)
    assert type(train_scheduler) is diffusers.DDPMScheduler
    assert generator.pipe.scheduler.config.beta_schedule == train_scheduler.config.beta_schedule
    latents = generator.sample_latents(["a photo of a person"] * 3, [1, 2, 3], steps=3)
    assert latents.shape[0] == 3 and torch.isfinite(latents).all()


def test_a_sampler_and_a_fine_tune_method_registered_here_are_used_by_name(tiny_sd_dir: Path) -> None:
    """A new sampler or fine-tune method is one registration (here from this test module alone):
    the config names it, the check phase accepts it and refuses a name nobody registered, and the
    generator samples and fine-tunes with it, then restores the base weights."""
    import diffusers

    from core.settings.run import load_run_config
    from factory.models.loading import load_text_to_image
    from factory.preflight import check_config
    from factory.stages.fine_tune_methods import FINETUNE_METHODS, FineTuneMethod
    from factory.stages.sample import SAMPLERS, DiffusersScheduler

    class InputConvOnly(FineTuneMethod):
        """Trains the UNet's first convolution alone; keeps a copy of it for the restore."""

        def __init__(self, model) -> None:
            super().__init__(model)
            self.base = {k: v.clone() for k, v in model.unet.conv_in.state_dict().items()}

        @staticmethod
        def learning_rate(config: GenerationConfig) -> float:
            return config.learning_rate

        def make_trainable(self) -> None:
            self.model.unet.requires_grad_(False)
            self.model.unet.conv_in.requires_grad_(True)

        def restore(self) -> None:
            self.model.unet.conv_in.load_state_dict(self.base)

    SAMPLERS.add("test_deis", DiffusersScheduler("DEISMultistepScheduler"))
    FINETUNE_METHODS.add("test_conv_in", InputConvOnly)
    try:
        names = ["generation.scheduler=test_deis", "generation.finetune=test_conv_in"]
        assert not [p for p in check_config(load_run_config(overrides=names)) if p.key.startswith("generation.")]
        unknown = check_config(load_run_config(overrides=["generation.scheduler=deis", "generation.finetune=dora"]))
        reasons = {p.key: p.reason for p in unknown}
        assert "unknown sampler 'deis'" in reasons["generation.scheduler"]
        assert "test_deis" in reasons["generation.scheduler"], "the registered names are listed"
        finetune = reasons["generation.finetune"]
        assert "unknown fine-tune method 'dora'" in finetune and "full, lora, test_conv_in" in finetune

        generator = DiversityInjectionGenerator(load_text_to_image(str(tiny_sd_dir), "cpu", torch.float32),
                                                _tiny_config(scheduler="test_deis", finetune="test_conv_in"))
        assert type(generator.pipe.scheduler) is diffusers.DEISMultistepScheduler
        unet = generator.unet
        parts = lambda: {name: module_fingerprint(child) for name, child in unet.named_children()}  # noqa: E731
        before = parts()
        output = generator.process_identity([_person((200, 30, 30))], "a photo of zwx person", "a photo of a person", 7)
        assert len(output.images) == 3 and len(output.losses) == 3
        assert parts() == before
        reference = generator.sample_latents(["a photo of a person"] * 2, [1, 2], steps=2)
        generator.fine_tune([_person((200, 30, 30))], "a photo of zwx person", reference, "a photo of a person", 1)
        assert {name for name, print_ in parts().items() if print_ != before[name]} == {"conv_in"}
    finally:
        SAMPLERS.remove("test_deis")
        FINETUNE_METHODS.remove("test_conv_in")


def test_vae_runs_in_chunks_of_vae_batch_size(tiny_sd_dir: Path) -> None:
    """The memory plan: no VAE call sees more than `vae_batch_size` images (the paper's 200
    reference images at 512x512 in one encoder call need ~25 GiB for the first conv alone)."""
    from factory.models.loading import load_text_to_image

    generator = DiversityInjectionGenerator(
        load_text_to_image(str(tiny_sd_dir), "cpu", torch.float32), _tiny_config(vae_batch_size=2, sample_batch_size=5)
    )
    batches: list[int] = []
    for module in (generator.vae.encoder, generator.vae.decoder):
        module.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    mean, std = generator.encode_images([_person((200, 30, 30))] * 5)
    assert mean.shape[0] == 5 and mean.dtype == torch.float32 and batches == [2, 2, 1]
    batches.clear()
    images = generator.generate_images(["a photo of a person"] * 5, list(range(5)), steps=2)
    assert len(images) == 5 and batches == [2, 2, 1]


def _captioned_rows(n: int) -> pa.Table:
    image = io.BytesIO()
    _person((30, 30, 200)).save(image, format="PNG")
    rows = {
        "identity": [f"demo/{i}" for i in range(n)], "source": ["demo"] * n, "source_pid": list(range(n)),
        "camid": [0] * n, "image_paths": [["x.png"]] * n, "image_bytes": [[image.getvalue()]] * n,
        "frames": [[0]] * n, "seed": [100 + i for i in range(n)], "captions": [["blue shirt"]] * n,
        "caption": ["blue shirt"] * n, "prompt": ["a photo of zwx person, blue shirt"] * n,
        "reference_prompt": ["a photo of a person, blue shirt"] * n, "caption_seconds": [0.0] * n,
    }
    return pa.table(rows, schema=CAPTIONED_SCHEMA)


def test_stage_loads_model_once_and_is_reproducible(tiny_sd_dir: Path) -> None:
    output = OutputConfig(image_size=(32, 16), image_format="png")
    stage = GenerationStage(_tiny_config(base_model=str(tiny_sd_dir)), output, num_threads=1)
    stage.setup()
    first = stage.process_batch(_captioned_rows(2))
    second = stage.process_batch(_captioned_rows(2))
    assert first.column("model_loads").to_pylist() == [1, 1]
    assert second.column("model_loads").to_pylist() == [1, 1]
    assert first.column("status").to_pylist() == ["ok", "ok"]
    # Same identity, same seeds -> the same bytes, however often it is processed.
    assert first.column("generated").to_pylist() == second.column("generated").to_pylist()
    seeds = first.column("sample_seeds").to_pylist()
    assert seeds[0] != seeds[1], "identities get different seeds"


def test_failing_identity_is_retried_then_recorded(tiny_sd_dir: Path) -> None:
    output = OutputConfig(image_size=(32, 16))
    config = _tiny_config(base_model=str(tiny_sd_dir), max_retries=2)
    stage = GenerationStage(config, output, num_threads=1, fail_identities=["demo/0"])
    stage.setup()
    before = module_fingerprint(stage.generator.unet)
    result = stage.process_batch(_captioned_rows(2)).to_pylist()
    assert result[0]["status"] == "failed" and result[0]["attempts"] == 3 and "injected" in result[0]["error"]
    assert result[1]["status"] == "ok" and len(result[1]["generated"]) == 3
    assert module_fingerprint(stage.generator.unet) == before


def test_vocabulary_word_as_iir_is_refused(tiny_sd_dir: Path) -> None:
    """Refused by the check phase from the model's tokenizer files, before any model loads."""
    from factory.preflight import check_models
    from core.settings.run import load_run_config

    config = load_run_config(overrides=[f"generation.base_model={tiny_sd_dir}", "caption.iir_token=person"])
    problems = [p for p in check_models(config) if p.key == "caption.iir_token"]
    assert problems and "text encoder's tokenizer already knows it" in problems[0].reason
    assert problems[0].file is not None and "/tokenizer/" in problems[0].file  # vocab.json or tokenizer.json


def test_out_of_memory_names_phase_and_memory_and_trips_the_breaker(tiny_sd_dir: Path) -> None:
    """An identity out of memory on every attempt reports the phase and the memory figures; the
    build's circuit breaker stops on the second OOM instead of failing every identity."""
    from factory.build import CircuitBreaker

    config = _tiny_config(base_model=str(tiny_sd_dir), max_retries=1)
    stage = GenerationStage(config, OutputConfig(image_size=(32, 16)), num_threads=1, fail_identities=["demo/0:oom"])
    stage.setup()
    failed, ok = stage.process_batch(_captioned_rows(2)).to_pylist()
    assert failed["status"] == "failed" and failed["attempts"] == 2 and ok["status"] == "ok"
    assert failed["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert "phase reference_set" in failed["error"] and "peak RSS" in failed["error"]
    breaker = CircuitBreaker(limit=3)
    assert breaker.record(True) is None  # a success disarms the K-alike rule, never the OOM rule
    reason = breaker.record(False, failed["error"], failed["attempts"])
    assert reason is not None and "out of GPU memory 2 times" in reason and "gradient_checkpointing" in reason


def test_circuit_breaker_needs_k_alike_failures_first() -> None:
    from factory.build import CircuitBreaker

    breaker = CircuitBreaker(limit=3)
    assert breaker.record(False, "ValueError: a") is None and breaker.record(False, "ValueError: b") is None
    assert "the first 3 identities all failed with ValueError" in breaker.record(False, "ValueError: c")
    mixed = CircuitBreaker(limit=2)
    assert mixed.record(False, "ValueError: a") is None and mixed.record(False, "KeyError: b") is None
    assert CircuitBreaker(limit=0).record(False, "ValueError: a") is None


def test_failed_identities_within_the_tolerance_count_as_done(tmp_path: Path) -> None:
    """`generation.max_failed_identities`: up to N failed identities exit 0 (the build's CLI
    maps `BuildFailed` to 1, as tests/test_build_resume.py shows end to end)."""
    from core.storage import resolve
    from factory.build import BuildFailed, raise_if_too_many_failed
    from factory.output.report import BuildSummary

    summary = BuildSummary(out_dir=str(tmp_path))
    summary.identities_processed = 3
    summary.record_failure("synthetic/2", "RuntimeError: injected")
    raise_if_too_many_failed(summary, 1, resolve(tmp_path))
    with pytest.raises(BuildFailed, match=r"1 identities failed \(tolerated: generation.max_failed_identities=0\): "
                                          r"1 x RuntimeError \(synthetic/2\)"):
        raise_if_too_many_failed(summary, 0, resolve(tmp_path))


def test_identities_with_one_reference_prompt_share_one_reference_set(tiny_sd_dir: Path, tmp_path: Path) -> None:
    """Reuse is exact: a shared set is the one that would have been sampled (its seeds come from
    the prompt, not the identity), so outputs equal a run without reuse; another actor (or a
    rerun) finds the set under the output location."""
    output = OutputConfig(image_size=(32, 16), image_format="png")
    config = _tiny_config(base_model=str(tiny_sd_dir))
    rows = _captioned_rows(2)  # two identities, one reference prompt
    shared = GenerationStage(config, output, num_threads=1, reference_dir=str(tmp_path / "refs"))
    shared.setup()
    first = shared.process_batch(rows).to_pylist()
    assert [r["reference_reused"] for r in first] == [False, True]
    assert len(list((tmp_path / "refs").glob("*.safetensors"))) == 1
    other_actor = GenerationStage(config, output, num_threads=1, reference_dir=str(tmp_path / "refs"))
    other_actor.setup()
    again = other_actor.process_batch(rows).to_pylist()
    assert [r["reference_reused"] for r in again] == [True, True]
    alone = GenerationStage(config.model_copy(update={"reuse_reference_sets": False}), output, num_threads=1,
                            reference_dir=str(tmp_path / "unused"))
    alone.setup()
    plain = alone.process_batch(rows).to_pylist()
    assert not (tmp_path / "unused").exists() and [r["reference_reused"] for r in plain] == [False, False]
    for a, b, c in zip(first, again, plain):
        assert a["generated"] == b["generated"] == c["generated"]
        assert a["reference_preview"] == b["reference_preview"] == c["reference_preview"]


@pytest.mark.parametrize("mode", ["reencoded", "sampled"])
def test_prior_term_trains_on_reencoded_or_sampled_reference_latents(tiny_sd_dir: Path, mode: str) -> None:
    """`reencoded` (the default, DreamBooth's class images): the reference set goes through the VAE
    once per identity, decoded and encoded in chunks; `sampled`: the VAE never sees it."""
    from factory.models.loading import load_text_to_image

    config = _tiny_config(reference_latents=mode, reference_images=3, vae_batch_size=2)
    generator = DiversityInjectionGenerator(load_text_to_image(str(tiny_sd_dir), "cpu", torch.float32), config)
    reference = generator.sample_latents(["a photo of a person"] * 3, [1, 2, 3], steps=2)
    calls: dict[str, list[int]] = {"encoder": [], "decoder": []}
    generator.vae.encoder.register_forward_pre_hook(lambda _m, args: calls["encoder"].append(args[0].shape[0]))
    generator.vae.decoder.register_forward_pre_hook(lambda _m, args: calls["decoder"].append(args[0].shape[0]))
    images = [_person((200, 30, 30))]
    losses = generator.fine_tune(images, "a photo of zwx person", reference, "a photo of a person", seed=1)
    assert len(losses) == config.train_steps and all(torch.isfinite(torch.tensor(losses)))
    if mode == "reencoded":
        assert calls == {"encoder": [1, 2, 1], "decoder": [2, 1]}  # instance image, then the 3 references
    else:
        assert calls == {"encoder": [1], "decoder": []}


def test_base_weight_copy_on_a_cpu_is_a_file_read_back_bit_exactly_in_groups() -> None:
    """On a CPU the base copy is not a second set of tensors in memory: it is a local file,
    read back a bounded group of tensors per opening, into the live weights."""
    from factory.stages.base_weights import BaseWeightCopy

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
    before = module_fingerprint(module)
    copy = BaseWeightCopy(module, "cpu", mapped_bytes_per_open=2_000)  # the first weight alone is 16 KiB
    assert "local file" in copy.where and len(copy._groups) > 2
    with torch.no_grad():
        for tensor in module.state_dict().values():
            tensor.add_(1)
    assert module_fingerprint(module) != before
    live = [p.data_ptr() for p in module.parameters()]
    copy.restore(module)
    assert module_fingerprint(module) == before
    assert [p.data_ptr() for p in module.parameters()] == live, "restored in place, into the live tensors"
    with pytest.raises(RuntimeError, match="parameters changed"):
        copy.restore(torch.nn.Linear(64, 64))


_HOLD_A_COPY = """
import sys, time, torch
from factory.stages.base_weights import BaseWeightCopy
copy = BaseWeightCopy(torch.nn.Linear(8, 8), "cpu")
print(copy._folder.name, flush=True)
time.sleep(600)
"""


def test_a_killed_actors_base_copy_is_removed_by_the_next_one_and_a_live_ones_kept(tmp_path: Path) -> None:
    """A generation actor killed by a signal cannot clean up its base-weight file (3.4 GB at SD
    v1.4 size); the next copy made on that machine removes it, and leaves a live actor's alone."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    from core.settings.run import REPO_ROOT
    from factory.stages.base_weights import BaseWeightCopy

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    owners = [subprocess.Popen([sys.executable, "-c", _HOLD_A_COPY], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        killed, alive = (Path(owner.stdout.readline().strip()) for owner in owners)
        assert killed.parent == alive.parent == tmp_path and (killed / "unet.safetensors").is_file()
        owners[0].send_signal(signal.SIGKILL)
        owners[0].wait()
        assert killed.is_dir(), "a SIGKILLed process runs no cleanup"
        saved, tempfile.tempdir = tempfile.tempdir, str(tmp_path)
        try:
            copy = BaseWeightCopy(torch.nn.Linear(8, 8), "cpu")
        finally:
            tempfile.tempdir = saved
        assert not killed.exists()
        assert (alive / "unet.safetensors").is_file(), "a live actor's copy is kept"
        assert Path(copy._folder.name).parent == tmp_path
    finally:
        for owner in owners:
            owner.kill()
            owner.wait()


def _row(**changes) -> dict:
    """Identity demo/0's captioned row, with `changes`."""
    return {**_captioned_rows(1).to_pylist()[0], **changes}


def test_stage_device_is_the_assigned_one_unless_given(tiny_sd_dir: Path) -> None:
    """Outside Ray a stage asking for a GPU that torch cannot use stops (core.device's policy);
    a caller driving the stage directly (a benchmark) names its device instead."""
    from core.device import DeviceUnusable

    config = _tiny_config(base_model=str(tiny_sd_dir))
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnusable):
            GenerationStage(config, OutputConfig(), num_gpus=1, num_threads=1).setup()
    stage = GenerationStage(config, OutputConfig(), num_gpus=1, num_threads=1, device="cpu")
    stage.setup()
    assert stage.generator.device == "cpu"


def test_sticky_cuda_error_ends_the_actor_once_per_build_and_ordinary_errors_stay_per_identity(
        tiny_sd_dir: Path, tmp_path: Path) -> None:
    """`SOURCE/PID:cuda` raises a sticky CUDA error: not a failed row but `StickyCudaError`, which
    ends the actor; it fires once per build output, so the fresh actor Ray starts succeeds."""
    from core.device import StickyCudaError, is_sticky_cuda_error

    output, reference_dir = OutputConfig(image_size=(32, 16)), str(tmp_path / "out" / "reference_sets")
    config = _tiny_config(base_model=str(tiny_sd_dir), max_retries=1, samples_per_identity=1)
    ordinary = GenerationStage(config.model_copy(update={"max_retries": 0}), output, num_threads=1,
                               fail_identities=["demo/0"], reference_dir=reference_dir)
    ordinary.setup()
    failed = ordinary.process_row(_row())
    assert failed["status"] == "failed" and failed["error"].startswith("RuntimeError: injected failure for demo/0")

    broken = GenerationStage(config, output, num_threads=1, fail_identities=["demo/0:cuda"],
                             reference_dir=reference_dir)
    broken.setup()
    before = module_fingerprint(broken.generator.unet)
    sticky = r"identity demo/0, phase reference_set, node .*illegal memory access"
    with pytest.raises(StickyCudaError, match=sticky) as info:
        broken.process_row(_row())
    assert is_sticky_cuda_error(info.value.__cause__), "raised from the CUDA error itself"
    assert (tmp_path / "out" / "debug" / "injected_cuda_faults" / "demo" / "0").is_file()
    assert module_fingerprint(broken.generator.unet) == before

    restarted = GenerationStage(config, output, num_threads=1, fail_identities=["demo/0:cuda"],
                                reference_dir=reference_dir)
    restarted.setup()
    retried = restarted.process_row(_row())
    assert retried["status"] == "ok" and retried["attempts"] == 1 and len(retried["generated"]) == 1


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_retry_after_oom_mid_fine_tune_starts_without_the_failed_tries_gradients(
        tiny_sd_dir: Path, finetune: str) -> None:
    """An out-of-memory error after the first fine-tune steps: the retry starts with no
    gradient, no `requires_grad` and no LoRA adapter left from the failed try."""
    config = _tiny_config(base_model=str(tiny_sd_dir), max_retries=1, samples_per_identity=1, finetune=finetune,
                          lora={"rank": 4, "alpha": 4, "learning_rate": 1e-2})
    stage = GenerationStage(config, OutputConfig(image_size=(32, 16)), num_threads=1)
    stage.setup()
    generator = stage.generator
    before = module_fingerprint(generator.unet)
    loss_fn, calls = generator.dreambooth.loss_fn, []

    def out_of_memory_at_the_second_step(*args):
        calls.append(1)
        if len(calls) == 2:  # the first step's backward and optimizer step have run
            assert any(p.grad is not None for p in generator.unet.parameters())
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return loss_fn(*args)

    generator.dreambooth.loss_fn = out_of_memory_at_the_second_step
    seen: list[tuple[int, int, bool]] = []

    def at_phase_start(phase: str) -> None:
        if phase == "reference_set":
            params = list(generator.unet.parameters())
            seen.append((sum(p.grad is not None for p in params), sum(p.requires_grad for p in params),
                         bool(getattr(generator.unet, "peft_config", None))))

    generator.phase_listeners.append(at_phase_start)
    result = stage.process_row(_row())
    assert result["status"] == "ok" and result["attempts"] == 2
    assert seen == [(0, 0, False), (0, 0, False)]
    assert module_fingerprint(generator.unet) == before


def test_base_weight_packing_is_one_aligned_buffer_restored_bit_exactly() -> None:
    """The pinned copy beside a GPU is one flat buffer (no per-tensor rounding of the pinned
    allocator); packed here into an unpinned buffer, as CPUs cannot pin."""
    from factory.stages.base_weights import _ALIGNMENT, pack_tensors

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    module[2].to(torch.bfloat16)
    module.register_buffer("fp16", torch.randn(3, 1, dtype=torch.float16))
    module.register_buffer("flag", torch.tensor([True, False, True]))
    module.register_buffer("scalar", torch.tensor(2.5, dtype=torch.float64))
    module.register_buffer("empty", torch.empty(0, 4))
    state = module.state_dict()
    bits = lambda: {k: t.reshape(-1).view(torch.uint8).clone() for k, t in module.state_dict().items()}  # noqa: E731
    before = bits()
    sizes: list[int] = []
    buffer, views = pack_tensors(state, lambda n: sizes.append(n) or torch.empty(n, dtype=torch.uint8))
    assert sizes == [buffer.numel()] and buffer.dtype == torch.uint8
    payload = sum(t.numel() * t.element_size() for t in state.values())
    assert payload <= buffer.numel() < payload + _ALIGNMENT * len(state)
    base = buffer.data_ptr()
    for name, view in views.items():
        assert view.dtype == state[name].dtype and view.shape == state[name].shape
        assert base <= view.data_ptr() < base + max(buffer.numel(), 1) or view.numel() == 0
        assert (view.data_ptr() - base) % _ALIGNMENT == 0 or view.numel() == 0
    with torch.no_grad():
        for tensor in module.state_dict().values():
            tensor.fill_(1)
    assert bits().keys() == before.keys() and any(not torch.equal(a, before[k]) for k, a in bits().items())
    module.load_state_dict(views)
    assert all(torch.equal(a, before[k]) for k, a in bits().items())


def test_mixed_precision_samples_with_fp32_latents_and_scheduler(tiny_sd_dir: Path) -> None:
    """`mixed_precision: bf16`: the UNet runs under autocast, but the latents, the guidance sum
    and the scheduler's arithmetic stay fp32 (a bf16 text encoder made the pipeline integrate in
    bf16); the fine-tune keeps fp32 master weights."""
    from factory.models.loading import load_text_to_image

    generator = DiversityInjectionGenerator(load_text_to_image(str(tiny_sd_dir), "cpu", torch.float32),
                                            _tiny_config(mixed_precision="bf16"))
    assert generator.vae.dtype == torch.bfloat16
    assert generator.text_encoder.dtype == torch.float32 and generator.unet.dtype == torch.float32
    scheduler, steps, autocast = generator.pipe.scheduler, [], []
    step = scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        steps.append((model_output.dtype, sample.dtype))
        return step(model_output, timestep, sample, *args, **kwargs)

    scheduler.step = recording_step
    generator.unet.register_forward_pre_hook(lambda *_: autocast.append(torch.is_autocast_enabled("cpu")))
    latents = generator.sample_latents(["a photo of a person"], [3], steps=2)
    assert len(steps) >= 2 and set(steps) == {(torch.float32, torch.float32)} and set(autocast) == {True}
    assert torch.isfinite(latents).all()
    assert generator.encode_prompt("a photo of zwx person").dtype == torch.float32
    losses = generator.fine_tune([_person((200, 30, 30))], "a photo of zwx person", latents, "a photo of a person", 1)
    assert len(losses) == 3 and all(isinstance(x, float) for x in losses)
    assert all(p.dtype == torch.float32 for p in generator.unet.parameters())


def test_lora_with_mixed_precision_keeps_the_base_in_bf16_and_the_adapter_fp32(tiny_sd_dir: Path) -> None:
    from factory.models.loading import load_text_to_image

    config = _tiny_config(finetune="lora", mixed_precision="bf16", lora={"rank": 4, "alpha": 4, "learning_rate": 1e-2})
    generator = DiversityInjectionGenerator(load_text_to_image(str(tiny_sd_dir), "cpu", torch.float32), config)
    assert all(p.dtype == torch.bfloat16 for p in generator.unet.parameters())
    before = module_fingerprint(generator.unet)
    reference = generator.sample_latents(["a photo of a person"] * 2, [1, 2], steps=2)
    losses = generator.fine_tune([_person((200, 30, 30))], "a photo of zwx person", reference, "a photo of a person", 1)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    dtypes = {("lora" in name, p.dtype) for name, p in generator.unet.named_parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    assert len(generator.generate_images(["a photo of zwx person"], [5], steps=2)) == 1
    generator.restore_base_weights()
    assert module_fingerprint(generator.unet) == before


def test_a_long_caption_is_shortened_so_the_variations_fit_and_the_used_prompt_is_recorded(tiny_sd_dir: Path) -> None:
    """CLIP sees 77 tokens: words go from the end of the caption, never from the template's
    head or the variation phrases, and `sample_prompts` records the prompt actually used."""
    from transformers import CLIPTokenizer

    from factory.stages.sample import fit_prompt

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_dir / "tokenizer")
    count = lambda text: len(tokenizer(text, truncation=False, verbose=False).input_ids)  # noqa: E731
    caption = ", ".join(["short grey hair wearing a red striped shirt", "blue jeans", "white shoes",
                         "carrying a black backpack", "holding a phone"] * 3)
    prompt = f"a photo of zwx person, {caption}"
    phrases = ["wearing a coat", "carrying a handbag", "walking", "seen from behind", "in a park"]
    assert count(", ".join([prompt, *phrases])) >= 100
    fitted = fit_prompt(prompt, caption, phrases, count, 77)
    assert count(fitted) <= 77 and fitted.endswith(", ".join(phrases))
    kept = fitted[len("a photo of zwx person, "):-len(", ".join(phrases)) - 2]
    assert fitted.startswith("a photo of zwx person, ") and caption.startswith(kept) and kept
    one_more = " ".join(caption.split()[: len(kept.split()) + 1]).rstrip(" ,")
    assert count(", ".join([f"a photo of zwx person, {one_more}", *phrases])) > 77, "as many words as fit"
    short = "a photo of zwx person, blue shirt"
    assert fit_prompt(short, "blue shirt", phrases, count, 77) == ", ".join([short, *phrases])  # fits: as it was
    assert fit_prompt(short, "blue shirt", [], count, 77) == short

    config = _tiny_config(base_model=str(tiny_sd_dir), samples_per_identity=2, variations={"probability": 1.0})
    stage = GenerationStage(config, OutputConfig(image_size=(32, 16)), num_threads=1)
    stage.setup()
    used: list[str] = []
    generate_images = stage.generator.generate_images
    stage.generator.generate_images = lambda prompts, *args: used.extend(prompts) or generate_images(prompts, *args)
    result = stage.process_row(_row(caption=caption, prompt=prompt))
    assert result["status"] == "ok"
    for sampled in result["sample_prompts"]:
        assert count(sampled) <= 77 and sampled.startswith("a photo of zwx person, short grey hair")
        assert not sampled.startswith(prompt), "the caption was shortened"
        assert sampled.count(",") >= 5 and any(sampled.endswith(p) for p in config.variations.scene)
    assert used == result["sample_prompts"]
