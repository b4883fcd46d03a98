"""Training the tiny random models into usable demo models: what every phase shares.

All three models learn from (pedestrian image, attribute description) pairs of procedural
datasets (`PedestrianCorpus`), each in its own module. The corpus is wider than any Re-ID source:
it spans every capture domain of the world (campus, mall, station, street) with identity traits
on, and the text-to-image model and CLIP also read the words for each image's view and scene
(`with_context`), as Stable Diffusion knows far more scenes and poses than Market-1501 shows;
that surplus is what Diversity Injection's variation phrases bring into a build. The captioner
describes the person only, as the caption stage asks it to.

- `demo.train_text_to_image`: the `AutoencoderKL` first as a plain autoencoder (L1 + MSE
  reconstruction and a small KL term, on bands of rows), then the `UNet2DConditionModel` and the
  `CLIPTextModel` together with SD's epsilon-prediction loss on the (scaled) VAE latents, dropping
  10 % of the captions so classifier-free guidance works, with an EMA of the UNet. The text encoder
  starts from the trained CLIP's text tower (as SD v1's is CLIP's) and keeps training: from a
  random text encoder the UNet needs several times more steps before colour words change its output.
- `demo.train_captioner`: BLIP-2 with the teacher-forced language-model loss on the description,
  prompted with the caption stage's prompt half of the time and unprompted otherwise, plus an
  attribute probe on the visual tokens (see `train_captioner`).
- `demo.train_clip`: the symmetric contrastive loss on image/description pairs, plus empty scenes
  and noise matched to the CLIP filter's negative texts so the filter's scores mean something.

Every loop (`train_loop`) draws batches from its own seeded generator and runs a fixed number of
steps, so a build is reproducible on a given machine (wall-clock time never decides anything).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from core.datasets.config import SyntheticSpec
from core.datasets.market import load_market1501
from core.datasets.synthetic import ATTRIBUTES_FILE, DOMAINS, VIEW_WORDS, planned_identity_images
from core.datasets.synthetic.attributes import SPEC_FILE

Log = Callable[[str], None]


@dataclass(frozen=True)
class PedestrianCorpus:
    """Every identity image of procedural datasets with its identity's description and the
    world's words for the conditions it was taken in (`contexts`: its view and its domain's scene,
    e.g. ("seen from the side", "in a shopping mall")), which no identity description names."""

    images: list[Image.Image]  # RGB, as stored (128x64)
    descriptions: list[str]
    attributes: list[dict]
    contexts: list[tuple[str, ...]]

    @classmethod
    def from_market_folder(cls, root: Path) -> PedestrianCorpus:
        """Read all splits of a generated Market-layout folder with `attributes.jsonl` and its
        spec (distractors and junk skipped: they have no description); each image's view comes
        from the generator's own plan of the spec, its scene from the spec's domain."""
        with (root / ATTRIBUTES_FILE).open(encoding="utf-8") as handle:
            by_pid = {row["pid"]: row for row in map(json.loads, handle)}
        spec = SyntheticSpec.model_validate_json((root / SPEC_FILE).read_text())
        views = {image.filename: image.shot.view for image in planned_identity_images(spec)}
        scene = DOMAINS.get(spec.domain).scene_words
        dataset = load_market1501(root, source="pedestrians")
        records = [r for r in (*dataset.train, *dataset.query, *dataset.gallery) if r.pid in by_pid]
        records.sort(key=lambda r: r.path)
        images = []
        for record in records:
            with Image.open(record.path) as image:
                images.append(image.convert("RGB"))
        return cls(images, [by_pid[r.pid]["description"] for r in records], [by_pid[r.pid] for r in records],
                   [(VIEW_WORDS[views[Path(r.path).name]], scene) for r in records])

    @classmethod
    def concat(cls, corpora: Sequence[PedestrianCorpus]) -> PedestrianCorpus:
        return cls(*(sum((getattr(c, name) for c in corpora), []) for name in
                     ("images", "descriptions", "attributes", "contexts")))

    @property
    def context_words(self) -> list[str]:
        """Every condition phrase of the corpus once (for the tokenizers' training text)."""
        return sorted({phrase for context in self.contexts for phrase in context})

    def __len__(self) -> int:
        return len(self.images)


def with_context(description: str, context: Sequence[str], generator: torch.Generator, keep: float = 0.5) -> str:
    """`description` with each phrase of `context` appended with probability `keep`, in order (view,
    then scene: the order Diversity Injection appends its camera-pose and scene phrases in), so a
    model learns both the words for conditions and to draw them when no word names them."""
    kept = [phrase for phrase in context if float(torch.rand((), generator=generator)) < keep]
    return ", ".join([description, *kept])


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def train_loop(
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


def padded_tokens(tokenizer, texts: Sequence[str]):
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


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of the batch `x` (N, C, H, W) mirrored left-right with probability 1/2."""
    mask = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


class CameraJitter:
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
