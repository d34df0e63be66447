"""The textbook MAML computation, one task at a time: the yardstick for the vectorized path.

Why it exists. The library computes a meta-batch in one ``torch.func.vmap``
pass over a per-task function built on :func:`torch.func.grad`. A claim that
this is exact needs something to be exact *against*, and that something must
not share the code it checks. This module is that reference: a Python loop
over the tasks of a :class:`~maml_func.tasks.TaskBatch`, the model called with
:func:`torch.func.functional_call`, the inner gradients taken with
``torch.autograd.grad(create_graph=not first_order)``, one mean over the query
losses. It is how per-task-loop MAML libraries compute the meta-loss, and it
imports nothing from the library's functional core (no ``vmap``, no
:mod:`maml_func.inner`). Two places measure against it:

- the float64 equality tests (``tests/test_core.py``, ``tests/test_throughput.py``):
  the vectorized meta-gradient must match :func:`loop_meta_grad` to 1e-10
  relative on the norm of all gradients together (``docs/design.md``, "BatchNorm
  under vmap", says why that tolerance and not a looser or per-tensor one);
- the ``loop`` row of ``benchmarks/throughput.py``: the speed of the vectorized
  path is reported as a multiple of :func:`loop_meta_loss` on the same network.

It is slow by construction (one forward and one backward per task and step)
and never on the training path.

Shapes, for a meta-batch of ``T`` tasks with ``S`` support and ``Q`` query examples::

    batch.x_support [T, S, *input]   batch.y_support [T, S] (labels) or [T, S, *target]
    batch.x_query   [T, Q, *input]   batch.y_query   [T, Q] or [T, Q, *target]
    loop_task_losses(...) -> [T]     loop_meta_loss(...) -> []     loop_meta_grad(...) -> one tensor per parameter

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from maml_func import MLP, sample_sinusoid_tasks
    >>> from maml_func.reference import loop_meta_grad, loop_meta_loss
    >>> model = MLP()
    >>> params = dict(model.named_parameters())
    >>> batch = sample_sinusoid_tasks(4, generator=torch.Generator().manual_seed(0))
    >>> loss = loop_meta_loss(model, params, batch, inner_lr=0.01, steps=1, loss_fn=F.mse_loss)
    >>> loss.shape
    torch.Size([])
    >>> grads = loop_meta_grad(model, params, batch, inner_lr=0.01, steps=1, loss_fn=F.mse_loss)
    >>> [g.shape for g in grads] == [p.shape for p in params.values()]
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from maml_func import checks
from maml_func.core import Params
from maml_func.tasks import TaskBatch

__all__ = ["LearningRate", "loop_meta_grad", "loop_meta_loss", "loop_task_losses"]

LossFn = Callable[[Tensor, Tensor], Tensor]
#: A fixed step size, or ``rate(name, step) -> Tensor``: the rate of parameter
#: ``name`` at inner step ``step`` (0-based), for learned rates (Meta-SGD: one
#: per element; MAML++ LSLR: one per tensor and step).
LearningRate = float | Callable[[str, int], Tensor | float]


def loop_task_losses(
    model: nn.Module,
    params: Params,
    batch: TaskBatch,
    *,
    inner_lr: LearningRate,
    steps: int,
    first_order: bool = False,
    loss_fn: LossFn = F.cross_entropy,
    step_weights: Sequence[float] | None = None,
) -> Tensor:
    """The query loss of every task after ``steps`` inner SGD steps on its support set, ``[T]``.

    Task by task: start from ``params``, take ``steps`` steps of
    ``p <- p - inner_lr * dL_support/dp`` with ``torch.autograd.grad`` (the
    graph through the gradient kept unless ``first_order``), then score the
    adapted weights on the query set with ``loss_fn``.

    Args:
        model: the network, used only as a template through ``functional_call``;
            each task runs on its own copy of the model's buffers, threaded
            through its forwards.
        params: the meta-parameters, ``{name: tensor}``; the result is
            differentiable with respect to them.
        batch: ``T`` tasks (see the module docstring for shapes).
        inner_lr: the inner step size, or ``rate(name, step)`` for learned rates.
        steps: inner steps per task, ``>= 0`` (0: the unadapted query loss).
        first_order: take the inner gradients without ``create_graph`` (first-order MAML).
        loss_fn: ``loss_fn(output, target) -> scalar``, for the support and the query loss.
        step_weights: ``None`` for the query loss after the last step; otherwise
            one weight per step, and a task's loss is ``sum_s step_weights[s] *
            query loss after step s + 1`` (MAML++'s multi-step loss).

    Returns:
        ``[T]``, one query loss per task.
    """
    steps = checks.integer("loop_task_losses", "steps", steps, minimum=0)
    if not callable(inner_lr):
        checks.number("loop_task_losses", "inner_lr", inner_lr)
    if step_weights is not None and len(step_weights) != steps:
        raise ValueError(
            f"loop_task_losses: step_weights must have one weight per inner step ({steps}), "
            f"got {len(step_weights)}: {list(step_weights)!r}"
        )
    names = list(params)
    losses = []
    for xs, ys, xq, yq in zip(*batch):
        fast = [params[n] for n in names]
        # Each task its own copy of the buffers, threaded through its forwards (the template is never written).
        buffers = {k: v.detach().clone() for k, v in model.named_buffers()}

        def run(x: Tensor) -> Tensor:
            return functional_call(model, (dict(zip(names, fast)), buffers), (x,))

        task_loss: Tensor | float = 0.0
        for step in range(steps):
            support = loss_fn(run(xs), ys)
            grads = torch.autograd.grad(support, fast, create_graph=not first_order)
            if callable(inner_lr):
                fast = [p - inner_lr(n, step) * g for n, p, g in zip(names, fast, grads)]
            else:
                fast = [p - inner_lr * g for p, g in zip(fast, grads)]
            if step_weights is not None:
                query = loss_fn(run(xq), yq)
                task_loss = task_loss + step_weights[step] * query
        if step_weights is None:
            task_loss = loss_fn(run(xq), yq)
        losses.append(task_loss)
    return torch.stack(losses)


def loop_meta_loss(model: nn.Module, params: Params, batch: TaskBatch, **options: Any) -> Tensor:
    """The MAML meta-loss (Finn et al. 2017, Algorithm 2): the mean over tasks of :func:`loop_task_losses`, ``[]``.

    Keyword options as for :func:`loop_task_losses` (``inner_lr`` and ``steps``
    required). ``loop_meta_loss(...).backward()`` gives the meta-gradient in
    ``params``' ``.grad``; :func:`loop_meta_grad` returns it instead.
    """
    return loop_task_losses(model, params, batch, **options).mean()


def loop_meta_grad(model: nn.Module, params: Params, batch: TaskBatch, **options: Any) -> tuple[Tensor, ...]:
    """The meta-gradient of :func:`loop_meta_loss`, one tensor per entry of ``params``, in its order.

    Options as for :func:`loop_task_losses`; every tensor of ``params`` must
    require gradients. ``.grad`` fields are left alone.
    """
    return torch.autograd.grad(loop_meta_loss(model, params, batch, **options), list(params.values()))
