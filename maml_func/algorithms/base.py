"""What every algorithm of the family is, and the pieces they are built from.

:class:`Algorithm` is the interface as a type (in the manner of optax's
``GradientTransformation`` protocol): what training, evaluation and the CLI
rely on, and nothing else. An algorithm is then put together from public
pieces, each usable on its own:

- the one per-task call of the model, with its buffers threaded through
  (:func:`maml_func.core.apply_model`): the objective :func:`model_loss` and
  the scores :func:`score`, :func:`score_path`, on top of :func:`task_loss`;
  a task's final buffers travel in its metrics (:func:`with_buffers`) and
  :func:`merge_buffers` turns the meta-batch's into the next meta-buffers;
- the inner loop: :func:`maml_func.inner.adapt_trajectory` with an
  :class:`~maml_func.inner.InnerRule`, resolved from the constructor's
  ``inner_lr``/``rule`` by :func:`resolve_rule`;
- the batching over tasks: :func:`maml_func.batching.map_tasks`, with an
  algorithm's own options by :func:`map_algorithm`, and the evaluation of
  every inner step of a meta-batch, :func:`evaluate_paths`;
- the checks of the options every algorithm has, and the model in its exact
  form for the BatchNorm policy: :func:`check_options`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch.nn.functional as F
from torch import Tensor, nn

from maml_func import checks
from maml_func.batching import check_chunk_size, map_tasks, stack_metrics
from maml_func.core import MetaParams, Params, accuracy, apply_model, params_and_buffers
from maml_func.inner import InnerRule, sgd
from maml_func.models import DropBlock
from maml_func.normalization import BATCH_NORM_POLICIES, exact_model
from maml_func.tasks import TaskBatch

__all__ = [
    "BUFFERS",
    "LOSSES",
    "Algorithm",
    "PlainRuleAlgorithm",
    "Metrics",
    "check_options",
    "evaluate_paths",
    "init_meta",
    "map_algorithm",
    "merge_buffers",
    "meta_buffers",
    "meta_parameters",
    "model_loss",
    "random_layers",
    "resolve_plain_rule",
    "resolve_rule",
    "score",
    "score_path",
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


@runtime_checkable
class Algorithm(Protocol):
    """The interface of every meta-learning algorithm (:class:`~maml_func.MAML`, :class:`~maml_func.Reptile`).

    Meta-parameters are ``{"model": Params, "rule": Params}``; one task is
    ``x_support [S, ...]``, ``y_support [S]``; a meta-batch is a
    :class:`~maml_func.tasks.TaskBatch` of T tasks.

    Example:
        >>> from maml_func import MLP, build
        >>> isinstance(build("reptile", MLP(), loss="mse"), Algorithm)
        True
    """

    @property
    def model(self) -> nn.Module:
        """The template network; never mutated."""

    @property
    def inner_steps(self) -> int:
        """Inner updates at meta-training time (the default of ``steps`` below)."""

    @property
    def loss(self) -> str:
        """The per-task objective, one of :data:`LOSSES`."""

    @property
    def chunk_size(self) -> int | str | None:
        """Tasks per ``vmap`` chunk, ``None`` or ``"auto"`` (see :mod:`maml_func.batching`)."""

    @property
    def vectorize(self) -> bool:
        """``False``: tasks run in a Python loop instead of ``vmap``."""

    def init(self) -> MetaParams:
        """Fresh meta-parameters, every leaf with ``requires_grad``."""

    def parameters(self, meta: MetaParams) -> list[Tensor]:
        """Every meta-learned tensor of ``meta``, for an optimizer."""

    def meta_loss(self, meta: MetaParams, batch: TaskBatch, iteration: int = 0) -> tuple[Tensor, Metrics]:
        """``(loss [], per-task metrics [T])``; ``loss.backward()`` gives the meta-gradient."""

    def evaluate(self, meta: MetaParams, batch: TaskBatch, steps: int | None = None) -> Metrics:
        """Query metrics after each of 0..``steps`` inner updates, ``[T, steps + 1]``."""

    def adapt(self, meta: MetaParams, x_support: Tensor, y_support: Tensor, steps: int | None = None) -> Params:
        """Params adapted to one task's support set."""

    def trajectory(
        self, meta: MetaParams, x_support: Tensor, y_support: Tensor, steps: int | None = None
    ) -> list[Params]:
        """Params after each of 0..``steps`` inner updates on one task's support set."""


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


def score_path(model: nn.Module, path: Sequence[Params], buffers: Params, x: Tensor, y: Tensor, loss: str) -> Metrics:
    """:func:`score` of every params along an inner-loop path with the same ``buffers``, stacked: ``[len(path)]``."""
    return stack_metrics([score(model, p, buffers, x, y, loss)[0] for p in path])


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


