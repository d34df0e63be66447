"""ProtoMAML: the head of each task starts at its class prototypes, inside the graph; checked against a loop.

The reference below is written here, with autograd on the model as it is
(the head's input captured by a forward pre-hook, not by the library's body
network), one task at a time, in float64; the library's meta-gradient must
match it to 1e-10 relative on all meta-parameters together, every way the tasks
can run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, classification_batch, rel_err
from torch import nn
from torch.func import functional_call

from maml_func import LOOP, VMAP, Conv4, ProtoMAML, Way, build

N_WAY, LR, STEPS = 3, 0.3, 2


def _model() -> Conv4:
    torch.manual_seed(0)
    return Conv4(n_way=N_WAY, hidden=8, image_size=16).double()


def _embeddings(model: nn.Module, params: dict, x: torch.Tensor) -> torch.Tensor:
    seen = []
    hook = model.head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        functional_call(model, params, (x,))
    finally:
        hook.remove()
    return seen[0]


def _reference(model: nn.Module, meta: dict, batch, steps: int, first_order: bool = False):
    """The mean query loss after ProtoMAML's inner loop, per task, and its gradient w.r.t. the body's parameters."""
    theta = {k: v.detach().clone().requires_grad_() for k, v in meta["model"].items()}
    body = [k for k in theta if not k.startswith("head.")]
    total = 0.0
    for xs, ys, xq, yq in zip(*batch):
        z = _embeddings(model, theta, xs)
        c = torch.stack([z[ys == k].mean(0) for k in range(N_WAY)])
        # The inner loop's variables: copies of theta (nodes of their own), so that the inner gradient is the
        # partial derivative in each variable, not theta's total one through the prototypes as well.
        fast = {**{k: v.clone() for k, v in theta.items()}, "head.weight": 2 * c, "head.bias": -(c * c).sum(1)}
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (xs,)), ys)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: v - LR * g for (k, v), g in zip(fast.items(), grads)}
        total = total + F.cross_entropy(functional_call(model, fast, (xq,)), yq)
    loss = total / batch.num_tasks
    return loss.detach(), list(torch.autograd.grad(loss, [theta[k] for k in body]))


@pytest.mark.parametrize("way", [VMAP, Way(2), LOOP], ids=["vmap", "chunk2", "loop"])
def test_meta_gradient_equals_the_per_task_loop_second_order(way):
    model, batch = _model(), classification_batch(4, n_way=N_WAY, k=2, q=2, size=16)
    algo = ProtoMAML(model, inner_lr=LR, inner_steps=STEPS)
    meta = algo.init()
    params = algo.parameters(meta)
    assert len(params) == len(meta["model"]) - 2  # the head comes from the prototypes: not meta-learned
    loss, _ = algo.meta_loss(meta, batch, way=way)
    got = torch.autograd.grad(loss, params)
    want_loss, want = _reference(model, meta, batch, STEPS)
    assert abs(loss.item() - want_loss.item()) < 1e-12 * abs(want_loss.item())
    assert rel_err(list(got), want) < TOL
    # the prototypes are inside the graph: without their path into the body the gradient is far off
    assert rel_err(list(got), _detached_prototypes_reference(model, meta, batch)) > 1e-3


def _detached_prototypes_reference(model, meta, batch):
    theta = {k: v.detach().clone().requires_grad_() for k, v in meta["model"].items()}
    total = 0.0
    for xs, ys, xq, yq in zip(*batch):
        z = _embeddings(model, theta, xs).detach()
        c = torch.stack([z[ys == k].mean(0) for k in range(N_WAY)])
        fast = {**theta, "head.weight": (2 * c).requires_grad_(), "head.bias": (-(c * c).sum(1)).requires_grad_()}
        for _ in range(STEPS):
            grads = torch.autograd.grad(F.cross_entropy(functional_call(model, fast, (xs,)), ys), list(fast.values()),
                                        create_graph=True)
            fast = {k: v - LR * g for (k, v), g in zip(fast.items(), grads)}
        total = total + F.cross_entropy(functional_call(model, fast, (xq,)), yq)
    return list(torch.autograd.grad(total / batch.num_tasks, [v for k, v in theta.items() if not k.startswith("head")]))


def test_first_order_and_adjoint_equal_their_references():
    model, batch = _model(), classification_batch(3, n_way=N_WAY, k=2, q=2, size=16, seed=1)
    first = ProtoMAML(model, inner_lr=LR, inner_steps=STEPS, first_order=True)
    meta = first.init()
    got = torch.autograd.grad(first.meta_loss(meta, batch, way=VMAP)[0], first.parameters(meta))
    assert rel_err(list(got), _reference(model, meta, batch, STEPS, first_order=True)[1]) < TOL
    adjoint = build("protomaml", model, inner_lr=LR, inner_steps=STEPS, backprop="adjoint")
    got = torch.autograd.grad(adjoint.meta_loss(meta, batch, way=VMAP)[0], adjoint.parameters(meta))
    assert rel_err(list(got), _reference(model, meta, batch, STEPS)[1]) < TOL


def test_before_any_step_it_is_the_prototypical_network():
    """Step 0 of the evaluation classifies each query by its nearest prototype (Snell et al. 2017)."""
    model, batch = _model(), classification_batch(4, n_way=N_WAY, k=3, q=4, size=16, seed=2)
    algo = ProtoMAML(model, inner_lr=LR)
    meta = algo.init()
    with torch.no_grad():
        accuracy = algo.scores(meta, batch, steps=1)["accuracy"][:, 0]
        want = []
        for xs, ys, xq, yq in zip(*batch):
            z, q = _embeddings(model, meta["model"], xs), _embeddings(model, meta["model"], xq)
            c = torch.stack([z[ys == k].mean(0) for k in range(N_WAY)])
            want.append((torch.cdist(q, c).argmin(1) == yq).double().mean())
    assert torch.equal(accuracy, torch.stack(want).to(accuracy.dtype))


def test_a_head_that_is_not_linear_is_refused_with_the_fix():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Bilinear(8, 8, 3))
    with pytest.raises(ValueError, match=r"ProtoMAML: the head '3' is a Bilinear; it must be an nn.Linear"):
        ProtoMAML(net)
    with pytest.raises(ValueError, match="head='body' owns no parameter"):
        ProtoMAML(_model(), head="body")
