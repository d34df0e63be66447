"""The networks of the MAML paper, and the ResNet-12 of later work, as plain ``nn.Module``\\ s.

They work outside the library like any module; the library only calls them
through ``functional_call`` with parameter dicts.

Normalization is :class:`~maml_func.normalization.TaskBatchNorm`: batch
statistics of the current call at train *and* test time, no running statistics
by default (the transductive setting of the original MAML; the ``batch_norm``
policy of the algorithms can add them). It applies its scale and shift outside
``F.batch_norm``, which keeps the vmapped second-order meta-gradient exact
(:mod:`maml_func.normalization` says why).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maml_func import checks
from maml_func.normalization import TaskBatchNorm

__all__ = ["MODELS", "Conv4", "DropBlock", "MLP", "ResNet12", "TaskBatchNorm", "build_model"]


def _positive(where: str, **sizes: int) -> None:
    for name, value in sizes.items():
        checks.integer(where, name, value, minimum=1, expect="a positive int")


def _check_images(where: str, x: Tensor, in_channels: int, image_size: int | None) -> None:
    """Refuse images of the wrong shape; ``image_size=None``: any square or not at least 16 pixels a side."""
    # Shapes are known without looking at the data: checking them costs nothing, even under vmap.
    if image_size is None:
        if x.dim() != 4 or x.shape[1] != in_channels or min(x.shape[-2:]) < 16:
            raise ValueError(f"{where}: expected images [B, {in_channels}, H, W] with H, W >= 16, got "
                             f"{list(x.shape)}; build {where}(in_channels=...) for these images")
        return
    if x.dim() != 4 or tuple(x.shape[1:]) != (in_channels, image_size, image_size):
        raise ValueError(f"{where}: expected images [B, {in_channels}, {image_size}, {image_size}], got "
                         f"{list(x.shape)}; build {where}(in_channels=..., image_size=...) for these images, or "
                         "resize them (image_size in the config)")


class Conv4(nn.Module):
    """The 4-block convolutional network of MAML (Finn et al. 2017; Vinyals et al. 2016).

    ``[B, in_channels, H, W] -> [B, n_way]`` logits. Each block is
    3×3 conv → :class:`TaskBatchNorm` → ReLU, and halves the resolution:

    - ``pool=False`` (Omniglot): stride-2 convolutions, ``hidden=64``.
    - ``pool=True`` (miniImageNet, 84×84 RGB): stride-1 convolutions followed by
      2×2 max-pooling; the paper uses ``hidden=32``.

    Example:
        >>> import torch
        >>> Conv4(n_way=5)(torch.zeros(10, 1, 28, 28)).shape
        torch.Size([10, 5])
    """

    def __init__(self, n_way: int = 5, in_channels: int = 1, hidden: int = 64, image_size: int = 28,
                 pool: bool = False) -> None:
        super().__init__()
        _positive("Conv4", n_way=n_way, in_channels=in_channels, hidden=hidden, image_size=image_size)
        blocks: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(4):
            conv = nn.Conv2d(channels, hidden, 3, stride=1 if pool else 2, padding=1)
            block = [conv, TaskBatchNorm(hidden), nn.ReLU()]
            if pool:
                block.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*block))
            channels, size = hidden, (size + 1) // 2 if not pool else size // 2
        if size < 1:
            raise ValueError(f"Conv4: image_size={image_size} is too small for 4 halvings; use at least 16")
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(hidden * size * size, n_way)
        self.in_channels, self.image_size = in_channels, image_size

    def forward(self, x: Tensor) -> Tensor:
        _check_images("Conv4", x, self.in_channels, self.image_size)
        return self.head(self.features(x).flatten(1))


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018): zero random ``block_size``-square patches of a feature map, rescale the rest.

    ``[B, C, H, W] -> [B, C, H, W]``. Active only while ``self.training`` and
    ``drop_rate > 0``; otherwise the identity, with no random draw at all.

    Randomness: the patch centres come from torch's global random number
    generator; the library's ``vmap`` over tasks draws them separately for
    every task (``randomness="different"``), and a training run seeds and
    checkpoints that generator, so runs repeat and resume exactly.
    """

    def __init__(self, drop_rate: float = 0.0, block_size: int = 5) -> None:
        super().__init__()
        checks.number("DropBlock", "drop_rate", drop_rate, minimum=0, maximum=0.99)
        checks.integer("DropBlock", "block_size", block_size, minimum=1, expect="a positive int")
        self.drop_rate, self.block_size = float(drop_rate), block_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_rate == 0:
            return x
        size = min(self.block_size, x.shape[-1], x.shape[-2])
        valid = (x.shape[-2] - size + 1) * (x.shape[-1] - size + 1)
        # Centres drawn where a whole block fits, at the rate that drops drop_rate of the units on average.
        gamma = self.drop_rate * x.shape[-2] * x.shape[-1] / (size * size * valid)
        centres = (torch.rand(*x.shape[:-2], x.shape[-2] - size + 1, x.shape[-1] - size + 1, device=x.device,
                              dtype=x.dtype) < gamma).to(x.dtype)
        pad = size - 1
        blocks = F.max_pool2d(F.pad(centres, (pad, pad, pad, pad)), size, stride=1)  # [B, C, H, W]
        keep = 1 - blocks
        return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, block_size={self.block_size}"


