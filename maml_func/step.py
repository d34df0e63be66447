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
from maml_func.algorithms.base import Algorithm
from maml_func.algorithms.pieces import Metrics, merge_buffers
from maml_func.batching import Way
from maml_func.core import MetaParams
from maml_func.diagnosis import is_out_of_memory
from maml_func.distributed import all_reduce_mean, gather_tasks
from maml_func.state import TrainState
from maml_func.tasks import TaskBatch

__all__ = ["MetaStepOutOfMemory", "NonFiniteLossError", "is_out_of_memory", "meta_gradient", "meta_lr_at", "train_step"]



class MetaStepOutOfMemory(MemoryError):
    """A meta-iteration did not fit in memory (host or device); its update was not applied.

    Attributes:
        iteration: the 1-based iteration that did not fit.
        checkpoint: the last checkpoint (``None`` when none was written).
    """

    def __init__(self, message: str, iteration: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.iteration, self.checkpoint = iteration, checkpoint


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
    algorithm: Algorithm, meta: MetaParams, batch: TaskBatch, iteration: int, *, tasks_per_backward: int | None = None,
    way: Way | None = None,
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
            memory grows with ``c``, not with T; a chunked ``way`` only bounds
            the temporaries of one ``vmap`` chunk). The same meta-gradient up
            to rounding; about as fast (each part is still vectorized).
        way: how each part's tasks run (:class:`~maml_func.batching.Way`);
            ``None``: ``Way()``.

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
        loss, metrics = algorithm.meta_loss(meta, part, iteration, way=way)
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
        return torch.zeros((), dtype=torch.float64, device=params[0].device if params else None)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))


class FiniteGuard:
    """The finiteness check of :func:`train_step` kept on the device, read on the host only by :meth:`check`.

    On an accelerator a host read of the loss each iteration (``.item()``)
    makes the host wait for the device every step, so launches and compute no
    longer overlap. With a guard, each step's update is applied with
    ``torch.where`` on a device flag instead: applied only while every step so
    far was finite. After the first non-finite step no update is applied at
    all, so the state stays that of the last good iteration until the caller
    checks (at its logging, saving or stopping points) and stops there.

    Attributes:
        ok: ``[]`` bool, every step so far was finite.
        first_bad: ``[]`` int64, the 1-based iteration of the first non-finite step (0: none).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device)
        self._values = torch.zeros(2, dtype=torch.float64, device=device)  # loss and gradient norm there

    def record(self, finite: Tensor, iteration: int, loss: Tensor, norm: Tensor) -> Tensor:
        """Note step ``iteration`` (1-based); returns whether its update may be applied (device bool)."""
        first = self.ok & ~finite
        self.first_bad = torch.where(first, iteration, self.first_bad)
        self._values = torch.where(first, torch.stack([loss.double(), norm.double()]), self._values)
        self.ok = self.ok & finite
        return self.ok

    def check(self) -> None:
        """Raise :class:`NonFiniteLossError` if a step was not finite (one host read).

        Raises:
            NonFiniteLossError: naming the first non-finite iteration and value; ``checkpoint`` is ``None``.
        """
        if bool(self.ok):
            return
        loss, norm = self._values.tolist()
        iteration = int(self.first_bad)
        what, value = ("meta-loss", loss) if not math.isfinite(loss) else ("meta-gradient", norm)
        raise NonFiniteLossError(f"train_step: the {what} is {value} at iteration {iteration}; the update was not "
                                 "applied", iteration, None, quantity=what, value=value)


def _guarded_step(optimizer: torch.optim.Optimizer, apply: Tensor) -> None:
    """``optimizer.step()``, undone with ``torch.where`` where ``apply`` is false: no host read.

    Parameters and every tensor of the optimizer's state are restored;
    state the step created is restored to zeros, which is Adam's initial state.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [p.detach().clone() for p in params]
    saved_state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)}
                   for p in params}
    optimizer.step()
    with torch.no_grad():
        for p, old in zip(params, saved):
            p.copy_(torch.where(apply, p, old))
        for p in params:
            for key, value in optimizer.state[p].items():
                if torch.is_tensor(value):
                    old = saved_state[id(p)].get(key, torch.zeros_like(value))
                    value.copy_(torch.where(apply.to(value.device), value, old))


