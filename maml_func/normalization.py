"""Normalization layers that are exact under ``vmap`` and second order, and the BatchNorm policy.

Why this module exists. Measured here (torch 2.14.1, CPU, float64, one inner
step, second order, ``vmap`` over tasks against a per-task autograd loop):
``nn.BatchNorm2d`` is off by about 2e-3 relative, ``nn.InstanceNorm2d(affine=True)``
by 2e-3, ``nn.LayerNorm`` by 4e-4; ``nn.GroupNorm`` is exact. The same layers
with their scale and shift applied *outside* the fused kernel
(``F.batch_norm(x, ..., weight=None, bias=None)`` then ``x * w + b``) match the
loop to 4e-16: the fused kernels' batching rule for the double backward with
affine weights is what is wrong (pytorch/functorch#534). So every algorithm
runs a model through :func:`exact_model`, which swaps each such layer for the
class here that does the same maths with the affine part outside, keeping the
parameter and buffer names, so a ``state_dict`` loads both ways.

The BatchNorm policy (``batch_norm=`` of every algorithm; one of
:data:`BATCH_NORM_POLICIES`) says which statistics normalize:

==========  ===================================================================
``batch``   Batch statistics at meta-train and meta-test, in either mode (the
            MAML convention, Finn et al. 2017). Running statistics are neither
            used nor updated; a model's buffers stay as they are.
``running`` During meta-training, batch statistics, and every task updates its
            own copy of the running statistics at each forward (each inner
            step's support forward, then the query forward), with the module's
            momentum (``r <- (1 - m) r + m * batch statistic``, the unbiased
            variance, as ``nn.BatchNorm``); after the meta-iteration the
            running statistics are the mean over the meta-batch's tasks of each
            task's final copy (integer buffers such as ``num_batches_tracked``:
            the largest). In eval mode (validation, ``maml-func eval``) the
            running statistics normalize, support and query alike.
``per_step``  MAML++ (Antoniou et al. 2019, "per-step batch normalization
            running statistics"; :class:`~maml_func.MAML` with
            ``backprop="unroll"``): as ``running``, with one copy of every
            BatchNorm layer's running statistics per inner step
            (``meta["buffers"]`` holds them stacked, ``[inner_steps, ...]``):
            the support forward of inner step ``s`` updates and, in eval mode,
            uses copy ``s``; the query forward the last copy; evaluation with
            more steps than were trained the last copy too.
==========  ===================================================================
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from maml_func import checks

__all__ = ["BATCH_NORM_POLICIES", "TaskBatchNorm", "TaskInstanceNorm", "TaskLayerNorm", "exact_model",
           "running_statistics", "stack_per_step", "at_step", "with_step"]

#: How BatchNorm layers normalize during meta-training and meta-testing (``batch_norm=`` of every algorithm).
BATCH_NORM_POLICIES = ("batch", "running", "per_step")


def _affine(normed: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``normed * weight + bias`` with the per-channel weights on axis 1 (one fused multiply-add)."""
    if weight is None:
        return normed if bias is None else normed + bias.view((1, -1) + (1,) * (normed.dim() - 2))
    shape = (1, -1) + (1,) * (normed.dim() - 2)
    if bias is None:
        return normed * weight.view(shape)
    return torch.addcmul(bias.view(shape), normed, weight.view(shape))


