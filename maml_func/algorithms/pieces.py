"""The public pieces every algorithm of the family is built from, each usable on its own.

- the objective of one task's model output, :func:`task_loss`, and the one
  per-task call of the model with its buffers threaded through
  (:func:`maml_func.core.apply_model`): :func:`model_loss`, :func:`score`; a
  task's final buffers travel in its metrics
  (:func:`with_buffers`) and :func:`merge_buffers` turns the meta-batch's into
  the next meta-buffers;
- meta-parameters: :func:`init_meta`, :func:`meta_parameters`,
  :func:`meta_buffers`;
- the inner rule from an algorithm's ``inner_lr``/``rule``: :func:`resolve_rule`;
- the model's parts that algorithms name: its random layers
  (:func:`random_layers`) and its head (:func:`head_predicate`, ANIL's and
  ProtoMAML's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from maml_func import checks
from maml_func.core import MetaParams, Params, accuracy, apply_model, params_and_buffers
from maml_func.inner import InnerRule, sgd
from maml_func.models import DropBlock

__all__ = [
    "BUFFERS",
    "LOSSES",
    "Metrics",
    "NamePrefix",
    "head_name",
    "head_predicate",
    "init_meta",
    "merge_buffers",
    "meta_buffers",
    "meta_parameters",
    "model_loss",
    "random_layers",
    "resolve_rule",
    "score",
    "task_loss",
    "with_buffers",
]

#: The prefix of the metrics that carry a task's buffers after its forwards: ``"buffers.<name>"``.
BUFFERS = "buffers."

#: Named per-task (or per-task, per-step) results: ``{"loss": ..., "accuracy": ...}``.
Metrics = dict[str, Tensor]

_LOSS_FNS = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
#: The per-task objectives by name; ``"cross_entropy"`` also reports accuracy.
LOSSES = tuple(_LOSS_FNS)


def task_loss(loss: str, out: Tensor, target: Tensor) -> Tensor:
    """The objective ``loss`` (one of :data:`LOSSES`) of a model's output on one task.  ``[B, ...], [B] -> []``

    Example:
        >>> import torch
        >>> task_loss("mse", torch.zeros(2, 1), torch.ones(2, 1))
        tensor(1.)
    """
    return _LOSS_FNS[checks.choice("task_loss", "loss", loss, LOSSES)](out, target)


def model_loss(model: nn.Module, loss: str, params: Params, buffers: Params, x: Tensor, y: Tensor, *,
               double_backward: bool = False) -> tuple[Tensor, Params]:
    """The objective ``loss`` of ``model`` run with ``params`` and ``buffers`` on ``(x, y)``, and the buffers after.

    ``(loss [], buffers)``: the support loss of the inner loop (``double_backward``
    when it is differentiated twice, see :func:`maml_func.core.apply_model`).
    """
    out, buffers = apply_model(model, params, buffers, x, double_backward=double_backward)
    return task_loss(loss, out, y), buffers


def score(model: nn.Module, params: Params, buffers: Params, x: Tensor, y: Tensor, loss: str) -> tuple[Metrics, Params]:
    """``({"loss": [], "accuracy": []}, buffers)`` of ``model`` run with ``params`` and ``buffers`` on ``(x, y)``.

    Accuracy only for ``loss="cross_entropy"``; the buffers as the forward left them.
    """
    out, buffers = apply_model(model, params, buffers, x)
    metrics = {"loss": task_loss(loss, out, y)}
    if loss == "cross_entropy":
        metrics["accuracy"] = accuracy(out, y)
    return metrics, buffers


def with_buffers(metrics: Metrics, buffers: Params) -> Metrics:
    """``metrics`` and a task's final ``buffers`` under ``"buffers.<name>"`` (how they leave a per-task function)."""
    return {**metrics, **{BUFFERS + k: v for k, v in buffers.items()}}


def merge_buffers(metrics: Metrics) -> Params:
    """The meta-batch's buffers from its per-task ones in ``metrics`` (``"buffers.<name>" [T, ...]``).

    The mean over tasks of each floating-point buffer (BatchNorm running
    statistics: the rule of :mod:`maml_func.normalization`); the largest value
    of an integer one (a counter such as ``num_batches_tracked``, the same in
    every task). ``{}`` when the metrics carry none.

    Example:
        >>> import torch
        >>> merge_buffers({"loss": torch.zeros(2), "buffers.mean": torch.tensor([[1.0], [3.0]]),
        ...                "buffers.n": torch.tensor([4, 4])})
        {'mean': tensor([2.]), 'n': tensor(4)}
    """
    merged = {}
    for key, value in metrics.items():
        if key.startswith(BUFFERS):
            name = key[len(BUFFERS):]
            merged[name] = value.mean(0) if value.is_floating_point() else value.amax(0)
    return merged


