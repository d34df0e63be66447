"""Inner-loop update rules as pure ``(init, step)`` pairs, and :func:`adapt`.

A rule (in the manner of optax's ``(init, update)``) is an :class:`InnerRule`:

- ``init(params, steps) -> rule_params``: the rule's own meta-learned
  hyper-parameters for a model with these ``params`` adapted for ``steps``
  steps (empty for plain SGD, a rate per parameter element for Meta-SGD, a
  rate per tensor per step for MAML++'s LSLR). They live in
  ``meta["rule"]`` and are meta-trained with the initialization.
- ``step(params, grads, rule_params, i) -> params``: the pure update of step
  ``i`` (0-based). Fixed hyper-parameters (a step size) live in the closure.

No rule needs state beyond the step index, so there is no state to thread
through; a rule that does can close over it the same way.

:func:`adapt` runs ``steps`` updates with :func:`torch.func.grad`. Gradients
through the update are kept (second order, MAML) unless ``first_order=True``,
which detaches the inner gradients explicitly: the order never depends on
whether someone remembered ``create_graph``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import grad

from maml_func.core import Params

__all__ = ["InnerRule", "adapt", "adapt_trajectory", "sgd"]

LossFn = Callable[[Params], Tensor]


class InnerRule(NamedTuple):
    """An inner-loop update rule: a pair of pure functions.

    Attributes:
        init: ``(params, steps) -> rule_params``, the meta-learned
            hyper-parameters of the rule (``{}`` when it has none).
        step: ``(params, grads, rule_params, i) -> new_params`` for step ``i``.
    """

    init: Callable[[Params, int], Params]
    step: Callable[[Params, Params, Params, int], Params]


def _positive_float(fn: str, name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{fn}: {name} must be a positive number, got {value!r}")
    return float(value)


def sgd(lr: float) -> InnerRule:
    """Plain gradient descent with a fixed step size (MAML, Finn et al. 2017).

    ``params[k] - lr * grads[k]`` for every adapted tensor; nothing meta-learned.

    Example:
        >>> import torch
        >>> rule = sgd(0.5)
        >>> rule.step({"w": torch.ones(2)}, {"w": torch.ones(2)}, rule.init({}, 1), 0)
        {'w': tensor([0.5000, 0.5000])}
    """
    lr = _positive_float("sgd", "lr", lr)

    def init(params: Params, steps: int) -> Params:
        return {}

    def step(params: Params, grads: Params, rule_params: Params, i: int) -> Params:
        return {k: p - lr * grads[k] for k, p in params.items()}

    return InnerRule(init, step)


def _updates(
    loss_fn: LossFn, params: Params, rule: InnerRule, rule_params: Params, steps: int, first_order: bool
) -> Iterator[Params]:
    """Yield the params after 0, 1, ..., ``steps`` updates."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"adapt: steps must be a non-negative int, got {steps!r}")
    grad_fn = grad(loss_fn)
    yield params
    for i in range(steps):
        grads = grad_fn(params)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        params = rule.step(params, grads, rule_params, i)
        yield params


def adapt(
    loss_fn: LossFn,
    params: Params,
    *,
    rule: InnerRule,
    rule_params: Params | None = None,
    steps: int = 1,
    first_order: bool = False,
) -> Params:
    """Adapt ``params`` to one task: ``steps`` updates of ``rule`` on ``loss_fn``.

    Args:
        loss_fn: ``Params -> []``, the support loss of the task as a function of
            the adapted params (close over the data and any frozen params).
        params: the starting point (the meta-learned initialization).
        rule: the update, e.g. :func:`sgd`.
        rule_params: the rule's meta-learned hyper-parameters (``meta["rule"]``).
        steps: number of inner updates.
        first_order: detach the inner gradients (first-order MAML).

    Returns:
        The adapted params, differentiable w.r.t. ``params`` and ``rule_params``.

    Example:
        >>> import torch
        >>> w = {"w": torch.tensor(3.0)}
        >>> adapt(lambda p: p["w"] ** 2, w, rule=sgd(0.25), steps=2)
        {'w': tensor(0.7500)}
    """
    *_, last = _updates(loss_fn, params, rule, rule_params or {}, steps, first_order)
    return last


def adapt_trajectory(
    loss_fn: LossFn,
    params: Params,
    *,
    rule: InnerRule,
    rule_params: Params | None = None,
    steps: int = 1,
    first_order: bool = False,
) -> list[Params]:
    """Like :func:`adapt`, but return the params after each of 0..``steps`` updates.

    Used for the accuracy after each inner step in evaluation and for the
    multi-step loss of MAML++. Returns a list of ``steps + 1`` dicts.
    """
    return list(_updates(loss_fn, params, rule, rule_params or {}, steps, first_order))
