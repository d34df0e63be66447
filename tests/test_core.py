"""The functional core against an independent reference, in float64.

The reference is :mod:`maml_func.reference`, written the way per-task-loop MAML
libraries do it: a Python loop over tasks, ``torch.autograd.grad(create_graph=True)``
in the inner loop, one backward of the mean query loss. The vectorized path must
match it to 1e-10 relative on the norm of all meta-gradients together (a conv
bias before batch norm has a true gradient of zero, so per-tensor relative errors
are noise; see docs/design.md, "BatchNorm under vmap").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, classification_batch, rel_err

import maml_func
from maml_func import LOOP, MAML, MLP, Conv4, TaskBatchNorm, Way, adapt, combine, sample_sinusoid_tasks, sgd
from maml_func.reference import loop_meta_grad, loop_task_losses


def setups():
    torch.manual_seed(0)
    conv = Conv4(n_way=3, hidden=8, image_size=16).double()
    mlp = MLP(hidden=(16, 16)).double()
    return {
        "conv4": (conv, classification_batch(4, 3, 2, 3, 16), F.cross_entropy, "cross_entropy", 0.3),
        "mlp": (
            mlp,
            sample_sinusoid_tasks(4, 6, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
            F.mse_loss,
            "mse",
            0.02,
        ),
    }


@pytest.mark.parametrize("net", ["conv4", "mlp"])
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("first_order", [False, True])
def test_vmapped_meta_gradient_equals_autograd_loop(net, steps, first_order):
    model, batch, loss_fn, loss_name, lr = setups()[net]
    maml = MAML(model, inner_lr=lr, inner_steps=steps, first_order=first_order, loss=loss_name)
    meta = maml.init()
    loss, metrics = maml.meta_loss(meta, batch)
    got = torch.autograd.grad(loss, list(meta["model"].values()))
    want = loop_meta_grad(model, meta["model"], batch, inner_lr=lr, steps=steps, first_order=first_order,
                          loss_fn=loss_fn)
    assert metrics["loss"].shape == (batch.num_tasks,)
    assert all(torch.isfinite(g).all() for g in got)
    assert torch.sqrt(sum((g**2).sum() for g in want)) > 1e-6, "reference gradient is trivially zero"
    assert rel_err(list(got), list(want)) < TOL


def test_first_and_second_order_differ():
    model, batch, _, loss_name, lr = setups()["conv4"]
    grads = {}
    for fo in (False, True):
        maml = MAML(model, inner_lr=lr, inner_steps=2, first_order=fo, loss=loss_name)
        meta = maml.init()
        grads[fo] = torch.autograd.grad(maml.meta_loss(meta, batch)[0], list(meta["model"].values()))
    # the second-order term is a Hessian-vector product: not small at this step size
    assert rel_err(list(grads[True]), list(grads[False])) > 1e-3


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_chunk_size_and_loop_do_not_change_results(chunk_size):
    model, batch, _, loss_name, lr = setups()["conv4"]
    results = []
    maml = MAML(model, inner_lr=lr, inner_steps=2, loss=loss_name)
    for way in (Way(), Way(chunk_size), LOOP):
        meta = maml.init()
        loss, metrics = maml.meta_loss(meta, batch, way=way)
        results.append((loss, metrics["accuracy"], torch.autograd.grad(loss, list(meta["model"].values()))))
    base_loss, base_acc, base_grad = results[0]
    for loss, acc, grad in results[1:]:
        assert torch.allclose(loss, base_loss, rtol=1e-12, atol=0)
        assert torch.equal(acc, base_acc)
        assert rel_err(list(grad), list(base_grad)) < 1e-12


def test_task_batch_norm_matches_torch_batch_norm():
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    ours = TaskBatchNorm(4).double()
    theirs = torch.nn.BatchNorm2d(4, track_running_stats=False).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2.0)
        ours.bias.uniform_(-1.0, 1.0)
        theirs.weight.copy_(ours.weight)
        theirs.bias.copy_(ours.bias)
    assert torch.allclose(ours(x), theirs(x), rtol=1e-12, atol=1e-12)
    # identical in eval mode too: batch statistics at test time, no running stats
    assert torch.allclose(ours.eval()(x), theirs.eval()(x), rtol=1e-12, atol=1e-12)


def test_evaluate_reports_every_step_and_step_zero_is_unadapted():
    model, batch, loss_fn, loss_name, lr = setups()["conv4"]
    maml = MAML(model, inner_lr=lr, inner_steps=1, loss=loss_name)
    meta = maml.init()
    with torch.no_grad():
        result = maml.scores(meta, batch, steps=3)
    assert result["loss"].shape == result["accuracy"].shape == (batch.num_tasks, 4)
    unadapted = loop_task_losses(model, meta["model"], batch, inner_lr=lr, steps=0, loss_fn=loss_fn)
    assert torch.allclose(result["loss"][:, 0], unadapted, rtol=1e-12, atol=0)
    # three SGD steps on the support set must change the query predictions' loss
    assert not torch.allclose(result["loss"][:, 3], result["loss"][:, 0])


def test_adapt_matches_closed_form_on_a_quadratic():
    w = {"w": torch.tensor([3.0, -2.0], dtype=torch.float64)}
    # loss = 0.5 * ||w||^2, gradient w: each step multiplies w by (1 - lr)
    out = adapt(lambda p: 0.5 * (p["w"] ** 2).sum(), w, rule=sgd(0.25), steps=3)
    assert torch.allclose(out["w"], w["w"] * 0.75**3, rtol=1e-15, atol=0)


def test_maml_meta_learns_sinusoids():
    torch.manual_seed(0)
    maml = MAML(MLP(), inner_lr=0.01, inner_steps=1, loss="mse")
    meta = maml.init()
    opt = torch.optim.Adam(maml.parameters(meta), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(500):
        loss, _ = maml.meta_loss(meta, sample_sinusoid_tasks(25, 10, 10, generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    test_batch = sample_sinusoid_tasks(200, 10, 50, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        mse = maml.scores(meta, test_batch, steps=10)["loss"].mean(0)
    assert mse[0] > 5 * mse[10], f"pre-adaptation MSE {mse[0]:.3f} vs after 10 steps {mse[10]:.3f}"
    assert mse[10] < 0.6


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="lr"):
        sgd(-0.1)
    with pytest.raises(ValueError, match="inner_steps"):
        MAML(MLP(), inner_steps=-1)
    with pytest.raises(ValueError, match="loss"):
        MAML(MLP(), loss="hinge")
    with pytest.raises(ValueError, match="chunk_size"):
        Way(chunk_size=0)
    with pytest.raises(TypeError, match="nn.Module"):
        MAML("not a model")
    with pytest.raises(ValueError, match="appear in more than one"):
        combine({"a": torch.zeros(1)}, {"a": torch.ones(1)})
    with pytest.raises(ValueError, match="adapt_only matches no parameter"):
        MAML(MLP(), adapt_only=lambda name: name.startswith("nothing")).init()
    with pytest.raises(ValueError, match="image_size"):
        Conv4(image_size=0)


def test_task_batch_to_keeps_integer_labels():
    batch = classification_batch(2, 3, 1, 2, 8).to(dtype=torch.float32)
    assert batch.x_support.dtype == batch.x_query.dtype == torch.float32
    assert batch.y_support.dtype == batch.y_query.dtype == torch.int64
    first, second = batch.split(1)
    assert first.num_tasks == second.num_tasks == 1


def test_public_api_is_exported():
    for name in maml_func.__all__:
        assert hasattr(maml_func, name), name
    assert maml_func.__version__
