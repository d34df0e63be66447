"""Networks a user brings, for the tests: importable as ``_user_models:small_cnn`` with ``tests/`` on the path."""

from __future__ import annotations

from torch import nn


def small_cnn(n_way: int = 5, in_channels: int = 1, hidden: int = 8) -> nn.Sequential:
    """Two stride-2 convolutions, global average pooling and a linear head; no normalization layer.

    ``[B, in_channels, H, W] -> [B, n_way]`` for any ``H, W``.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, n_way),
    )


def not_a_network(size: int = 3) -> nn.Module:
    """A factory that says it makes a network and returns something else."""
    return [0] * size  # type: ignore[return-value]


def unannotated(n_way=5):  # noqa: ANN001, ANN201 - what a factory without a declared return looks like
    return small_cnn(n_way)
