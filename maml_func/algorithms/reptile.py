"""Reptile (Nichol, Achiam & Schulman 2018): move the initialization toward adapted weights.

Per task, Reptile runs a few steps of plain SGD on mini-batches of the support
set, starting from the meta-parameters ``θ``, and reaches ``φ``; the meta-update
moves ``θ`` toward the mean of the ``φ`` over the meta-batch. No gradient flows
through the inner loop, so it costs a first-order MAML step and no query loss is
differentiated.

To fit the interface of the family (``loss.backward(); optimizer.step()``),
:meth:`Reptile.meta_loss` returns the surrogate

    ``L(θ) = mean over tasks of ½ ‖θ − stopgrad(φ_t)‖²``,  whose gradient is ``θ − mean_t φ_t``.

So with ``torch.optim.SGD(lr=ε)`` one optimizer step is exactly the batched
Reptile update ``θ ← θ + ε (mean_t φ_t − θ)`` with outer step size ``ε``
(``ε = 1`` jumps to the mean adapted weights; the paper anneals ε linearly
to 0). With Adam the Reptile direction is treated as a gradient, as the paper
suggests (§5 "we can treat (Φ − W) as a gradient and plug it into a more
sophisticated optimizer like Adam"); the step size is then Adam's ``lr``.

It is built from the same public pieces as :class:`~maml_func.algorithms.maml.MAML`
(:mod:`maml_func.algorithms.base`): the inner loop of :mod:`maml_func.inner`,
whose loss here takes the step index to pick each step's mini-batch, the
scores of :func:`~maml_func.algorithms.base.score`, and the batching over
tasks of :func:`maml_func.batching.map_tasks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from maml_func import checks
from maml_func.algorithms.base import (
    Metrics, PlainRuleAlgorithm, check_options, evaluate_paths, map_algorithm, meta_buffers, model_loss, score,
    with_buffers,
)
from maml_func.core import MetaParams, Params
from maml_func.inner import InnerRule, adapt_trajectory
from maml_func.tasks import TaskBatch

__all__ = ["Reptile"]

_DEFAULT_INNER_LR = 0.1


@dataclass(frozen=True, eq=False)
class Reptile(PlainRuleAlgorithm):
    """Reptile (Nichol et al. 2018), batched over tasks with ``vmap``.

    Args:
        model: the template network; never mutated.
        inner_lr: inner step size. Without ``rule``, the step size of
            :func:`~maml_func.sgd` (default 0.1); with a ``rule``, read from it.
        inner_steps: inner updates per task at meta-training time.
        inner_batch_size: support examples per inner step; ``None`` (or a value
            at least the support size) uses the whole support set every step.
            Smaller values draw mini-batches by shuffling the support set
            anew each epoch (over it), the same order for every task of a
            meta-batch, seeded by ``(seed, iteration)``.
        rule: the inner update; defaults to ``sgd(inner_lr)``. It must have no
            meta-learned parameters (Reptile gives them no gradient).
        loss: ``"cross_entropy"`` (reports accuracy) or ``"mse"``.
        chunk_size: tasks per vectorized chunk; ``None`` = all at once;
            ``"auto"`` (default) as in :class:`MAML`.
        vectorize: ``False`` loops over tasks in Python instead of ``vmap``.
        seed: seeds the mini-batch order (with the iteration); unused when
            every step sees the whole support set.
        batch_norm: the BatchNorm policy, as in :class:`MAML` (``"batch"`` or ``"running"``).

    Example:
        >>> import torch
        >>> from maml_func import MLP, Reptile, sample_sinusoid_tasks
        >>> reptile = Reptile(MLP(), inner_lr=0.02, inner_steps=5, loss="mse")
        >>> meta = reptile.init()
        >>> opt = torch.optim.SGD(reptile.parameters(meta), lr=1.0)
        >>> loss, metrics = reptile.meta_loss(meta, sample_sinusoid_tasks(8))
        >>> loss.backward(); opt.step()   # θ moved to the mean adapted weights
        >>> metrics["loss"].shape          # post-adaptation query loss per task
        torch.Size([8])
    """

    model: nn.Module
    inner_lr: float | None = None
    inner_steps: int = 5
    inner_batch_size: int | None = None
    rule: InnerRule | None = None
    loss: str = "cross_entropy"
    chunk_size: int | str | None = "auto"
    vectorize: bool = True
    seed: int = 0
    batch_norm: str = "batch"
    _rule: InnerRule = field(init=False, repr=False)

    def __post_init__(self) -> None:
        name = type(self).__name__
        checks.integer(name, "inner_batch_size", self.inner_batch_size, minimum=1, none_ok=True,
                       expect="a positive int or None")
        checks.integer(name, "seed", self.seed, minimum=0, maximum=2**31 - 1, expect="an int in [0, 2**31)")
        object.__setattr__(self, "model", check_options(name, self.model, self.inner_steps, self.loss,
                                                        self.chunk_size, self.batch_norm))
        if self.batch_norm == "per_step":
            raise ValueError(f"{name}: batch_norm='per_step' is MAML++'s (build('mamlpp', ...) or MAML); "
                             "use 'batch' or 'running'")
        self._set_rule(_DEFAULT_INNER_LR, "Reptile cannot train (its update has no gradient for them)")

    # -------------------------------------------------------------- one task
    def _steps(self, steps: int | None) -> int:
        return self.inner_steps if steps is None else checks.integer(type(self).__name__, "steps", steps, minimum=0)

    def _order(self, support_size: int, steps: int, iteration: int) -> Tensor | None:
        """``[steps, inner_batch_size]`` support indices of every inner step, or ``None`` (whole set).

        Drawn outside ``vmap`` (random ops inside it would need a randomness
        mode) and shared by the tasks of a meta-batch.
        """
        b = self.inner_batch_size
        if b is None or b >= support_size or steps == 0:
            return None
        checks.integer("Reptile", "iteration", iteration, minimum=0, maximum=2**32 - 1, expect="an int in [0, 2**32)")
        generator = torch.Generator().manual_seed((self.seed << 32) + iteration)
        epochs = math.ceil(steps * b / support_size)
        stream = torch.cat([torch.randperm(support_size, generator=generator) for _ in range(epochs)])
        return stream[: steps * b].view(steps, b)

    def _trajectory(
        self, meta: MetaParams, x_support: Tensor, y_support: Tensor, steps: int, order: Tensor | None
    ) -> tuple[list[Params], Params]:
        """Params after 0..``steps`` inner updates, and the buffers after the support forwards."""

        def support_loss(p: Params, i: int, buffers: Params) -> tuple[Tensor, Params]:
            x, y = x_support, y_support
            if order is not None:
                idx = order[i].to(x_support.device)
                x, y = x_support.index_select(0, idx), y_support.index_select(0, idx)
            return model_loss(self.model, self.loss, p, buffers, x, y)

        # No gradient flows through Reptile's inner loop, so it is first order by definition.
        return adapt_trajectory(support_loss, dict(meta["model"]), rule=self._rule, rule_params=meta["rule"],
                                steps=steps, first_order=True, indexed=True, state=meta_buffers(meta, self.model))

    def trajectory(
        self, meta: MetaParams, x_support: Tensor, y_support: Tensor, steps: int | None = None
    ) -> list[Params]:
        """Params after 0..``steps`` inner updates on one task (mini-batch order of iteration 0)."""
        steps = self._steps(steps)
        order = self._order(x_support.shape[0], steps, 0)
        return self._trajectory(meta, x_support, y_support, steps, order)[0]

    def adapt(self, meta: MetaParams, x_support: Tensor, y_support: Tensor, steps: int | None = None) -> Params:
        """Adapted params for one task (``steps`` defaults to ``inner_steps``)."""
        return self.trajectory(meta, x_support, y_support, steps)[-1]

    # -------------------------------------------------------------- T tasks
    def meta_loss(self, meta: MetaParams, batch: TaskBatch, iteration: int = 0) -> tuple[Tensor, Metrics]:
        """The Reptile surrogate of a meta-batch; its gradient is ``θ − mean_t φ_t``.

        Args:
            meta: meta-parameters from :meth:`init`.
            batch: T tasks; the inner loop uses the support sets only, the
                query sets are only scored (for logging).
            iteration: the meta-training step; seeds the mini-batch order.

        Returns:
            ``(loss [], metrics)``: ``loss`` is ``mean_t ½‖θ − stopgrad(φ_t)‖²``
            (call ``backward`` on it, then any optimizer's ``step``);
            ``metrics["loss"]`` / ``["accuracy"]`` ``[T]`` are the query loss and
            accuracy of the adapted weights (no gradient), ``metrics["distance"]``
            ``[T]`` is ``½‖θ − φ_t‖²``.
        """
        order = self._order(batch.x_support.shape[1], self.inner_steps, iteration)

        def fn(meta: MetaParams, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Metrics:
            # Adapt from a detached copy: no graph through the inner loop at all.
            start = {**meta, "model": {k: v.detach() for k, v in meta["model"].items()}}
            path, buffers = self._trajectory(start, xs, ys, self.inner_steps, order)
            adapted = {k: v.detach() for k, v in path[-1].items()}
            metrics, buffers = score(self.model, adapted, buffers, xq, yq, self.loss)
            metrics["distance"] = 0.5 * sum((meta["model"][k] - adapted[k]).square().sum() for k in adapted)
            return metrics if self.batch_norm == "batch" else with_buffers(metrics, buffers)

        metrics = map_algorithm(self, fn, meta, batch)
        return metrics["distance"].mean(), metrics

    def evaluate(self, meta: MetaParams, batch: TaskBatch, steps: int | None = None) -> Metrics:
        """Query loss and accuracy after each of 0..``steps`` inner updates.

        Returns:
            ``{"loss": [T, steps+1], "accuracy": [T, steps+1]}`` (no accuracy
            for ``loss="mse"``). Wrap in ``torch.no_grad()`` for evaluation.
        """
        steps = self._steps(steps)
        order = self._order(batch.x_support.shape[1], steps, 0)

        return evaluate_paths(self, meta, batch,
                              lambda meta, xs, ys: self._trajectory(meta, xs, ys, steps, order)[0])
