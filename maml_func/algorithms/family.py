"""The family by name: the variants that are an existing algorithm with options set, and :func:`build`.

=========  =====================================================  ==============================
name       is                                                     paper
=========  =====================================================  ==============================
maml       ``MAML(model)``                                        Finn et al. 2017
fomaml     ``MAML(model, first_order=True)``                      Finn et al. 2017, §5.2
anil       ``MAML(model, adapt_only=<head's names>)``             Raghu et al. 2020
metasgd    ``MAML(model, rule=meta_sgd(inner_lr))``               Li et al. 2017
mamlpp     ``MAML(model, rule=lslr(inner_lr), inner_steps=5,      Antoniou et al. 2019
           multi_step_iterations=...)``
protomaml  ``ProtoMAML(model)``: the head starts at the prototypes Triantafillou et al. 2020
reptile    ``Reptile(model)``                                     Nichol et al. 2018
imaml      ``IMAML(model)``                                       Rajeswaran et al. 2019
=========  =====================================================  ==============================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from maml_func.algorithms.base import Algorithm
from maml_func.algorithms.imaml import IMAML
from maml_func.algorithms.maml import MAML
from maml_func.algorithms.pieces import head_predicate
from maml_func.algorithms.protomaml import ProtoMAML
from maml_func.algorithms.reptile import Reptile
from maml_func.inner import lslr, meta_sgd

__all__ = ["ALGORITHMS", "anil", "build", "fomaml", "mamlpp", "metasgd", "reptile"]


def _reject(fn: str, kwargs: dict[str, Any], names: Iterable[str], fix: str) -> None:
    clash = sorted(set(names) & kwargs.keys())
    if clash:
        raise ValueError(f"{fn}: {clash} is fixed by this algorithm; {fix}")


def fomaml(model: nn.Module, **kwargs: Any) -> MAML:
    """First-order MAML (Finn et al. 2017, §5.2): inner gradients detached.

    Example:
        >>> from maml_func import MLP
        >>> fomaml(MLP(), loss="mse").first_order
        True
    """
    if kwargs.pop("first_order", True) is not True:
        raise ValueError("fomaml: first_order=False contradicts first-order MAML; use build('maml', ...) "
                         "for second order")
    return MAML(model, first_order=True, **kwargs)


def anil(model: nn.Module, *, head: str | None = None, **kwargs: Any) -> MAML:
    """ANIL, Almost No Inner Loop (Raghu et al. 2020): only the head is adapted.

    The body is meta-trained (through the query loss, second order by default)
    but left untouched by the inner loop.

    Args:
        model: the template network.
        head: name of the submodule adapted in the inner loop. ``None``: the
            submodule called ``head`` (as in :class:`~maml_func.Conv4`), else the
            last registered submodule that owns parameters (``layers.4`` in the
            default :class:`~maml_func.MLP`).
        **kwargs: options of :class:`MAML`.

    Example:
        >>> from maml_func import Conv4, MLP
        >>> anil(Conv4()).adapt_only("head.weight"), anil(Conv4()).adapt_only("features.0.0.weight")
        (True, False)
        >>> anil(MLP(), loss="mse").adapt_only
        NamePrefix(prefix='layers.4.')
    """
    _reject("anil", kwargs, ["adapt_only"], "use build('maml', model, adapt_only=...) for another subset")
    return MAML(model, adapt_only=head_predicate(model, head, "anil"), **kwargs)


def metasgd(model: nn.Module, *, inner_lr: float = MAML.default_inner_lr, **kwargs: Any) -> MAML:
    """Meta-SGD (Li et al. 2017): a learned step size per parameter element.

    The rates start at ``inner_lr`` and live in ``meta["rule"]``.

    Example:
        >>> from maml_func import MLP
        >>> algo = metasgd(MLP(), inner_lr=0.01, loss="mse")
        >>> algo.init()["rule"]["layers.0.weight"].shape
        torch.Size([40, 1])
    """
    _reject("metasgd", kwargs, ["rule"], "set the initial rates with inner_lr")
    return MAML(model, rule=meta_sgd(inner_lr), **kwargs)


def mamlpp(
    model: nn.Module,
    *,
    inner_lr: float = 0.1,
    inner_steps: int = 5,
    multi_step_iterations: int | None = 1000,
    first_order_iterations: int = 0,
    **kwargs: Any,
) -> MAML:
    """MAML++ (Antoniou et al. 2019): LSLR plus the multi-step loss, second order.

    Of the paper's fixes this has the two that matter most: learned per-layer
    per-step step sizes (:func:`~maml_func.lslr`, starting at ``inner_lr``) and
    the multi-step loss annealed to the last step over
    ``multi_step_iterations`` meta-iterations (:func:`multi_step_weights`);
    derivative-order annealing (first order for ``first_order_iterations``
    meta-iterations) is off by default. Per-step batch-norm weights and
    statistics and the cosine outer schedule are not included.

    Defaults follow the paper's 5 inner steps with rates starting at 0.1.

    Example:
        >>> from maml_func import MLP
        >>> algo = mamlpp(MLP(), inner_lr=0.01, inner_steps=3, loss="mse")
        >>> algo.init()["rule"]["layers.0.weight"]
        tensor([0.0100, 0.0100, 0.0100], requires_grad=True)
    """
    _reject("mamlpp", kwargs, ["rule"], "set the initial rates with inner_lr")
    return MAML(
        model,
        inner_steps=inner_steps,
        rule=lslr(inner_lr),
        multi_step_iterations=multi_step_iterations,
        first_order_iterations=first_order_iterations,
        **kwargs,
    )


def reptile(model: nn.Module, **kwargs: Any) -> Reptile:
    """Reptile (Nichol et al. 2018); see :class:`Reptile` for the options and the outer step."""
    return Reptile(model, **kwargs)


ALGORITHMS: dict[str, Callable[..., Algorithm]] = {
    "maml": MAML,
    "fomaml": fomaml,
    "anil": anil,
    "metasgd": metasgd,
    "mamlpp": mamlpp,
    "reptile": reptile,
    "imaml": IMAML,
    "protomaml": ProtoMAML,
}


def build(name: str, model: nn.Module, **kwargs: Any) -> Algorithm:
    """Make the algorithm called ``name`` for ``model``.

    Args:
        name: one of :data:`ALGORITHMS`: ``"maml"``, ``"fomaml"``, ``"anil"``,
            ``"metasgd"``, ``"mamlpp"``, ``"reptile"``, ``"imaml"``, ``"protomaml"``.
        model: the template network.
        **kwargs: the algorithm's options (``inner_lr``, ``inner_steps``, ``loss``, ...).

    Example:
        >>> from maml_func import MLP
        >>> build("fomaml", MLP(), inner_lr=0.01, loss="mse").first_order
        True
        >>> type(build("reptile", MLP(), loss="mse")).__name__
        'Reptile'
    """
    if name not in ALGORITHMS:
        raise ValueError(f"build: unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name](model, **kwargs)
