"""The MAML family of meta-learning algorithms, each over the same functional core.

Every algorithm object has the same interface as :class:`MAML`: ``init()``,
``parameters(meta)``, ``meta_loss(meta, batch, iteration)``,
``evaluate(meta, batch, steps)``, ``adapt(meta, x_support, y_support)``.
:func:`build` makes one by name, so switching algorithm is one argument.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from maml_func.algorithms.maml import MAML

__all__ = ["ALGORITHMS", "MAML", "build"]


def _fomaml(model: nn.Module, **kwargs: Any) -> MAML:
    return MAML(model, first_order=True, **kwargs)


ALGORITHMS: dict[str, Callable[..., Any]] = {
    "maml": MAML,
    "fomaml": _fomaml,
}


def build(name: str, model: nn.Module, **kwargs: Any) -> Any:
    """Make the algorithm called ``name`` for ``model``.

    Args:
        name: one of :data:`ALGORITHMS` (``"maml"``, ``"fomaml"``, ...).
        model: the template network.
        **kwargs: the algorithm's options (``inner_lr``, ``inner_steps``, ``chunk_size``, ...).

    Example:
        >>> from maml_func import MLP
        >>> build("fomaml", MLP(), inner_lr=0.01, loss="mse").first_order
        True
    """
    if name not in ALGORITHMS:
        raise ValueError(f"build: unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name](model, **kwargs)
