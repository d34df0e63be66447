"""One meta-training step: :func:`meta_gradient`, the step size :func:`meta_lr_at`, and :func:`train_step`.

:func:`train_step` is the whole update of one iteration, and the only code
that changes a :class:`~maml_func.state.TrainState`: the meta-gradient of this
rank's tasks, the average over ranks, the guard that no non-finite update is
ever applied, the step size of the schedule, the optimizer step, and the
iteration count. Everything around it (sampling, logging, validation, saving,
stopping) is :func:`maml_func.train.fit`'s.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from maml_func import checks
from maml_func.core import MetaParams
from maml_func.distributed import all_reduce_mean, gather_tasks
from maml_func.state import TrainState
from maml_func.tasks import TaskBatch

__all__ = ["NonFiniteLossError", "meta_gradient", "meta_lr_at", "train_step"]

Metrics = dict[str, Tensor]


class NonFiniteLossError(FloatingPointError):
    """The meta-loss or meta-gradient became NaN/inf; the update was not applied, the bad state not saved.

    Attributes:
        iteration: the 1-based iteration whose update was refused.
        checkpoint: the last good checkpoint (``None`` when none was written).
        quantity: ``"meta-loss"`` or ``"meta-gradient"`` (its norm), whichever is not finite.
        value: its value (``nan`` or ``inf``).
    """

    def __init__(self, message: str, iteration: int, checkpoint: Path | None, *, quantity: str = "meta-loss",
                 value: float = math.nan) -> None:
        super().__init__(message)
        self.iteration, self.checkpoint, self.quantity, self.value = iteration, checkpoint, quantity, value


def meta_gradient(
    algorithm: Any, meta: MetaParams, batch: TaskBatch, iteration: int, *, tasks_per_backward: int | None = None
) -> tuple[Tensor, Metrics]:
    """The meta-loss of ``batch`` and its gradient, left in each meta-tensor's ``.grad``.

    The one place where a meta-gradient is computed, so that a data-parallel
    step can run it on its shard and average the ``.grad``\\ s across ranks.

    Args:
        algorithm: any algorithm of the family (its ``meta_loss`` is a mean over tasks).
        meta: its meta-parameters.
        batch: T tasks.
        iteration: the meta-training step, for algorithms with schedules.
        tasks_per_backward: ``None``: one backward over the whole meta-batch.
            An int ``c`` bounds memory: the meta-batch is cut into parts of at
            most ``c`` tasks, each part's loss (weighted by its share of T) is
            differentiated on its own and the gradients are summed, so the
            autograd graph of at most ``c`` tasks is alive at any time (peak
            memory grows with ``c``, not with T; ``chunk_size`` only bounds the
            temporaries of one ``vmap`` chunk). The same meta-gradient up to
            rounding; about as fast (each part is still vectorized).

    Returns:
        ``(loss [], metrics)``, both detached; ``metrics`` as ``algorithm.meta_loss``'s (per task, ``[T]``).
        Meta-tensors the loss does not depend on get ``.grad = None``.

    Raises:
        ValueError: ``tasks_per_backward`` is not a positive int or ``None``.
    """
    checks.integer("meta_gradient", "tasks_per_backward", tasks_per_backward, minimum=1, none_ok=True,
                   expect="a positive int or None")
    params = algorithm.parameters(meta)
    total = batch.num_tasks
    parts = [batch] if tasks_per_backward is None or tasks_per_backward >= total else batch.split(tasks_per_backward)
    grads: list[Tensor | None] = [None] * len(params)
    losses, all_metrics = [], []
    for part in parts:
        loss, metrics = algorithm.meta_loss(meta, part, iteration)
        if len(parts) > 1:
            loss = loss * (part.num_tasks / total)  # the mean over T tasks is the weighted sum of the parts' means
        for i, g in enumerate(torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                grads[i] = g if grads[i] is None else grads[i] + g
        losses.append(loss.detach())
        all_metrics.append({k: v.detach() for k, v in metrics.items()})
    for p, g in zip(params, grads):
        p.grad = g
    if len(parts) == 1:
        return losses[0], all_metrics[0]
    return torch.stack(losses).sum(), {k: torch.cat([m[k] for m in all_metrics]) for k in all_metrics[0]}


def meta_lr_at(config: Any, iteration: int) -> float:
    """The outer step size of the update from ``iteration`` to ``iteration + 1`` under ``config.lr_schedule``."""
    if config.lr_schedule == "constant":
        return config.meta_lr
    progress = min(iteration / config.iterations, 1.0)
    floor = config.final_lr_factor
    return config.meta_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _grad_norm(params: list[Tensor]) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))


def train_step(state: TrainState, batch: TaskBatch, algorithm: Any, *, lr: float,
               tasks_per_backward: int | None = None) -> dict[str, float]:
    """Apply one meta-update to ``state`` from this rank's ``batch``; return the step's metrics.

    The meta-gradient of ``batch`` (:func:`meta_gradient`), averaged over the
    ranks with the loss under ``torch.distributed``; then, only if both are
    finite, the optimizer step at step size ``lr`` and ``state.iteration += 1``.

    Args:
        state: the run's state; changed in place.
        batch: this rank's share of the meta-batch, in the meta-parameters' dtype.
        algorithm: the algorithm ``state.meta`` belongs to.
        lr: the optimizer's step size for this update (see :func:`meta_lr_at`).
        tasks_per_backward: as in :func:`meta_gradient`.

    Returns:
        ``{"loss", "grad_norm", "accuracy", "query_loss"}`` of the whole meta-batch:
        the meta-loss, the norm of the meta-gradient, and the post-adaptation
        query accuracy (``nan`` without one) and loss (the meta-loss without
        one), comparable across algorithms (Reptile's objective is a distance).

    Raises:
        NonFiniteLossError: the loss or the gradient is NaN/inf; ``state`` is
            unchanged (no optimizer step), ``checkpoint`` is ``None``.
    """
    params = algorithm.parameters(state.meta)
    loss, metrics = meta_gradient(algorithm, state.meta, batch, state.iteration,
                                  tasks_per_backward=tasks_per_backward)
    if state.world.size > 1:  # the meta-gradient and loss of the whole meta-batch, on every rank
        loss = loss.detach().to(dtype=batch.x_support.dtype).clone()
        all_reduce_mean([loss, *(p.grad for p in params if p.grad is not None)],
                        what=f"averaging the meta-gradients of iteration {state.iteration + 1}")
        metrics = gather_tasks(metrics)
    loss_value, norm = loss.item(), _grad_norm(params).item()
    if not (math.isfinite(loss_value) and math.isfinite(norm)):
        what, value = ("meta-loss", loss_value) if not math.isfinite(loss_value) else ("meta-gradient", norm)
        raise NonFiniteLossError(f"train_step: the {what} is {value} at iteration {state.iteration + 1}; the update "
                                 "was not applied", state.iteration + 1, None, quantity=what, value=value)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.optimizer.step()
    state.iteration += 1
    return {
        "loss": loss_value,
        "grad_norm": norm,
        "accuracy": metrics["accuracy"].mean().item() if "accuracy" in metrics else float("nan"),
        "query_loss": metrics["loss"].mean().item() if "loss" in metrics else loss_value,
    }
