"""The adjoint meta-gradient (``backprop="adjoint"``) against unrolled autograd and the per-task reference.

Float64, the tolerance of docs/design.md ("BatchNorm under vmap"): 1e-10
relative on the norm of all meta-gradients together (initialization and
rates), for 1, 5 and 10 inner steps, every inner rule, ANIL's frozen body and
the multi-step loss; vmapped with and without chunks, and in the Python loop.
A deliberately wrong recursion is far outside that tolerance.
"""

from __future__ import annotations

import pytest
import torch
from helpers import ITERATION, TOL, classification_batch, spread_rates
from helpers import conv4 as _conv
from helpers import flat as _flat
from helpers import meta_grads as _grads
from helpers import rel_err as _rel

from maml_func import LOOP, MAML, VMAP, TaskBatch, Way, lslr, meta_gradient, multi_step_weights, sgd
from maml_func.algorithms import adjoint, anil, mamlpp, metasgd
from maml_func.reference import loop_meta_loss

N_WAY, K_SHOT, N_QUERY, TASKS = 3, 2, 2, 3
LR, ANNEAL = 0.3, 10


def _batch(seed: int = 0) -> TaskBatch:
    return classification_batch(TASKS, N_WAY, K_SHOT, N_QUERY, 16, seed)


# name -> (factory of the algorithm, rate(rule_params, name, step) for the reference or None for sgd)
VARIANTS = {
    "sgd": (lambda model, **kw: MAML(model, inner_lr=LR, **kw), None),
    "metasgd": (lambda model, **kw: metasgd(model, inner_lr=LR, **kw), lambda r, k, i: r[k]),
    "lslr": (lambda model, **kw: MAML(model, rule=lslr(LR), **kw), lambda r, k, i: r[k][i]),
    "anil": (lambda model, **kw: anil(model, inner_lr=LR, **kw), None),
    "multistep": (lambda model, **kw: mamlpp(model, inner_lr=LR, multi_step_iterations=ANNEAL, **kw),
                  lambda r, k, i: r[k][i]),
}


def _meta(algo) -> dict:
    """Fresh meta-parameters with distinct learned rates, so that a mixed-up index or step shows."""
    return spread_rates(algo.init())


