"""The adjoint meta-gradient of MAML: exact second order with the activation memory of one inner step.

Unrolled autograd (``backprop="unroll"``) records every inner step of every
task and keeps the activations of all ``S`` support forwards alive until the
meta-backward, so second-order memory grows linearly with ``S``. The adjoint
(``backprop="adjoint"``) is the reverse-mode recursion of Franceschi et al.
2017 ("Forward and Reverse Gradient-Based Hyperparameter Optimization",
Reverse-HG) applied to the inner loop of MAML (Finn et al. 2017). With the
inner update of step ``s`` written as ``phi_{s+1} = U_s(phi_s, theta_frozen,
alpha)`` (``U_s(phi) = phi - alpha_s * grad L_s(phi)`` for SGD):

- forward: run the ``S`` inner steps without any graph and hand ``phi_S``
  (with the multi-step loss ``phi_1 .. phi_S``) to the query loss, which
  autograd records as usual;
- backward, from the query loss's ``v_S = dL/dphi_S``: re-run the inner loop
  without a graph, keeping only the parameters ``phi_0 .. phi_S`` (parameters
  are small, activations are big), then for ``s = S-1 .. 0`` recompute one
  support forward at ``phi_s`` and pull ``v_{s+1}`` back through ``U_s`` with
  :func:`torch.func.vjp`, which gives at once

  - ``v_s = v_{s+1} - H_s (alpha_s * v_{s+1})`` (``H_s`` the support loss's
    Hessian at ``phi_s``),
  - the learned rates' share ``dL/dalpha_s = -v_{s+1} * grad L_s(phi_s)``
    (per element for Meta-SGD; summed per tensor, into the step's slot, for
    MAML++'s LSLR),
  - the mixed term ``-(d/dtheta_frozen grad L_s(phi_s))^T (alpha_s v_{s+1})``
    for parameters the inner loop does not adapt (ANIL's body),

  and add the cotangent ``w_s dL_query/dphi_s`` that the query loss sends to
  ``phi_s`` (MAML++'s multi-step loss, Antoniou et al. 2019).

``theta``'s gradient is ``v_0`` plus the direct terms autograd adds (the query
loss's own gradient in the frozen parameters): the same meta-gradient as
unrolled autograd up to rounding, with the support activations of one inner
step (one support forward and its double backward) alive at any time,
whatever ``S``. The pull-back is the vector-Jacobian product of the rule's own
``step``, so any :class:`~maml_func.inner.InnerRule` works, not only the three
written out above.

What lives from the forward to the backward: the parameters after every
``checkpoint_every``-th step (default 2 in :class:`~maml_func.MAML`), ``T * S
/ k`` parameter sets for the meta-batch (0.45 MB each for the Omniglot Conv4:
144 MB at T = 32, S = 20, k = 2); the backward re-runs the steps in between
(Chen et al. 2016's checkpointing, on parameters rather than activations).
That is what still grows with ``S`` (``benchmarks/README.md``, "memory.py:
memory against inner steps"). The query loss stays outside the Function and is
recorded by autograd as in unrolled MAML: its activations are kept as there
(with the multi-step loss, one query forward per step).

The recursion is the backward of a :class:`torch.autograd.Function` on one
task, written for ``torch.func`` (``setup_context``, ``generate_vmap_rule``),
so it runs under :func:`maml_func.batching.map_tasks`'s ``vmap``, chunked or
not, and in its Python loop alike, and both ``loss.backward()`` and
:func:`maml_func.meta_gradient` reach it. First-order MAML keeps no
activations to begin with (its inner gradients are detached), so the adjoint
of a first-order step is the unrolled computation itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vjp

from maml_func import checks
from maml_func.core import Params, combine
from maml_func.inner import InnerRule

__all__ = ["BACKPROPS", "SupportLoss", "adjoint_trajectory"]

#: How the second-order meta-gradient of the MAML family is taken: through
#: autograd's record of the unrolled inner loop, or by the adjoint recursion.
BACKPROPS = ("unroll", "adjoint")

#: ``(params, buffers, x, y) -> ([], buffers)``: the support loss of one task as a pure function of its
#: arguments, and the model's buffers after its forward (:func:`maml_func.core.apply_model`).
SupportLoss = Callable[[Params, Params, Tensor, Tensor], tuple[Tensor, Params]]
#: ``U_s(phi, frozen, rule_params) -> phi_next``: one inner update as a pure function.
Update = Callable[[Params, Params, Params], Params]


@dataclass(frozen=True, eq=False)
class _InnerLoop:
    """What one task's inner loop is, beside its tensors (a non-tensor input of the Function)."""

    loss_fn: SupportLoss
    rule: InnerRule
    steps: int
    every_step: bool
    checkpoint_every: int
    adapted: tuple[str, ...]
    frozen: tuple[str, ...]
    rates: tuple[str, ...]
    buffers: tuple[str, ...]

    @property
    def starts(self) -> list[int]:
        """The steps whose parameters the forward keeps for the backward: where its segments start."""
        return list(range(0, self.steps, 1 if self.every_step else self.checkpoint_every))

    def unpack(self, flat: Sequence[Tensor]) -> tuple[Params, Params, Params, Params]:
        sizes = [len(self.adapted), len(self.frozen), len(self.rates), len(self.buffers)]
        names = [self.adapted, self.frozen, self.rates, self.buffers]
        out, i = [], 0
        for n, size in zip(names, sizes):
            out.append(dict(zip(n, flat[i:i + size])))
            i += size
        return out[0], out[1], out[2], out[3]

    def objective(self, adapted: Params, frozen: Params, state: Params, x: Tensor, y: Tensor) -> tuple[Tensor, Params]:
        return self.loss_fn(combine(adapted, frozen), state, x, y)

    def advance(self, phi: Params, frozen: Params, rates: Params, state: Params, x: Tensor, y: Tensor, start: int,
                stop: int) -> list[tuple[Params, Params]]:
        """``(phi, state)`` at ``start .. stop`` from ``phi_start``, no graph (the rule sees the global step index)."""
        path = [(phi, state)]
        for s in range(start, stop):
            grads, state = grad(self.objective, has_aux=True)(phi, frozen, state, x, y)
            phi = self.rule.step(phi, grads, rates, s)
            path.append((phi, state))
        return path

    def update(self, s: int, state: Params, x: Tensor, y: Tensor) -> Update:
        def step(phi: Params, frozen: Params, rates: Params) -> Params:
            grads, _ = grad(self.objective, has_aux=True)(phi, frozen, state, x, y)
            return self.rule.step(phi, grads, rates, s)

        return step


