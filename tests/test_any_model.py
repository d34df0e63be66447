"""Any nn.Module, exact: users' models (standard BatchNorm, LayerNorm, GroupNorm, buffers, Dropout) in every mode.

Every meta-gradient here is checked in float64 against the per-task autograd
loop of :mod:`maml_func.reference`, run on the user's model *as it is*
(``nn.BatchNorm2d`` with its affine weights inside ``F.batch_norm``, which is
exact without ``vmap``), on all meta-parameters together, to 1e-10 relative.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import TOL, assert_same_meta, classification_batch, rel_err, tiny
from torch import nn

from maml_func import LOOP, MAML, VMAP, UnsupportedModelError, Way, build, evaluate_run, exact_model, fit, meta_sgd
from maml_func.algorithms.pieces import merge_buffers
from maml_func.normalization import TaskBatchNorm, TaskLayerNorm
from maml_func.reference import loop_meta_loss

LR = 0.3


class Scaled(nn.Module):
    """A model with a plain registered buffer, read by its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 16))
        self.body = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x.flatten(1) * self.scale)))


def bn_mlp() -> nn.Module:
    """BatchNorm1d (affine, running statistics) and LayerNorm (affine), as a user writes them."""
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.LayerNorm(12),
                         nn.Linear(12, 3))


def gn_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64, 3))


SMALL = {"bn_mlp": bn_mlp, "gn_cnn": gn_cnn, "buffer": Scaled}
# (options of MAML, inner steps of the reference, first order, learned rates, adapted only the head)
MODES = {
    "maml_s1": ({}, 1, False),
    "maml_s2": ({"inner_steps": 2}, 2, False),
    "fomaml": ({"first_order": True}, 1, True),
    "adjoint_s2": ({"inner_steps": 2, "backprop": "adjoint", "checkpoint_every": 1}, 2, False),
}
EXECUTIONS = {"vmap": VMAP, "chunked": Way(2), "loop": LOOP}


