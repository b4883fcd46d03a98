"""Tiny real models: built from configs, saved with save_pretrained, loaded back through the same
loaders as hub ids; offline failures name the model; the demo models are trained and useful."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from factory.models.loading import (
    ModelNotAvailableError,
    check_model_available,
    downloads_allowed,
    load_captioner,
    load_clip,
    load_text_to_image,
)
from demo.tiny import tiny_blip2, tiny_clip, tiny_stable_diffusion
from demo.tokenizers import train_clip_tokenizer, train_opt_tokenizer, write_vocab_files


DESCRIPTION = (
    "a person with short black hair wearing a red shirt, blue trousers and white shoes, carrying a green backpack"
)


def _person(upper: tuple[int, int, int], lower: tuple[int, int, int] = (40, 40, 160)) -> Image.Image:
    image = Image.new("RGB", (64, 128), (120, 120, 110))
    image.paste(upper, (20, 20, 44, 64))
    image.paste(lower, (22, 64, 42, 120))
    return image


@pytest.fixture(scope="module")
def clip_tokenizer():
    return train_clip_tokenizer()


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory, clip_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_stable_diffusion(seed=0, tokenizer=clip_tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-blip2")
    model, processor = tiny_blip2(seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory, clip_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-clip")
    model, processor = tiny_clip(seed=0, tokenizer=clip_tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture
def offline_empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf-home" / "hub"


# --- tokenizers --------------------------------------------------------------------------------


def test_clip_tokenizer_has_clip_layout_and_round_trips(clip_tokenizer, tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    vocab = clip_tokenizer.get_vocab()
    assert "red</w>" in vocab and "shirt</w>" in vocab
    assert clip_tokenizer.bos_token == "<|startoftext|>" and clip_tokenizer.eos_token == "<|endoftext|>"
    assert (clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id) == (len(vocab) - 2, len(vocab) - 1)
    assert clip_tokenizer.model_max_length == 77
    clip_tokenizer.save_pretrained(tmp_path)
    write_vocab_files(clip_tokenizer, tmp_path)
    assert {"vocab.json", "merges.txt"} <= {p.name for p in tmp_path.iterdir()}
    assert "</w>" in (tmp_path / "merges.txt").read_text()
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a photo of zwx person, " + DESCRIPTION
    ids = loaded(text).input_ids
    assert ids == clip_tokenizer(text).input_ids
    assert ids[0] == loaded.bos_token_id and ids[-1] == loaded.eos_token_id
    # the IIR token is rare: split into pieces, never unknown; colour words are single tokens
    assert loaded.tokenize("zwx") == ["z", "w", "x</w>"]
    assert loaded.tokenize("red blue") == ["red</w>", "blue</w>"]
    assert loaded.decode(ids, skip_special_tokens=True).replace(" ,", ",") == text


def test_opt_tokenizer_is_opt_style(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = train_opt_tokenizer()
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    tokenizer.save_pretrained(tmp_path)
    write_vocab_files(tokenizer, tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    batch = loaded(["a red shirt", DESCRIPTION], padding=True).input_ids
    assert batch[1][0] == loaded.bos_token_id == 2  # OPT prepends </s>
    assert batch[0][0] == loaded.pad_token_id == 1  # left padding for batched generation
    assert loaded.decode(batch[1], skip_special_tokens=True) == DESCRIPTION


# --- round trips through the loaders -------------------------------------------------------------


def test_text_to_image_round_trip_is_seeded(sd_dir: Path) -> None:
    pipeline = load_text_to_image(str(sd_dir), "cpu", torch.float32)
    assert pipeline.safety_checker is None
    assert pipeline.vae_scale_factor == 4

    def sample(seed: int, **kwargs) -> np.ndarray:
        generator = torch.Generator().manual_seed(seed)
        result = pipeline(DESCRIPTION, num_inference_steps=2, generator=generator, output_type="np", **kwargs)
        return result.images

    first = sample(3, height=64, width=32)
    assert first.shape == (1, 64, 32, 3)
    np.testing.assert_array_equal(first, sample(3, height=64, width=32))
    assert not np.array_equal(first, sample(4, height=64, width=32))
    assert sample(3).shape == (1, 64, 32, 3)  # the default size is the 2:1 person crop
    assert sample(3, height=32, width=16, guidance_scale=1.0).shape == (1, 32, 16, 3)


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "ddpm"])
def test_schedulers_by_name(scheduler: str) -> None:
    pipeline = tiny_stable_diffusion(scheduler=scheduler)
    assert type(pipeline.scheduler).__name__.lower().startswith(scheduler)
    assert pipeline.scheduler.config.beta_schedule == "scaled_linear"


def test_captioner_round_trip_generates_text(blip2_dir: Path) -> None:
    from core.settings.stages import CaptionConfig

    model, processor = load_captioner(str(blip2_dir), "cpu", torch.float32)
    assert processor.num_query_tokens == model.config.num_query_tokens
    images = [_person((200, 30, 30)), _person((30, 30, 200))]
    inputs = processor(images=images, text=[CaptionConfig().prompt] * 2, return_tensors="pt", padding=True)
    assert (inputs.input_ids == model.config.image_token_index).sum(dim=1).tolist() == [8, 8]
    output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert output.shape[0] == 2 and output.shape[1] <= inputs.input_ids.shape[1] + 6
    texts = processor.batch_decode(output, skip_special_tokens=True)
    assert all(isinstance(t, str) and t.startswith("Question:") for t in texts)
    unprompted = model.generate(**processor(images=images, return_tensors="pt"), max_new_tokens=4)
    assert len(processor.batch_decode(unprompted, skip_special_tokens=True)) == 2


def test_clip_round_trip_returns_logits(clip_dir: Path) -> None:
    model, processor = load_clip(str(clip_dir), "cpu", "float32")
    texts = ["a photo of a person", "a photo of an empty street", "a blurry photo of nothing"]
    inputs = processor(text=texts, images=[_person((200, 30, 30))] * 2, return_tensors="pt", padding=True)
    assert inputs.pixel_values.shape == (2, 3, 32, 32)
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.logits_per_image.shape == (2, 3)
    assert outputs.logits_per_text.shape == (3, 2)


def test_clip_filter_scores_generated_images_as_probabilities(clip_dir: Path) -> None:
    """The CLIP filter as a build runs it (it was broken by transformers 5, where
    get_text_features returns an output object, and no test loaded it)."""
    import io

    from core.settings.stages import FilterConfig
    from factory.filters.clip import ClipFilter

    config = FilterConfig(kind="clip", clip_model=str(clip_dir), threshold=0.5)
    clip = ClipFilter(config, {})
    clip.setup("cpu")
    images = []
    for colour in ((200, 30, 30), (30, 30, 200)):
        buffer = io.BytesIO()
        _person(colour).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    scores = clip.score({"generated": images})
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    assert clip.score({"generated": []}) == []


def test_the_filter_stage_keeps_each_rejections_reason_in_the_staged_rows(clip_dir: Path) -> None:
    import io

    import pyarrow as pa

    from factory.schema import GENERATED_SCHEMA
    from core.settings.stages import FilterConfig
    from factory.filters import FilterStage
    from factory.output.write import staged_rows

    images = []
    for colour in ((200, 30, 30), (30, 30, 200)):
        buffer = io.BytesIO()
        _person(colour).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    probe = FilterStage(FilterConfig(kind="clip", clip_model=str(clip_dir)), {})
    probe.setup()
    low, high = sorted(probe.filter.score({"generated": images}))
    threshold = (low + high) / 2  # one image each side
    row = {field.name: None for field in GENERATED_SCHEMA} | {
        "identity": "synthetic/1", "source": "synthetic", "source_pid": 1, "status": "ok", "generated": images,
        "sample_prompts": ["p", "p"], "sample_seeds": [1, 2]}
    stage = FilterStage(FilterConfig(kind="clip", clip_model=str(clip_dir), threshold=threshold), {})
    stage.setup()
    filtered = stage.process_batch(pa.Table.from_pylist([row], schema=GENERATED_SCHEMA)).to_pylist()[0]
    assert sorted(filtered["kept"]) == [False, True]
    staged = staged_rows(filtered).to_pylist()
    assert [r["reason"] for r in staged if r["kept"]] == [""]
    assert [r["reason"] for r in staged if not r["kept"]] == [f"score {low:.3f} < threshold {threshold}"]


def test_builders_are_seeded() -> None:
    first, _ = tiny_clip(seed=5)
    second, _ = tiny_clip(seed=5)
    third, _ = tiny_clip(seed=6)
    a, b, c = (m.visual_projection.weight for m in (first, second, third))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- offline behaviour ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loader", "model_id", "key"),
    [
        (load_text_to_image, "CompVis/stable-diffusion-v1-4", "generation.base_model"),
        (load_captioner, "Salesforce/blip2-opt-2.7b", "caption.model"),
        (load_clip, "openai/clip-vit-base-patch32", "filter.clip_model"),
    ],
)
def test_missing_hub_model_raises_named_error(offline_empty_hub: Path, loader, model_id: str, key: str) -> None:
    with pytest.raises(ModelNotAvailableError) as info:
        loader(model_id, "cpu", torch.float32)
    message = str(info.value)
    assert model_id in message
    assert f"--set {key}=" in message and "download" in message
    assert isinstance(info.value, RuntimeError)


def test_missing_local_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailableError, match="no directory"):
        check_model_available(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailableError, match="config.json"):
        check_model_available(str(tmp_path / "empty"))
    with pytest.raises(ModelNotAvailableError, match="valid hub id"):
        check_model_available("not a valid id!")


def test_check_reads_no_weights(tmp_path: Path, offline_empty_hub: Path) -> None:
    # A local folder: the check passes on config.json alone, although the weights are garbage.
    local = tmp_path / "model"
    local.mkdir()
    (local / "config.json").write_text("{}")
    (local / "model.safetensors").write_bytes(b"not a safetensors file")
    check_model_available(str(local))
    # A hub cache entry with only the index: a snapshot is enough for the check.
    repo = offline_empty_hub / "models--org--tiny-model"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    check_model_available("org/tiny-model")
    with pytest.raises(ModelNotAvailableError, match="org/other"):
        check_model_available("org/other")


@pytest.mark.parametrize(("value", "allowed"), [(None, False), ("1", False), ("0", True), ("false", True)])
def test_downloads_only_when_explicitly_allowed(monkeypatch: pytest.MonkeyPatch, value, allowed: bool) -> None:
    if value is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert downloads_allowed() is allowed


# --- demo models ---------------------------------------------------------------------------------


def test_recipe_scales_steps_not_clock() -> None:
    from demo.models import DemoRecipe

    short, long = DemoRecipe().scaled(2), DemoRecipe().scaled(4)
    assert short == DemoRecipe().scaled(2)
    assert abs(long.text_to_image_steps - 2 * short.text_to_image_steps) <= 1
    assert long.seed == short.seed == 1000
    assert abs(DemoRecipe().scaled(3).estimated_minutes - 3) < 0.1


def test_a_build_without_the_current_stamp_is_incomplete(tmp_path: Path) -> None:
    from demo.models import COMPONENTS, DEMO_MODELS_VERSION, VERSION_FILE, is_complete

    for component in COMPONENTS:
        (tmp_path / component).mkdir()
        (tmp_path / component / "config.json").write_text("{}")
    assert not is_complete(tmp_path)
    (tmp_path / VERSION_FILE).write_text("demo-models-0\n")
    assert not is_complete(tmp_path)
    (tmp_path / VERSION_FILE).write_text(DEMO_MODELS_VERSION + "\n")
    assert is_complete(tmp_path)


def test_build_demo_models_end_to_end_with_a_few_steps(tmp_path: Path) -> None:
    """The training path with 2 steps per phase on 4 identities: mechanics, not quality."""
    from demo.models import DemoRecipe, build_demo_models, is_complete

    recipe = DemoRecipe(
        ids=4, cameras=2, images_per_camera=1, clip_steps=2, autoencoder_steps=2, text_to_image_steps=2,
        captioner_steps=2, batch_size=4,
    )
    logs: list[str] = []
    paths = build_demo_models(tmp_path / "cache", tmp_path / "pedestrians", recipe, log=logs.append)
    assert is_complete(tmp_path / "cache")
    assert any("[text-to-image] step 2/2" in line for line in logs)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".build-")]
    assert (paths.text_to_image / "tokenizer" / "vocab.json").is_file()
    assert (paths.captioner / "merges.txt").is_file()
    pipeline = load_text_to_image(str(paths.text_to_image), "cpu", torch.float32)
    assert pipeline.vae.config.scaling_factor != 0.18215  # calibrated on the latents
    image = pipeline("a person wearing a red shirt", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 32, 3)
    load_captioner(str(paths.captioner), "cpu", torch.float32)
    load_clip(str(paths.clip), "cpu", torch.float32)


def _training_pedestrians(root: Path, ids: int = 12):
    """The first `ids` training identities of the demo models' campus training set (seed 1000): an
    identity's attributes and images depend on (seed, pid) only, not on how many are generated."""
    from core.datasets.config import SyntheticSpec
    from core.datasets.synthetic import generate_synthetic_dataset
    from demo.models import DemoRecipe
    from demo.training import PedestrianCorpus

    spec = DemoRecipe().synthetic_specs["campus"].model_copy(update={"ids": ids})
    corpus = PedestrianCorpus.from_market_folder(generate_synthetic_dataset(root, SyntheticSpec(**spec.model_dump())))
    keep = [i for i, a in enumerate(corpus.attributes) if a["split"] == "train"]
    return [corpus.images[i] for i in keep], [corpus.attributes[i] for i in keep]


