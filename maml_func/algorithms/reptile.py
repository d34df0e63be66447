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

It states only what is new over :class:`~maml_func.algorithms.base.MetaLearner`:
the mini-batch order of the inner steps, and the per-task surrogate; the inner
loop is :mod:`maml_func.inner`'s, whose loss here takes the step index to pick
each step's mini-batch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import Tensor

from maml_func import checks
from maml_func.algorithms.base import MetaLearner
from maml_func.algorithms.pieces import Metrics, meta_buffers, model_loss, score, with_buffers
from maml_func.core import MetaParams, Params
from maml_func.inner import adapt_trajectory

__all__ = ["Reptile"]


@dataclass(frozen=True, eq=False)
class Reptile(MetaLearner):
    """Reptile (Nichol et al. 2018).

    Args:
        model, inner_lr, inner_steps, rule, loss, batch_norm: as every
            algorithm has them (:class:`~maml_func.algorithms.base.MetaLearner`);
            ``inner_lr`` defaults to 0.1, ``inner_steps`` to 5; the rule may
            have no meta-learned parameters (Reptile gives them no gradient);
            ``batch_norm`` ``"batch"`` or ``"running"``.
        inner_batch_size: support examples per inner step; ``None`` (or a value
            at least the support size) uses the whole support set every step.
            Smaller values draw mini-batches by shuffling the support set
            anew each epoch (over it), the same order for every task of a
            meta-batch, seeded by ``(seed, iteration)``.
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

    inner_steps: int = 5
    inner_batch_size: int | None = None
    seed: int = 0

    default_inner_lr = 0.1
    fixed_rule_reason = "Reptile cannot train (its update has no gradient for them)"
    objective = "distance"

    def _check(self) -> None:
        name = type(self).__name__
        checks.integer(name, "inner_batch_size", self.inner_batch_size, minimum=1, none_ok=True,
                       expect="a positive int or None")
        checks.integer(name, "seed", self.seed, minimum=0, maximum=2**31 - 1, expect="an int in [0, 2**31)")
        if self.batch_norm == "per_step":
            raise ValueError(f"{name}: batch_norm='per_step' is MAML++'s (build('mamlpp', ...) or MAML); "
                             "use 'batch' or 'running'")

    # -------------------------------------------------------------- one task
    def _order(self, support_size: int, steps: int, iteration: int) -> Tensor | None:
        """``[steps, inner_batch_size]`` support indices of every inner step, or ``None`` (whole set).

        A function of ``(seed, iteration)`` and the shapes alone, drawn from a
        generator of its own (no global state), so every task of a meta-batch
        gets the same order, under ``vmap`` as in the loop.
        """
        b = self.inner_batch_size
        if b is None or b >= support_size or steps == 0:
            return None
        checks.integer("Reptile", "iteration", iteration, minimum=0, maximum=2**32 - 1, expect="an int in [0, 2**32)")
        generator = random.Random((self.seed << 32) + iteration)
        stream: list[int] = []
        for _ in range(math.ceil(steps * b / support_size)):
            stream += generator.sample(range(support_size), support_size)
        return torch.tensor(stream[: steps * b]).view(steps, b)

    def _path(self, meta: MetaParams, x_support: Tensor, y_support: Tensor, steps: int,
              iteration: int = 0) -> tuple[list[Params], Params]:
        order = self._order(x_support.shape[0], steps, iteration)

        def support_loss(p: Params, i: int, buffers: Params) -> tuple[Tensor, Params]:
            x, y = x_support, y_support
            if order is not None:
                idx = order[i].to(x_support.device)
                x, y = x_support.index_select(0, idx), y_support.index_select(0, idx)
            return model_loss(self.model, self.loss, p, buffers, x, y)

        # No gradient flows through Reptile's inner loop, so it is first order by definition.
        return adapt_trajectory(support_loss, dict(meta["model"]), rule=self._rule, rule_params=meta["rule"],
                                steps=steps, first_order=True, indexed=True, state=meta_buffers(meta, self.model))

    def task_metrics(self, meta: MetaParams, x_support: Tensor, y_support: Tensor, x_query: Tensor,
                     y_query: Tensor, iteration: int = 0) -> Metrics:
        """One task's Reptile surrogate ``"distance"`` ``½‖θ − stopgrad(φ)‖²``, whose gradient is ``θ − φ``.

        Also the query ``"loss"`` / ``"accuracy"`` of the adapted weights (no
        gradient; for logging). ``iteration`` seeds the mini-batch order.
        """
        # Adapt from a detached copy: no graph through the inner loop at all.
        start = {**meta, "model": {k: v.detach() for k, v in meta["model"].items()}}
        path, buffers = self._path(start, x_support, y_support, self.inner_steps, iteration)
        adapted = {k: v.detach() for k, v in path[-1].items()}
        metrics, buffers = score(self.model, adapted, buffers, x_query, y_query, self.loss)
        metrics["distance"] = 0.5 * sum((meta["model"][k] - adapted[k]).square().sum() for k in adapted)
        return metrics if self.batch_norm == "batch" else with_buffers(metrics, buffers)
