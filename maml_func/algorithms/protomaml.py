"""ProtoMAML (Triantafillou et al. 2020, Meta-Dataset §3.2): MAML whose linear head starts at the prototypes.

Per task, the support set's embeddings (the model's output before its head)
give the class prototypes ``c_k``, the mean embedding of class ``k``; the
head's weights start at ``2 c_k`` and its biases at ``-||c_k||^2``, which
makes the head at step 0 a Prototypical Network's classifier (Snell et al.
2017): ``-||z - c_k||^2`` up to a term that is the same for every class. MAML's
inner loop then adapts from there. The prototypes are computed inside the
graph, so the meta-gradient flows through the head's initialization into the
body (second order by default, as MAML). The meta-learned head of ``meta`` is
not used (it gets no gradient); the head's shape and name are the model's.

Everything else is :class:`~maml_func.algorithms.maml.MAML`'s: this module
states where a task's inner loop starts, and nothing more.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from maml_func.algorithms.maml import MAML
from maml_func.algorithms.pieces import head_predicate, meta_buffers
from maml_func.core import MetaParams, Params, apply_model
from maml_func.normalization import at_step

__all__ = ["ProtoMAML", "prototype_head"]


def prototype_head(embeddings: Tensor, labels: Tensor, ways: int) -> tuple[Tensor, Tensor]:
    """The linear head of a Prototypical Network: ``(weight [ways, D], bias [ways])`` from one support set.

    ``embeddings [S, D]``, ``labels [S]`` in ``0..ways-1``; ``c_k`` the mean
    embedding of class ``k`` (zero for a class with no example); ``weight = 2
    c_k``, ``bias = -||c_k||^2``. Differentiable in ``embeddings``; written
    without data-dependent shapes, so it runs under ``vmap``.

    Example:
        >>> import torch
        >>> w, b = prototype_head(torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0, 1]), 2)
        >>> w, b
        (tensor([[4., 0.],
                [0., 4.]]), tensor([-4., -4.]))
    """
    onehot = (labels.unsqueeze(1) == torch.arange(ways, device=labels.device)).to(embeddings.dtype)  # [S, ways]
    prototypes = onehot.T @ embeddings / onehot.sum(0).clamp(min=1).unsqueeze(1)  # [ways, D]
    return 2 * prototypes, -prototypes.square().sum(1)


@dataclass(frozen=True, eq=False)
class ProtoMAML(MAML):
    """ProtoMAML (Triantafillou et al. 2020): MAML with the head of each task started at the class prototypes.

    Args:
        head: the output submodule, an ``nn.Linear`` with a bias whose input
            is the embedding; ``None``: found as ANIL finds it
            (:func:`~maml_func.algorithms.pieces.head_name`: the submodule
            called ``head``, else the last one that owns parameters).

    Every other option is :class:`~maml_func.algorithms.maml.MAML`'s
    (``adapt_only`` too: ProtoMAML that adapts only the head).
    The embedding forward reads the buffers the first inner step sees and
    leaves them as they are.

    Example:
        >>> from maml_func import Conv4
        >>> algo = ProtoMAML(Conv4(hidden=8), inner_lr=0.1)
        >>> algo.head
        'head'
    """

    head: str | None = None
    _body: nn.Module = field(init=False, repr=False)

    def _check(self) -> None:
        super()._check()
        if self.loss != "cross_entropy":
            raise ValueError(f"ProtoMAML: the prototype head classifies: loss must be 'cross_entropy', got "
                             f"{self.loss!r}; for regression use MAML")
        prefix = head_predicate(self.model, self.head, "ProtoMAML").prefix
        name = prefix.removesuffix(".")
        module = self.model.get_submodule(name)
        if not isinstance(module, nn.Linear) or module.bias is None:
            raise ValueError(f"ProtoMAML: the head {name!r} is a {type(module).__name__}; it must be an nn.Linear "
                             "with a bias whose input is the embedding (pass head='<its name>')")
        body = copy.deepcopy(self.model)
        parent, _, leaf = name.rpartition(".")
        setattr(body.get_submodule(parent) if parent else body, leaf, nn.Identity())
        object.__setattr__(self, "head", name)
        object.__setattr__(self, "_body", body)

    def _start(self, meta: MetaParams, x_support: Tensor, y_support: Tensor) -> Params:
        prefix = self.head + "."
        params = {k: v for k, v in meta["model"].items() if not k.startswith(prefix)}
        buffers = at_step(meta_buffers(meta, self.model), self._stepped, 0)
        embeddings, _ = apply_model(self._body, params, {k: v for k, v in buffers.items() if not k.startswith(prefix)},
                                    x_support)
        weight, bias = prototype_head(embeddings.flatten(1), y_support, meta["model"][prefix + "weight"].shape[0])
        return {**meta["model"], prefix + "weight": weight, prefix + "bias": bias}

    def parameters(self, meta: MetaParams) -> list[Tensor]:
        """Every meta-learned tensor; the head's are not (each task's head comes from its prototypes)."""
        prefix = self.head + "."
        return [*(v for k, v in meta["model"].items() if not k.startswith(prefix)), *meta["rule"].values()]
