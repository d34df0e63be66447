"""Inner-loop update rules as pure ``(init, step)`` pairs, and :func:`adapt`.

A rule (in the manner of optax's ``(init, update)``) is an :class:`InnerRule`:

- ``init(params, steps) -> rule_params``: the rule's own meta-learned
  hyper-parameters for a model with these ``params`` adapted for ``steps``
  steps (empty for plain SGD, a rate per parameter element for Meta-SGD, a
  rate per tensor per step for MAML++'s LSLR). They live in
  ``meta["rule"]`` and are meta-trained with the initialization.
- ``step(params, grads, rule_params, i) -> params``: the pure update of step
  ``i`` (0-based). Fixed hyper-parameters (a step size) live in the closure.

A rule also records the fixed step size it was built with (``lr``: the rate of
:func:`sgd`, the initial rates of :func:`meta_sgd` and :func:`lslr`), so that an
algorithm reads its inner step size from the rule instead of keeping a second
copy that could disagree.

No rule needs state beyond the step index, so there is no state to thread
through; a rule that does can close over it the same way.

:func:`adapt` runs ``steps`` updates with :func:`torch.func.grad`. Gradients
through the update are kept (second order, MAML) unless ``first_order=True``,
which detaches the inner gradients explicitly: the order never depends on
whether someone remembered ``create_graph``. With ``indexed=True`` the loss is
also given the step index, ``loss_fn(params, i)``, for an inner loop whose data
changes from step to step (Reptile's mini-batches).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import grad

from maml_func import checks
from maml_func.core import Params

__all__ = ["IndexedLossFn", "InnerRule", "LossFn", "adapt", "adapt_trajectory", "lslr", "meta_sgd", "sgd"]

#: ``params -> []``: the support loss of one task.
LossFn = Callable[[Params], Tensor]
#: ``(params, i) -> []``: the support loss at inner step ``i`` (0-based).
IndexedLossFn = Callable[[Params, int], Tensor]


class InnerRule(NamedTuple):
    """An inner-loop update rule: a pair of pure functions.

    Attributes:
        init: ``(params, steps) -> rule_params``, the meta-learned
            hyper-parameters of the rule (``{}`` when it has none).
        step: ``(params, grads, rule_params, i) -> new_params`` for step ``i``.
        lr: the fixed step size the rule was built with (for learned rates,
            their starting value); ``None`` for a rule that declares none.
            ``InnerRule(init, step)`` still makes a rule.
    """

    init: Callable[[Params, int], Params]
    step: Callable[[Params, Params, Params, int], Params]
    lr: float | None = None


def sgd(lr: float) -> InnerRule:
    """Plain gradient descent with a fixed step size (MAML, Finn et al. 2017).

    ``params[k] - lr * grads[k]`` for every adapted tensor; nothing meta-learned.

    Example:
        >>> import torch
        >>> rule = sgd(0.5)
        >>> rule.step({"w": torch.ones(2)}, {"w": torch.ones(2)}, rule.init({}, 1), 0)
        {'w': tensor([0.5000, 0.5000])}
    """
    lr = float(checks.number("sgd", "lr", lr, positive=True))

    def init(params: Params, steps: int) -> Params:
        return {}

    def step(params: Params, grads: Params, rule_params: Params, i: int) -> Params:
        return {k: p - lr * grads[k] for k, p in params.items()}

    return InnerRule(init, step, lr)


def _updates(
    loss_fn: Callable[..., Any], params: Params, rule: InnerRule, rule_params: Params | None, steps: int,
    first_order: bool, indexed: bool, state: Params | None,
) -> Iterator[tuple[Params, Params | None]]:
    """Yield ``(params, state)`` after 0, 1, ..., ``steps`` updates (``state`` stays ``None`` without one)."""
    checks.integer("adapt", "steps", steps, minimum=0)
    rule_params = rule_params or {}
    stateful = state is not None
    grad_fn = grad(loss_fn, has_aux=stateful)
    yield params, state
    for i in range(steps):
        args = (params, i) if indexed else (params,)
        if stateful:
            grads, state = grad_fn(*args, state)
        else:
            grads = grad_fn(*args)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        params = rule.step(params, grads, rule_params, i)
        yield params, state


def adapt(
    loss_fn: LossFn | IndexedLossFn, params: Params, *, rule: InnerRule, rule_params: Params | None = None,
    steps: int = 1, first_order: bool = False, indexed: bool = False, state: Params | None = None,
) -> Any:
    """Adapt ``params`` to one task: ``steps`` updates of ``rule`` on ``loss_fn``.

    Args:
        loss_fn: ``Params -> []``, the support loss of the task as a function of
            the adapted params (close over the data and any frozen params).
        params: the starting point (the meta-learned initialization).
        rule: the update, e.g. :func:`sgd`.
        rule_params: the rule's meta-learned hyper-parameters (``meta["rule"]``).
        steps: number of inner updates.
        first_order: detach the inner gradients (first-order MAML).
        indexed: ``loss_fn`` takes the step index too, ``(params, i) -> []``,
            so that each step may see other data (a mini-batch per step).
        state: state threaded through the steps (a model's buffers, see
            :func:`maml_func.core.apply_model`): ``loss_fn`` then takes it last
            and returns it updated, ``(params[, i], state) -> (loss, state)``,
            and the result is ``(params, state)``.

    Returns:
        The adapted params, differentiable w.r.t. ``params`` and ``rule_params``
        (with ``state``: ``(params, state)``).

    Example:
        >>> import torch
        >>> w = {"w": torch.tensor(3.0)}
        >>> adapt(lambda p: p["w"] ** 2, w, rule=sgd(0.25), steps=2)
        {'w': tensor(0.7500)}
        >>> adapt(lambda p, i: (i + 1) * p["w"] ** 2, w, rule=sgd(0.25), steps=2, indexed=True)
        {'w': tensor(0.)}
        >>> adapt(lambda p, s: (p["w"] ** 2, {"n": s["n"] + 1}), w, rule=sgd(0.25), steps=2,
        ...       state={"n": torch.tensor(0)})
        ({'w': tensor(0.7500)}, {'n': tensor(2)})
    """
    *_, (last, end) = _updates(loss_fn, params, rule, rule_params, steps, first_order, indexed, state)
    return last if state is None else (last, end)


def adapt_trajectory(
    loss_fn: LossFn | IndexedLossFn, params: Params, *, rule: InnerRule, rule_params: Params | None = None,
    steps: int = 1, first_order: bool = False, indexed: bool = False, state: Params | None = None,
) -> Any:
    """Like :func:`adapt` (same arguments), but return the params after each of 0..``steps`` updates.

    Used for the accuracy after each inner step in evaluation and for the
    multi-step loss of MAML++. Returns a list of ``steps + 1`` dicts (with
    ``state``: ``(that list, the state after the last step)``).
    """
    path = list(_updates(loss_fn, params, rule, rule_params, steps, first_order, indexed, state))
    params_path = [p for p, _ in path]
    return params_path if state is None else (params_path, path[-1][1])


def _rates(fn: str, rule_params: Params, params: Params) -> None:
    missing = params.keys() - rule_params.keys()
    if missing:
        raise ValueError(f"{fn}: rule_params has no rate for {sorted(missing)[:4]}; make them with "
                         f"the rule's init on the same adapted params (algorithm.init() does)")


def meta_sgd(init_lr: float) -> InnerRule:
    """Meta-SGD (Li et al. 2017): a learned step size for every parameter element.

    ``params[k] - rates[k] * grads[k]`` with ``rates[k]`` of ``params[k]``'s
    shape, meta-trained with the initialization (a rate may turn negative: the
    paper learns the update direction too). The paper draws the initial rates
    at random; here they all start at ``init_lr``, so the first meta-step is
    exactly MAML's.

    Example:
        >>> import torch
        >>> rule = meta_sgd(0.1)
        >>> rates = rule.init({"w": torch.zeros(2, 3)}, 1)
        >>> rates["w"].shape
        torch.Size([2, 3])
        >>> rule.step({"w": torch.ones(2)}, {"w": torch.ones(2)}, {"w": torch.tensor([0.5, 1.0])}, 0)
        {'w': tensor([0.5000, 0.0000])}
    """
    init_lr = float(checks.number("meta_sgd", "init_lr", init_lr, positive=True))

    def init(params: Params, steps: int) -> Params:
        return {k: torch.full_like(p.detach(), init_lr) for k, p in params.items()}

    def step(params: Params, grads: Params, rule_params: Params, i: int) -> Params:
        _rates("meta_sgd", rule_params, params)
        return {k: p - rule_params[k] * grads[k] for k, p in params.items()}

    return InnerRule(init, step, init_lr)


def lslr(init_lr: float) -> InnerRule:
    """Per-layer per-step learned step sizes, LSLR of MAML++ (Antoniou et al. 2019).

    A scalar rate for every adapted tensor and every inner step:
    ``params[k] - rates[k][i] * grads[k]``, ``rates[k]`` of shape ``[steps]``,
    all starting at ``init_lr``. Steps past the trained number (evaluation with
    more steps than meta-training) reuse the last step's rate.

    Example:
        >>> import torch
        >>> rule = lslr(0.1)
        >>> rule.init({"w": torch.zeros(2, 3)}, 5)["w"]
        tensor([0.1000, 0.1000, 0.1000, 0.1000, 0.1000])
        >>> rule.step({"w": torch.ones(2)}, {"w": torch.ones(2)}, {"w": torch.tensor([0.5, 0.25])}, 1)
        {'w': tensor([0.7500, 0.7500])}
    """
    init_lr = float(checks.number("lslr", "init_lr", init_lr, positive=True))

    def init(params: Params, steps: int) -> Params:
        # At least one rate, so that a model meta-trained with 0 steps can still be adapted.
        n = max(int(steps), 1)
        return {k: torch.full((n,), init_lr, dtype=p.dtype, device=p.device) for k, p in params.items()}

    def step(params: Params, grads: Params, rule_params: Params, i: int) -> Params:
        _rates("lslr", rule_params, params)
        return {k: p - rule_params[k][min(i, rule_params[k].shape[0] - 1)] * grads[k] for k, p in params.items()}

    return InnerRule(init, step, init_lr)
