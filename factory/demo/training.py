"""Training loops that turn the tiny random models into usable demo models.

All three learn from (pedestrian image, attribute description) pairs of the procedural dataset:

- text-to-image: the `AutoencoderKL` first as a plain autoencoder (L1 + MSE reconstruction and a
  small KL term, on bands of rows), then the `UNet2DConditionModel` and the `CLIPTextModel`
  together with SD's epsilon-prediction loss on the (scaled) VAE latents, dropping 10 % of the
  captions so classifier-free guidance works, with an EMA of the UNet. The text encoder starts
  from the trained CLIP's text tower (as SD v1's is CLIP's) and keeps training: from a random
  text encoder the UNet needs several times more steps before colour words change its output.
- captioner: BLIP-2 with the teacher-forced language-model loss on the description, prompted with
  the caption stage's prompt half of the time and unprompted otherwise, plus an attribute probe
  on the visual tokens (see `train_captioner`).
- CLIP: the symmetric contrastive loss on image/description pairs, plus empty scenes and noise
  matched to the CLIP filter's negative texts so the filter's scores mean something.

Every loop draws batches from its own seeded generator and runs a fixed number of steps, so a
build is reproducible on a given machine (wall-clock time never decides anything).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import EMAModel
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor, CLIPModel, CLIPProcessor

from core.datasets.market import load_market1501
from core.datasets.synthetic import ATTRIBUTES_FILE, CameraStyle, render_image, sequence_shots
from factory.demo.tiny import SD_V1_SCHEDULE, TEXT_TO_IMAGE_RESOLUTION
from core.settings.stages import CaptionConfig, FilterConfig

Log = Callable[[str], None]


@dataclass(frozen=True)
class PedestrianCorpus:
    """Every identity image of a procedural dataset with its identity's description."""

    images: list[Image.Image]  # RGB, as stored (128x64)
    descriptions: list[str]
    attributes: list[dict]

    @classmethod
    def from_market_folder(cls, root: Path) -> PedestrianCorpus:
        """Read all splits of a Market-layout folder with `attributes.jsonl` (distractors and
        junk skipped: they have no description)."""
        with (root / ATTRIBUTES_FILE).open(encoding="utf-8") as handle:
            by_pid = {row["pid"]: row for row in map(json.loads, handle)}
        dataset = load_market1501(root, source="pedestrians")
        records = [r for r in (*dataset.train, *dataset.query, *dataset.gallery) if r.pid in by_pid]
        records.sort(key=lambda r: r.path)
        images = []
        for record in records:
            with Image.open(record.path) as image:
                images.append(image.convert("RGB"))
        return cls(images, [by_pid[r.pid]["description"] for r in records], [by_pid[r.pid] for r in records])

    def __len__(self) -> int:
        return len(self.images)


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def _train(
    phase: str, modules: Sequence[torch.nn.Module], params: Iterable[torch.nn.Parameter] | Sequence[dict],
    loss_of: Callable[[torch.Tensor, torch.Generator], torch.Tensor], n: int, batch_size: int, steps: int,
    lr: float, seed: int, log: Log, weight_decay: float = 0.01,
    clip_grad: Sequence[torch.nn.Parameter] | None = None, after_step: Callable[[], None] | None = None,
) -> None:
    """The loop all phases share: AdamW with warmup and cosine decay over `steps` index batches
    of the `n` examples; `loss_of(index, generator)` draws its noise and augmentation from one
    generator seeded per phase. Gradients are clipped to norm 1 over `clip_grad` when given;
    `modules` are in train mode during the loop and in eval mode after it. Every 50 steps the
    mean loss since the last report is logged with the elapsed time."""
    for module in modules:
        module.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, min(50, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine_lr(s, steps, warmup))
    generator = torch.Generator().manual_seed(seed)
    start, losses = time.perf_counter(), []
    for step, index in enumerate(_batches(n, batch_size, steps, seed)):
        loss = loss_of(index, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(clip_grad, 1.0)
        optimizer.step()
        schedule.step()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            log(f"[{phase}] step {step + 1}/{steps} loss {sum(losses) / len(losses):.4f} elapsed {elapsed:.0f}s")
            losses.clear()
    for module in modules:
        module.eval()


def _tokens(tokenizer, texts: Sequence[str]):
    """`texts` padded and truncated to the tokenizer's maximum length (77 for CLIP), as tensors."""
    return tokenizer(
        list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Index batches for `steps` steps: shuffled epochs from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    out = []
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


def _flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    mask = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


class _CameraJitter:
    """Random brightness and per-channel gain on normalised pixel values: what a new camera's
    light does to colours. Makes colour words survive cameras the models never saw."""

    def __init__(self, image_processor, strength: float = 0.15) -> None:
        self.mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
        self.strength = strength

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = pixels.shape[0]
        brightness = 1 + self.strength * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
        cast = 1 + self.strength / 2 * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
        rgb = (pixels * self.std + self.mean) * brightness * cast
        return (rgb.clamp(0, 1) - self.mean) / self.std


# ---------------------------------------------------------------------------------------------
# Text-to-image


def train_autoencoder(
    vae: AutoencoderKL,
    pixels: torch.Tensor,
    steps: int,
    batch_size: int = 16,
    lr: float = 2e-3,
    kl_weight: float = 1e-4,
    crop_rows: int | None = 32,
    seed: int = 0,
    log: Log = print,
) -> float:
    """Train `vae` to reconstruct `pixels` (N, 3, H, W in [-1, 1]); then set its
    `scaling_factor` to 1 / std of the latents (SD's 0.18215 plays the same role). Returns the
    reconstruction MSE on a sample of the training images.

    The autoencoder is convolutional, so it trains on random bands of `crop_rows` rows: the same
    number of updates at a fraction of the cost of whole images."""

    def loss_of(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = _flip(pixels[index], generator)
        if crop_rows is not None and crop_rows < x.shape[2]:
            top = int(torch.randint(0, (x.shape[2] - crop_rows) // 8 + 1, (1,), generator=generator)) * 8
            x = x[:, :, top : top + crop_rows]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        kl = posterior.kl().mean() / x[0].numel()
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + kl_weight * kl

    _train("autoencoder", [vae], vae.parameters(), loss_of, len(pixels), batch_size, steps, lr, seed, log)
    with torch.no_grad():
        sample = pixels[:: max(1, len(pixels) // 256)]
        latents = vae.encode(sample).latent_dist.mean
        mse = F.mse_loss(vae.decode(latents).sample, sample).item()
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    log(f"[autoencoder] reconstruction MSE {mse:.4f}, latent scaling factor {vae.config.scaling_factor:.4f}")
    return mse


def train_text_to_image(
    pipeline: StableDiffusionPipeline,
    pixels: torch.Tensor,
    descriptions: Sequence[str],
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    caption_dropout: float = 0.1,
    ema_decay: float | None = 0.999,
    seed: int = 0,
    log: Log = print,
) -> None:
    """Train the pipeline's UNet and text encoder on (image, description) pairs with SD's
    epsilon-prediction loss. Half of the captions use the generation stage's reference template
    ("a photo of a person, <caption>") so the prompts the factory writes are in-distribution."""
    vae, unet, text_encoder = pipeline.vae, pipeline.unet, pipeline.text_encoder
    template = CaptionConfig().reference_template
    with torch.no_grad():
        encoded = [vae.encode(chunk).latent_dist for chunk in pixels.split(256)]
    means = torch.cat([d.mean for d in encoded])
    stds = torch.cat([d.std for d in encoded])
    unique = sorted(set(descriptions))
    texts = ["", *unique, *(template.format(caption=d) for d in unique)]
    token_ids = _tokens(pipeline.tokenizer, texts).input_ids
    text_index = torch.tensor([1 + unique.index(d) for d in descriptions])
    noise_scheduler = DDPMScheduler.from_config(SD_V1_SCHEDULE)

    def loss_of(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator))
        latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        rows = text_index[index] + len(unique) * (torch.rand(len(index), generator=generator) < 0.5).long()
        rows = torch.where(torch.rand(len(index), generator=generator) < caption_dropout, 0, rows)
        return F.mse_loss(unet(noisy, timesteps, text_encoder(token_ids[rows])[0]).sample, noise)

    params = [*unet.parameters(), *text_encoder.parameters()]
    ema = EMAModel(unet.parameters(), decay=ema_decay, use_ema_warmup=True, power=3 / 4) if ema_decay else None
    _train(
        "text-to-image", [unet, text_encoder], params, loss_of, len(pixels), batch_size, steps, lr, seed, log,
        clip_grad=params, after_step=None if ema is None else lambda: ema.step(unet.parameters()),
    )
    if ema is not None:  # sample with the averaged weights: smoother than the last step's
        ema.copy_to(unet.parameters())


# ---------------------------------------------------------------------------------------------
# Captioner


def train_captioner(
    model: Blip2ForConditionalGeneration,
    processor: Blip2Processor,
    images: Sequence[Image.Image],
    descriptions: Sequence[str],
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    prompt: str | None = None,
    attributes: Sequence[dict] | None = None,
    attribute_weight: float = 1.0,
    vision_lr_scale: float = 3.0,
    seed: int = 0,
    log: Log = print,
) -> None:
    """Teacher-forced LM loss on `descriptions` given the image, with and without `prompt`
    (default: the caption stage's prompt). Only description tokens and EOS are labelled.

    With `attributes` (the procedural dataset's per-image attribute rows) an auxiliary linear
    probe classifies each attribute from the query outputs the language model sees. From random
    initialisation the LM loss alone first settles on the language prior (every caption the same)
    and reads the image only slowly; the probe makes the visual features carry colours from the
    start. The probe is discarded: the saved model is a plain `Blip2ForConditionalGeneration`."""
    prompt = CaptionConfig().prompt if prompt is None else prompt
    tokenizer = processor.tokenizer
    pixel_values = processor(images=list(images), return_tensors="pt")["pixel_values"]
    image_ids = [model.config.image_token_index] * model.config.num_query_tokens
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    unique = sorted(set(descriptions))
    # Prompted answers follow "Answer:" after a space; unprompted captions start right after BOS.
    with_prompt = [tokenizer(" " + d, add_special_tokens=False).input_ids for d in unique]
    without_prompt = [tokenizer(d, add_special_tokens=False).input_ids for d in unique]
    text_index = [unique.index(d) for d in descriptions]

    def sequence(i: int, prompted: bool) -> tuple[list[int], list[int]]:
        context = image_ids + [bos] + (prompt_ids if prompted else [])
        target = (with_prompt if prompted else without_prompt)[text_index[i]] + [eos]
        return context + target, [-100] * len(context) + target

    probe = _AttributeProbe(attributes, model) if attributes is not None else None
    jitter = _CameraJitter(processor.image_processor)

    def loss_of(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        prompted = (torch.rand(len(index), generator=generator) < 0.5).tolist()
        pairs = [sequence(int(i), p) for i, p in zip(index, prompted, strict=True)]
        input_ids = pad_sequence([torch.tensor(ids) for ids, _ in pairs], batch_first=True, padding_value=pad)
        labels = pad_sequence([torch.tensor(target) for _, target in pairs], batch_first=True, padding_value=-100)
        attention = pad_sequence([torch.ones(len(ids), dtype=torch.long) for ids, _ in pairs], batch_first=True)
        pixels = jitter(_flip(pixel_values[index], generator), generator)
        features = model.get_image_features(pixel_values=pixels, return_dict=True)
        loss = model(
            pixel_values=None, mm_encoder_outputs={"image": features},
            input_ids=input_ids, attention_mask=attention, labels=labels,
        ).loss
        if probe is not None:
            loss = loss + attribute_weight * probe.loss(features.pooler_output, index)
        return loss

    params = [p for p in model.parameters() if p.requires_grad] + (list(probe.parameters()) if probe else [])
    language = {id(p) for p in model.language_model.parameters()}
    # The randomly initialised vision side needs a larger step than the language model.
    groups = [
        {"params": [p for p in params if id(p) not in language], "lr": lr * vision_lr_scale},
        {"params": [p for p in params if id(p) in language], "lr": lr},
    ]
    _train("captioner", [model], groups, loss_of, len(images), batch_size, steps, lr, seed, log, clip_grad=params)


class _AttributeProbe(torch.nn.Module):
    """Linear classifiers of every categorical attribute from the flattened query outputs."""

    KEYS = (
        "upper_color", "upper_pattern", "upper_color2", "lower_color", "lower_type", "shoe_color",
        "hair_color", "hair_length", "bag", "bag_color",
    )  # fmt: skip

    def __init__(self, rows: Sequence[dict], model: Blip2ForConditionalGeneration) -> None:
        """One head per attribute that every row has with at least two values."""
        super().__init__()
        features = model.config.num_query_tokens * model.config.text_config.hidden_size
        self.labels: dict[str, torch.Tensor] = {}
        self.heads = torch.nn.ModuleDict()
        for key in self.KEYS:
            values = sorted({str(row[key]) for row in rows}) if all(key in row for row in rows) else []
            if len(values) >= 2:
                self.labels[key] = torch.tensor([values.index(str(row[key])) for row in rows])
                self.heads[key] = torch.nn.Linear(features, len(values))

    def loss(self, query_embeddings: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        flat = query_embeddings.flatten(1)
        losses = [F.cross_entropy(head(flat), self.labels[key][index]) for key, head in self.heads.items()]
        return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------
# CLIP


def empty_scenes(count: int, seed: int) -> list[Image.Image]:
    """Backgrounds of the procedural cameras with nobody in them."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(count):
        camera = CameraStyle.sample(rng)
        scenes.append(render_image(None, camera, sequence_shots(camera, rng, 1)[0], rng))
    return scenes


def blurry_noise(count: int, seed: int, size: tuple[int, int] = (128, 64)) -> list[Image.Image]:
    """Smooth random colour fields: "a blurry photo of nothing"."""
    rng = np.random.default_rng(seed)
    coarse = (rng.integers(0, 256, size=(4, 2, 3), dtype=np.uint8) for _ in range(count))
    return [Image.fromarray(c).resize((size[1], size[0]), Image.Resampling.BICUBIC) for c in coarse]


def train_clip(
    model: CLIPModel,
    processor: CLIPProcessor,
    images: Sequence[Image.Image],
    descriptions: Sequence[str],
    steps: int,
    batch_size: int = 48,
    lr: float = 1e-3,
    seed: int = 0,
    log: Log = print,
) -> None:
    """Contrastive image/text training. Each batch's texts are its people's descriptions plus
    the CLIP filter's fixed texts (`clip_positive`, `clip_negatives`); a person image's target is
    split between its description and the positive text, an empty scene's target is the first
    negative, a noise field's the second. Texts are matched back to images only for descriptions."""
    filter_config = FilterConfig()
    fixed_texts = [filter_config.clip_positive, *filter_config.clip_negatives]
    count = min(256, len(images))
    negatives = [empty_scenes(count, seed), blurry_noise(count, seed)][: len(filter_config.clip_negatives)]
    person_pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    negative_pixels = [processor(images=n, return_tensors="pt")["pixel_values"] for n in negatives]
    unique = sorted(set(descriptions))
    text_tokens = _tokens(processor.tokenizer, [*unique, *fixed_texts])
    text_index = torch.tensor([unique.index(d) for d in descriptions])
    fixed_rows = torch.arange(len(unique), len(unique) + len(fixed_texts))
    per_negative = max(1, batch_size // 8)
    jitter = _CameraJitter(processor.image_processor)

    def loss_of(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # one image per description in the batch, so every text has a single positive image
        seen: dict[int, int] = {}
        for i in index.tolist():
            seen.setdefault(int(text_index[i]), i)
        people = torch.tensor(list(seen.values()))
        rows = torch.cat([torch.tensor(list(seen.keys())), fixed_rows])
        pixel_batches = [jitter(_flip(person_pixels[people], generator), generator)]
        for pixels in negative_pixels:
            pixel_batches.append(pixels[torch.randint(0, len(pixels), (per_negative,), generator=generator)])
        logits = model(  # (images, texts)
            input_ids=text_tokens.input_ids[rows], attention_mask=text_tokens.attention_mask[rows],
            pixel_values=torch.cat(pixel_batches),
        ).logits_per_image
        n_people = len(people)
        targets = torch.zeros_like(logits)
        targets[torch.arange(n_people), torch.arange(n_people)] = 0.5
        targets[:n_people, n_people] = 0.5  # clip_positive
        for k in range(len(negative_pixels)):
            start = n_people + k * per_negative
            targets[start : start + per_negative, n_people + 1 + k] = 1.0
        image_loss = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
        text_loss = F.cross_entropy(logits[:n_people, :n_people].T, torch.arange(n_people))
        return (image_loss + text_loss) / 2

    _train(
        "clip", [model], model.parameters(), loss_of, len(images), batch_size, steps, lr, seed, log, weight_decay=0.1
    )


def pipeline_pixels(corpus: PedestrianCorpus) -> torch.Tensor:
    """The corpus at the text-to-image resolution: a float tensor in [-1, 1] of shape (N, 3, H, W)."""
    height, width = TEXT_TO_IMAGE_RESOLUTION
    arrays = [np.asarray(im.resize((width, height), Image.Resampling.BICUBIC), np.float32) for im in corpus.images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
