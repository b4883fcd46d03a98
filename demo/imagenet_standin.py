"""An ImageNet stand-in: a timm backbone pre-trained to classify procedural objects (`demo.objects`).

The paper compares its backbone with the usual ImageNet initialisation. Offline, timm's ImageNet
weights are not in the cache, so the downstream `imagenet` cells would be unavailable; this trains
the reference instead: the downstream arch (resnet18 in the demo) as a classifier of generic,
non-person things, with flips, shifted crops and lighting jitter, for a fixed number of steps from
one seed (`demo.training.train_loop`: AdamW, warm-up, cosine decay). Its backbone is what
`downstream.imagenet_standin` names; `init: imagenet` still means the real weights wherever they
can be had.

    OUT/imagenet-standin/backbone.safetensors   the backbone (keys of timm.create_model(arch, num_classes=0))
    OUT/imagenet-standin/card.json              what it was trained on and how well it classifies
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from demo.objects import object_class_names, object_images
from demo.training import Log, random_flip, train_loop
from trainers.weights import create_model, save_backbone_safetensors

BACKBONE_FILE = "backbone.safetensors"
CARD_FILE = "card.json"


@dataclass(frozen=True)
class StandinRecipe:
    """What the stand-in learns from and for how long: step counts, never wall-clock. The demo's
    numbers (classes, images, steps, seed) are `demo.models.DemoRecipe`'s `standin_*` fields."""

    classes: int
    images_per_class: int
    steps: int
    arch: str = "resnet18"  # the demo's downstream arch
    held_out_per_class: int = 20  # fresh draws (further indices) for the held-out accuracy
    image_size: int = 64
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0


def to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """uint8 (N, 3, H, W): the set stays compact in memory and is normalised per batch."""
    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2)


class Normalize(nn.Module):
    """uint8 pixels to the ImageNet-normalised floats every downstream transform feeds the backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", 255 * torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", 255 * torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() - self.mean) / self.std


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips, crops shifted by up to 1/8 of the side (reflection-padded) and a brightness /
    colour-cast jitter, on a uint8 batch; returns float pixels in 0..255."""
    n, _, height, width = pixels.shape
    pad = max(1, height // 8)
    padded = F.pad(random_flip(pixels, generator).float(), (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).tolist()
    crops = torch.stack([padded[i, :, dy:dy + height, dx:dx + width] for i, (dy, dx) in enumerate(offsets)])
    gain = (1 + 0.2 * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)) * \
           (1 + 0.08 * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1))
    return (crops * gain).clamp(0, 255)


@torch.no_grad()
def accuracy(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` (eval mode, no augmentation) on uint8 `pixels`."""
    normalize = Normalize()
    model.eval()
    correct = 0
    for start in range(0, len(pixels), batch_size):
        logits = model(normalize(pixels[start:start + batch_size]))
        correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    return correct / max(1, len(pixels))


def train_imagenet_standin(recipe: StandinRecipe, out_dir: Path, half: bool = False, log: Log = print) -> dict:
    """Draw the object set, train `recipe.arch` to classify it and write `out_dir`/backbone.safetensors
    (fp16 when `half`) and `out_dir`/card.json; returns the card."""
    images, labels = object_images(recipe.classes, recipe.images_per_class, recipe.image_size, recipe.seed)
    pixels, targets = to_pixels(images), torch.tensor(labels)
    del images
    log(f"[imagenet-standin] {len(pixels)} images of {recipe.classes} procedural object classes "
        f"at {recipe.image_size}px; {recipe.steps} steps of {recipe.batch_size} on {recipe.arch}")
    torch.manual_seed(recipe.seed)  # the classifier's initial weights
    model = create_model(recipe.arch, "the stand-in's arch", pretrained=False, num_classes=recipe.classes)
    normalize = Normalize()
    losses: list[float] = []

    def loss_of(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        logits = model(normalize(augment(pixels[index], generator)))
        loss = F.cross_entropy(logits, targets[index], label_smoothing=0.1)
        losses.append(loss.item())
        return loss

    train_loop("imagenet-standin", [model], model.parameters(), loss_of, len(pixels), recipe.batch_size,
               recipe.steps, recipe.lr, recipe.seed, log, weight_decay=recipe.weight_decay)
    held_out, held_out_labels = object_images(recipe.classes, recipe.held_out_per_class, recipe.image_size,
                                              recipe.seed, start=recipe.images_per_class)
    window = max(1, len(losses) // 10)
    # the train accuracy on as many training images per class as are held out (evenly spaced)
    every = max(1, recipe.images_per_class // recipe.held_out_per_class)
    card = {
        "recipe": asdict(recipe),
        "classes": object_class_names(recipe.classes),
        "images": len(pixels),
        "steps": recipe.steps,
        "first_loss": sum(losses[:window]) / window,  # mean over the first and last tenth of the steps
        "final_loss": sum(losses[-window:]) / window,
        "train_accuracy": accuracy(model, pixels[::every], targets[::every]),
        "train_accuracy_images": len(pixels[::every]),
        "held_out_images": len(held_out),
        "held_out_accuracy": accuracy(model, to_pixels(held_out), torch.tensor(held_out_labels)),
    }
    log(f"[imagenet-standin] train accuracy {card['train_accuracy']:.3f}, "
        f"held-out accuracy {card['held_out_accuracy']:.3f} on {len(held_out)} fresh draws")
    model.reset_classifier(0)  # the backbone alone: the keys of timm.create_model(arch, num_classes=0)
    if half:
        model.half()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_backbone_safetensors(model, out_dir / BACKBONE_FILE)
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return card


__all__ = ["BACKBONE_FILE", "CARD_FILE", "StandinRecipe", "train_imagenet_standin"]