def check_options(where: str, model: Any, inner_steps: Any, loss: Any, chunk_size: Any,
                  batch_norm: Any = "batch") -> nn.Module:
    """Check the options every algorithm has (``where``, the algorithm's name, in each message).

    Returns:
        The model the algorithm runs: :func:`~maml_func.normalization.exact_model`
        of ``model`` for the ``batch_norm`` policy (``model`` itself when no
        layer needs changing).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    checks.integer(where, "inner_steps", inner_steps, minimum=0)
    checks.choice(where, "loss", loss, LOSSES)
    check_chunk_size(where, chunk_size)
    checks.choice(where, "batch_norm", batch_norm, BATCH_NORM_POLICIES)
    return exact_model(model, batch_norm)


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


def resolve_plain_rule(where: str, rule: Any, inner_lr: Any, default_lr: float, model: nn.Module, inner_steps: int,
                       why: str) -> tuple[InnerRule, float | None]:
    """:func:`resolve_rule` for an algorithm that meta-learns no inner rule (Reptile, iMAML).

    A rule with meta-learned parameters (``meta_sgd``, ``lslr``) is refused,
    with ``why`` (why this algorithm cannot train them) in the message.
    """
    rule, inner_lr = resolve_rule(where, rule, inner_lr, default_lr)
    learned = rule.init(dict(model.named_parameters()), inner_steps)
    if learned:
        raise ValueError(f"{where}: the inner rule has meta-learned parameters ({sorted(learned)[:3]}...), "
                         f"which {why}; use sgd(lr), or MAML with this rule")
    return rule, inner_lr


class PlainRuleAlgorithm:
    """The set-up of an algorithm whose inner rule has no meta-learned parameters (Reptile, iMAML).

    A base for frozen dataclasses with ``model``, ``rule``, ``inner_lr`` and
    ``inner_steps`` fields: :meth:`_set_rule` in ``__post_init__``, then
    :meth:`init` and :meth:`parameters` as every such algorithm has them.
    """

    def _set_rule(self, default_lr: float, why: str) -> None:
        """Resolve ``rule``/``inner_lr`` (:func:`resolve_plain_rule`) into ``_rule`` and ``inner_lr``."""
        name = type(self).__name__
        rule, inner_lr = resolve_plain_rule(name, self.rule, self.inner_lr, default_lr, self.model,  # type: ignore
                                            self.inner_steps, why)  # type: ignore[attr-defined]
        object.__setattr__(self, "_rule", rule)
        object.__setattr__(self, "inner_lr", inner_lr)

    def init(self) -> MetaParams:
        """Fresh meta-parameters ``{"model": Params, "rule": {}, "buffers": Params}``."""
        return init_meta(self.model, {})  # type: ignore[attr-defined]

    def parameters(self, meta: MetaParams) -> list[Tensor]:
        """Every meta-learned tensor, for an optimizer."""
        return meta_parameters(meta)


def map_algorithm(algorithm: Algorithm, fn: Callable[..., Metrics], meta: MetaParams, batch: TaskBatch, *,
                  randomness: str = "different") -> Metrics:
    """:func:`maml_func.batching.map_tasks` of ``fn(meta, xs, ys, xq, yq)`` with ``algorithm``'s batching options."""
    return map_tasks(fn, meta, batch, chunk_size=algorithm.chunk_size, vectorize=algorithm.vectorize,
                     caller=type(algorithm).__name__, model=algorithm.model, randomness=randomness)


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


def evaluate_paths(algorithm: Algorithm, meta: MetaParams, batch: TaskBatch,
                   path: Callable[[MetaParams, Tensor, Tensor], Sequence[Params]],
                   query_buffers: Callable[[Params, int], Params] | None = None) -> Metrics:
    """Query metrics along ``path(meta, x_support, y_support)`` of every task, ``[T, len(path)]`` each.

    Every point of the path is scored with the meta-buffers (in eval mode the
    running statistics; the support forwards of the path leave them alone),
    or with ``query_buffers(meta["buffers"], j)`` for the point after ``j`` steps.
    """

    def fn(meta: MetaParams, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Metrics:
        points = path(meta, xs, ys)
        if query_buffers is None:
            return score_path(algorithm.model, points, meta_buffers(meta, algorithm.model), xq, yq, algorithm.loss)
        buffers = meta_buffers(meta, algorithm.model)
        return stack_metrics([score(algorithm.model, p, query_buffers(buffers, j), xq, yq, algorithm.loss)[0]
                              for j, p in enumerate(points)])

    return map_algorithm(algorithm, fn, meta, batch)