"""Tests of the paper methods registered for the downstream evaluation (`mgn`, `sbs`, `bdb`) and
of the recipe pieces they added to the Re-ID trainer (momentum SGD, the cosine schedule, the
backbone freeze, AutoAugment).

Every model is the real one, built the way a cell builds it (`build_cell_model`), on timm's
ResNet-18 at 64x32 with random weights; batches are P=4 identities x K=4 random images.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from core.config import ConfigError
from core.settings.reid import ReidTrainConfig
from eval.downstream.bdb import BatchDropBlock
from eval.downstream.branches import BranchOutput
from eval.downstream.inits import random_init
from eval.downstream.methods import METHODS
from eval.downstream.mgn import MgnModel, MgnOptions
from eval.downstream.sbs import circle_softmax_logits
from eval.downstream.trial import build_cell_model
from trainers.reid.data import TrainingSet, make_train_loader
from trainers.reid.model import ReidOutput
from trainers.reid.schedule import FROZEN_UNTIL_EPOCH, build_lr_scheduler, build_optimizer
from trainers.reid.train import run_epoch
from trainers.reid.transforms import build_train_transform
from trainers.weights import build_backbone

NUM_CLASSES = 4
# configs/reid_demo.yaml at test scale
TINY = dict(arch="resnet18", init="random", image_size=(64, 32), pad=4, epochs=4, warmup_epochs=1,
            milestones=(3,), base_lr=1e-3, ids_per_batch=4, images_per_id=4, loader_workers=0, seed=0)
# Options that fit ResNet-18 (2 blocks in layer3) and a 4-epoch run.
OPTIONS = {"mgn": {}, "sbs": {"non_local": {"layer2": 1, "layer3": 1}, "freeze_backbone_epochs": 1}, "bdb": {}}
# (train output type, eval feature size on ResNet-18)
EXPECTED = {"mgn": (BranchOutput, 8 * 256), "sbs": (ReidOutput, 512), "bdb": (BranchOutput, 512 + 1024)}


def tiny_recipe(**overrides: object) -> ReidTrainConfig:
    return ReidTrainConfig(**{**TINY, **overrides})


def build(name: str, options: dict | None = None, **overrides: object):
    """(model, loss, recipe) of method `name` as a cell builds them."""
    method = METHODS.get(name)
    parsed = method.options(name, OPTIONS[name] if options is None else options)
    recipe = method.adjust_recipe(tiny_recipe(**overrides), parsed)
    model, loss = build_cell_model(method, parsed, recipe, random_init(), NUM_CLASSES, seed=0)
    return model, loss, recipe


def pk_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, 64, 32, generator=generator), torch.arange(4).repeat_interleave(4)


# ------------------------------------------------------------------------------------------
# the three methods


def test_the_paper_methods_are_registered() -> None:
    assert {"bot", "agw", "mgn", "sbs", "bdb"} <= set(METHODS.names())


@pytest.mark.parametrize("name", ["mgn", "sbs", "bdb"])
def test_outputs_in_train_and_eval_mode(name: str) -> None:
    model, loss_fn, _ = build(name)
    images, labels = pk_batch()
    output_type, dim = EXPECTED[name]
    output = model.train()(images)
    assert isinstance(output, output_type) and output.logits.shape == (16, NUM_CLASSES)
    if isinstance(output, BranchOutput):
        assert output.id_logits[0] is output.logits and output.triplet_features[0] is output.features
        assert all(logits.shape == (16, NUM_CLASSES) for logits in output.id_logits)
    losses = loss_fn(output, labels)
    assert {"loss", "id_loss", "triplet_loss"} <= set(losses)
    assert torch.isclose(losses["loss"], losses["id_loss"] + losses["triplet_loss"])
    with torch.no_grad():
        feature = model.eval()(images)
    assert feature.shape == (16, dim) == (16, model.feature_dim) and torch.isfinite(feature).all()


@pytest.mark.parametrize("name", ["mgn", "sbs", "bdb"])
def test_the_loss_falls_on_a_fixed_batch(name: str) -> None:
    model, loss_fn, recipe = build(name)
    optimizer = build_optimizer(model, recipe)  # the method's own optimiser (MGN: SGD)
    images, labels = pk_batch()
    model.train()
    losses = []
    for _ in range(10):
        loss = loss_fn(model(images), labels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


@pytest.mark.parametrize(("name", "options", "key"), [
    ("mgn", {"parts": [1, 3]}, "parts.0"),
    ("mgn", {"global_softmax_on": "concat"}, "global_softmax_on"),
    ("sbs", {"circle_margin": 1.5}, "circle_margin"),
    ("sbs", {"hold_fraction": 1.0}, "hold_fraction"),
    ("bdb", {"drop_height_ratio": 0}, "drop_height_ratio"),
    ("bdb", {"dropout": 0.5}, "dropout"),
])
def test_bad_options_name_the_method_and_key(name: str, options: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"method_options\.{name}(.|\n)*'{key}'"):
        METHODS.get(name).options(name, options)


def test_sbs_recipe_is_validated_against_the_run() -> None:
    with pytest.raises(ValueError, match="freeze_backbone_epochs=5 leaves no epoch"):
        build("sbs", {"non_local": {"layer2": 1, "layer3": 1}, "freeze_backbone_epochs": 5})


def test_sbs_recipe_and_circle_softmax() -> None:
    model, loss_fn, recipe = build("sbs")
    assert (recipe.optimizer, recipe.lr_schedule, recipe.triplet_margin) == ("adam", "cosine", None)
    assert (recipe.cosine_delay_epochs, recipe.freeze_backbone_epochs, recipe.warmup_factor) == (2, 1, 0.1)
    assert recipe.min_lr == pytest.approx(0.002 * recipe.base_lr) and recipe.autoaugment_prob == 0.1
    output = model.train()(pk_batch()[0])
    assert output.logits.abs().max() <= 1 + 1e-5  # cosine similarities
    # Every similarity at 0: target 64 * 1.35 * (0 - 0.65), others 64 * 0.35 * (0 - 0.35).
    logits = torch.zeros(2, 3)
    circle = circle_softmax_logits(logits, torch.tensor([0, 2]), scale=64, margin=0.35)
    target, other = 64 * 1.35 * -0.65, 64 * 0.35 * -0.35
    assert torch.allclose(circle, torch.tensor([[target, other, other], [other, other, target]]))


def test_mgn_branches_own_their_weights_and_strides() -> None:
    model, loss_fn, recipe = build("mgn")
    assert recipe.last_stride == 2 and recipe.optimizer == "sgd" and recipe.milestones == (2, 3)
    assert (recipe.warmup_epochs, recipe.label_smoothing, recipe.triplet_margin) == (0, 0.0, 1.2)
    global_branch, *part_branches = model.backbone["branches"]
    assert len(part_branches) == 2 and model.stripes == (1, 2, 3)
    for part in part_branches:  # same start, separate tensors
        for (name, a), (_, b) in zip(global_branch.named_parameters(), part.named_parameters()):
            assert a.data_ptr() != b.data_ptr() and torch.equal(a, b), name
    shared = model.backbone["trunk"](torch.zeros(1, 3, 64, 32))
    assert shared.shape[-2:] == (4, 2)
    with torch.no_grad():
        assert global_branch.eval()(shared).shape[-2:] == (2, 1)  # the global branch downsamples
        assert part_branches[0].eval()(shared).shape[-2:] == (4, 2)  # the part branches do not
    optimizer = build_optimizer(model, recipe)
    images, labels = pk_batch()
    model.train()
    loss_fn(model(images), labels)["loss"].backward()
    optimizer.step()
    first = dict(global_branch.named_parameters())
    moved = [name for name, p in part_branches[0].named_parameters() if not torch.equal(p, first[name])]
    assert moved  # one step apart, the copies differ
    # The paper's classifier inputs: pooled 512-d whole-map features, 256-d stripes.
    assert [c.in_features for c in model.classifiers] == [512] * 3 + [256] * 5


def test_mgn_needs_a_downsampling_last_stage() -> None:
    with pytest.raises(ValueError, match="last_stride 2"):
        MgnModel(build_backbone("resnet18", "random", last_stride=1), NUM_CLASSES, MgnOptions())
    bot = METHODS.get("mgn").adjust_recipe(tiny_recipe(), MgnOptions(recipe="bot"))
    assert bot == tiny_recipe(last_stride=2)


def test_batch_dropblock_drops_one_block_for_the_whole_batch() -> None:
    drop = BatchDropBlock(height_ratio=0.3, width_ratio=1.0).train()
    maps = torch.ones(6, 5, 10, 4)
    for _ in range(5):
        kept = drop(maps)
        zero_rows = (kept[0, 0] == 0).all(dim=1).nonzero().flatten().tolist()
        assert len(zero_rows) == 3 and zero_rows == list(range(zero_rows[0], zero_rows[0] + 3))
        assert (kept == kept[0, 0]).all()  # the same block in every map of the batch
        assert int((kept == 0).sum()) == 6 * 5 * 3 * 4
    assert torch.equal(drop.eval()(maps), maps)


def test_bdb_drops_in_training_only() -> None:
    model, _, recipe = build("bdb")
    assert recipe.last_stride == 1 and recipe.triplet_margin is None and recipe.label_smoothing == 0.1
    images, _ = pk_batch()
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(images), model(images))  # nothing random in eval mode
        model.train()
        block_out = model.drop_block(model.backbone(images))  # what the Batch DropBlock sees
        dropped = model.batch_drop(block_out)
    block = ((dropped == 0) & (block_out != 0)).any(dim=0).any(dim=0)  # (H, W): where anything was zeroed
    assert 0 < int(block.sum()) < block.numel()
    assert (dropped[..., block] == 0).all()  # the block is zeroed in every map of the batch
    assert torch.equal(dropped[..., ~block], block_out[..., ~block])  # and nothing else


# ------------------------------------------------------------------------------------------
# recipe pieces in the trainer


def _lrs(config: ReidTrainConfig, epochs: int) -> list[float]:
    optimizer = build_optimizer(torch.nn.Linear(2, 2), config)
    scheduler = build_lr_scheduler(optimizer, config)
    lrs = []
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(epoch + 1)
    return lrs


def test_cosine_schedule_warms_up_holds_then_anneals() -> None:
    config = tiny_recipe(base_lr=1.0, epochs=8, warmup_epochs=2, warmup_factor=0.1, lr_schedule="cosine",
                         cosine_delay_epochs=4, min_lr=0.0, milestones=())
    expected = [0.1, 0.55, 1.0, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert _lrs(config, 8) == pytest.approx(expected)
    resumed = build_optimizer(torch.nn.Linear(2, 2), config)
    build_lr_scheduler(resumed, config, 5)
    assert resumed.param_groups[0]["lr"] == pytest.approx(expected[5])
    with pytest.raises(ValueError, match="annealing would start at epoch 8"):
        tiny_recipe(epochs=8, lr_schedule="cosine", cosine_delay_epochs=8)


def test_step_schedule_and_optimizer_unchanged_by_default() -> None:
    config = tiny_recipe(base_lr=1.0, epochs=8, warmup_epochs=2, warmup_factor=0.1, milestones=(4, 6), gamma=0.5)
    assert _lrs(config, 8) == pytest.approx([0.1, 0.55, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
    optimizer = build_optimizer(torch.nn.Linear(2, 2), config)
    assert type(optimizer) is torch.optim.Adam and len(optimizer.param_groups) == 1
    assert FROZEN_UNTIL_EPOCH not in optimizer.param_groups[0]
    sgd = build_optimizer(torch.nn.Linear(2, 2), tiny_recipe(optimizer="sgd", momentum=0.8))
    assert type(sgd) is torch.optim.SGD
    assert sgd.param_groups[0]["momentum"] == 0.8 and not sgd.param_groups[0]["nesterov"]


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 64), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_frozen_backbone_gets_no_update_during_the_freeze() -> None:
    model, loss_fn, recipe = build("sbs", {"non_local": {"layer2": 1, "layer3": 1}, "freeze_backbone_epochs": 1,
                                           "autoaugment_prob": 0.0})
    labels = [i // 4 for i in range(16)]
    training = TrainingSet(paths=[f"img{i}.png" for i in range(16)], labels=labels, camids=[0] * 16,
                           pids=list(range(4)), images=[_png((60 * label, 40, 200 - 40 * i)) for i, label in
                                                        zip(range(16), labels)])
    loader = make_train_loader(training, recipe)
    optimizer = build_optimizer(model, recipe)
    assert optimizer.param_groups[0][FROZEN_UNTIL_EPOCH] == 1
    scheduler = build_lr_scheduler(optimizer, recipe)
    backbone_before = {k: v.clone() for k, v in model.backbone.named_parameters()}
    head_before = model.bottleneck.weight.clone()
    run_epoch(0, model, loader, loss_fn, optimizer, scheduler, torch.device("cpu"))
    assert all(torch.equal(p, backbone_before[k]) for k, p in model.backbone.named_parameters())
    assert not any(p in optimizer.state for p in model.backbone.parameters())  # Adam's moments untouched
    assert not torch.equal(model.bottleneck.weight, head_before)
    assert all(p.requires_grad for p in model.backbone.parameters())  # restored after the epoch
    assert not model.bottleneck.bias.requires_grad  # BNNeck's frozen shift stays frozen
    run_epoch(1, model, loader, loss_fn, optimizer, scheduler, torch.device("cpu"))
    assert any(not torch.equal(p, backbone_before[k]) for k, p in model.backbone.named_parameters())


def test_freeze_needs_a_backbone_and_autoaugment_is_opt_in() -> None:
    with pytest.raises(ValueError, match="needs a model with a `backbone`"):
        build_optimizer(torch.nn.Linear(2, 2), tiny_recipe(freeze_backbone_epochs=1))

    def has_autoaugment(config: ReidTrainConfig) -> bool:
        return any(isinstance(step, v2.RandomApply) and isinstance(step.transforms[0], v2.AutoAugment)
                   for step in build_train_transform(config).transforms)

    assert not has_autoaugment(tiny_recipe()) and has_autoaugment(tiny_recipe(autoaugment_prob=0.1))
    image = build_train_transform(tiny_recipe(autoaugment_prob=1.0))(Image.new("RGB", (32, 64), (90, 30, 200)))
    assert image.shape == (3, 64, 32)