class TaskBatchNorm(_BatchNorm):
    """Batch normalization over ``dim=0`` and all spatial dims, exact under ``vmap`` and second order.

    ``[B, C, *spatial] -> [B, C, *spatial]``; the same maths as
    ``nn.BatchNorm1d/2d/3d`` (biased variance to normalize, unbiased for the
    running statistics), with the scale and shift applied outside
    ``F.batch_norm`` (see the module docstring for why). The library's own
    networks use it with ``track_running_stats=False``: batch statistics in
    either mode. :func:`exact_model` turns a model's ``nn.BatchNorm*`` layers
    into this one, keeping their parameters and buffers.

    Attributes:
        statistics: ``"batch"`` (default): batch statistics in either mode,
            running statistics (if any) left alone; ``"running"``: the module's
            own behaviour, batch statistics and an update of the running ones
            in training mode, the running ones in eval mode. Set by
            :func:`exact_model` from the algorithm's ``batch_norm`` policy.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = False, statistics: str = "batch") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.statistics = checks.choice("TaskBatchNorm", "statistics", statistics, ("batch", "running"))

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"TaskBatchNorm: expected inputs [B, C, ...], got shape {list(input.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        running = self.statistics == "running" and self.running_mean is not None
        if running and not self.training:
            normed = F.batch_norm(x, self.running_mean, self.running_var, None, None, False, 0.0, self.eps)
        elif running:
            normed = self._normalize_and_track(x)
        else:
            # Without affine weights the fused kernel's vmapped double backward is exact.
            normed = F.batch_norm(x, None, None, None, None, True, 0.0, self.eps)
        return _affine(normed, self.weight, self.bias)

    def _normalize_and_track(self, x: Tensor) -> Tensor:
        """Batch statistics, and the running ones updated in place (on the per-task copies the library passes)."""
        assert self.num_batches_tracked is not None and self.running_mean is not None
        self.num_batches_tracked.add_(1)
        if self.momentum is not None:
            return F.batch_norm(x, self.running_mean, self.running_var, None, None, True, self.momentum, self.eps)
        # A cumulative average: the factor is a tensor (1 / batches so far), which F.batch_norm cannot take.
        dims = [0, *range(2, x.dim())]
        factor = 1.0 / self.num_batches_tracked.to(x.dtype)
        with torch.no_grad():
            mean, var = x.mean(dims), x.var(dims, correction=1)
            self.running_mean.copy_(torch.lerp(self.running_mean, mean, factor))
            self.running_var.copy_(torch.lerp(self.running_var, var, factor))
        return F.batch_norm(x, None, None, None, None, True, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, statistics={self.statistics}"


class TaskLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with its elementwise scale and shift outside ``F.layer_norm`` (exact under ``vmap``)."""

    def forward(self, x: Tensor) -> Tensor:
        normed = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        if self.weight is not None:
            normed = normed * self.weight
        return normed + self.bias if self.bias is not None else normed


class TaskInstanceNorm(_InstanceNorm):
    """``nn.InstanceNorm1d/2d/3d`` with the affine part outside ``F.instance_norm`` (exact under ``vmap``)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 3:
            raise ValueError(f"TaskInstanceNorm: expected inputs [B, C, *spatial], got shape {list(input.shape)}")

    def _get_no_batch_dim(self) -> int:  # unbatched inputs are not supported; a batch always has dim 0
        return -1

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        use_input_stats = self.training or not self.track_running_stats
        normed = F.instance_norm(x, self.running_mean, self.running_var, None, None, use_input_stats,
                                 self.momentum if self.momentum is not None else 0.0, self.eps)
        return _affine(normed, self.weight, self.bias)


def _moved(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` holding ``old``'s very parameters, buffers and mode (names kept: state dicts load both ways)."""
    new._parameters, new._buffers = old._parameters, old._buffers
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    new.train(old.training)
    return new


def _exact(module: nn.Module, statistics: str) -> nn.Module | None:
    """The exact replacement of ``module``, or ``None`` when it needs none."""
    if isinstance(module, TaskBatchNorm):
        if module.statistics == statistics:
            return None
        new = copy.copy(module)
        new.statistics = statistics
        return new
    if isinstance(module, _BatchNorm):
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(f"exact_model: {type(module).__name__} has not seen an input yet; run the model once "
                             "on a batch before meta-training it")
        new = TaskBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, statistics)
        return _moved(module, new)
    if isinstance(module, nn.LayerNorm) and not isinstance(module, TaskLayerNorm):
        if module.weight is None and module.bias is None:
            return None
        new = TaskLayerNorm(module.normalized_shape, module.eps, elementwise_affine=False)
        return _moved(module, new)
    if isinstance(module, _InstanceNorm) and not isinstance(module, TaskInstanceNorm) and module.affine:
        new = TaskInstanceNorm(module.num_features, module.eps, module.momentum, True, module.track_running_stats)
        return _moved(module, new)
    return None


