"""MAML (Finn et al. 2017): the per-task function and its ``vmap`` over a meta-batch.

Write the per-task function first, batch it second: :meth:`MAML.task_metrics`
adapts the meta-learned initialization to one task's support set and scores
the adapted weights on its query set; :meth:`MAML.meta_loss` runs it for every
task of a :class:`~maml_func.tasks.TaskBatch` with
:func:`maml_func.batching.map_tasks` (one ``torch.func.vmap`` pass,
``chunk_size`` bounds memory) and averages. ``vectorize=False`` runs the same
per-task function in a Python loop instead, which is what the tests compare
against.

The other algorithms of the family are this one with another inner rule
(Meta-SGD, MAML++ LSLR), another set of adapted parameters (ANIL), first-order
gradients, or another per-task objective (MAML++'s multi-step loss, with the
weights of :func:`multi_step_weights`): options of one dataclass, composed,
rather than a subclass per paper. Reptile, whose outer update is not the
gradient of a query loss, is its own small class
(:class:`~maml_func.algorithms.reptile.Reptile`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from torch import Tensor, nn

from maml_func import checks
from maml_func.algorithms.adjoint import BACKPROPS, adjoint_trajectory
from maml_func.algorithms.base import (
    Metrics, check_options, evaluate_paths, init_meta, map_algorithm, meta_buffers, meta_parameters, model_loss,
    random_layers,
    resolve_rule, score, with_buffers,
)
from maml_func.core import MetaParams, Params, combine, partition
from maml_func.inner import InnerRule, adapt_trajectory
from maml_func.normalization import at_step, running_statistics, stack_per_step, with_step
from maml_func.tasks import TaskBatch

__all__ = ["MAML", "multi_step_weights"]

# MAML++'s reference implementation floors the weight of every non-final step
# at 0.03 / steps while annealing, so early steps never drop out abruptly.
_MIN_STEP_WEIGHT = 0.03
_DEFAULT_INNER_LR = 0.4
_CHECKPOINT_EVERY = 2


def multi_step_weights(steps: int, iteration: int, anneal_iterations: int) -> list[float]:
    """Weights of the query losses after inner steps 1..``steps`` (MAML++'s multi-step loss).

    Antoniou et al. 2019, §4 "multi-step loss optimization": start uniform
    (``1/steps`` each); every meta-iteration the non-final weights shrink
    linearly, by ``1/steps`` over ``anneal_iterations`` iterations, down to a
    floor of ``0.03/steps``, and the final weight takes up the rest, so the sum
    is always 1. From ``iteration >= anneal_iterations`` on only the final step
    counts (``[0, ..., 0, 1]``), as in the paper, where the multi-step loss is
    used for the first epochs only.

    Args:
        steps: inner steps (length of the result), at least 1.
        iteration: the meta-training iteration, 0-based.
        anneal_iterations: iterations over which the weights move to the last step.

    Returns:
        ``steps`` floats that sum to 1.

    Example:
        >>> multi_step_weights(4, 0, 100)
        [0.25, 0.25, 0.25, 0.25]
        >>> multi_step_weights(4, 100, 100)
        [0.0, 0.0, 0.0, 1.0]
    """
    checks.integer("multi_step_weights", "steps", steps, minimum=1, expect="a positive int")
    checks.integer("multi_step_weights", "iteration", iteration, minimum=0)
    checks.integer("multi_step_weights", "anneal_iterations", anneal_iterations, minimum=0)
    if iteration >= anneal_iterations:
        return [0.0] * (steps - 1) + [1.0]
    start, floor = 1.0 / steps, _MIN_STEP_WEIGHT / steps
    early = max(start - iteration * start / anneal_iterations, floor)
    return [early] * (steps - 1) + [1.0 - early * (steps - 1)]


@dataclass(frozen=True, eq=False)
class MAML:
    """Model-Agnostic Meta-Learning (Finn et al. 2017), second order by default.

    Args:
        model: the template network (e.g. :class:`~maml_func.Conv4`); never mutated.
        inner_lr: inner step size. Without ``rule``, the step size of
            :func:`~maml_func.sgd` (default 0.4); with a ``rule``, read from it
            (``rule.lr``), so leave it out or give the same value.
        inner_steps: inner updates at meta-training time (evaluation may use more).
        first_order: detach the inner gradients (first-order MAML, §5.2).
        rule: the inner update; defaults to ``sgd(inner_lr)``.
        adapt_only: a predicate on parameter names; only matching parameters are
            adapted in the inner loop, the rest are only meta-trained (ANIL).
            ``None`` adapts all.
        loss: ``"cross_entropy"`` (classification, reports accuracy) or ``"mse"``.
        chunk_size: tasks per vectorized chunk (``vmap(chunk_size=...)``);
            ``None`` runs the whole meta-batch at once. ``"auto"`` (default):
            the whole meta-batch on an accelerator; on the CPU, chunks of about
            1 MiB of task inputs (4 tasks of Omniglot 5-way 1-shot, 15
            queries), small enough for glibc to reuse memory instead of
            page-faulting it in anew even when it is not tuned
            (:func:`maml_func.batching.auto_chunk_size`). Bounds the
            temporaries of a chunk, not the autograd graph (see
            ``maml_func.meta_gradient``'s ``tasks_per_backward``).
        vectorize: ``False`` loops over tasks in Python instead of ``vmap``.
            On the CPU the vectorized path calls
            :func:`maml_func.system.auto_tune_malloc` on first use (glibc then
            keeps freed memory for the process's lifetime; same results).
        multi_step_iterations: ``None`` meta-trains the query loss after the
            last inner step. An int turns on MAML++'s multi-step loss: the
            query losses after every inner step, weighted by
            :func:`multi_step_weights`, which reach the last step alone after
            this many meta-iterations (read from ``meta_loss``'s ``iteration``).
        first_order_iterations: derivative-order annealing (MAML++): first-order
            inner gradients for meta-iterations ``0..first_order_iterations-1``,
            second order after (unless ``first_order``). 0 turns it off.
        backprop: how the second-order meta-gradient is taken. ``"unroll"``
            (default): autograd through the recorded inner loop, whose memory
            grows with ``inner_steps``. ``"adjoint"``: the inner loop keeps only
            its parameters and the meta-backward recomputes one step at a time
            (:mod:`maml_func.algorithms.adjoint`): the same meta-gradient up to
            rounding, the activation memory of one inner step whatever
            ``inner_steps``, one more support forward and backward per step.
            First-order steps are the same computation either way.
        checkpoint_every: with ``backprop="adjoint"``, the inner loop's
            parameters are kept after every this many steps and the backward
            re-runs the steps in between (:func:`~maml_func.algorithms.adjoint.adjoint_trajectory`):
            1 keeps one parameter set per task and step (the fastest), larger
            values trade time (``(k-1)/k`` of a support gradient per step)
            for that memory.
        batch_norm: how BatchNorm layers normalize, one of
            :data:`~maml_func.normalization.BATCH_NORM_POLICIES`: ``"batch"``
            (default; batch statistics at meta-train and meta-test),
            ``"running"`` (running statistics accumulated from the meta-batch,
            used in eval mode) or ``"per_step"`` (MAML++: a set of running
            statistics per inner step; ``backprop="unroll"`` only);
            :mod:`maml_func.normalization` gives the rules.
            The model's normalization layers run in their exact form
            (:func:`~maml_func.normalization.exact_model`, applied here: see
            ``maml.model``).

    Example:
        >>> import torch
        >>> from maml_func import MAML, MLP, lslr, sample_sinusoid_tasks
        >>> maml = MAML(MLP(), inner_lr=0.01, loss="mse")
        >>> meta = maml.init()
        >>> loss, metrics = maml.meta_loss(meta, sample_sinusoid_tasks(8))
        >>> loss.backward()   # meta-gradients land in meta["model"][name].grad
        >>> MAML(MLP(), rule=lslr(0.1), loss="mse").inner_lr
        0.1
    """

    model: nn.Module
    inner_lr: float | None = None
    inner_steps: int = 1
    first_order: bool = False
    rule: InnerRule | None = None
    adapt_only: Callable[[str], bool] | None = None
    loss: str = "cross_entropy"
    chunk_size: int | str | None = "auto"
    vectorize: bool = True
    multi_step_iterations: int | None = None
    first_order_iterations: int = 0
    backprop: str = "unroll"
    checkpoint_every: int = _CHECKPOINT_EVERY
    batch_norm: str = "batch"
    _rule: InnerRule = field(init=False, repr=False)
    #: The buffers kept once per inner step (``batch_norm="per_step"``); none otherwise. Found once, here.
    _stepped: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "model", check_options(name, self.model, self.inner_steps, self.loss,
                                                        self.chunk_size, self.batch_norm))
        checks.integer(name, "multi_step_iterations", self.multi_step_iterations, minimum=0, none_ok=True)
        if self.multi_step_iterations is not None and self.inner_steps < 1:
            raise ValueError(f"{name}: the multi-step loss (multi_step_iterations="
                             f"{self.multi_step_iterations}) needs inner_steps >= 1, got {self.inner_steps}")
        checks.integer(name, "first_order_iterations", self.first_order_iterations, minimum=0)
        checks.choice(name, "backprop", self.backprop, BACKPROPS)
        checks.integer(name, "checkpoint_every", self.checkpoint_every, minimum=1, expect="a positive int")
        if self.backprop != "adjoint" and self.checkpoint_every != _CHECKPOINT_EVERY:
            raise ValueError(f"{name}: checkpoint_every={self.checkpoint_every} applies to backprop='adjoint' only "
                             f"(backprop={self.backprop!r} keeps the whole graph); drop it or set backprop='adjoint'")
        if self.batch_norm == "per_step" and self.backprop == "adjoint":
            raise ValueError(f"{name}: batch_norm='per_step' runs with backprop='unroll' only (the adjoint recomputes "
                             "the inner steps without their step's statistics); use one of the two alone")
        if self.backprop == "adjoint" and random_layers(self.model):
            raise ValueError(f"{name}: backprop='adjoint' recomputes the inner steps in the meta-backward, where the "
                             f"random layers {random_layers(self.model)[:3]} would draw anew; use backprop='unroll' "
                             "or set their rate to 0")
        if self.adapt_only is not None and not callable(self.adapt_only):
            raise TypeError(f"{name}: adapt_only must be a predicate on parameter names "
                            f"(e.g. lambda n: n.startswith('head.')), got {self.adapt_only!r}")
        rule, inner_lr = resolve_rule(name, self.rule, self.inner_lr, _DEFAULT_INNER_LR)
        object.__setattr__(self, "_rule", rule)
        object.__setattr__(self, "_stepped",
                           running_statistics(self.model) if self.batch_norm == "per_step" else [])
        object.__setattr__(self, "inner_lr", inner_lr)

    # ----------------------------------------------------------------- set-up
    def init(self) -> MetaParams:
        """Fresh meta-parameters: the model's initialization and the rule's own.

        Returns:
            ``{"model": Params, "rule": Params, "buffers": Params}``, the
            learned leaves with ``requires_grad``; the buffers are the model's
            (state, not learned).
        """
        adapted, _ = self._split(dict(self.model.named_parameters()))
        meta = init_meta(self.model, self._rule.init(adapted, self.inner_steps))
        if self.batch_norm == "per_step":
            meta["buffers"] = stack_per_step(meta["buffers"], self._stepped, max(self.inner_steps, 1))
        return meta

    def parameters(self, meta: MetaParams) -> list[Tensor]:
        """Every meta-learned tensor, for an optimizer: ``Adam(maml.parameters(meta))``."""
        return meta_parameters(meta)

    # -------------------------------------------------------------- one task
    def _split(self, params: Params) -> tuple[Params, Params]:
        if self.adapt_only is None:
            return dict(params), {}
        adapted, frozen = partition(params, self.adapt_only)
        if not adapted:
            raise ValueError(f"{type(self).__name__}: adapt_only matches no parameter of the model "
                             f"(names are {sorted(params)[:6]}...); fix the predicate")
        return adapted, frozen

    def trajectory(
        self,
        meta: MetaParams,
        x_support: Tensor,
        y_support: Tensor,
        steps: int | None = None,
        *,
        first_order: bool | None = None,
    ) -> list[Params]:
        """Full params after 0..``steps`` inner updates on one task's support set.

        ``x_support: [S, *input_shape]``, ``y_support: [S]``; returns ``steps + 1``
        dicts. ``first_order`` overrides the algorithm's own (for schedules).
        """
        return self._path(meta, x_support, y_support, steps, first_order)[0]

    def _path(self, meta: MetaParams, x_support: Tensor, y_support: Tensor, steps: int | None,
              first_order: bool | None) -> tuple[list[Params], Params]:
        """:meth:`trajectory`, and the buffers after its support forwards."""
        adapted, frozen = self._split(meta["model"])
        first_order = self.first_order if first_order is None else first_order

        stepped = self._stepped

        def support_loss(p: Params, i: int, buffers: Params) -> tuple[Tensor, Params]:
            loss, after = self._support_loss(combine(p, frozen), at_step(buffers, stepped, i), x_support, y_support,
                                             double_backward=not first_order)
            return loss, with_step(buffers, stepped, i, after) if stepped else after

        steps = self.inner_steps if steps is None else checks.integer(type(self).__name__, "steps", steps, minimum=0)
        path, buffers = adapt_trajectory(support_loss, adapted, rule=self._rule, rule_params=meta["rule"],
                                         steps=steps, first_order=first_order, indexed=True, state=meta_buffers(meta, self.model))
        return [combine(p, frozen) for p in path], buffers

    def adapt(self, meta: MetaParams, x_support: Tensor, y_support: Tensor, steps: int | None = None) -> Params:
        """Adapted full params for one task (``steps`` defaults to ``inner_steps``)."""
        return self.trajectory(meta, x_support, y_support, steps)[-1]

    def task_metrics(
        self, meta: MetaParams, x_support: Tensor, y_support: Tensor, x_query: Tensor, y_query: Tensor, iteration: int = 0
    ) -> Metrics:
        """Adapt on one task's support set, score on its query set.

        Shapes: ``x_support [S, ...]``, ``y_support [S]``, ``x_query [Q, ...]``,
        ``y_query [Q]``. Returns ``{"loss": [], "accuracy": []}`` (no accuracy for
        ``loss="mse"``); ``"loss"`` is what is meta-trained: the query loss after
        the last inner step, or with the multi-step loss the weighted sum of the
        query losses after every step (``"accuracy"`` is then the last step's).
        ``iteration`` (the meta-training step) drives the schedules:
        ``multi_step_iterations`` and ``first_order_iterations``. With the
        ``"running"`` BatchNorm policy the task's buffers after its forwards
        come too, as ``"buffers.<name>"`` (:func:`~maml_func.algorithms.base.merge_buffers`).
        The query set is scored with the buffers the inner loop ended with.
        """
        first_order = self.first_order or iteration < self.first_order_iterations
        last_only = self.multi_step_iterations is None or iteration >= self.multi_step_iterations
        if self.backprop == "adjoint" and not first_order:
            later, buffers = self._adjoint_path(meta, x_support, y_support, every_step=not last_only)
        else:
            path, buffers = self._path(meta, x_support, y_support, None, first_order)
            later = path[1:] or path
        stepped, last = self._stepped, self.inner_steps - 1
        query_buffers = at_step(buffers, stepped, last)
        metrics, after = score(self.model, later[-1], query_buffers, x_query, y_query, self.loss)
        if not last_only:
            weights = multi_step_weights(self.inner_steps, iteration, self.multi_step_iterations)
            scores = [score(self.model, p, query_buffers, x_query, y_query, self.loss)[0] for p in later[:-1]]
            metrics["loss"] = sum(w * s["loss"] for w, s in zip(weights, [*scores, metrics]))
        if stepped:
            after = with_step(buffers, stepped, last, after)
        return metrics if self.batch_norm == "batch" else with_buffers(metrics, after)

    def _adjoint_path(self, meta: MetaParams, x_support: Tensor, y_support: Tensor,
                      every_step: bool) -> tuple[list[Params], Params]:
        adapted, frozen = self._split(meta["model"])
        return adjoint_trajectory(partial(self._support_loss, double_backward=True), adapted, frozen, x_support,
                                  y_support, rule=self._rule, rule_params=meta["rule"], steps=self.inner_steps,
                                  every_step=every_step, checkpoint_every=self.checkpoint_every,
                                  buffers=meta_buffers(meta, self.model))

    def _support_loss(self, params: Params, buffers: Params, x: Tensor, y: Tensor, *,
                      double_backward: bool = False) -> tuple[Tensor, Params]:
        return model_loss(self.model, self.loss, params, buffers, x, y, double_backward=double_backward)

    # -------------------------------------------------------------- T tasks
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

        randomness = "error" if self.backprop == "adjoint" else "different"
        metrics = map_algorithm(self, fn, meta, batch, randomness=randomness)
        return metrics["loss"].mean(), metrics

    def evaluate(self, meta: MetaParams, batch: TaskBatch, steps: int | None = None) -> Metrics:
        """Query loss and accuracy after each of 0..``steps`` inner updates.

        Returns:
            ``{"loss": [T, steps+1], "accuracy": [T, steps+1]}``. Wrap in
            ``torch.no_grad()`` when no meta-gradient is wanted (the inner
            ``grad`` still works there).
        """
        steps = self.inner_steps if steps is None else steps
        stepped = self._stepped
        # per_step: the query after j steps is normalized with the copy of the step that made those weights.
        query_buffers = (lambda buffers, j: at_step(buffers, stepped, max(j - 1, 0))) if stepped else None
        return evaluate_paths(self, meta, batch, lambda meta, xs, ys: self.trajectory(meta, xs, ys, steps),
                              query_buffers)
