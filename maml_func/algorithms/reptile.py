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

Tasks are batched with the same ``vmap`` as :class:`~maml_func.algorithms.maml.MAML`
(composition: a first-order ``MAML`` with the same options does the batching and
the scoring).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import grad

from maml_func.algorithms.maml import MAML
from maml_func.core import MetaParams, Params, forward, params_and_buffers
from maml_func.inner import InnerRule
from maml_func.tasks import TaskBatch

__all__ = ["Reptile"]

Metrics = dict[str, Tensor]


@dataclass(frozen=True, eq=False)
class Reptile:
    """Reptile (Nichol et al. 2018), batched over tasks with ``vmap``.

    Args:
        model: the template network; never mutated.
        inner_lr: step size of the default inner rule, :func:`~maml_func.sgd`.
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
    inner_lr: float = 0.1
    inner_steps: int = 5
    inner_batch_size: int | None = None
    rule: InnerRule | None = None
    loss: str = "cross_entropy"
    chunk_size: int | str | None = "auto"
    vectorize: bool = True
    seed: int = 0
    _maml: MAML = field(init=False, repr=False)

    def __post_init__(self) -> None:
        name = type(self).__name__
        b = self.inner_batch_size
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise ValueError(f"{name}: inner_batch_size must be a positive int or None, got {b!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**31:
            raise ValueError(f"{name}: seed must be an int in [0, 2**31), got {self.seed!r}")
        # The first-order MAML validates the shared options and lends its vmap
        # batching, objective and scoring: composition instead of a subclass.
        maml = MAML(
            self.model,
            inner_lr=self.inner_lr,
            inner_steps=self.inner_steps,
            first_order=True,
            rule=self.rule,
            loss=self.loss,
            chunk_size=self.chunk_size,
            vectorize=self.vectorize,
        )
        rule_params = maml._rule.init(dict(self.model.named_parameters()), self.inner_steps)
        if rule_params:
            raise ValueError(f"{name}: the inner rule has meta-learned parameters ({sorted(rule_params)[:3]}...), "
                             "which Reptile cannot train (its update has no gradient for them); "
                             "use sgd(lr), or MAML with this rule")
        object.__setattr__(self, "_maml", maml)

    # ----------------------------------------------------------------- set-up
    def init(self) -> MetaParams:
        """Fresh meta-parameters ``{"model": Params, "rule": {}}``."""
        params, _ = params_and_buffers(self.model)
        return {"model": params, "rule": {}}

    def parameters(self, meta: MetaParams) -> list[Tensor]:
        """Every meta-learned tensor, for an optimizer."""
        return [*meta["model"].values(), *meta["rule"].values()]

    # -------------------------------------------------------------- one task
    def _order(self, support_size: int, steps: int, iteration: int) -> Tensor | None:
        """``[steps, inner_batch_size]`` support indices of every inner step, or ``None`` (whole set).

        Drawn outside ``vmap`` (random ops inside it would need a randomness
        mode) and shared by the tasks of a meta-batch.
        """
        b = self.inner_batch_size
        if b is None or b >= support_size or steps == 0:
            return None
        if not isinstance(iteration, int) or isinstance(iteration, bool) or not 0 <= iteration < 2**32:
            raise ValueError(f"Reptile: iteration must be an int in [0, 2**32), got {iteration!r}")
        generator = torch.Generator().manual_seed((self.seed << 32) + iteration)
        epochs = math.ceil(steps * b / support_size)
        stream = torch.cat([torch.randperm(support_size, generator=generator) for _ in range(epochs)])
        return stream[: steps * b].view(steps, b)

    def _trajectory(
        self, meta: MetaParams, x_support: Tensor, y_support: Tensor, steps: int, order: Tensor | None
    ) -> list[Params]:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"Reptile: steps must be a non-negative int, got {steps!r}")
        buffers = dict(self.model.named_buffers())

        def batch_loss(x: Tensor, y: Tensor) -> Callable[[Params], Tensor]:
            return lambda p: self._maml._objective(forward(self.model, p, buffers, x), y)

        params = dict(meta["model"])
        path = [params]
        for i in range(steps):
            if order is None:
                x, y = x_support, y_support
            else:
                idx = order[i].to(x_support.device)
                x, y = x_support.index_select(0, idx), y_support.index_select(0, idx)
            grads = {k: g.detach() for k, g in grad(batch_loss(x, y))(params).items()}
            params = self._maml._rule.step(params, grads, meta["rule"], i)
            path.append(params)
        return path

    def trajectory(
        self, meta: MetaParams, x_support: Tensor, y_support: Tensor, steps: int | None = None
    ) -> list[Params]:
        """Params after 0..``steps`` inner updates on one task (mini-batch order of iteration 0)."""
        steps = self.inner_steps if steps is None else steps
        order = self._order(x_support.shape[0], steps, 0)
        return self._trajectory(meta, x_support, y_support, steps, order)

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
            start = {"model": {k: v.detach() for k, v in meta["model"].items()}, "rule": meta["rule"]}
            adapted = {k: v.detach() for k, v in self._trajectory(start, xs, ys, self.inner_steps, order)[-1].items()}
            metrics = self._maml._score(adapted, xq, yq)
            metrics["distance"] = 0.5 * sum((meta["model"][k] - adapted[k]).square().sum() for k in adapted)
            return metrics

        metrics = self._maml._batched(fn, meta, batch)
        return metrics["distance"].mean(), metrics

    def evaluate(self, meta: MetaParams, batch: TaskBatch, steps: int | None = None) -> Metrics:
        """Query loss and accuracy after each of 0..``steps`` inner updates.

        Returns:
            ``{"loss": [T, steps+1], "accuracy": [T, steps+1]}`` (no accuracy
            for ``loss="mse"``). Wrap in ``torch.no_grad()`` for evaluation.
        """
        steps = self.inner_steps if steps is None else steps
        order = self._order(batch.x_support.shape[1], steps, 0)

        def fn(meta: MetaParams, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Metrics:
            scores = [self._maml._score(p, xq, yq) for p in self._trajectory(meta, xs, ys, steps, order)]
            return {k: torch.stack([s[k] for s in scores]) for k in scores[0]}

        return self._maml._batched(fn, meta, batch)