def _add_running_stats(module: TaskBatchNorm) -> None:
    """Give a BatchNorm without running statistics a fresh set (zeros, ones, 0), as ``nn.BatchNorm`` starts."""
    like = module.weight if module.weight is not None else torch.empty(0)
    module.track_running_stats = True
    module.register_buffer("running_mean", torch.zeros(module.num_features, dtype=like.dtype, device=like.device))
    module.register_buffer("running_var", torch.ones(module.num_features, dtype=like.dtype, device=like.device))
    module.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=like.device))


def exact_model(model: nn.Module, batch_norm: str = "batch") -> nn.Module:
    """``model`` with every normalization layer in the form that is exact under ``vmap`` and second order.

    ``nn.BatchNorm1d/2d/3d`` (and ``SyncBatchNorm``) become :class:`TaskBatchNorm`
    following the ``batch_norm`` policy, ``nn.LayerNorm`` with affine weights
    :class:`TaskLayerNorm`, affine ``nn.InstanceNorm*`` :class:`TaskInstanceNorm`;
    parameter and buffer names stay, so ``state_dict``\\ s load both ways.
    ``nn.GroupNorm`` is exact as it is. Every algorithm applies this to the
    model it is given; calling it yourself shows what will run.

    Args:
        model: any ``nn.Module``; it is not changed.
        batch_norm: one of :data:`BATCH_NORM_POLICIES` (see the module
            docstring). ``running`` and ``per_step`` give BatchNorm layers
            without running statistics a fresh set.

    Returns:
        ``model`` itself when nothing needs changing, else a copy with the
        layers replaced (the copy's weights are copies of ``model``'s).

    Example:
        >>> from torch import nn
        >>> net = exact_model(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
        >>> plain = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> type(net[1]).__name__, sorted(net.state_dict()) == sorted(plain.state_dict())
        ('TaskBatchNorm', True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"exact_model: model must be an nn.Module, got {type(model).__name__}")
    checks.choice("exact_model", "batch_norm", batch_norm, BATCH_NORM_POLICIES)
    statistics = "batch" if batch_norm == "batch" else "running"
    tracked = statistics == "running"
    todo = [name for name, m in model.named_modules()
            if _exact(m, statistics) is not None or (tracked and isinstance(m, TaskBatchNorm)
                                                     and m.running_mean is None)]
    if not todo:
        return model
    model = copy.deepcopy(model)
    for name in todo:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if name else None
        module = model.get_submodule(name)
        new = _exact(module, statistics) or module
        if tracked and isinstance(new, TaskBatchNorm) and new.running_mean is None:
            _add_running_stats(new)
        if parent is None:
            model = new
        else:
            setattr(parent, child, new)
    return model


def running_statistics(model: nn.Module) -> list[str]:
    """Buffer names of the running statistics of ``model``'s :class:`TaskBatchNorm` layers (the ``per_step`` ones)."""
    return [f"{name}.{buffer}" if name else buffer for name, m in model.named_modules()
            if isinstance(m, TaskBatchNorm) and m.running_mean is not None
            for buffer in ("running_mean", "running_var", "num_batches_tracked")]


def stack_per_step(buffers: dict[str, Tensor], names: list[str], steps: int) -> dict[str, Tensor]:
    """``buffers`` with each of ``names`` repeated into ``[steps, ...]``: one copy per inner step (``per_step``)."""
    return {k: v.expand(steps, *v.shape).clone() if k in names else v for k, v in buffers.items()}


def at_step(buffers: dict[str, Tensor], names: list[str], step: int) -> dict[str, Tensor]:
    """The buffers one forward of inner step ``step`` sees: copy ``step`` of the stacked (the last one past the end)."""
    return {k: v[min(step, v.shape[0] - 1)] if k in names else v for k, v in buffers.items()}


def with_step(stacked: dict[str, Tensor], names: list[str], step: int, new: dict[str, Tensor]) -> dict[str, Tensor]:
    """``stacked`` with copy ``step`` replaced by ``new``'s values (out of place), the other buffers ``new``'s."""
    out = {}
    for k, v in stacked.items():
        if k in names:
            i = min(step, v.shape[0] - 1)
            out[k] = torch.cat([v[:i], new[k].unsqueeze(0), v[i + 1:]])
        else:
            out[k] = new[k]
    return out