class _ResidualBlock(nn.Module):
    """Three 3×3 conv → TaskBatchNorm (→ LeakyReLU 0.1) with a 1×1 conv shortcut, LeakyReLU, 2×2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int, dropblock: DropBlock | None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False),
                       TaskBatchNorm(out_channels)]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), TaskBatchNorm(out_channels))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))
        self.dropblock = dropblock

    def forward(self, x: Tensor) -> Tensor:
        y = self.out(self.body(x) + self.shortcut(x))
        return self.dropblock(y) if self.dropblock is not None else y


class ResNet12(nn.Module):
    """The ResNet-12 of TADAM (Oreshkin et al. 2018) and MetaOptNet (Lee et al. 2019).

    ``[B, in_channels, H, W] -> [B, n_way]`` logits. Four residual blocks of
    ``widths`` filters (each: three 3×3 conv → :class:`TaskBatchNorm` →
    LeakyReLU 0.1, the last without its activation, plus a 1×1 conv →
    TaskBatchNorm shortcut; then LeakyReLU and 2×2 max-pooling), global average
    pooling and a linear ``head`` (the part ANIL adapts). Convolutions have no
    bias: each is followed by a batch norm. Batch statistics only, as
    everywhere in the library, so the vmapped second-order meta-gradient is
    exact (docs/design.md, "BatchNorm under vmap").

    It takes images of any size of at least 16 pixels a side (the features are
    pooled globally); ``image_size`` names the usual one (84) and is checked
    only to be at least 16.

    ``drop_rate > 0`` adds :class:`DropBlock` (``dropblock_size`` squares) after
    the last two blocks, as MetaOptNet does; off by default, and then the
    network has no random operation.

    Example:
        >>> import torch
        >>> ResNet12(n_way=5, widths=(8, 8, 16, 16), image_size=32)(torch.zeros(4, 3, 32, 32)).shape
        torch.Size([4, 5])
    """

    def __init__(self, n_way: int = 5, in_channels: int = 3, image_size: int = 84,
                 widths: Sequence[int] = (64, 160, 320, 640), drop_rate: float = 0.0, dropblock_size: int = 5) -> None:
        super().__init__()
        _positive("ResNet12", n_way=n_way, in_channels=in_channels, image_size=image_size)
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or len(widths) != 4:
            checks.fail("ResNet12", "widths", "four ints, one per residual block (e.g. [64, 160, 320, 640])", widths)
        for width in widths:
            checks.integer("ResNet12", "widths", width, minimum=1, expect="four positive ints")
        if image_size < 16:
            raise ValueError(f"ResNet12: image_size={image_size} is too small for 4 halvings; use at least 16")
        blocks = []
        channels = in_channels
        for i, width in enumerate(widths):
            drop = DropBlock(drop_rate, dropblock_size) if drop_rate > 0 and i >= 2 else None
            blocks.append(_ResidualBlock(channels, width, drop))
            channels = width
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, n_way)
        self.in_channels, self.image_size, self.widths = in_channels, image_size, tuple(widths)

    def forward(self, x: Tensor) -> Tensor:
        # Global average pooling: any image size with four halvings works (image_size only documents the usual one).
        _check_images("ResNet12", x, self.in_channels, None)
        return self.head(self.features(x).mean(dim=(-2, -1)))


class MLP(nn.Module):
    """A fully connected ReLU network, ``[B, in_features] -> [B, out_features]``.

    The default (1 → 40 → 40 → 1) is the sinusoid regression network of MAML.

    Example:
        >>> import torch
        >>> MLP()(torch.zeros(7, 1)).shape
        torch.Size([7, 1])
    """

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1) -> None:
        super().__init__()
        sizes = [in_features, *hidden, out_features]
        for s in sizes:
            checks.integer("MLP", "layer size", s, minimum=1, expect="a positive int")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


#: The networks :func:`build_model` makes, by name (``TrainConfig.model``).
MODELS: dict[str, type[nn.Module]] = {"conv4": Conv4, "resnet12": ResNet12}


def build_model(name: str, *, n_way: int, in_channels: int, image_size: int, hidden: int = 64,
                **options: Any) -> nn.Module:
    """The network ``name`` of :data:`MODELS` for ``n_way``-way tasks of ``in_channels x image_size²`` images.

    ``hidden`` is Conv4's filters per block; ``options`` are the model's own
    keyword arguments (``pool=True`` for Conv4's max-pooling variant;
    ``widths=[16, 32, 64, 128]`` or ``drop_rate=0.1`` for ResNet12).

    Example:
        >>> build_model("conv4", n_way=5, in_channels=3, image_size=84, hidden=32, pool=True).head.in_features
        800
        >>> build_model("resnet12", n_way=5, in_channels=3, image_size=84, widths=[16, 32, 64, 128]).head.in_features
        128
    """
    checks.choice("build_model", "name", name, MODELS, expect=f"one of {sorted(MODELS)}")
    if name == "conv4":
        options = {"hidden": hidden, **options}
    try:
        return MODELS[name](n_way=n_way, in_channels=in_channels, image_size=image_size, **options)
    except TypeError as err:
        raise ValueError(f"build_model: {name} does not accept these options ({err}); fix model_options") from None
