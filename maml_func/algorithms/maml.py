"""MAML (Finn et al. 2017): the per-task function; its batching over a meta-batch is the shared one.

Write the per-task function first, batch it second: :meth:`MAML.task_metrics`
adapts the meta-learned initialization to one task's support set and scores
the adapted weights on its query set; ``meta_loss``
(:class:`~maml_func.algorithms.base.MetaLearner`) runs it for every task of a
:class:`~maml_func.tasks.TaskBatch` with :func:`maml_func.batching.map_tasks`
(one ``torch.func.vmap`` pass, chunks, or the Python loop the tests compare
against: the caller's :class:`~maml_func.batching.Way`) and averages.

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
from dataclasses import dataclass
from functools import partial

from torch import Tensor

from maml_func import checks
from maml_func.algorithms.adjoint import BACKPROPS, adjoint_trajectory
from maml_func.algorithms.base import MetaLearner
from maml_func.algorithms.pieces import Metrics, meta_buffers, model_loss, random_layers, score, with_buffers
from maml_func.core import MetaParams, Params, combine, partition
from maml_func.inner import adapt_trajectory
from maml_func.normalization import at_step, with_step

__all__ = ["MAML", "multi_step_weights"]

# MAML++'s reference implementation floors the weight of every non-final step
# at 0.03 / steps while annealing, so early steps never drop out abruptly.
_MIN_STEP_WEIGHT = 0.03
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
class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning (Finn et al. 2017), second order by default.

    Args:
        model, inner_lr, inner_steps, rule, loss, batch_norm: as every
            algorithm has them (:class:`~maml_func.algorithms.base.MetaLearner`);
            ``inner_lr`` defaults to 0.4, ``inner_steps`` to 1; every
            ``batch_norm`` policy (``"per_step"`` with ``backprop="unroll"``).
        first_order: detach the inner gradients (first-order MAML, §5.2).
        adapt_only: a predicate on parameter names; only matching parameters are
            adapted in the inner loop, the rest are only meta-trained (ANIL).
            ``None`` adapts all.
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

    first_order: bool = False
    adapt_only: Callable[[str], bool] | None = None
    multi_step_iterations: int | None = None
    first_order_iterations: int = 0
    backprop: str = "unroll"
    checkpoint_every: int = _CHECKPOINT_EVERY

    def _check(self) -> None:
        name = type(self).__name__
        checks.flag(name, "first_order", self.first_order)
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

    # -------------------------------------------------------------- one task
    def _adapted(self, params: Params) -> Params:
        return self._split(params)[0]

    def _split(self, params: Params) -> tuple[Params, Params]:
        if self.adapt_only is None:
            return dict(params), {}
        adapted, frozen = partition(params, self.adapt_only)
        if not adapted:
            raise ValueError(f"{type(self).__name__}: adapt_only matches no parameter of the model "
                             f"(names are {sorted(params)[:6]}...); fix the predicate")
        return adapted, frozen

    def _start(self, meta: MetaParams, x_support: Tensor, y_support: Tensor) -> Params:
        """Where one task's inner loop starts: the meta-learned initialization (ProtoMAML changes its head)."""
        return meta["model"]

    def _path(self, meta: MetaParams, x_support: Tensor, y_support: Tensor, steps: int, iteration: int = 0,
              first_order: bool | None = None) -> tuple[list[Params], Params]:
        adapted, frozen = self._split(self._start(meta, x_support, y_support))
        first_order = self.first_order if first_order is None else first_order
        stepped = self._stepped

        def support_loss(p: Params, i: int, buffers: Params) -> tuple[Tensor, Params]:
            loss, after = self._support_loss(combine(p, frozen), at_step(buffers, stepped, i), x_support, y_support,
                                             double_backward=not first_order)
            return loss, with_step(buffers, stepped, i, after) if stepped else after

        path, buffers = adapt_trajectory(support_loss, adapted, rule=self._rule, rule_params=meta["rule"],
                                         steps=steps, first_order=first_order, indexed=True,
                                         state=meta_buffers(meta, self.model))
        return [combine(p, frozen) for p in path], buffers

    def task_metrics(self, meta: MetaParams, x_support: Tensor, y_support: Tensor, x_query: Tensor,
                     y_query: Tensor, iteration: int = 0) -> Metrics:
        """Adapt on one task's support set, score on its query set.

        Returns ``{"loss": [], "accuracy": []}`` (no accuracy for
        ``loss="mse"``); ``"loss"`` is what is meta-trained: the query loss after
        the last inner step, or with the multi-step loss the weighted sum of the
        query losses after every step (``"accuracy"`` is then the last step's).
        ``iteration`` (the meta-training step) drives the schedules:
        ``multi_step_iterations`` and ``first_order_iterations``. With a
        BatchNorm policy other than ``"batch"`` the task's buffers after its
        forwards come too, as ``"buffers.<name>"``
        (:func:`~maml_func.algorithms.pieces.merge_buffers`). The query set is
        scored with the buffers the inner loop ended with.
        """
        first_order = self.first_order or iteration < self.first_order_iterations
        last_only = self.multi_step_iterations is None or iteration >= self.multi_step_iterations
        if self.backprop == "adjoint" and not first_order:
            later, buffers = self._adjoint_path(meta, x_support, y_support, every_step=not last_only)
        else:
            path, buffers = self._path(meta, x_support, y_support, self.inner_steps, iteration, first_order)
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
        adapted, frozen = self._split(self._start(meta, x_support, y_support))
        return adjoint_trajectory(partial(self._support_loss, double_backward=True), adapted, frozen, x_support,
                                  y_support, rule=self._rule, rule_params=meta["rule"], steps=self.inner_steps,
                                  every_step=every_step, checkpoint_every=self.checkpoint_every,
                                  buffers=meta_buffers(meta, self.model))

    def _support_loss(self, params: Params, buffers: Params, x: Tensor, y: Tensor, *,
                      double_backward: bool = False) -> tuple[Tensor, Params]:
        return model_loss(self.model, self.loss, params, buffers, x, y, double_backward=double_backward)

    def _randomness(self) -> str:
        # The adjoint recomputes the forwards in the backward, where a random layer would draw anew.
        return "error" if self.backprop == "adjoint" else "different"