def meta_parameters(meta: MetaParams) -> list[Tensor]:
    """Every meta-learned tensor: the initialization's, then the rule's (buffers are state, not learned)."""
    return [*meta["model"].values(), *meta["rule"].values()]


def meta_buffers(meta: MetaParams, model: nn.Module) -> Params:
    """``meta["buffers"]``; for meta-parameters made without them (``{"model": ..., "rule": ...}``), the model's own."""
    if "buffers" in meta:
        return meta["buffers"]
    return {k: v.detach() for k, v in model.named_buffers()}


def init_meta(model: nn.Module, rule_params: Params) -> MetaParams:
    """``{"model": params, "rule": rule_params, "buffers": buffers}``: fresh copies, learned leaves with grad."""
    params, buffers = params_and_buffers(model)
    return {"model": params,
            "rule": {k: v.detach().clone().requires_grad_(True) for k, v in rule_params.items()},
            "buffers": buffers}


def resolve_rule(where: str, rule: Any, inner_lr: Any, default_lr: float) -> tuple[InnerRule, float | None]:
    """The inner rule an algorithm runs, and its inner step size: ``(rule, inner_lr)``.

    The rule is the one source of the step size. Without a rule it is
    ``sgd(inner_lr)`` (``sgd(default_lr)`` when ``inner_lr`` is ``None``); with
    one, ``inner_lr`` is read from its ``lr``, and an ``inner_lr`` given as
    well must agree with it. A rule that declares no ``lr`` keeps ``inner_lr``
    as given.

    Example:
        >>> from maml_func import lslr
        >>> resolve_rule("MAML", lslr(0.1), None, 0.4)[1]
        0.1
        >>> resolve_rule("MAML", lslr(0.1), 0.4, 0.4)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: MAML: inner_lr=0.4 contradicts the step size of the rule (0.1); leave inner_lr out ...
    """
    checks.number(where, "inner_lr", inner_lr, positive=True, none_ok=True)
    if rule is None:
        rule = sgd(default_lr if inner_lr is None else inner_lr)
        return rule, rule.lr
    if not isinstance(rule, InnerRule):
        raise TypeError(f"{where}: rule must be an InnerRule such as sgd(0.4) or meta_sgd(0.4), "
                        f"got {type(rule).__name__}")
    if rule.lr is None:
        return rule, inner_lr
    if inner_lr is not None and float(inner_lr) != rule.lr:
        raise ValueError(f"{where}: inner_lr={inner_lr!r} contradicts the step size of the rule ({rule.lr!r}); "
                         "leave inner_lr out (it is read from the rule) or build the rule with the step size you want")
    return rule, rule.lr


def random_layers(model: nn.Module) -> list[str]:
    """Names of ``model``'s layers that draw random numbers in training mode (Dropout with ``p > 0``, DropBlock).

    Example:
        >>> from torch import nn
        >>> random_layers(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Dropout(0.0)))
        ['1']
    """
    return [name for name, module in model.named_modules()
            if (isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0)
            or (isinstance(module, DropBlock) and module.drop_rate > 0)]


@dataclass(frozen=True)
class NamePrefix:
    """``adapt_only`` predicate: the parameters of one submodule (picklable, readable repr)."""

    prefix: str

    def __call__(self, name: str) -> bool:
        return name.startswith(self.prefix)


def head_name(model: nn.Module, where: str = "anil") -> str:
    """The name of ``model``'s output submodule: the one called ``head`` (as in :class:`~maml_func.Conv4`), else the
    last registered submodule that owns parameters (``layers.4`` in the default :class:`~maml_func.MLP`).

    Example:
        >>> from maml_func import MLP
        >>> head_name(MLP())
        'layers.4'
    """
    modules = dict(model.named_modules())
    if isinstance(modules.get("head"), nn.Module) and any(True for _ in modules["head"].parameters()):
        return "head"
    owners = [n for n, m in modules.items() if n and any(True for _ in m.parameters(recurse=False))]
    if not owners:
        raise ValueError(f"{where}: model {type(model).__name__} has no submodule with parameters to adapt")
    return owners[-1]


def head_predicate(model: nn.Module, head: str | None, where: str) -> NamePrefix:
    """The predicate on parameter names that picks the head ``head`` (``None``: :func:`head_name`) of ``model``."""
    if head is None:
        head = head_name(model, where)
    names = [n for n, _ in model.named_parameters()]
    predicate = NamePrefix(head + ".")
    if not any(predicate(n) for n in names):
        raise ValueError(f"{where}: head={head!r} owns no parameter of {type(model).__name__} "
                         f"(parameters: {names[:6]}...); pass the name of the output submodule")
    return predicate
