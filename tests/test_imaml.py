"""Implicit MAML: its meta-gradient against a dense linear solve, vmap against the loop, and meta-learning.

The dense reference is written here, independently of maml_func: the proximal
inner loop with ``torch.autograd.grad`` on the flattened parameters, the
support loss's Hessian by ``torch.func.hessian``, and
``torch.linalg.solve(I + H / lam, grad L_query)``, float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import flat as _flat
from helpers import rel_err as _rel
from torch.func import functional_call, hessian

from maml_func import LOOP, MLP, VMAP, Way, build, meta_sgd, sample_sinusoid_tasks, sgd
from maml_func.algorithms import IMAML, conjugate_gradient


def _dense_meta_gradient(model, meta, batch, *, lr: float, steps: int, lam: float) -> torch.Tensor:
    """Mean over tasks of (I + H/lam)^-1 grad L_query(phi), phi after ``steps`` proximal SGD steps from theta."""
    names = list(meta["model"])
    shapes = [meta["model"][n].shape for n in names]
    theta = _flat(meta["model"][n].detach() for n in names)

    def loss(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, (t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes))))
        return F.mse_loss(functional_call(model, params, (x,)), y)

    total = torch.zeros_like(theta)
    for xs, ys, xq, yq in zip(*batch):
        phi = theta.clone()
        for _ in range(steps):
            p = phi.clone().requires_grad_(True)
            proximal = loss(p, xs, ys) + lam / 2 * (p - theta).square().sum()
            phi = phi - lr * torch.autograd.grad(proximal, p)[0]
        h = hessian(lambda p: loss(p, xs, ys))(phi)
        p = phi.clone().requires_grad_(True)
        g = torch.autograd.grad(loss(p, xq, yq), p)[0]
        total += torch.linalg.solve(torch.eye(len(theta), dtype=theta.dtype) + h / lam, g)
    return total / batch.num_tasks


@pytest.mark.parametrize("execution", [VMAP, Way(1), LOOP], ids=["vmap", "chunk1", "loop"])
@pytest.mark.slow
def test_meta_gradient_equals_a_dense_linear_solve(execution):
    torch.manual_seed(0)
    model = MLP(hidden=(8, 8)).double()  # 97 parameters: CG converges well within 200 steps
    batch = sample_sinusoid_tasks(3, 6, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lr, steps, lam = 0.05, 20, 1.0
    algo = IMAML(model, inner_lr=lr, inner_steps=steps, lam=lam, cg_steps=200, cg_tol=1e-14, loss="mse")
    meta = algo.init()
    loss, metrics = algo.meta_loss(meta, batch, way=execution)
    got = _flat(torch.autograd.grad(loss, algo.parameters(meta)))
    want = _dense_meta_gradient(model, meta, batch, lr=lr, steps=steps, lam=lam)
    assert metrics["loss"].shape == (3,) and want.norm() > 0
    assert _rel(got, want) < 1e-8


def test_first_order_skips_the_solve():
    """vmap against the loop, chunks and meta_gradient are in tests/test_algorithms.py (NAMES has imaml)."""
    torch.manual_seed(0)
    model = MLP(hidden=(8, 8)).double()
    batch = sample_sinusoid_tasks(3, 6, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    options = dict(inner_lr=0.05, inner_steps=5, lam=1.0, cg_steps=20, loss="mse")
    implicit, first = IMAML(model, **options), IMAML(model, first_order=True, **options)
    meta = implicit.init()
    g_i = _flat(torch.autograd.grad(implicit.meta_loss(meta, batch)[0], implicit.parameters(meta)))
    g_f = _flat(torch.autograd.grad(first.meta_loss(meta, batch)[0], first.parameters(meta)))
    want = 0
    for xs, ys, xq, yq in zip(*batch):
        phi = {k: v.requires_grad_(True) for k, v in first.adapt(meta, xs, ys).items()}
        want = want + _flat(torch.autograd.grad(F.mse_loss(functional_call(model, phi, (xq,)), yq),
                                                list(phi.values()))) / 3
    assert _rel(g_f, want) < 1e-12  # grad L_query(phi) itself
    assert _rel(g_f, g_i) > 1e-3    # and not the implicit gradient


def test_conjugate_gradient_solves_a_positive_definite_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a, b = m @ m.T + torch.eye(6, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, steps=6)["x"]
    assert torch.allclose(x, torch.linalg.solve(a, b), rtol=1e-10, atol=1e-12)
    # converged early: further steps leave the solution where it is
    assert torch.equal(conjugate_gradient(lambda v: {"x": 2 * v["x"]}, {"x": b}, steps=3, tol=1e-12)["x"], b / 2)


def test_registered_and_reachable_from_a_config():
    from maml_func.components import build_algorithm
    from maml_func.config import TrainConfig

    config = TrainConfig(algorithm="imaml", algorithm_options={"lam": 0.5, "cg_steps": 3}, inner_steps=4,
                         hidden=8, image_size=28)
    _, algo = build_algorithm(config)
    assert isinstance(algo, IMAML) and (algo.lam, algo.cg_steps, algo.inner_steps) == (0.5, 3, 4)
    assert algo.inner_lr == config.inner_lr and not hasattr(algo, "chunk_size")  # how tasks run: the policy's
    assert build("imaml", MLP(), first_order=True, loss="mse").first_order
    with pytest.raises(ValueError, match="algorithm 'imaml' does not accept these options"):
        build_algorithm(TrainConfig(algorithm="imaml", backprop="adjoint"))  # nothing to choose: always implicit


@pytest.mark.parametrize("options, message", [
    (dict(lam=0.0), "IMAML: lam must be a positive number, got 0.0; it weighs the proximal term"),
    (dict(lam="2"), "IMAML: lam must be a positive number, got '2'"),
    (dict(cg_steps=0), "IMAML: cg_steps must be a positive int, got 0"),
    (dict(cg_tol=-1.0), r"IMAML: cg_tol must be a number >= 0, got -1.0"),
    (dict(first_order=1), "IMAML: first_order must be true or false, got 1"),
    (dict(rule=meta_sgd(0.1)), "IMAML: the inner rule has meta-learned parameters"),
    (dict(rule=sgd(0.1), inner_lr=0.2), "IMAML: inner_lr=0.2 contradicts the step size of the rule"),
    (dict(inner_steps=-1), "IMAML: inner_steps must be an int >= 0, got -1"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        IMAML(MLP(), loss="mse", **options)