def train_step(state: TrainState, batch: TaskBatch, algorithm: Algorithm, *, lr: float,
               tasks_per_backward: int | None = None, guard: FiniteGuard | None = None) -> dict[str, Tensor]:
    """Apply one meta-update to ``state`` from this rank's ``batch``; return the step's metrics.

    The meta-gradient of ``batch`` (:func:`meta_gradient`), run the way
    ``state.execution`` says (:class:`~maml_func.execution.ExecutionPolicy`;
    ``None``: ``Way()``), averaged over the
    ranks with the loss under ``torch.distributed``; then, only if both are
    finite, the optimizer step at step size ``lr``; the model's buffers from
    the tasks' own (:func:`~maml_func.algorithms.base.merge_buffers`, with the
    ``"running"`` BatchNorm policy); and ``state.iteration += 1``.

    Args:
        state: the run's state; changed in place.
        batch: this rank's share of the meta-batch, in the meta-parameters' dtype.
        algorithm: the algorithm ``state.meta`` belongs to.
        lr: the optimizer's step size for this update (see :func:`meta_lr_at`).
        tasks_per_backward: as in :func:`meta_gradient`, for a state without
            an execution policy; a policy has its own
            (:meth:`~maml_func.execution.ExecutionPolicy.tasks_per_backward_for`),
            and a different value here is refused.
        guard: ``None`` checks finiteness on the host now (one device sync)
            and raises before any change. A :class:`FiniteGuard` checks on the
            device without waiting: the update is applied only while every
            step was finite, and ``guard.check()`` raises later (the loop of
            :func:`maml_func.train.fit` does this at its logging, saving and
            stopping points).

    Returns:
        ``{"loss", "grad_norm", "accuracy", "query_loss"}`` of the whole
        meta-batch, ``[]`` float64 tensors on the device: the meta-loss, the
        norm of the meta-gradient, and the post-adaptation query accuracy
        (``nan`` without one) and loss (the meta-loss without one), comparable
        across algorithms (Reptile's objective is a distance).

    Raises:
        NonFiniteLossError: (without ``guard``) the loss or the gradient is
            NaN/inf; ``state`` is unchanged (no optimizer step), ``checkpoint`` is ``None``.
        ValueError: ``tasks_per_backward`` differs from the state's execution policy's.
    """
    params = algorithm.parameters(state.meta)

    def one_meta_gradient(way: Way | None, per_backward: int | None) -> tuple[Tensor, Metrics]:
        return meta_gradient(algorithm, state.meta, batch, state.iteration, tasks_per_backward=per_backward, way=way)

    if state.execution is not None and tasks_per_backward not in (None, state.execution.tasks_per_backward):
        raise ValueError(f"train_step: tasks_per_backward={tasks_per_backward} but the state's execution policy has "
                         f"{state.execution.tasks_per_backward}; give it to the policy "
                         "(ExecutionPolicy(tasks_per_backward=...)) and leave it out here")
    if state.execution is None:
        loss, metrics = one_meta_gradient(None, tasks_per_backward)
    else:  # the policy's way of running the tasks (timing the candidates on the first iterations)
        loss, metrics = state.execution.run(batch, state.device, one_meta_gradient)
    if state.world.size > 1:  # the meta-gradient and loss of the whole meta-batch, on every rank
        loss = loss.detach().to(dtype=batch.x_support.dtype).clone()
        all_reduce_mean([loss, *(p.grad for p in params if p.grad is not None)],
                        what=f"averaging the meta-gradients of iteration {state.iteration + 1}")
        metrics = gather_tasks(metrics)
    norm = _grad_norm(params)
    finite = torch.isfinite(loss) & torch.isfinite(norm)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    if guard is None:
        check = FiniteGuard(finite.device)
        check.record(finite, state.iteration + 1, loss, norm)
        check.check()
        state.optimizer.step()
    else:
        _guarded_step(state.optimizer, guard.record(finite, state.iteration + 1, loss, norm))
    buffers = merge_buffers(metrics)  # the running BatchNorm policy's statistics of this meta-batch
    if buffers:
        state.meta["buffers"].update(buffers)
    state.iteration += 1
    loss = loss.detach().double()
    return {
        "loss": loss,
        "grad_norm": norm,
        "accuracy": metrics["accuracy"].mean().double() if "accuracy" in metrics else torch.full_like(loss, math.nan),
        "query_loss": metrics["loss"].mean().double() if "loss" in metrics else loss,
    }