def make(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory().double()


def algorithm_grads(algo, batch, way=None) -> tuple[list[torch.Tensor], dict]:
    meta = algo.init()
    loss, _ = algo.meta_loss(meta, batch, way=way)
    return list(torch.autograd.grad(loss, algo.parameters(meta))), meta


def reference_grads(model: nn.Module, meta: dict, batch, steps: int, first_order: bool, rate=None,
                    lr: float = LR) -> list[torch.Tensor]:
    params = {k: v.detach().clone().requires_grad_() for k, v in meta["model"].items()}
    rates = {k: v.detach().clone().requires_grad_() for k, v in meta["rule"].items()}
    inner_lr = lr if rate is None else (lambda name, step: rate(rates, name))
    loss = loop_meta_loss(model, params, batch, inner_lr=inner_lr, steps=steps, first_order=first_order,
                          loss_fn=F.cross_entropy)
    return list(torch.autograd.grad(loss, [*params.values(), *rates.values()], allow_unused=True))


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", SMALL)
def test_users_models_meta_gradient_equals_the_loop(name, mode, execution):
    model = make(SMALL[name])
    options, steps, first_order = MODES[mode]
    batch = classification_batch(4, n_way=3, k=2, q=2, size=4)
    got, meta = algorithm_grads(MAML(model, inner_lr=LR, **options), batch, EXECUTIONS[execution])
    want = reference_grads(model, meta, batch, steps, first_order)
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("name", SMALL)
def test_users_models_with_learned_rates_and_anil_equal_the_loop(name):
    model = make(SMALL[name])
    batch = classification_batch(4, n_way=3, k=2, q=2, size=4)
    got, meta = algorithm_grads(MAML(model, rule=meta_sgd(LR)), batch, Way(2))
    assert rel_err(got, reference_grads(model, meta, batch, 1, False, rate=lambda r, n: r[n])) < TOL
    head = [n for n, _ in model.named_parameters()][-1].rpartition(".")[0]
    anil = build("anil", model, head=head, inner_lr=LR)
    got, meta = algorithm_grads(anil, batch, VMAP)
    only_head = reference_grads(model, meta, batch, 1, False,
                                rate=lambda r, n: LR if n.startswith(head + ".") else 0.0)
    assert rel_err(got, only_head) < TOL


R18_MODES = {  # options of MAML, reference (steps, first order), learned rates / head only
    "fomaml_vmap": ({"first_order": True, "way": VMAP}, 1, True, None),
    "maml_s2_chunked": ({"inner_steps": 2, "way": Way(2)}, 2, False, None),
    "maml_loop": ({"way": LOOP}, 1, False, None),
    "metasgd_vmap": ({"rule": "meta_sgd", "way": VMAP}, 1, False, "rates"),
    "anil_vmap": ({"adapt_only": "fc", "way": VMAP}, 1, False, "head"),
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", R18_MODES)
def test_torchvision_resnet18_in_every_mode_equals_the_loop(mode):
    model = make(lambda: torchvision.models.resnet18(num_classes=3))
    options, steps, first_order, learned = dict(R18_MODES[mode][0]), *R18_MODES[mode][1:]
    # Two second-order steps at 16x16 (BatchNorm over 1x1 maps of 6 images) put the meta-gradient's norm at 3e6:
    # rounding alone then differs by 1e-10 between two orders of the same sums (the loop against the reference:
    # 7e-11); at 32x32 the problem is tame (norm 7e4) and every way agrees to 1e-11.
    batch = classification_batch(3, n_way=3, k=2, q=1, size=32 if steps > 1 else 16, channels=3)
    lr, rate = 0.01, None
    if learned == "rates":
        options["rule"] = meta_sgd(lr)
        rate = lambda r, n: r[n]  # noqa: E731
    elif learned == "head":
        options["adapt_only"] = lambda n: n.startswith("fc.")
        rate = lambda r, n: lr if n.startswith("fc.") else 0.0  # noqa: E731
    way = options.pop("way")
    got, meta = algorithm_grads(MAML(model, inner_lr=None if learned == "rates" else lr, **options), batch, way)
    assert rel_err(got, reference_grads(model, meta, batch, steps, first_order, rate=rate, lr=lr)) < TOL


@pytest.mark.slow
def test_torchvision_resnet18_is_exact_vectorized_whole_chunked_and_adjoint():
    model = make(lambda: torchvision.models.resnet18(num_classes=3))
    batch = classification_batch(3, n_way=3, k=2, q=1, size=16, channels=3)
    lr = 0.01  # a step that keeps 11M parameters in a well-conditioned region, so rounding stays at 1e-14
    converted = MAML(model, inner_lr=lr).model
    assert sum(isinstance(m, TaskBatchNorm) for m in converted.modules()) == 20
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert sorted(converted.state_dict()) == sorted(model.state_dict())  # names kept: loads both ways
    got, meta = algorithm_grads(MAML(model, inner_lr=lr), batch, VMAP)
    want = reference_grads(model, meta, batch, 1, False, lr=lr)
    assert rel_err(got, want) < TOL
    chunked, _ = algorithm_grads(MAML(model, inner_lr=lr), batch, Way(2))
    assert rel_err(chunked, want) < TOL
    adjoint, _ = algorithm_grads(MAML(model, inner_lr=lr, backprop="adjoint"), batch)
    assert rel_err(adjoint, want) < TOL
    assert all(type(m) is nn.BatchNorm2d for m in model.modules() if isinstance(m, nn.BatchNorm2d))  # untouched
    assert int(model.bn1.num_batches_tracked) == 0


def test_affine_inside_the_fused_batch_norm_kernel_is_caught(monkeypatch):
    """The trap the conversion avoids, shown: with the affine part inside F.batch_norm, vmap is off by far more."""

    def fused(self, x):
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)

    model = make(bn_mlp)
    batch = classification_batch(4, n_way=3, k=2, q=2, size=4)
    monkeypatch.setattr(TaskBatchNorm, "forward", fused)
    monkeypatch.setattr(TaskLayerNorm, "forward", lambda self, x: F.layer_norm(x, self.normalized_shape,
                                                                               self.weight, self.bias, self.eps))
    got, meta = algorithm_grads(MAML(model, inner_lr=LR), batch, VMAP)
    assert rel_err(got, reference_grads(model, meta, batch, 1, False)) > 1e-6


def test_reptile_and_imaml_run_users_models_and_reptile_equals_its_loop():
    batch = classification_batch(4, n_way=3, k=2, q=2, size=4)
    for factory in (bn_mlp, gn_cnn, Scaled):
        model = make(factory)
        reptile = build("reptile", model, inner_lr=LR, inner_steps=2)
        meta = reptile.init()
        loss, _ = reptile.meta_loss(meta, batch, way=VMAP)
        got = torch.autograd.grad(loss, reptile.parameters(meta))
        names, adapted = list(meta["model"]), []
        for xs, ys, _, _ in zip(*batch):  # the loop: plain SGD with autograd on the model as it is
            fast = [meta["model"][n].detach().clone().requires_grad_() for n in names]
            for _ in range(2):
                out = torch.func.functional_call(model, (dict(zip(names, fast)), copy.deepcopy(dict(
                    model.named_buffers()))), (xs,))
                grads = torch.autograd.grad(F.cross_entropy(out, ys), fast)
                fast = [(p - LR * g).detach().requires_grad_() for p, g in zip(fast, grads)]
            adapted.append(fast)
        want = [meta["model"][n].detach() - torch.stack([a[i] for a in adapted]).mean(0) for i, n in enumerate(names)]
        assert rel_err(list(got), want) < TOL
        imaml = build("imaml", model, inner_lr=0.1, inner_steps=3, lam=2.0)
        meta = imaml.init()
        vmapped = torch.autograd.grad(imaml.meta_loss(meta, batch, way=VMAP)[0], imaml.parameters(meta))
        assert rel_err(list(vmapped), list(torch.autograd.grad(imaml.meta_loss(meta, batch, way=LOOP)[0],
                                                              imaml.parameters(meta)))) < TOL


def test_running_statistics_follow_the_documented_rule_and_normalize_in_eval_mode():
    """BatchNorm1d first: the statistics it sees are the raw inputs', so the rule can be computed by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(16, momentum=0.2), nn.Linear(16, 3)).double()
    algo = MAML(model, inner_lr=LR, inner_steps=2, batch_norm="running")
    batch = classification_batch(3, n_way=3, k=2, q=2, size=4)
    meta = algo.init()
    _, metrics = algo.meta_loss(meta, batch, way=VMAP)
    new = merge_buffers(metrics)
    m, mean0, var0 = 0.2, meta["buffers"]["1.running_mean"], meta["buffers"]["1.running_var"]
    means, variances = [], []
    for xs, _, xq, _ in zip(*batch):
        mean, var = mean0, var0
        for x in (xs, xs, xq):  # two support forwards, then the query forward
            x = x.flatten(1)
            mean, var = (1 - m) * mean + m * x.mean(0), (1 - m) * var + m * x.var(0, correction=1)
        means.append(mean)
        variances.append(var)
    assert torch.allclose(new["1.running_mean"], torch.stack(means).mean(0), rtol=1e-12, atol=1e-14)
    assert torch.allclose(new["1.running_var"], torch.stack(variances).mean(0), rtol=1e-12, atol=1e-14)
    assert int(new["1.num_batches_tracked"]) == 3
    meta["buffers"].update(new)
    algo.model.eval()
    got = algo.scores(meta, batch, steps=0)["loss"][:, 0]
    bn = algo.model[1]
    want = [F.cross_entropy(F.linear((xq.flatten(1) - new["1.running_mean"]) / (new["1.running_var"] + bn.eps).sqrt()
                                     * meta["model"]["1.weight"] + meta["model"]["1.bias"],
                                     meta["model"]["2.weight"], meta["model"]["2.bias"]), yq)
            for _, _, xq, yq in zip(*batch)]
    assert torch.allclose(got, torch.stack(want), rtol=1e-12)
    assert int(model[1].num_batches_tracked) == 0  # the user's module never written


def test_batch_policy_leaves_the_buffers_alone_and_converts_visibly():
    model = make(bn_mlp)
    algo = MAML(model, inner_lr=LR)
    _, metrics = algo.meta_loss(algo.init(), classification_batch(2, n_way=3, k=2, q=2, size=4))
    assert merge_buffers(metrics) == {} and "statistics=batch" in repr(algo.model)
    assert exact_model(nn.Linear(2, 2)).__class__ is nn.Linear
    with pytest.raises(ValueError, match="batch_norm must be one of"):
        MAML(model, batch_norm="moving")


def test_what_cannot_work_is_said_in_one_line():
    class Counts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(16, 3)
            self.calls = torch.zeros(())  # not registered: shared by every task

        def forward(self, x):
            self.calls.add_(1)
            return self.layer(x.flatten(1))

    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(16, 3)

        def forward(self, x):
            return self.layer(x.flatten(1)) if x.sum() > 0 else -self.layer(x.flatten(1))

    batch = classification_batch(2, n_way=3, k=2, q=2, size=4)
    for model, said in ((Counts(), "writes in place"), (Branches(), "branches in Python")):
        with pytest.raises(UnsupportedModelError, match=said) as err:
            MAML(model.double(), inner_lr=LR).meta_loss(MAML(model.double()).init(), batch)
        assert "\n" not in str(err.value) and "way=LOOP" in str(err.value) or "register" in str(err.value)
    with pytest.raises(ValueError, match="backprop='adjoint' recomputes"):
        MAML(nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(16, 3)), backprop="adjoint")


def test_dropout_trains_vectorized_with_a_draw_per_task_and_repeats_under_a_seed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 3)).double()
    algo = MAML(model, inner_lr=LR)
    meta = algo.init()
    batch = classification_batch(4, n_way=3, k=2, q=2, size=4)
    torch.manual_seed(1)
    first = algo.meta_loss(meta, batch, way=VMAP)[1]["loss"]
    torch.manual_seed(1)
    assert torch.equal(first, algo.meta_loss(meta, batch, way=VMAP)[1]["loss"])
    model.eval()
    evaluated = [algo.scores(meta, batch, way=VMAP)["loss"] for _ in range(2)]
    assert torch.equal(*evaluated)


@pytest.mark.slow
def test_a_users_model_with_running_statistics_and_dropout_repeats_and_resumes_bit_for_bit(glyphs, tmp_path):
    """fit(model=...): the same seed gives the same run twice; a resumed run is the same run; evaluation repeats."""

    def net() -> nn.Module:
        torch.manual_seed(5)
        return nn.Sequential(nn.Conv2d(1, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.3),
                             nn.Flatten(), nn.Linear(6 * 8 * 8, 3))

    config = tiny(glyphs, tmp_path / "a", batch_norm="running", rotations=False)
    whole = fit(config, model=net(), progress=False)
    again = fit(config.replace(save_to=str(tmp_path / "b")), model=net(), progress=False)
    assert_same_meta(whole.meta, again.meta)
    assert not torch.equal(whole.meta["buffers"]["1.running_mean"], torch.zeros(6))
    assert int(whole.meta["buffers"]["1.num_batches_tracked"]) == 6 * 2  # a support and a query forward each
    fit(config.replace(save_to=str(tmp_path / "c"), iterations=4), model=net(), progress=False)
    resumed = fit(config.replace(save_to=str(tmp_path / "c")), model=net(), resume=tmp_path / "c", progress=False)
    assert_same_meta(resumed.meta, whole.meta)
    first, second = (evaluate_run(tmp_path / "a", model=net(), num_tasks=6, batch_size=3) for _ in range(2))
    assert first == second


def test_an_attention_model_runs_second_order_and_equals_the_loop():
    """The fused attention kernels have no double backward; the library's support forwards take the math one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):  # [B, 1, 4, 4] -> 4 tokens of 4 features
            return self.head(self.layer(self.embed(x.flatten(1, 2))).mean(1))

    model = make(Attention)
    batch = classification_batch(3, n_way=3, k=2, q=2, size=4)
    got, meta = algorithm_grads(MAML(model, inner_lr=LR), batch, VMAP)
    with sdpa_kernel([SDPBackend.MATH]):  # the loop needs the same kernel for its own double backward
        want = reference_grads(model, meta, batch, 1, False)
    assert rel_err(got, want) < TOL


def test_per_step_statistics_keep_one_copy_per_inner_step():
    """MAML++'s per-step running statistics: copy s follows the forwards of inner step s (the query: the last)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(16, momentum=0.2), nn.Linear(16, 3)).double()
    algo = build("mamlpp", model, inner_lr=LR, inner_steps=2, batch_norm="per_step")
    batch = classification_batch(3, n_way=3, k=2, q=2, size=4)
    meta = algo.init()
    assert meta["buffers"]["1.running_mean"].shape == (2, 16)
    _, metrics = algo.meta_loss(meta, batch, way=VMAP)
    new = merge_buffers(metrics)
    m, r = 0.2, torch.zeros(16, dtype=torch.float64)
    firsts, seconds = [], []
    for xs, _, xq, _ in zip(*batch):
        s, q = xs.flatten(1).mean(0), xq.flatten(1).mean(0)
        firsts.append((1 - m) * r + m * s)
        seconds.append((1 - m) * ((1 - m) * r + m * s) + m * q)
    assert torch.allclose(new["1.running_mean"][0], torch.stack(firsts).mean(0), rtol=1e-12, atol=1e-14)
    assert torch.allclose(new["1.running_mean"][1], torch.stack(seconds).mean(0), rtol=1e-12, atol=1e-14)
    assert new["1.num_batches_tracked"].tolist() == [1, 2]
    meta["buffers"].update(new)
    algo.model.eval()
    evaluated = algo.scores(meta, batch, steps=3)["loss"]
    assert evaluated.shape == (3, 4) and torch.isfinite(evaluated).all()
    with pytest.raises(ValueError, match="per_step' runs with backprop='unroll' only"):
        MAML(model, batch_norm="per_step", backprop="adjoint")
