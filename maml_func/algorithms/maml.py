"""MAML (Finn et al. 2017): the per-task function and its ``vmap`` over a meta-batch.

Write the per-task function first, batch it second: :meth:`MAML.task_metrics`
adapts the meta-learned initialization to one task's support set and scores
the adapted weights on its query set; :meth:`MAML.meta_loss` runs it for every
task of a :class:`~maml_func.tasks.TaskBatch` in one ``torch.func.vmap`` pass
(``chunk_size`` bounds memory) and averages. ``vectorize=False`` runs the same
per-task function in a Python loop instead, which is what the tests compare
against.

The other algorithms of the family are this one with another inner rule
(Meta-SGD, MAML++ LSLR), another set of adapted parameters (ANIL), first-order
gradients, or another per-task objective (MAML++'s multi-step loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from maml_func.core import MetaParams, Params, accuracy, combine, forward, params_and_buffers, partition
from maml_func.inner import InnerRule, adapt_trajectory, sgd
from maml_func.tasks import TaskBatch

__all__ = ["MAML"]

Metrics = dict[str, Tensor]
_LOSSES = ("cross_entropy", "mse")


@dataclass(frozen=True, eq=False)
class MAML:
    """Model-Agnostic Meta-Learning (Finn et al. 2017), second order by default.

    Args:
        model: the template network (e.g. :class:`~maml_func.Conv4`); never mutated.
        inner_lr: step size of the default inner rule, :func:`~maml_func.sgd`.
        inner_steps: inner updates at meta-training time (evaluation may use more).
        first_order: detach the inner gradients (first-order MAML, §5.2).
        rule: the inner update; defaults to ``sgd(inner_lr)``.
        adapt_only: a predicate on parameter names; only matching parameters are
            adapted in the inner loop, the rest are only meta-trained (ANIL).
            ``None`` adapts all.
        loss: ``"cross_entropy"`` (classification, reports accuracy) or ``"mse"``.
        chunk_size: tasks per vectorized chunk (``vmap(chunk_size=...)``);
            ``None`` runs the whole meta-batch at once. Bounds peak memory.
        vectorize: ``False`` loops over tasks in Python instead of ``vmap``.

    Example:
        >>> import torch
        >>> from maml_func import MAML, MLP, sample_sinusoid_tasks
        >>> maml = MAML(MLP(), inner_lr=0.01, loss="mse")
        >>> meta = maml.init()
        >>> loss, metrics = maml.meta_loss(meta, sample_sinusoid_tasks(8))
        >>> loss.backward()   # meta-gradients land in meta["model"][name].grad
    """

    model: nn.Module
    inner_lr: float = 0.4
    inner_steps: int = 1
    first_order: bool = False
    rule: InnerRule | None = None
    adapt_only: Callable[[str], bool] | None = None
    loss: str = "cross_entropy"
    chunk_size: int | None = None
    vectorize: bool = True
    _rule: InnerRule = field(init=False, repr=False)

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"{name}: model must be an nn.Module, got {type(self.model).__name__}")
        if not isinstance(self.inner_steps, int) or isinstance(self.inner_steps, bool) or self.inner_steps < 0:
            raise ValueError(f"{name}: inner_steps must be a non-negative int, got {self.inner_steps!r}")
        if self.loss not in _LOSSES:
            raise ValueError(f"{name}: loss must be one of {_LOSSES}, got {self.loss!r}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"{name}: chunk_size must be a positive int or None, got {self.chunk_size!r}")
        object.__setattr__(self, "_rule", self.rule if self.rule is not None else sgd(self.inner_lr))

    # ----------------------------------------------------------------- set-up
    def init(self) -> MetaParams:
        """Fresh meta-parameters: the model's initialization and the rule's own.

        Returns:
            ``{"model": Params, "rule": Params}``, all leaves with ``requires_grad``.
        """
        params, _ = params_and_buffers(self.model)
        adapted, _ = self._split(params)
        rule_params = {
            k: v.detach().clone().requires_grad_(True) for k, v in self._rule.init(adapted, self.inner_steps).items()
        }
        return {"model": params, "rule": rule_params}

    def parameters(self, meta: MetaParams) -> list[Tensor]:
        """Every meta-learned tensor, for an optimizer: ``Adam(maml.parameters(meta))``."""
        return [*meta["model"].values(), *meta["rule"].values()]

    # -------------------------------------------------------------- one task
    def _split(self, params: Params) -> tuple[Params, Params]:
        if self.adapt_only is None:
            return dict(params), {}
        adapted, frozen = partition(params, self.adapt_only)
        if not adapted:
            raise ValueError(f"{type(self).__name__}: adapt_only matches no parameter of the model "
                             f"(names are {sorted(params)[:6]}...); fix the predicate")
        return adapted, frozen

    def _objective(self, out: Tensor, target: Tensor) -> Tensor:
        if self.loss == "cross_entropy":
            return F.cross_entropy(out, target)
        return F.mse_loss(out, target)

    def _score(self, params: Params, x: Tensor, y: Tensor) -> Metrics:
        out = forward(self.model, params, dict(self.model.named_buffers()), x)
        metrics = {"loss": self._objective(out, y)}
        if self.loss == "cross_entropy":
            metrics["accuracy"] = accuracy(out, y)
        return metrics

    def trajectory(self, meta: MetaParams, x_support: Tensor, y_support: Tensor, steps: int | None = None) -> list[Params]:
        """Full params after 0..``steps`` inner updates on one task's support set.

        ``x_support: [S, *input_shape]``, ``y_support: [S]``; returns ``steps + 1`` dicts.
        """
        adapted, frozen = self._split(meta["model"])
        buffers = dict(self.model.named_buffers())

        def support_loss(p: Params) -> Tensor:
            return self._objective(forward(self.model, combine(p, frozen), buffers, x_support), y_support)

        steps = self.inner_steps if steps is None else steps
        path = adapt_trajectory(
            support_loss, adapted, rule=self._rule, rule_params=meta["rule"], steps=steps, first_order=self.first_order
        )
        return [combine(p, frozen) for p in path]

    def adapt(self, meta: MetaParams, x_support: Tensor, y_support: Tensor, steps: int | None = None) -> Params:
        """Adapted full params for one task (``steps`` defaults to ``inner_steps``)."""
        return self.trajectory(meta, x_support, y_support, steps)[-1]

    def task_metrics(
        self, meta: MetaParams, x_support: Tensor, y_support: Tensor, x_query: Tensor, y_query: Tensor, iteration: int = 0
    ) -> Metrics:
        """Adapt on one task's support set, score on its query set.

        Shapes: ``x_support [S, ...]``, ``y_support [S]``, ``x_query [Q, ...]``,
        ``y_query [Q]``. Returns ``{"loss": [], "accuracy": []}`` (no accuracy for
        ``loss="mse"``); ``"loss"`` is what is meta-trained. ``iteration`` (the
        meta-training step) is unused here; schedules such as MAML++'s read it.
        """
        return self._score(self.adapt(meta, x_support, y_support), x_query, y_query)

    # -------------------------------------------------------------- T tasks
    def _batched(self, fn: Callable[..., Metrics], meta: MetaParams, batch: TaskBatch) -> Metrics:
        """Run a per-task ``fn(meta, xs, ys, xq, yq)`` over every task: ``vmap`` or a loop."""
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"{type(self).__name__}: expected a TaskBatch, got {type(batch).__name__}")
        if self.vectorize:
            return vmap(fn, in_dims=(None, 0, 0, 0, 0), chunk_size=self.chunk_size)(meta, *batch)
        per_task = [fn(meta, *task) for task in zip(*batch)]
        return {k: torch.stack([m[k] for m in per_task]) for k in per_task[0]}

    def meta_loss(self, meta: MetaParams, batch: TaskBatch, iteration: int = 0) -> tuple[Tensor, Metrics]:
        """The meta-objective of a meta-batch: mean query loss after adaptation.

        Args:
            meta: meta-parameters from :meth:`init`.
            batch: T tasks.
            iteration: the meta-training step, for algorithms with schedules.

        Returns:
            ``(loss [], metrics)`` with per-task ``metrics["loss"]`` / ``["accuracy"]`` of shape ``[T]``.
            ``loss.backward()`` leaves meta-gradients in the ``.grad`` of ``meta``'s tensors.
        """

        def fn(meta: MetaParams, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Metrics:
            return self.task_metrics(meta, xs, ys, xq, yq, iteration)

        metrics = self._batched(fn, meta, batch)
        return metrics["loss"].mean(), metrics

    def evaluate(self, meta: MetaParams, batch: TaskBatch, steps: int | None = None) -> Metrics:
        """Query loss and accuracy after each of 0..``steps`` inner updates.

        Returns:
            ``{"loss": [T, steps+1], "accuracy": [T, steps+1]}``. Wrap in
            ``torch.no_grad()`` when no meta-gradient is wanted (the inner
            ``grad`` still works there).
        """
        steps = self.inner_steps if steps is None else steps

        def fn(meta: MetaParams, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Metrics:
            scores = [self._score(p, xq, yq) for p in self.trajectory(meta, xs, ys, steps)]
            return {k: torch.stack([s[k] for s in scores]) for k in scores[0]}

        return self._batched(fn, meta, batch)
