"""A meta-batch of few-shot tasks (:class:`TaskBatch`), and the episode sampler that draws them.

Tensors lead with the task axis ``T``; ``vmap`` over the meta-batch maps over it.
:class:`EpisodeSampler` builds a whole meta-batch of N-way K-shot tasks with
index tensors and a single gather on the images' device: no ``DataLoader``, no
Python loop over tasks or classes, no host-device copy.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from maml_func import checks
from maml_func.data.classes import ImageClasses

__all__ = ["EpisodeSampler", "TaskBatch", "crop_and_flip"]


class TaskBatch(NamedTuple):
    """T tasks, each with a support set (to adapt on) and a query set (to score).

    Attributes:
        x_support: ``[T, S, *input_shape]`` (classification: ``S = n_way * k_shot``).
        y_support: ``[T, S]`` int64 labels in ``0..n_way-1``, or ``[T, S, *target_shape]`` targets.
        x_query: ``[T, Q, *input_shape]``.
        y_query: ``[T, Q]`` or ``[T, Q, *target_shape]``.
    """

    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor

    @property
    def num_tasks(self) -> int:
        return self.x_support.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TaskBatch:
        """Move to ``device``; cast floating-point tensors (never integer labels) to ``dtype``."""

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        return TaskBatch(*(move(t) for t in self))

    def split(self, sizes: int | list[int]) -> tuple[TaskBatch, ...]:
        """Split along the task axis (``torch.split`` semantics)."""
        return tuple(TaskBatch(*parts) for parts in zip(*(t.split(sizes) for t in self)))


class EpisodeSampler:
    """Draws meta-batches of N-way K-shot classification tasks from :class:`~maml_func.data.ImageClasses`.

    Per task: ``n_way`` distinct classes, and ``k_shot + n_query`` distinct images
    of each (the first ``k_shot`` form the support set, the rest the query set).
    Labels ``0..n_way-1`` are assigned to the drawn classes in a random order, so
    a label says nothing about which class it is. With ``rotations=True`` each
    class of a task is rotated by a random multiple of 90° (the same for all its
    images): a rotated character is a new class (Santoro et al. 2016; MAML).

    Everything happens on ``classes.images.device``: the classes, images and
    rotations of all tasks are drawn as index tensors from ``generator`` and the
    images are fetched with one ``index_select``. The four rotated copies are
    made once here, so ``rotations=True`` costs four times the images' memory
    and nothing per sample.

    With ``augment=True`` every image of every task (support and query) is
    also randomly cropped and flipped, as the published protocols of the
    ImageNet, CIFAR and CUB benchmarks augment their training images: padded
    with ``crop_padding`` zero pixels on each side, cut back to ``H × W`` at a
    random offset, and mirrored left-right with probability 1/2. The offsets
    and flips are drawn from the same ``generator`` after the tasks, and the
    whole meta-batch is cropped and flipped by one indexing operation on the
    device. Augment meta-training tasks only: validation and test tasks are
    seen as they are.

    Args:
        classes: the images, ``[n_classes, max_per_class, C, H, W]`` uint8, with
            their per-class ``counts``; put them on the device first.
        n_way: classes per task.
        k_shot: support images per class.
        n_query: query images per class.
        rotations: rotate each class of a task by ``k * 90°``, ``k`` random.
        augment: random crop with padding and horizontal flip, per task and image.
        crop_padding: pixels of zero padding for the random crop (4, as the protocols use).

    Raises:
        ValueError: a non-positive ``n_way``/``k_shot``/``n_query``, ``n_way``
            above the number of classes, a class with fewer than
            ``k_shot + n_query`` images (named), or non-square images with
            ``rotations``.

    Example:
        >>> import torch
        >>> from maml_func.data import ImageClasses
        >>> classes = ImageClasses(torch.zeros(10, 20, 1, 28, 28, dtype=torch.uint8), torch.full((10,), 20),
        ...                        [f"c{i}" for i in range(10)])
        >>> batch = EpisodeSampler(classes, n_way=5, k_shot=1, n_query=15).sample(32, torch.Generator())
        >>> batch.x_support.shape, batch.y_query.shape
        (torch.Size([32, 5, 1, 28, 28]), torch.Size([32, 75]))
    """

    def __init__(self, classes: ImageClasses, n_way: int, k_shot: int, n_query: int, *,
                 rotations: bool = False, augment: bool = False, crop_padding: int = 4) -> None:
        name = type(self).__name__
        if not isinstance(classes, ImageClasses):
            raise TypeError(f"{name}: classes must be an ImageClasses (see maml_func.data.load_dataset), "
                            f"got {type(classes).__name__}")
        for arg, value in (("n_way", n_way), ("k_shot", k_shot), ("n_query", n_query)):
            checks.integer(name, arg, value, minimum=1, expect="a positive int")
        checks.flag(name, "augment", augment)
        checks.integer(name, "crop_padding", crop_padding, minimum=0, expect="an int >= 0")
        images, counts = classes.images, classes.counts
        if images.dtype != torch.uint8 or images.dim() != 5:
            raise ValueError(f"{name}: classes.images must be uint8 [n_classes, max_per_class, C, H, W], "
                             f"got {images.dtype} of shape {tuple(images.shape)}")
        n_classes, per_class, channels, height, width = images.shape
        if counts.shape != (n_classes,) or len(classes.names) != n_classes:
            raise ValueError(f"{name}: classes.counts {tuple(counts.shape)} and names ({len(classes.names)}) "
                             f"must have one entry per class of images {tuple(images.shape)}")
        if n_way > n_classes:
            raise ValueError(f"{name}: n_way={n_way} is larger than the number of classes ({n_classes}); "
                             "lower n_way or use a split with more classes")
        need = k_shot + n_query
        count_list = counts.tolist()
        if max(count_list) > per_class:
            raise ValueError(f"{name}: classes.counts has a count of {max(count_list)}, more than the "
                             f"{per_class} image slots per class")
        short = [(c, n) for c, n in zip(classes.names, count_list) if n < need]
        if len(short) == 1:
            raise ValueError(f"{name}: class {short[0][0]!r} has {short[0][1]} images, fewer than k_shot + n_query "
                             f"= {need}; lower n_query (or k_shot), or drop the class with classes.subset(...)")
        if short:
            listed = ", ".join(f"{c!r} ({n})" for c, n in short[:3]) + (", ..." if len(short) > 3 else "")
            raise ValueError(f"{name}: {len(short)} classes have fewer than k_shot + n_query = {need} images: "
                             f"{listed}; lower n_query (or k_shot), or drop them with classes.subset(...)")
        if rotations and height != width:
            raise ValueError(f"{name}: rotations=True needs square images, got {height}x{width}; "
                             "resize them or pass rotations=False")

        self.n_way, self.k_shot, self.n_query, self.rotations = n_way, k_shot, n_query, bool(rotations)
        self.augment, self.crop_padding = augment, crop_padding
        self.num_classes = n_classes
        self.device = images.device
        self._image_shape = (channels, height, width)
        self._per_class = per_class
        # All four rotated copies, made once, so that a rotation is only an offset in the gather index.
        pool = torch.stack([images.rot90(r, dims=(-2, -1)) for r in range(4)]) if rotations else images
        self._pool = pool.reshape(-1, channels, height, width)  # [(4) * n_classes * per_class, C, H, W]
        self._counts = counts.to(device=self.device, dtype=torch.int64)
        self._padded = min(count_list) < per_class
        self._slots = torch.arange(per_class, device=self.device)
        self._y_support = torch.arange(n_way, device=self.device).repeat_interleave(k_shot)
        self._y_query = torch.arange(n_way, device=self.device).repeat_interleave(n_query)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(classes={self.num_classes}, image_shape={self._image_shape}, "
                f"n_way={self.n_way}, k_shot={self.k_shot}, n_query={self.n_query}, "
                f"rotations={self.rotations}, augment={self.augment}, device={self.device})")

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """Draw ``num_tasks`` tasks; the same generator state gives the same batch.

        Args:
            num_tasks: ``T``, tasks in the meta-batch.
            generator: the source of randomness, on the images' device.

        Returns:
            A :class:`TaskBatch`, class-major (all shots of label 0, then label 1, ...):
            ``x_support [T, n_way*k_shot, C, H, W]`` float32 in ``[0, 1]``,
            ``y_support [T, n_way*k_shot]`` int64, ``x_query [T, n_way*n_query, C, H, W]``,
            ``y_query [T, n_way*n_query]``.
        """
        name = f"{type(self).__name__}.sample"
        checks.integer(name, "num_tasks", num_tasks, minimum=1, expect="a positive int")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{name}: generator must be a torch.Generator, got {type(generator).__name__}")
        if not _same_device(generator.device, self.device):
            raise ValueError(f"{name}: generator is on {generator.device} but the images are on {self.device}; "
                             f"pass torch.Generator(device={str(self.device)!r})")
        t, n, k, per_class = num_tasks, self.n_way, self.k_shot, self._per_class
        draw = {"generator": generator, "device": self.device}
        # The n_way largest of i.i.d. keys: distinct classes, in an order independent of the class index.
        cls = torch.rand(t, self.num_classes, **draw).topk(n, dim=1).indices  # [T, N]
        keys = torch.rand(t, n, per_class, **draw)  # [T, N, per_class]
        if self._padded:
            keys.masked_fill_(self._slots >= self._counts[cls].unsqueeze(-1), 2.0)  # padding is never drawn
        slot = keys.topk(k + self.n_query, dim=2, largest=False).indices  # [T, N, K+Q], distinct images
        first = cls * per_class
        if self.rotations:
            first += torch.randint(4, (t, n), **draw) * (self.num_classes * per_class)
        index = first.unsqueeze(2) + slot  # [T, N, K+Q] rows of the pool
        index = torch.cat([index[:, :, :k].reshape(t, -1), index[:, :, k:].reshape(t, -1)], dim=1)
        x = self._pool.index_select(0, index.flatten()).view(t, -1, *self._image_shape)  # [T, N*(K+Q), C, H, W]
        if self.augment:
            x = crop_and_flip(x, self.crop_padding, generator)
        support = n * k
        return TaskBatch(
            x[:, :support].to(torch.float32).div_(255),
            self._y_support.expand(t, -1).clone(),
            x[:, support:].to(torch.float32).div_(255),
            self._y_query.expand(t, -1).clone(),
        )


def crop_and_flip(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Random crop with zero padding and random horizontal flip of every image, in one gather.

    ``x`` is ``[..., C, H, W]``; each image is padded with ``padding`` zero
    pixels per side and cut back to ``H × W`` at an offset drawn uniformly from
    ``0..2*padding`` in each direction, then mirrored left-right with
    probability 1/2. Draws from ``generator`` (on ``x``'s device): the offsets,
    then the flips.

    Example:
        >>> import torch
        >>> x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
        >>> crop_and_flip(x, 0, torch.Generator().manual_seed(0)).shape
        torch.Size([1, 1, 4, 4])
    """
    *lead, channels, height, width = x.shape
    images = x.reshape(-1, channels, height, width)  # [B, C, H, W]
    b, draw = images.shape[0], {"generator": generator, "device": x.device}
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))  # [B, C, H+2p, W+2p]
    offsets = torch.randint(2 * padding + 1, (2, b, 1), **draw)  # [2, B, 1]: rows, columns
    flips = torch.rand(b, 1, **draw) < 0.5  # [B, 1]
    rows = offsets[0] + torch.arange(height, device=x.device)  # [B, H]
    cols = torch.arange(width, device=x.device).expand(b, -1)
    cols = offsets[1] + torch.where(flips, width - 1 - cols, cols)  # [B, W], mirrored where flipped
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).reshape(*lead, channels, height, width)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