def _check_demo_quality(paths, tmp_path: Path) -> None:
    from tests.demo_quality import caption_accuracy, colour_response

    pipeline = load_text_to_image(str(paths.text_to_image), "cpu", torch.float32)
    # chromaticity, not raw channels: without scene words the samples span four domains' light (a dim
    # station, a sunny street), which moves every channel; what a colour word must move is their balance
    means = colour_response(pipeline, ("red", "blue"), samples=8)
    red, blue = (means[c] / means[c].sum() for c in ("red", "blue"))
    assert red[0] > blue[0] + 0.05, f"'red shirt' is not redder than 'blue shirt': {red} vs {blue}"
    assert blue[2] > red[2] + 0.05, f"'blue shirt' is not bluer than 'red shirt': {blue} vs {red}"

    # the wider world: a scene's words bring its conditions in, as Diversity Injection asks
    from eval.experiment.diversity import fit_condition_probe
    from tests.demo_quality import scene_response

    probe = fit_condition_probe(seed=0, images_per_domain=150, heldout_per_domain=25)
    shares = scene_response(pipeline, probe, samples=8)
    assert sum(shares.values()) / len(shares) >= 0.5, f"scene words followed in too few samples (chance 25 %): {shares}"

    images, attributes = _training_pedestrians(tmp_path / "pedestrians-check")
    step = max(1, len(images) // 24)
    model, processor = load_captioner(str(paths.captioner), "cpu", torch.float32)
    accuracy, captions = caption_accuracy(
        model, processor, images[::step], [a["upper_color"] for a in attributes[::step]]
    )
    assert accuracy >= 0.6, f"shirt colour right in only {accuracy:.0%} of captions: {captions[:4]}"


def test_the_demo_preset_loads_the_committed_weights_in_place(tmp_path: Path) -> None:
    """The product path: configs/demo.yaml names the committed fp16 folders, which the loaders
    read as they read any model folder (upcast to fp32 on a CPU: no install step, no training),
    and they do what the factory needs."""
    from core.settings.run import REPO_ROOT, load_run_config
    from demo.models import CAPTIONER, CLIP, COMMITTED_WEIGHTS, TEXT_TO_IMAGE, DemoModelPaths, is_complete

    assert is_complete(COMMITTED_WEIGHTS)
    demo = load_run_config()
    named = (demo.generation.base_model, demo.caption.model, demo.filter.clip_model)
    components = [COMMITTED_WEIGHTS / c for c in (TEXT_TO_IMAGE, CAPTIONER, CLIP)]
    assert [(REPO_ROOT / m).resolve() for m in named] == components
    paths = DemoModelPaths.under(COMMITTED_WEIGHTS)
    model, _ = load_clip(str(paths.clip), "cpu", None)
    assert model.dtype == torch.float32
    _check_demo_quality(paths, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
def test_demo_models_trained_from_scratch_are_useful(tmp_path: Path) -> None:
    """How the committed weights were made, minus `--fp16`: the full default recipe (about 47
    minutes of one CPU thread), then the same quality checks."""
    from demo.models import build_demo_models, is_complete

    paths = build_demo_models(tmp_path / "models", tmp_path / "pedestrians")
    assert is_complete(tmp_path / "models")
    _check_demo_quality(paths, tmp_path)
