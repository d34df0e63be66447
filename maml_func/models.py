"""The networks of the MAML paper as plain ``nn.Module``\\ s.

They work outside the library like any module; the library only calls them
through ``functional_call`` with parameter dicts.

Normalization is :class:`TaskBatchNorm`: batch statistics of the current call
at train *and* test time, no running statistics (the transductive setting of
the original MAML; in-place running-stat updates cannot run under ``vmap``).
It calls ``F.batch_norm`` *without* affine weights and applies its own scale and
shift, because ``vmap`` of the double backward of ``F.batch_norm`` with affine
weights gives wrong meta-gradients in torch 2.x (see docs/design.md, "BatchNorm
under vmap", and pytorch/functorch#534); without them the vmapped meta-gradient
matches a per-task loop to rounding error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maml_func import checks

__all__ = ["Conv4", "MLP", "TaskBatchNorm"]


class TaskBatchNorm(nn.Module):
    """Batch normalization over ``dim=0`` and all spatial dims, batch statistics only.

    ``[B, C, *spatial] -> [B, C, *spatial]``; biased variance as in ``nn.BatchNorm2d``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        # The fused kernel normalizes without affine weights (its vmapped double
        # backward is exact that way, unlike with them), and the scale and shift
        # follow as one fused multiply-add: fewer full-size passes than the same
        # maths in plain ops, and every pass (with its backward and double
        # backward) costs memory bandwidth.
        normed = F.batch_norm(x, None, None, training=True, eps=self.eps)
        if self.weight is None:
            return normed
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.bias.view(shape), normed, self.weight.view(shape))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}"


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

    def __init__(
        self,
        n_way: int = 5,
        in_channels: int = 1,
        hidden: int = 64,
        image_size: int = 28,
        pool: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("n_way", n_way), ("in_channels", in_channels), ("hidden", hidden),
                            ("image_size", image_size)):
            checks.integer("Conv4", name, value, minimum=1, expect="a positive int")
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
        # Shapes are known without looking at the data: checking them costs nothing, even under vmap.
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"Conv4: expected images [B, {self.in_channels}, {self.image_size}, {self.image_size}], "
                             f"got {list(x.shape)}; build Conv4(in_channels=..., image_size=...) for these images, "
                             "or resize them (image_size in the config)")
        return self.head(self.features(x).flatten(1))


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
MODELS: dict[str, type[nn.Module]] = {"conv4": Conv4}


def build_model(name: str, *, n_way: int, in_channels: int, image_size: int, hidden: int = 64,
                **options: Any) -> nn.Module:
    """The network ``name`` of :data:`MODELS` for ``n_way``-way tasks of ``in_channels x image_size²`` images.

    ``hidden`` is Conv4's filters per block; ``options`` are the model's own
    keyword arguments (``pool=True`` for Conv4's max-pooling variant).

    Example:
        >>> build_model("conv4", n_way=5, in_channels=3, image_size=84, hidden=32, pool=True).head.in_features
        800
    """
    checks.choice("build_model", "name", name, MODELS, expect=f"one of {sorted(MODELS)}")
    if name == "conv4":
        options = {"hidden": hidden, **options}
    try:
        return MODELS[name](n_way=n_way, in_channels=in_channels, image_size=image_size, **options)
    except TypeError as err:
        raise ValueError(f"build_model: {name} does not accept these options ({err}); fix model_options") from None
