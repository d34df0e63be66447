"""A meta-batch of few-shot tasks (:class:`TaskBatch`).

Tensors lead with the task axis ``T``; ``vmap`` over the meta-batch maps over it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["TaskBatch"]


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
