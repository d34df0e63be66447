"""The sinusoid regression task family of MAML (Finn et al. 2017, §5.1).

Each task is ``y = A sin(x - phase)`` with ``A ~ U[0.1, 5]``, ``phase ~ U[0, π]``
and inputs ``x ~ U[-5, 5]``; K support points to adapt on, Q query points to score.
"""

from __future__ import annotations

import math

import torch

from maml_func import checks
from maml_func.tasks import TaskBatch

__all__ = ["sample_sinusoid_tasks"]


def sample_sinusoid_tasks(
    num_tasks: int,
    k_shot: int = 10,
    n_query: int = 10,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> TaskBatch:
    """Sample ``num_tasks`` sinusoid tasks.

    Returns:
        A :class:`TaskBatch` with ``x_*``/``y_*`` of shape ``[T, K, 1]`` / ``[T, Q, 1]``.

    Example:
        >>> import torch
        >>> b = sample_sinusoid_tasks(4, 5, 7, generator=torch.Generator().manual_seed(0))
        >>> b.x_support.shape, b.y_query.shape
        (torch.Size([4, 5, 1]), torch.Size([4, 7, 1]))
    """
    for name, value in (("num_tasks", num_tasks), ("k_shot", k_shot), ("n_query", n_query)):
        checks.integer("sample_sinusoid_tasks", name, value, minimum=1, expect="a positive int")
    gen_device = generator.device if generator is not None else "cpu"

    def uniform(*shape: int, low: float, high: float) -> torch.Tensor:
        u = torch.rand(*shape, generator=generator, device=gen_device, dtype=torch.float64)
        return (low + (high - low) * u).to(device=device, dtype=dtype)

    amplitude = uniform(num_tasks, 1, 1, low=0.1, high=5.0)
    phase = uniform(num_tasks, 1, 1, low=0.0, high=math.pi)
    x = uniform(num_tasks, k_shot + n_query, 1, low=-5.0, high=5.0)
    y = amplitude * torch.sin(x - phase)
    return TaskBatch(x[:, :k_shot], y[:, :k_shot], x[:, k_shot:], y[:, k_shot:])
