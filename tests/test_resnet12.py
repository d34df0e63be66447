"""ResNet-12 under vmap against the per-task loop in float64; DropBlock; the sampler's on-device augmentation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, classification_batch, rel_err
from torch.func import functional_call, vmap

from maml_func import MAML, VMAP, build
from maml_func.components import build_algorithm
from maml_func.config import make_config
from maml_func.data import ImageClasses
from maml_func.evaluate import evaluate
from maml_func.models import DropBlock, ResNet12, build_model
from maml_func.reference import loop_meta_grad
from maml_func.tasks import EpisodeSampler, TaskBatch, crop_and_flip

WIDTHS = (4, 6, 8, 8)


@pytest.mark.parametrize("steps", [1, 2])
def test_vmapped_second_order_meta_gradient_equals_the_loop(steps: int) -> None:
    torch.manual_seed(0)
    model = ResNet12(n_way=3, in_channels=3, image_size=16, widths=WIDTHS).double()
    batch = classification_batch(3, 3, 2, 2, 16, channels=3)
    maml = MAML(model, inner_lr=0.1, inner_steps=steps)
    meta = maml.init()
    loss, _ = maml.meta_loss(meta, batch, way=VMAP)
    got = torch.autograd.grad(loss, list(meta["model"].values()))
    want = loop_meta_grad(model, meta["model"], batch, inner_lr=0.1, steps=steps)
    assert torch.sqrt(sum((g**2).sum() for g in want)) > 1e-6, "reference gradient is trivially zero"
    first = loop_meta_grad(model, meta["model"], batch, inner_lr=0.1, steps=steps, first_order=True)
    assert rel_err(list(first), list(want)) > 1e-4, "the second-order term must matter here"
    assert rel_err(list(got), list(want)) < TOL


def test_architecture_names_and_options() -> None:
    model = build_model("resnet12", n_way=5, in_channels=3, image_size=84)
    assert model.widths == (64, 160, 320, 640) and model.head.in_features == 640
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert [m.negative_slope for m in model.modules() if isinstance(m, torch.nn.LeakyReLU)] == [0.1] * 12
    assert not any(isinstance(m, DropBlock) for m in model.modules())
    assert build("anil", model).adapt_only("head.weight") and not build("anil", model).adapt_only(
        "features.0.body.0.weight")
    config = make_config(model="resnet12", model_options={"widths": [16, 32, 64, 128]}, image_size=32, channels=3)
    net, _ = build_algorithm(config, in_channels=3)
    assert isinstance(net, ResNet12) and net.widths == (16, 32, 64, 128)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match=r"ResNet12: widths must be four ints"):
        ResNet12(widths=(8, 8, 8))
    assert ResNet12(image_size=32, widths=WIDTHS)(torch.zeros(1, 3, 28, 20)).shape == (1, 5)  # pooled globally
    with pytest.raises(ValueError, match="ResNet12: expected images"):
        ResNet12(image_size=32)(torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match=r"ResNet12: expected images \[B, 3, H, W\] with H, W >= 16"):
        ResNet12(image_size=32)(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="build_model: resnet12 does not accept these options"):
        build_model("resnet12", n_way=5, in_channels=3, image_size=84, pool=True)


def test_dropblock_is_off_by_default_and_explicit_when_on() -> None:
    x = torch.rand(2, 3, 16, 16)
    model = ResNet12(image_size=16, widths=WIDTHS)
    params = dict(model.named_parameters())
    state = torch.get_rng_state()
    assert torch.equal(functional_call(model, params, (x,)), functional_call(model, params, (x,)))
    vmap(lambda p, y: functional_call(model, p, (y,)), in_dims=(None, 0))(params, x[None])  # no random op
    assert torch.equal(state, torch.get_rng_state()), "the default network drew random numbers"
    dropping = ResNet12(image_size=16, widths=WIDTHS, drop_rate=0.5, dropblock_size=2)
    drop = DropBlock(0.3, 3)
    features = torch.ones(64, 4, 12, 12)
    dropped = drop(features)
    assert 0.15 < float((dropped == 0).float().mean()) < 0.45 and torch.allclose(dropped.mean(), torch.tensor(1.0),
                                                                                    atol=0.05)
    assert torch.equal(drop.eval()(features), features) and torch.equal(DropBlock(0.0)(features), features)
    assert vmap(lambda y: dropping(y), randomness="different")(x[None]).shape == (1, 2, 5)


def test_dropblock_trains_vectorized_with_its_own_draws_per_task_and_repeats_under_a_seed() -> None:
    g = torch.Generator().manual_seed(0)
    images = (255 * torch.rand(6, 4, 3, 16, 16, generator=g)).to(torch.uint8)
    sampler = EpisodeSampler(ImageClasses(images, torch.full((6,), 4), [f"c{i}" for i in range(6)]), n_way=3,
                             k_shot=1, n_query=2)
    batch = sampler.sample(4, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    dropping = ResNet12(n_way=3, in_channels=3, image_size=16, widths=WIDTHS, drop_rate=0.3, dropblock_size=2)
    maml = MAML(dropping, inner_lr=0.1)
    meta = maml.init()

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        loss, metrics = maml.meta_loss(meta, batch, way=VMAP)
        (grad,) = torch.autograd.grad(loss, [meta["model"]["head.weight"]])
        return metrics["loss"], grad

    first, grad = run(3)
    again, grad_again = run(3)
    other, _ = run(4)
    assert torch.equal(first, again) and torch.equal(grad, grad_again) and torch.isfinite(grad).all()
    assert not torch.equal(first, other), "the draws follow the global generator"
    twins = TaskBatch(*(t[:1].expand(2, *t.shape[1:]) for t in batch))  # the same task twice: different draws
    torch.manual_seed(3)
    _, metrics = maml.meta_loss(meta, twins, way=VMAP)
    assert metrics["loss"][0] != metrics["loss"][1]


def test_evaluation_turns_dropblock_off_and_restores_the_mode() -> None:
    g = torch.Generator().manual_seed(0)
    images = (255 * torch.rand(6, 4, 3, 16, 16, generator=g)).to(torch.uint8)
    sampler = EpisodeSampler(ImageClasses(images, torch.full((6,), 4), [f"c{i}" for i in range(6)]), n_way=3,
                             k_shot=1, n_query=2)
    torch.manual_seed(0)
    dropping = ResNet12(n_way=3, in_channels=3, image_size=16, widths=WIDTHS, drop_rate=0.5, dropblock_size=2)
    plain = ResNet12(n_way=3, in_channels=3, image_size=16, widths=WIDTHS)
    plain.load_state_dict(dropping.state_dict())
    meta = MAML(dropping, inner_lr=0.1).init()
    state = torch.get_rng_state()
    # Vectorized (no random op may run under vmap) and equal to the network without DropBlock, draw for draw.
    got = evaluate(MAML(dropping, inner_lr=0.1), meta, sampler, num_tasks=6, steps=2, batch_size=3, seed=4)
    want = evaluate(MAML(plain, inner_lr=0.1), meta, sampler, num_tasks=6, steps=2, batch_size=3, seed=4)
    assert got == want and torch.equal(state, torch.get_rng_state())
    assert all(m.training for m in dropping.modules())  # training mode is back for the next meta-iteration


# ---------------------------------------------------------------- augmentation


def coded_classes(n_classes: int = 6, per_class: int = 8, size: int = 6) -> ImageClasses:
    """Images whose every pixel is distinct and nonzero, so any crop or flip can be recognized."""
    base = torch.arange(1, 3 * size * size + 1, dtype=torch.uint8).view(3, size, size)
    images = (base + 100 * (torch.arange(n_classes * per_class) % 2).view(-1, 1, 1, 1).to(torch.uint8))
    return ImageClasses(images.view(n_classes, per_class, 3, size, size).contiguous(),
                        torch.full((n_classes,), per_class), [f"c{i}" for i in range(n_classes)])


def test_augmented_batches_have_the_same_shapes_and_tasks_and_follow_the_generator() -> None:
    classes = coded_classes()
    plain = EpisodeSampler(classes, 3, 2, 2)
    aug = EpisodeSampler(classes, 3, 2, 2, augment=True)
    a = aug.sample(4, torch.Generator().manual_seed(1))
    b = plain.sample(4, torch.Generator().manual_seed(1))
    assert [t.shape for t in a] == [t.shape for t in b] and a.x_support.dtype == torch.float32
    assert torch.equal(a.y_support, b.y_support) and torch.equal(a.y_query, b.y_query)
    again = aug.sample(4, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, again))
    other = aug.sample(4, torch.Generator().manual_seed(2))
    assert not torch.equal(a.x_query, other.x_query)
    assert "augment=True" in repr(aug)
    with pytest.raises(ValueError, match="augment must be true or false"):
        EpisodeSampler(classes, 3, 2, 2, augment="yes")


def test_crops_and_flips_are_what_they_claim() -> None:
    padding, size = 2, 6
    x = coded_classes(size=size).images.view(-1, 3, size, size)[:40]  # [40, 3, 6, 6]
    out = crop_and_flip(x, padding, torch.Generator().manual_seed(0))
    padded = F.pad(x, (padding,) * 4)
    seen = {"offsets": set(), "flips": 0}
    for original, got in zip(padded, out):
        matches = [(dy, dx, flip) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                   for flip in (False, True)
                   if torch.equal(got, (lambda c: c.flip(-1) if flip else c)(original[:, dy:dy + size, dx:dx + size]))]
        assert len(matches) == 1, "each output is exactly one crop of the zero-padded image, maybe mirrored"
        seen["offsets"].add(matches[0][:2])
        seen["flips"] += matches[0][2]
    assert len(seen["offsets"]) > 10 and 8 <= seen["flips"] <= 32
    unpadded = crop_and_flip(x, 0, torch.Generator().manual_seed(3))
    assert all(torch.equal(u, o) or torch.equal(u, o.flip(-1)) for u, o in zip(unpadded, x))
    assert torch.equal(crop_and_flip(x.view(4, 10, 3, size, size), padding, torch.Generator().manual_seed(0)),
                       out.view(4, 10, 3, size, size))
