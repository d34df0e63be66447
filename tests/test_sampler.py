"""EpisodeSampler: shapes, labels, distinct classes and images, counts, rotations, seeding, bad input."""

from __future__ import annotations

import pytest
import torch

from maml_func.data import ImageClasses
from maml_func.tasks import EpisodeSampler, TaskBatch, _same_device

SIDE = 5  # images are 1x5x5: pixel (0,0) = class, (0,1) = image slot, (4,4) = 255 marks the upright corner


def tagged_classes(n_classes: int = 40, per_class: int = 20, counts: list[int] | None = None) -> ImageClasses:
    """Classes whose every image carries its own class and slot, so a sampled image can be traced back."""
    images = torch.zeros(n_classes, per_class, 1, SIDE, SIDE, dtype=torch.uint8)
    images[:, :, 0, 0, 0] = torch.arange(n_classes, dtype=torch.uint8)[:, None]
    images[:, :, 0, 0, 1] = torch.arange(per_class, dtype=torch.uint8)[None, :]
    images[:, :, 0, SIDE - 1, SIDE - 1] = 255
    counts_t = torch.full((n_classes,), per_class) if counts is None else torch.tensor(counts)
    return ImageClasses(images, counts_t, [f"class{i:02d}" for i in range(n_classes)])


def trace(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[..., 1, H, W]`` float images -> (class, slot, rotation k) of each, undoing the rotation."""
    pixels = (x * 255).round().to(torch.uint8)
    cls, slot, rot = (torch.full(x.shape[:-3], -1) for _ in range(3))
    for k in range(4):
        upright = pixels.rot90(-k, dims=(-2, -1))
        here = upright[..., 0, SIDE - 1, SIDE - 1] == 255
        cls = torch.where(here, upright[..., 0, 0, 0].long(), cls)
        slot = torch.where(here, upright[..., 0, 0, 1].long(), slot)
        rot = torch.where(here, torch.tensor(k), rot)
    assert (rot >= 0).all(), "every image must carry its marker in one corner"
    return cls, slot, rot


def by_label(t: torch.Tensor, n_way: int) -> torch.Tensor:
    """``[T, n_way * m]`` class-major -> ``[T, n_way, m]``."""
    return t.reshape(t.shape[0], n_way, -1)


@pytest.mark.parametrize("rotations", [False, True])
def test_shapes_dtypes_and_labels(rotations: bool) -> None:
    sampler = EpisodeSampler(tagged_classes(), n_way=5, k_shot=2, n_query=3, rotations=rotations)
    batch = sampler.sample(7, torch.Generator().manual_seed(0))
    assert isinstance(batch, TaskBatch)
    assert batch.x_support.shape == (7, 10, 1, SIDE, SIDE) and batch.x_query.shape == (7, 15, 1, SIDE, SIDE)
    assert batch.x_support.dtype == batch.x_query.dtype == torch.float32
    assert batch.y_support.dtype == batch.y_query.dtype == torch.int64
    assert 0.0 <= float(batch.x_support.min()) and float(batch.x_query.max()) == 1.0
    assert torch.equal(batch.y_support, torch.arange(5).repeat_interleave(2).expand(7, -1))
    assert torch.equal(batch.y_query, torch.arange(5).repeat_interleave(3).expand(7, -1))
    assert batch.x_support.is_contiguous() and batch.x_query.is_contiguous()


def test_pixels_are_the_stored_images_over_255() -> None:
    classes = tagged_classes()
    batch = EpisodeSampler(classes, 3, 1, 2).sample(4, torch.Generator().manual_seed(1))
    cls, slot, _ = trace(batch.x_query)
    expected = classes.images[cls, slot].float() / 255
    assert torch.equal(batch.x_query, expected)


@pytest.mark.parametrize("rotations", [False, True])
def test_distinct_classes_and_images_with_consistent_labels(rotations: bool) -> None:
    n_way, k, q = 5, 3, 4
    batch = EpisodeSampler(tagged_classes(), n_way, k, q, rotations=rotations).sample(
        200, torch.Generator().manual_seed(2))
    s_cls, s_slot, s_rot = (by_label(t, n_way) for t in trace(batch.x_support))  # [T, N, K]
    q_cls, q_slot, q_rot = (by_label(t, n_way) for t in trace(batch.x_query))  # [T, N, Q]
    cls = torch.cat([s_cls, q_cls], 2)
    # One class per label, the same in support and query.
    assert (cls == cls[:, :, :1]).all()
    per_task = cls[:, :, 0]  # [T, N]
    assert (per_task.sort(1).values.diff(dim=1) > 0).all(), "a class appears twice in a task"
    slots = torch.cat([s_slot, q_slot], 2).sort(2).values
    assert (slots.diff(dim=2) > 0).all(), "an image appears twice in a class"
    rot = torch.cat([s_rot, q_rot], 2)
    assert (rot == rot[:, :, :1]).all(), "a class must be rotated the same way in all its images"
    if rotations:
        assert set(rot.unique().tolist()) == {0, 1, 2, 3}
    else:
        assert (rot == 0).all()


def test_same_seed_same_batch_other_seed_other_batch() -> None:
    sampler = EpisodeSampler(tagged_classes(), 5, 1, 5, rotations=True)
    a = sampler.sample(16, torch.Generator().manual_seed(3))
    b = sampler.sample(16, torch.Generator().manual_seed(3))
    c = sampler.sample(16, torch.Generator().manual_seed(4))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a.x_query, c.x_query)


def test_class_usage_and_label_order_are_uniform() -> None:
    n_classes, n_way, tasks = 40, 5, 4000
    batch = EpisodeSampler(tagged_classes(n_classes), n_way, 1, 1, rotations=True).sample(
        tasks, torch.Generator().manual_seed(5))
    cls, slot, rot = trace(batch.x_support)  # [T, N]
    expected = tasks * n_way / n_classes
    chi2 = float(((torch.bincount(cls.flatten(), minlength=n_classes) - expected) ** 2 / expected).sum())
    assert chi2 < 72.1, f"class usage not uniform: chi2={chi2:.1f} with 39 dof (99.9% quantile 72.1)"
    # The label does not follow the class index: label 0 holds the smaller class about half the time.
    assert 0.45 < float((cls[:, 0] < cls[:, 1]).float().mean()) < 0.55
    # Images within a class and rotations are uniform too (20 slots: 19 dof, 99.9% quantile 43.8).
    expected_slot = tasks * n_way / 20
    chi2_slot = float(((torch.bincount(slot.flatten(), minlength=20) - expected_slot) ** 2 / expected_slot).sum())
    assert chi2_slot < 43.8
    assert torch.allclose(torch.bincount(rot.flatten(), minlength=4).float() / rot.numel(),
                          torch.full((4,), 0.25), atol=0.02)


def test_padding_slots_are_never_drawn() -> None:
    counts = [20 if i % 2 else 6 + i % 5 for i in range(30)]  # 6..10 images in the even classes
    classes = tagged_classes(30, 20, counts)
    batch = EpisodeSampler(classes, 4, 2, 4).sample(300, torch.Generator().manual_seed(6))
    s_cls, s_slot, _ = (by_label(t, 4) for t in trace(batch.x_support))
    _, q_slot, _ = (by_label(t, 4) for t in trace(batch.x_query))
    cls, slot = s_cls[:, :, 0], torch.cat([s_slot, q_slot], 2)  # [T, N], [T, N, 6]
    assert (slot < classes.counts[cls].unsqueeze(-1)).all()
    # A class with exactly k_shot + n_query = 6 images uses all of them whenever it is drawn.
    six = classes.counts[cls] == 6
    assert six.any() and torch.equal(slot[six].sort(-1).values, torch.arange(6).expand(int(six.sum()), -1))


def test_single_task_and_full_class_draw() -> None:
    batch = EpisodeSampler(tagged_classes(5), 5, 5, 15, rotations=True).sample(1, torch.Generator())
    cls, slot, _ = trace(torch.cat([batch.x_support, batch.x_query], 1))
    assert sorted(cls.unique().tolist()) == [0, 1, 2, 3, 4]
    assert batch.x_support.shape == (1, 25, 1, SIDE, SIDE) and batch.y_query.shape == (1, 75)


def test_bad_arguments_raise_naming_the_problem() -> None:
    classes = tagged_classes(8)
    with pytest.raises(ValueError, match=r"n_way=9 is larger than the number of classes \(8\)"):
        EpisodeSampler(classes, 9, 1, 1)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="k_shot must be a positive int"):
            EpisodeSampler(classes, 5, bad, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_query must be a positive int"):
        EpisodeSampler(classes, 5, 1, 0)
    with pytest.raises(TypeError, match="ImageClasses"):
        EpisodeSampler(classes.images, 5, 1, 1)  # type: ignore[arg-type]
    sampler = EpisodeSampler(classes, 5, 1, 1)
    for bad in (0, -3, 2.0):
        with pytest.raises(ValueError, match="num_tasks must be a positive int"):
            sampler.sample(bad, torch.Generator())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sampler.sample(2, 0)  # type: ignore[arg-type]


def test_short_class_is_named() -> None:
    classes = tagged_classes(8, 20, [20, 20, 20, 4, 20, 20, 20, 20])
    with pytest.raises(ValueError, match=r"class 'class03' has 4 images, fewer than k_shot \+ n_query = 6.*lower"):
        EpisodeSampler(classes, 5, 1, 5)
    with pytest.raises(ValueError, match=r"8 classes have fewer than k_shot \+ n_query = 21 images: 'class00' \(20\)"):
        EpisodeSampler(classes, 5, 1, 20)
    assert EpisodeSampler(classes, 5, 1, 3).num_classes == 8


def test_inconsistent_classes_and_rotation_of_non_square_images_raise() -> None:
    classes = tagged_classes(6)
    with pytest.raises(ValueError, match="uint8"):
        EpisodeSampler(ImageClasses(classes.images.float(), classes.counts, classes.names), 2, 1, 1)
    with pytest.raises(ValueError, match="one entry per class"):
        EpisodeSampler(ImageClasses(classes.images, classes.counts[:5], classes.names), 2, 1, 1)
    wide = ImageClasses(torch.zeros(6, 4, 1, 5, 7, dtype=torch.uint8), torch.full((6,), 4), classes.names)
    with pytest.raises(ValueError, match="square"):
        EpisodeSampler(wide, 2, 1, 1, rotations=True)
    assert EpisodeSampler(wide, 2, 1, 1).sample(3, torch.Generator()).x_query.shape == (3, 2, 1, 5, 7)


def test_generator_device_must_match() -> None:
    assert _same_device(torch.device("cpu"), torch.device("cpu"))
    assert not _same_device(torch.device("cpu"), torch.device("cuda", 0))
    assert not _same_device(torch.device("cuda", 1), torch.device("cuda", 0))
    assert _same_device(torch.device("cuda"), torch.device("cuda", 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_everything_stays_on_the_device() -> None:
    classes = tagged_classes().to("cuda")
    sampler = EpisodeSampler(classes, 5, 1, 5, rotations=True)
    with pytest.raises(ValueError, match="generator is on cpu but the images are on cuda"):
        sampler.sample(2, torch.Generator())
    batch = sampler.sample(8, torch.Generator(device="cuda").manual_seed(0))
    assert all(t.device.type == "cuda" for t in batch)
    cls, _, _ = trace(batch.x_support.cpu())
    assert (cls.sort(1).values.diff(dim=1) > 0).all()


def test_image_classes_subset_and_to() -> None:
    classes = tagged_classes(6, 4, [4, 3, 4, 2, 4, 4])
    sub = classes.subset([3, 0])
    assert sub.names == ["class03", "class00"] and sub.counts.tolist() == [2, 4]
    assert torch.equal(sub.images[0], classes.images[3]) and len(sub) == 2
    mask = torch.tensor([True, False, True, False, False, True])
    assert classes.subset(mask).names == ["class00", "class02", "class05"]
    assert len(classes.subset(torch.tensor([], dtype=torch.int64))) == 0
    with pytest.raises(IndexError, match=r"\[0, 6\)"):
        classes.subset([6])
    moved = classes.to("cpu")
    assert torch.equal(moved.images, classes.images) and moved.names == classes.names
