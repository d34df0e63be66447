"""Parameters as plain dicts, and a model called through ``functional_call``.

A model is an ordinary ``nn.Module`` used as a stateless template: its weights
travel as ``dict[str, Tensor]`` (:data:`Params`) and are handed to
:func:`torch.func.functional_call` at every call, so adapting a model to a task
never mutates the module. Meta-parameters are a two-level dict
(:data:`MetaParams`): ``{"model": Params, "rule": Params}``, the second holding
whatever an inner-loop rule learns (Meta-SGD rates, MAML++ LSLR rates; empty for
plain SGD), and ``"buffers"``, the model's buffers (BatchNorm running
statistics, any registered buffer): state, not meta-learned.

Buffers are state threaded functionally, as flax's ``apply(..., mutable=...)``
and equinox's ``(y, state) = model(x, state)`` do: :func:`apply_model` is the
one per-task call of a model in the library. It runs the model on copies of
the buffers it is given and returns them after the call, so a layer that
updates its buffers in place (``nn.BatchNorm`` in training mode) changes only
those copies. The copies are made inside the function that ``torch.func.grad``
differentiates, which is what lets such a layer run there at all (a tensor
made outside a ``grad`` transform may not be written in place inside it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

Params = dict[str, Tensor]
MetaParams = dict[str, Params]

__all__ = [
    "MetaParams",
    "Params",
    "accuracy",
    "apply_model",
    "combine",
    "forward",
    "params_and_buffers",
    "partition",
]


def params_and_buffers(model: nn.Module) -> tuple[Params, Params]:
    """Fresh copies of a model's parameters (trainable leaves) and buffers.

    The copies share nothing with the module, so the module stays a template
    that any number of parameter dicts can be run through.

    Example:
        >>> from maml_func import MLP, params_and_buffers
        >>> params, buffers = params_and_buffers(MLP())
        >>> params["layers.0.weight"].shape, params["layers.0.weight"].requires_grad
        (torch.Size([40, 1]), True)
    """
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    return params, buffers


def apply_model(model: nn.Module, params: Params, buffers: Params, x: Tensor, *,
                double_backward: bool = False) -> tuple[Tensor, Params]:
    """Run ``model`` on ``x`` with ``params`` and ``buffers``; return its output and the buffers after the call.

    The model runs on fresh copies of ``buffers`` (``buffers`` itself is never
    written), so the second result holds whatever the forward wrote
    (BatchNorm's running statistics in training mode) and equals ``buffers``
    otherwise. This is the one place where the library calls a model.

    Args:
        model: the template module; its own weights are ignored.
        params, buffers: dicts as from :func:`params_and_buffers` (adapted or not).
        x: a batch of inputs, ``[B, ...]``.
        double_backward: the output will be differentiated twice (a
            second-order inner step): attention runs on the kernel that has a
            double backward (PyTorch's math ``scaled_dot_product_attention``;
            the fused CPU and GPU kernels have none).

    Returns:
        ``(output, buffers)``: e.g. logits ``[B, n_way]``, and the buffers' new values.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.BatchNorm1d(2)
        >>> out, state = apply_model(net, dict(net.named_parameters()), dict(net.named_buffers()), torch.ones(4, 2))
        >>> int(state["num_batches_tracked"]), int(net.num_batches_tracked)
        (1, 0)
    """
    state = {k: v.clone() for k, v in buffers.items()}
    with sdpa_kernel([SDPBackend.MATH]) if double_backward else contextlib.nullcontext():
        return functional_call(model, (params, state), (x,)), state


def forward(model: nn.Module, params: Params, buffers: Params, x: Tensor) -> Tensor:
    """Run ``model`` on ``x`` with the weights in ``params`` and ``buffers``: :func:`apply_model`'s output alone.

    Args:
        model: the template module; its own weights are ignored.
        params, buffers: dicts as from :func:`params_and_buffers` (adapted or not).
        x: a batch of inputs, ``[B, ...]``.

    Returns:
        The model's output for ``x``, e.g. logits ``[B, n_way]``.
    """
    return apply_model(model, params, buffers, x)[0]


def partition(params: Mapping[str, Tensor], predicate: Callable[[str], bool]) -> tuple[Params, Params]:
    """Split ``params`` into ``(selected, rest)`` by a predicate on the name.

    Used to adapt only part of a network in the inner loop (ANIL adapts the head
    only); :func:`combine` puts the halves back together.

    Example:
        >>> head, body = partition({"head.weight": 1, "conv.weight": 2}, lambda n: n.startswith("head."))
        >>> sorted(head), sorted(body)
        (['head.weight'], ['conv.weight'])
    """
    selected = {k: v for k, v in params.items() if predicate(k)}
    rest = {k: v for k, v in params.items() if not predicate(k)}
    return selected, rest


def combine(*dicts: Mapping[str, Tensor]) -> Params:
    """Merge disjoint parameter dicts (the inverse of :func:`partition`).

    Raises:
        ValueError: if a name appears in more than one dict.
    """
    out: Params = {}
    for d in dicts:
        clash = out.keys() & d.keys()
        if clash:
            raise ValueError(f"combine: parameter names {sorted(clash)} appear in more than one dict; "
                             "partition the params so that each name is in exactly one half")
        out.update(d)
    return out


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of rows whose arg-max equals the label.  ``[B, C], [B] -> []``"""
    return (logits.argmax(dim=-1) == labels).to(logits.dtype).mean()