def _reference(name: str, algo, meta, batch, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """maml_func.reference's per-task autograd loop: the meta-loss and its gradient in every meta-parameter.

    ANIL: the reference adapts the head only and reaches the body through the
    module's own weights (``functional_call`` falls back to them), which equal
    ``meta``'s by construction; the body's gradient is taken there.
    """
    _, rate = VARIANTS[name]
    weights = multi_step_weights(steps, ITERATION, ANNEAL) if name == "multistep" else None
    params, wrt = meta["model"], algo.parameters(meta)
    if name == "anil":
        params = {k: v for k, v in meta["model"].items() if algo.adapt_only(k)}
        body = {k: p for k, p in algo.model.named_parameters() if not algo.adapt_only(k)}
        assert all(torch.equal(body[k], meta["model"][k]) for k in body)
        wrt = [params[k] if k in params else body[k] for k in meta["model"]]
    inner_lr = LR if rate is None else (lambda k, i: rate(meta["rule"], k, i))
    loss = loop_meta_loss(algo.model, params, batch, inner_lr=inner_lr, steps=steps, step_weights=weights)
    return loss.detach(), _flat(torch.autograd.grad(loss, wrt))


@pytest.mark.parametrize("steps", [1, 5, 10])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_adjoint_equals_unroll_and_the_per_task_reference(name, steps):
    make, _ = VARIANTS[name]
    model, batch = _conv(), _batch()
    unrolled = make(model, inner_steps=steps)
    adjoint_ = make(model, inner_steps=steps, backprop="adjoint")
    meta = _meta(unrolled)
    loss_u, g_u = _grads(unrolled, meta, batch, way=VMAP)
    loss_a, g_a = _grads(adjoint_, meta, batch, way=VMAP)
    loss_r, g_r = _reference(name, unrolled, meta, batch, steps)
    assert g_r.norm() > 0 and torch.isfinite(g_a).all()
    assert _rel(loss_a, loss_r) < 1e-12 and _rel(loss_u, loss_r) < 1e-12
    assert _rel(g_a, g_r) < TOL
    assert _rel(g_a, g_u) < TOL


@pytest.mark.parametrize("execution", [Way(1), Way(2), LOOP], ids=["chunk1", "chunk2", "loop"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_adjoint_in_chunks_and_in_the_loop_equals_the_reference(name, execution):
    make, _ = VARIANTS[name]
    model, batch = _conv(), _batch(seed=2)
    algo = make(model, inner_steps=5, backprop="adjoint")
    meta = _meta(algo)
    loss, grads = _grads(algo, meta, batch, way=execution)
    loss_r, grads_r = _reference(name, algo, meta, batch, 5)
    assert _rel(loss, loss_r) < 1e-12
    assert _rel(grads, grads_r) < TOL


def test_meta_gradient_and_backward_agree_and_metrics_match_unroll():
    model, batch = _conv(), _batch()
    unrolled = mamlpp(model, inner_lr=LR, inner_steps=3, multi_step_iterations=ANNEAL)
    algo = mamlpp(model, inner_lr=LR, inner_steps=3, multi_step_iterations=ANNEAL, backprop="adjoint")
    meta = _meta(algo)
    params = algo.parameters(meta)
    loss, metrics = meta_gradient(algo, meta, batch, ITERATION, tasks_per_backward=2)
    parts = _flat(p.grad for p in params)
    for p in params:
        p.grad = None
    loss_b, metrics_b = algo.meta_loss(meta, batch, ITERATION)
    loss_b.backward()
    assert _rel(parts, _flat(p.grad for p in params)) < TOL
    _, metrics_u = unrolled.meta_loss(meta, batch, ITERATION)
    assert metrics.keys() == metrics_u.keys() == {"loss", "accuracy"}
    for key in metrics:
        assert torch.allclose(metrics_b[key].detach(), metrics_u[key].detach(), rtol=1e-12, atol=0)
    with torch.no_grad():  # no query gradient is taken ahead of a backward: same values
        assert torch.allclose(algo.meta_loss(meta, batch, ITERATION)[0], loss_b.detach(), rtol=1e-12, atol=0)


def test_first_order_and_derivative_order_annealing_with_adjoint():
    model, batch = _conv(), _batch()
    options = dict(inner_lr=LR, inner_steps=2, multi_step_iterations=ANNEAL)
    annealed = mamlpp(model, first_order_iterations=3, backprop="adjoint", **options)
    meta = _meta(annealed)
    first = MAML(model, rule=lslr(LR), first_order=True, inner_steps=2, multi_step_iterations=ANNEAL)
    second = mamlpp(model, **options)
    for it, reference in ((2, first), (3, second)):
        assert _rel(_grads(annealed, meta, batch, it)[1], _grads(reference, meta, batch, it)[1]) < TOL
    first_adjoint = MAML(model, inner_lr=LR, inner_steps=3, first_order=True, backprop="adjoint")
    first_unroll = MAML(model, inner_lr=LR, inner_steps=3, first_order=True)
    plain = first_unroll.init()
    assert _rel(_grads(first_adjoint, plain, batch)[1], _grads(first_unroll, plain, batch)[1]) < TOL


def _drop_hessian(update, phi, frozen, rates, v):
    _, d_frozen, d_rates = _TRUE_REVERSE_STEP(update, phi, frozen, rates, v)
    return dict(v), d_frozen, d_rates


def _flip_hessian(update, phi, frozen, rates, v):
    # v - H(alpha v) becomes v + H(alpha v)
    d_phi, d_frozen, d_rates = _TRUE_REVERSE_STEP(update, phi, frozen, rates, v)
    return {k: 2 * v[k] - d_phi[k] for k in v}, d_frozen, d_rates


_TRUE_REVERSE_STEP = adjoint._reverse_step


@pytest.mark.parametrize("mutant", [_drop_hessian, _flip_hessian], ids=["no-hessian", "sign"])
def test_a_wrong_recursion_is_far_off(monkeypatch, mutant):
    model, batch = _conv(), _batch()
    algo = MAML(model, inner_lr=LR, inner_steps=5, backprop="adjoint")
    meta = _meta(algo)
    want = _reference("sgd", algo, meta, batch, 5)[1]
    assert _rel(_grads(algo, meta, batch, way=VMAP)[1], want) < TOL
    monkeypatch.setattr(adjoint, "_reverse_step", mutant)
    assert _rel(_grads(algo, meta, batch, way=VMAP)[1], want) > 1e-3


def test_bad_backprop_is_refused():
    with pytest.raises(ValueError, match=r"MAML: backprop must be one of \('unroll', 'adjoint'\), got 'adjoin'"):
        MAML(_conv(), backprop="adjoin")


def test_adjoint_trajectory_has_unrolled_values_and_every_step():
    model, (xs, ys, _, _) = _conv(), (t[0] for t in _batch())
    algo = MAML(model, inner_lr=LR, inner_steps=3)
    meta = algo.init()
    path = algo.trajectory(meta, xs, ys)
    every, _ = adjoint.adjoint_trajectory(algo._support_loss, meta["model"], {}, xs, ys, rule=sgd(LR),
                                          rule_params={}, steps=3, every_step=True)
    assert len(every) == 3
    for got, want in zip(every, path[1:]):
        assert all(torch.allclose(got[k], want[k], rtol=1e-13, atol=1e-15) for k in want)
    (untouched,), _ = adjoint.adjoint_trajectory(algo._support_loss, meta["model"], {}, xs, ys, rule=sgd(LR),
                                                 rule_params={}, steps=0)
    assert all(untouched[k] is meta["model"][k] for k in meta["model"])
