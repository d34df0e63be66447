"""Implicit MAML (Rajeswaran, Finn, Kakade & Levine 2019): the meta-gradient of the inner problem's solution.

Per task, iMAML adapts by (approximately) solving the proximal inner problem

    ``phi*(theta) = argmin_phi  L_support(phi) + lam/2 ||phi - theta||^2``

with ``inner_steps`` updates of an inner rule (plain gradient descent by
default) started at ``theta``. At a solution, the implicit function theorem
gives ``dphi*/dtheta = (I + H/lam)^-1`` with ``H`` the support loss's Hessian
at ``phi`` (the paper's Lemma 1), so the task's meta-gradient is

    ``g_theta = (I + H/lam)^-1 grad L_query(phi)``,

found by ``cg_steps`` iterations of conjugate gradient, each one
Hessian-vector product of the support loss (the paper's Algorithm 2). No
gradient flows through the inner loop, so memory does not depend on
``inner_steps``: one support forward and its double backward at a time.

:meth:`IMAML.task_metrics` is the query loss after adaptation through a
:class:`torch.autograd.Function` whose backward is that solve, so
``loss.backward()`` and :func:`maml_func.meta_gradient` both give the implicit
meta-gradient. It is written for ``torch.func`` (``generate_vmap_rule``), so
the solve is vectorized over tasks by :func:`maml_func.batching.map_tasks`
like the inner loop. The Hessian-vector products are reverse over reverse
(:func:`torch.func.vjp` of :func:`torch.func.grad`), as in the adjoint of
:mod:`maml_func.algorithms.adjoint`: forward over reverse fails on
``F.mse_loss`` in torch 2.x ("ZeroTensors are immutable").

The implicit gradient is exact only at the inner problem's solution and when
``I + H/lam`` is positive definite (``lam`` above minus the smallest
eigenvalue of ``H``): enough inner steps, a ``lam`` large enough for the
network, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, vjp

from maml_func import checks
from maml_func.algorithms.base import MetaLearner
from maml_func.algorithms.pieces import Metrics, meta_buffers, model_loss, random_layers, task_loss
from maml_func.core import MetaParams, Params, accuracy, apply_model
from maml_func.inner import adapt_trajectory

__all__ = ["IMAML", "conjugate_gradient"]


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def conjugate_gradient(
    matvec: Callable[[Params], Params], b: Params, *, steps: int, tol: float = 0.0
) -> Params:
    """Solve ``A x = b`` for a symmetric positive definite ``A`` given as ``matvec(v) = A v``, from ``x = 0``.

    Hestenes & Stiefel 1952, on parameter dicts. Exactly ``steps`` iterations
    (a fixed count, so that it runs under ``vmap``); once the residual norm is
    at most ``tol`` times ``||b||`` the iterate stops moving (masked, not
    broken off). ``steps`` at least the number of unknowns solves exactly, up
    to rounding.

    Args:
        matvec: ``Params -> Params`` with the shapes of ``b``.
        b: the right-hand side, e.g. the query gradient.
        steps: iterations (matrix-vector products).
        tol: relative residual at which to stop moving; 0 never stops early.

    Returns:
        ``x`` with the shapes of ``b``.

    Example:
        >>> import torch
        >>> a = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> x = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": torch.tensor([1.0, 2.0])}, steps=2)
        >>> torch.allclose(a @ x["x"], torch.tensor([1.0, 2.0]))
        True
    """
    x = {k: torch.zeros_like(t) for k, t in b.items()}
    r, p = dict(b), dict(b)
    rr = _dot(r, r)
    floor = tol**2 * rr
    for _ in range(steps):
        ap = matvec(p)
        moving = rr > floor
        alpha = torch.where(moving, rr / torch.where(moving, _dot(p, ap), 1.0), 0.0)
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rr_next = _dot(r, r)
        beta = torch.where(moving, rr_next / torch.where(moving, rr, 1.0), 0.0)
        p = {k: r[k] + beta * p[k] for k in p}
        rr = rr_next
    return x


@dataclass(frozen=True, eq=False)
class IMAML(MetaLearner):
    """Implicit MAML (Rajeswaran et al. 2019).

    Args:
        model, inner_lr, inner_steps, rule, loss, batch_norm: as every
            algorithm has them (:class:`~maml_func.algorithms.base.MetaLearner`);
            ``inner_lr`` defaults to 0.1 (gradient descent on the proximal
            loss is stable for ``inner_lr * (lam + curvature) < 2``),
            ``inner_steps`` (of the proximal problem) to 10; the rule may have
            no meta-learned parameters (the implicit gradient gives them
            none); ``batch_norm`` ``"batch"`` only (the implicit gradient is
            taken at the inner solution, with no record of the forwards that
            running statistics would follow).
        lam: the proximal regularization ``lambda`` (the paper's Omniglot runs use 2).
        cg_steps: conjugate-gradient iterations per task (Hessian-vector products).
        cg_tol: relative residual at which a task's solve stops moving; 0: all ``cg_steps``.
        first_order: ``True`` skips the solve and meta-trains with
            ``grad L_query(phi)`` itself (``(I + H/lam)^-1`` taken as ``I``).

    The model's buffers are read as they are in ``meta["buffers"]`` by every
    forward; writes to them stay inside the task.

    Example:
        >>> from maml_func import MLP, build, sample_sinusoid_tasks
        >>> imaml = build("imaml", MLP(), inner_lr=0.02, inner_steps=5, lam=1.0, loss="mse")
        >>> meta = imaml.init()
        >>> loss, metrics = imaml.meta_loss(meta, sample_sinusoid_tasks(8))
        >>> loss.backward()   # the implicit meta-gradient lands in meta["model"][name].grad
    """

    inner_steps: int = 10
    lam: float = 2.0
    cg_steps: int = 5
    cg_tol: float = 0.0
    first_order: bool = False

    default_inner_lr = 0.1
    fixed_rule_reason = ("the implicit meta-gradient does not train (it depends on the inner solution only, "
                         "not on the path to it)")

    def _check(self) -> None:
        name = type(self).__name__
        if self.batch_norm != "batch":
            raise ValueError(f"{name}: batch_norm={self.batch_norm!r} is not available for iMAML (its meta-gradient "
                             "is taken at the inner solution, with no record of the forwards that running "
                             "statistics follow); use batch_norm='batch', or MAML")
        if random_layers(self.model):
            raise ValueError(f"{name}: the implicit meta-gradient recomputes the support loss at the inner solution, "
                             f"where the random layers {random_layers(self.model)[:3]} would draw anew; set their "
                             "rate to 0, or use MAML")
        checks.number(name, "lam", self.lam, positive=True,
                      hint="; it weighs the proximal term lam/2 ||phi - theta||^2 (the paper uses 0.5 to 2)")
        checks.integer(name, "cg_steps", self.cg_steps, minimum=1, expect="a positive int")
        checks.number(name, "cg_tol", self.cg_tol, minimum=0)
        checks.flag(name, "first_order", self.first_order)

    # -------------------------------------------------------------- one task
    def _loss(self, params: Params, buffers: Params, x: Tensor, y: Tensor) -> Tensor:
        return model_loss(self.model, self.loss, params, buffers, x, y, double_backward=not self.first_order)[0]

    def _path(self, meta: MetaParams, x_support: Tensor, y_support: Tensor, steps: int,
              iteration: int = 0) -> tuple[list[Params], Params]:
        """Params after 0..``steps`` inner updates of the proximal problem on one task (no graph), and the buffers."""
        anchor = {k: v.detach() for k, v in meta["model"].items()}
        buffers = meta_buffers(meta, self.model)

        def proximal(p: Params) -> Tensor:
            distance = sum((p[k] - anchor[k]).square().sum() for k in p)
            return self._loss(p, buffers, x_support, y_support) + 0.5 * self.lam * distance

        # No gradient flows through the inner loop: the meta-gradient is implicit.
        return adapt_trajectory(proximal, anchor, rule=self._rule, steps=steps, first_order=True), buffers

    def implicit_gradient(self, phi: Params, query_grad: Params, x_support: Tensor, y_support: Tensor,
                          buffers: Params | None = None) -> Params:
        """``(I + H/lam)^-1 query_grad`` by conjugate gradient, ``H`` the support loss's Hessian at ``phi``.

        Each iteration is one Hessian-vector product; shapes of ``phi``. With
        ``first_order``, ``query_grad`` itself. ``buffers``: the model's (``meta["buffers"]``).
        """
        if self.first_order:
            return query_grad
        buffers = buffers or {}
        _, hvp = vjp(grad(lambda p: self._loss(p, buffers, x_support, y_support)), phi)

        def matvec(v: Params) -> Params:
            (hv,) = hvp(v)
            return {k: v[k] + hv[k] / self.lam for k in v}

        return conjugate_gradient(matvec, query_grad, steps=self.cg_steps, tol=self.cg_tol)

    def task_metrics(self, meta: MetaParams, x_support: Tensor, y_support: Tensor, x_query: Tensor,
                     y_query: Tensor, iteration: int = 0) -> Metrics:
        """Adapt on one task's support set, score on its query set; the backward of ``"loss"`` is implicit.

        Shapes: ``x_support [S, ...]``, ``y_support [S]``, ``x_query [Q, ...]``,
        ``y_query [Q]``. Returns ``{"loss": [], "accuracy": []}`` (no accuracy
        for ``loss="mse"``): the query loss after adaptation, whose gradient
        with respect to ``meta["model"]`` is :meth:`implicit_gradient`'s.
        """
        buffers = meta_buffers(meta, self.model)
        names = tuple(meta["model"])
        out = _ImplicitLoss.apply(self, (names, tuple(buffers)), x_support, y_support, x_query, y_query,
                                  *meta["model"].values(), *buffers.values())
        metrics = {"loss": out[0]}
        if self.loss == "cross_entropy":
            metrics["accuracy"] = out[1]
        return metrics


class _ImplicitLoss(torch.autograd.Function):
    """One task: ``(imaml, (names, buffer names), xs, ys, xq, yq, *theta, *buffers) -> (loss, [accuracy], *phi,
    *query_grad)``.

    ``phi`` and the query gradient are outputs only so that ``setup_context``
    may save them (``torch.func`` saves inputs and outputs only); they are
    marked non-differentiable.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(imaml: IMAML, names: tuple[tuple[str, ...], tuple[str, ...]], xs: Tensor, ys: Tensor, xq: Tensor,
                yq: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
        params, buffers = dict(zip(names[0], flat)), dict(zip(names[1], flat[len(names[0]):]))
        phi = imaml.adapt({"model": params, "rule": {}, "buffers": buffers}, xs, ys)

        def query(p: Params) -> tuple[Tensor, Tensor]:
            out, _ = apply_model(imaml.model, p, buffers, xq)
            return task_loss(imaml.loss, out, yq), out

        query_grad, (value, out) = grad_and_value(query, has_aux=True)(phi)
        scores = [accuracy(out, yq)] if imaml.loss == "cross_entropy" else []
        return (value, *scores, *phi.values(), *query_grad.values())

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        imaml, names, xs, ys = inputs[:4]
        ctx.imaml, ctx.names = imaml, names
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        buffers = inputs[6 + len(names[0]):]
        ctx.save_for_backward(xs, ys, *buffers, *output[2 if imaml.loss == "cross_entropy" else 1:])

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, *unused: Any) -> tuple[Tensor | None, ...]:
        names, buffer_names = ctx.names
        if grad_loss is None:
            return (None,) * (6 + len(names) + len(buffer_names))
        xs, ys, *saved = ctx.saved_tensors
        buffers, saved = dict(zip(buffer_names, saved[:len(buffer_names)])), saved[len(buffer_names):]
        phi, query_grad = dict(zip(names, saved[:len(names)])), dict(zip(names, saved[len(names):]))
        g = ctx.imaml.implicit_gradient(phi, query_grad, xs, ys, buffers)
        return (None,) * 6 + tuple(grad_loss * g[k] for k in names) + (None,) * len(buffer_names)