def _reverse_step(update: Update, phi: Params, frozen: Params, rates: Params,
                  v: Params) -> tuple[Params, Params, Params]:
    """Pull ``v = dL/dphi_{s+1}`` back through one inner update: ``(dL/dphi_s, dL/dfrozen, dL/drates)`` of step s.

    One support forward at ``phi_s`` and its double backward; for SGD the first
    part is ``v - H_s (alpha v)``.
    """
    _, pullback = vjp(update, phi, frozen, rates)
    return pullback(v)


def _plus(acc: Params, extra: Params) -> Params:
    return {k: acc[k] + extra[k] for k in acc}


class _AdjointInnerLoop(torch.autograd.Function):
    """One task: ``(loop, xs, ys, *adapted, *frozen, *rates, *buffers) -> (phi_S or phi_1 .. phi_S, *kept, *state_S)``.

    ``kept`` are the parameters and buffers at the segment starts after step 0
    (see ``checkpoint_every``), outputs only so that ``setup_context`` may
    save them (``torch.func`` saves inputs and outputs only); with
    ``every_step`` the outputs already hold the parameters. ``state_S`` are
    the buffers after the last step. Both are marked non-differentiable.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(loop: _InnerLoop, xs: Tensor, ys: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
        adapted, frozen, rates, state = loop.unpack(flat)
        path = loop.advance(adapted, frozen, rates, state, xs, ys, 0, loop.steps)
        outputs = [t for phi, _ in path[1:] for t in phi.values()] if loop.every_step else list(path[-1][0].values())
        later = loop.starts[1:]
        if not loop.every_step:
            outputs += [t.clone() for s in later for t in path[s][0].values()]
        outputs += [t.clone() for s in later for t in path[s][1].values()]
        return (*outputs, *(t.clone() for t in path[-1][1].values()))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        loop, xs, ys, *flat = inputs
        ctx.loop = loop
        ctx.set_materialize_grads(False)
        first_kept = loop.steps * len(loop.adapted) if loop.every_step else len(loop.adapted)
        ctx.mark_non_differentiable(*output[first_kept:])
        ctx.save_for_backward(xs, ys, *flat, *output[0 if loop.every_step else first_kept:])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        loop: _InnerLoop = ctx.loop
        xs, ys, *saved = ctx.saved_tensors
        a, b = len(loop.adapted), len(loop.buffers)
        n_in = a + len(loop.frozen) + len(loop.rates) + b
        adapted, frozen, rates, state = loop.unpack(saved[:n_in])
        later = len(loop.starts) - 1
        params_kept = saved[n_in:]
        if loop.every_step:  # phi_1 .. phi_S: the starts after 0 are phi_1 .. phi_{S-1}
            params_kept = params_kept[:later * a]
        states_kept = saved[n_in + (loop.steps * a if loop.every_step else later * a):][:later * b]
        kept_phi = [dict(zip(loop.adapted, params_kept[i * a:(i + 1) * a])) for i in range(later)]
        kept_state = [dict(zip(loop.buffers, states_kept[i * b:(i + 1) * b])) for i in range(later)]
        # (phi, buffers) at each segment start: step 0's from the inputs, the others as the forward kept them
        starts = dict(zip(loop.starts, zip([adapted, *kept_phi], [state, *kept_state])))
        # The cotangents arrive for phi_1 .. phi_S with every_step, for phi_S alone otherwise.
        first = 1 if loop.every_step else loop.steps
        n_phi = loop.steps if loop.every_step else 1
        incoming = {first + i: grads[i * a:(i + 1) * a] for i in range(n_phi)}
        v = {k: torch.zeros_like(t) for k, t in adapted.items()}
        d_frozen = {k: torch.zeros_like(t) for k, t in frozen.items()}
        d_rates = {k: torch.zeros_like(t) for k, t in rates.items()}
        v = _receive(v, loop.adapted, incoming.get(loop.steps, ()))
        for start in reversed(loop.starts):
            stop = min(start + (1 if loop.every_step else loop.checkpoint_every), loop.steps)
            phi, buffers = starts[start]
            segment = loop.advance(phi, frozen, rates, buffers, xs, ys, start, stop - 1)
            for s in range(stop - 1, start - 1, -1):
                phi_s, state_s = segment[s - start]
                v, df, dr = _reverse_step(loop.update(s, state_s, xs, ys), phi_s, frozen, rates, v)
                d_frozen, d_rates = _plus(d_frozen, df), _plus(d_rates, dr)
                v = _receive(v, loop.adapted, incoming.get(s, ()))
        return (None, None, None, *v.values(), *d_frozen.values(), *d_rates.values(), *(None,) * b)


def _receive(v: Params, names: tuple[str, ...], grads: Sequence[Tensor | None]) -> Params:
    """``v`` plus the cotangent that the query loss sent to these parameters (``None``: nothing sent)."""
    return {k: v[k] if g is None else v[k] + g for k, g in zip(names, grads)} if grads else v


def adjoint_trajectory(
    loss_fn: SupportLoss,
    adapted: Params,
    frozen: Params,
    x_support: Tensor,
    y_support: Tensor,
    *,
    rule: InnerRule,
    rule_params: Params,
    steps: int,
    every_step: bool = False,
    checkpoint_every: int = 1,
    buffers: Params | None = None,
) -> tuple[list[Params], Params]:
    """Adapt one task with ``steps`` updates of ``rule``; the backward through the result is the adjoint recursion.

    The same values as :func:`maml_func.inner.adapt_trajectory` (second
    order) and, through ``backward``, the same gradients in ``adapted``,
    ``frozen`` and ``rule_params`` as unrolled autograd, with the activations
    of one inner step alive (see the module docstring). Runs under ``vmap``
    (:func:`maml_func.batching.map_tasks`), chunked or not.

    Args:
        loss_fn: ``(params, buffers, x, y) -> ([], buffers)``, the support
            loss of the full params (adapted and frozen together) and the
            buffers after its forward; a pure function of its arguments (it
            must not close over tensors that ``vmap`` batches).
        adapted: the initialization of the parameters the inner loop adapts.
        frozen: those it leaves alone (ANIL's body; ``{}`` for MAML).
        x_support, y_support: one task's support set, ``[S, ...]``, ``[S]``.
        rule: the inner update; ``rule_params`` its meta-learned rates (``meta["rule"]``).
        steps: inner steps.
        every_step: return the params after each of 1..``steps`` (MAML++'s
            multi-step loss) instead of after the last only.
        checkpoint_every: the forward keeps the parameters after every this
            many steps, and the backward re-runs each segment from its start
            (Chen et al. 2016's checkpointing, on parameters): 1 keeps all
            (``T * S`` parameter sets between forward and backward, no
            re-run); ``k`` keeps ``S / k`` and costs ``S (k - 1) / k`` more
            support gradients; ``k >= steps`` keeps none and re-runs the whole
            inner loop. With ``every_step`` every step is kept (the outputs
            hold them anyway).

    Returns:
        ``[phi_S]``, or ``[phi_1, ..., phi_S]`` with ``every_step``: full
        params (adapted and frozen together).

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from maml_func import MLP, forward, sample_sinusoid_tasks, sgd
        >>> model, (xs, ys, xq, yq) = MLP(), (t[0] for t in sample_sinusoid_tasks(1))
        >>> loss_fn = lambda p, b, x, y: (F.mse_loss(forward(model, p, b, x), y), b)
        >>> (phi,), _ = adjoint_trajectory(loss_fn, dict(model.named_parameters()), {}, xs, ys, rule=sgd(0.01),
        ...                                rule_params={}, steps=3)
        >>> loss_fn(phi, {}, xq, yq)[0].backward()   # the exact second-order gradient, in the model's .grad
    """
    buffers = buffers or {}
    if steps == 0:  # no inner loop to walk back through
        return ([combine(adapted, frozen)] if not every_step else []), buffers
    checks.integer("adjoint_trajectory", "checkpoint_every", checkpoint_every, minimum=1, expect="a positive int")
    loop = _InnerLoop(loss_fn, rule, steps, every_step, checkpoint_every, tuple(adapted), tuple(frozen),
                      tuple(rule_params), tuple(buffers))
    out = _AdjointInnerLoop.apply(loop, x_support, y_support, *adapted.values(), *frozen.values(),
                                  *rule_params.values(), *buffers.values())
    a, b = len(adapted), len(buffers)
    final = dict(zip(buffers, out[len(out) - b:]))
    phis = out[:steps * a] if every_step else out[:a]
    return [combine(dict(zip(adapted, phis[i:i + a])), frozen) for i in range(0, len(phis), a)], final
