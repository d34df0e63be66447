"""How a per-task function runs over the tasks of a meta-batch: a :class:`Way`, and :func:`map_tasks`.

An algorithm writes its per-task function first, ``fn(meta, xs, ys, xq, yq)
-> metrics`` on one task's tensors, and :func:`map_tasks` runs it over every
task of a :class:`~maml_func.tasks.TaskBatch` the :class:`Way` it is given:
``torch.func.vmap`` over all tasks, ``vmap`` in chunks, or a Python loop (the
reference the vectorized path is tested against). The way is the caller's
choice, never an algorithm's option: the same algorithm runs any way and
computes the same result up to rounding; the execution policy
(:mod:`maml_func.execution`) picks the fastest by timing them. What depends on
the device, with its reason (``benchmarks/README.md`` has the measurements):

========  =====================================================================
device    ``Way()``, the default
========  =====================================================================
CPU       chunks of about 1 MiB of task inputs (:func:`auto_chunk_size`);
          image inputs laid out so that the grouped convolutions run
          channels-last (:func:`tasks_channels_last`; ``channels_last=False``
          keeps them as they come, faster at 84x84)
other     one ``vmap`` over the whole meta-batch; inputs as they come
========  =====================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from maml_func import checks
from maml_func.diagnosis import explain_model_error
from maml_func.tasks import TaskBatch

__all__ = ["LOOP", "VMAP", "TaskFn", "Way", "auto_chunk_size", "check_chunk_size", "map_tasks", "stack_metrics",
           "tasks_channels_last"]

#: ``(meta, x_support, y_support, x_query, y_query) -> metrics`` on one task's tensors.
TaskFn = Callable[[Any, Tensor, Tensor, Tensor, Tensor], dict[str, Tensor]]

# A vmapped chunk's activations are about 16x its inputs for a Conv4 (64
# channels at a quarter of the pixels), so 1 MiB of inputs keeps each
# activation under glibc's 32 MiB mmap ceiling: untuned glibc then reuses
# memory instead of faulting fresh pages in at every use, and tuned it runs as
# fast as one vmap with less peak memory, so one rule serves either allocator
# (benchmarks/README.md, "Where the time goes on the CPU").
_CPU_CHUNK_INPUT_BYTES = 2**20
# A chunk of one task pays vmap's overhead and gains nothing from it.
_MIN_CHUNK = 2
# The suffix of a way's name that keeps the inputs' layout (no tasks_channels_last).
_NCHW = "/nchw"


def check_chunk_size(where: str, value: Any) -> int | str | None:
    """``value`` if it is a valid ``chunk_size``: a positive int, ``None`` or ``"auto"``.

    Example:
        >>> check_chunk_size("MAML", "auto"), check_chunk_size("MAML", 4)
        ('auto', 4)
        >>> check_chunk_size("MAML", 0)
        Traceback (most recent call last):
        ...
        ValueError: MAML: chunk_size must be a positive int, None or 'auto', got 0
    """
    if isinstance(value, str) and value == "auto":
        return value
    return checks.integer(where, "chunk_size", value, minimum=1, none_ok=True, expect="a positive int, None or 'auto'")


@dataclass(frozen=True)
class Way:
    """One way to run the tasks of a meta-batch: ``vmap`` in chunks of ``chunk_size`` tasks, or a Python loop.

    Args:
        chunk_size: tasks per ``vmap`` chunk; ``None`` runs all T at once;
            ``"auto"`` (default) asks :func:`auto_chunk_size`.
        vectorize: ``False`` runs the tasks one by one in a Python loop
            (``chunk_size`` unused).
        channels_last: on the CPU, lay image inputs out with
            :func:`tasks_channels_last` so that ``vmap``'s folded grouped
            convolutions run channels-last (default: faster at Omniglot's
            28x28); ``False`` keeps them as they come, which is faster at
            miniImageNet's 84x84 (``benchmarks/README.md``). Unused by the
            loop and off the CPU.

    Example:
        >>> Way().name, Way(chunk_size=4).name, VMAP.name, LOOP.name, Way(4, channels_last=False).name
        ('auto', 'chunk=4', 'vmap', 'loop', 'chunk=4/nchw')
        >>> Way.parse("chunk=4") == Way(4), Way.parse("vmap/nchw") == Way(None, channels_last=False)
        (True, True)
    """

    chunk_size: int | str | None = "auto"
    vectorize: bool = True
    channels_last: bool = True

    def __post_init__(self) -> None:
        check_chunk_size("Way", self.chunk_size)
        checks.flag("Way", "vectorize", self.vectorize)
        checks.flag("Way", "channels_last", self.channels_last)

    @property
    def name(self) -> str:
        """``"loop"``, ``"vmap"``, ``"chunk=<n>"`` or ``"auto"``, ``/nchw`` added without the channels-last layout:
        what :meth:`parse` reads back."""
        if not self.vectorize:
            return "loop"
        if self.chunk_size is None or self.chunk_size == "auto":
            name = "vmap" if self.chunk_size is None else "auto"
        else:
            name = f"chunk={self.chunk_size}"
        return name if self.channels_last else name + _NCHW

    @classmethod
    def parse(cls, name: str) -> Way:
        """The way called ``name`` (:attr:`name`'s form)."""
        base = name.removesuffix(_NCHW)
        layout = {"channels_last": base == name}
        if base in ("vmap", "auto"):
            return cls(None if base == "vmap" else "auto", **layout)
        if name == "loop":
            return LOOP
        if not base.startswith("chunk=") or not base.removeprefix("chunk=").isdigit():
            raise ValueError(f"Way.parse: unknown way {name!r}; use 'loop', 'vmap', 'auto' or 'chunk=<tasks>', "
                             f"the last three with '{_NCHW}' to keep the inputs' layout")
        return cls(int(base.removeprefix("chunk=")), **layout)

    def tasks_per_call(self, num_tasks: int) -> int:
        """How many of ``num_tasks`` tasks one call of the per-task function batches (1 for the loop; ``"auto"``
        counts as one ``vmap``, its chunks depending on the batch's bytes)."""
        if not self.vectorize:
            return 1
        return num_tasks if self.chunk_size in (None, "auto") else min(int(self.chunk_size), num_tasks)


#: One ``vmap`` over the whole meta-batch.
VMAP = Way(None)
#: The tasks one by one in a Python loop: the reference, and the least memory.
LOOP = Way(None, vectorize=False)


def auto_chunk_size(batch: TaskBatch) -> int | None:
    """What ``chunk_size="auto"`` means for ``batch``: tasks per ``vmap`` chunk, ``None`` for one ``vmap``.

    On the CPU, as many tasks as hold about 1 MiB of inputs (support and query
    together), at least 2, and ``None`` when the whole meta-batch fits. On any
    other device ``None``: device allocators (CUDA's caching allocator) reuse
    freed blocks, so the page faults that chunks avoid on the CPU do not
    arise there, and one ``vmap`` gives the widest kernels.

    Example:
        >>> from maml_func import sample_sinusoid_tasks
        >>> auto_chunk_size(sample_sinusoid_tasks(8)) is None   # a few KiB per task: one vmap
        True
    """
    tasks = batch.num_tasks
    # Off the CPU: device allocators reuse freed blocks, so nothing to avoid; one vmap, widest kernels.
    if batch.x_support.device.type != "cpu" or tasks == 0:
        return None
    per_task = sum(t[0].numel() * t.element_size() for t in batch)
    chunk = max(_MIN_CHUNK, _CPU_CHUNK_INPUT_BYTES // max(per_task, 1))
    return None if chunk >= tasks else chunk


def tasks_channels_last(x: Tensor) -> Tensor:
    """Images ``[T, B, C, H, W]`` with the same values, laid out in memory as ``[B, H, W, T, C]``.

    ``vmap`` folds the task axis into the channels of a grouped convolution
    (``[B, T*C, H, W]``); with this layout that folded tensor is a
    channels-last view, and oneDNN's channels-last kernels are much faster on
    the CPU than its grouped NCHW ones (benchmarks/README.md, "Where the time
    goes on the CPU"). Anything that is not a 5-D float tensor is returned as is.

    Example:
        >>> import torch
        >>> x = torch.rand(4, 6, 3, 5, 5)
        >>> y = tasks_channels_last(x)
        >>> torch.equal(x, y), y.movedim(0, 1).reshape(6, 12, 5, 5).is_contiguous(memory_format=torch.channels_last)
        (True, True)
    """
    if x.dim() != 5 or not x.is_floating_point():
        return x
    return x.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)


def stack_metrics(metrics: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """``[{"loss": [...]}, ...] -> {"loss": [len(metrics), ...]}``: one stacked tensor per key.

    Example:
        >>> import torch
        >>> stack_metrics([{"loss": torch.tensor(1.0)}, {"loss": torch.tensor(2.0)}])
        {'loss': tensor([1., 2.])}
    """
    return {k: torch.stack([m[k] for m in metrics]) for k in metrics[0]}


def _per_task_buffers(meta: Any, tasks: int) -> tuple[Any, Any]:
    """``(meta, in_dims)`` for ``vmap``: ``meta["buffers"]`` given a task axis (views), the rest shared.

    A layer that writes its buffers (BatchNorm's running statistics) writes a
    per-task value; under ``vmap`` that needs a per-task copy to write into.
    """
    if not (isinstance(meta, dict) and isinstance(meta.get("buffers"), dict) and meta["buffers"]):
        return meta, None
    buffers = {k: v.expand(tasks, *v.shape) for k, v in meta["buffers"].items()}
    return {**meta, "buffers": buffers}, {k: 0 if k == "buffers" else None for k in meta}


def map_tasks(
    fn: TaskFn,
    meta: Any,
    batch: TaskBatch,
    *,
    way: Way | None = None,
    caller: str = "map_tasks",
    model: nn.Module | None = None,
    randomness: str = "different",
) -> dict[str, Tensor]:
    """Run a per-task ``fn(meta, xs, ys, xq, yq) -> metrics`` over every task of ``batch``.

    Args:
        fn: the per-task function; ``meta`` is shared, the other four are one
            task's ``x_support [S, ...]``, ``y_support [S]``, ``x_query [Q, ...]``,
            ``y_query [Q]``. It returns a dict of tensors of fixed shapes.
        meta: passed to every call of ``fn`` unbatched (``vmap`` in_dims ``None``).
        batch: T tasks.
        way: how to run the tasks (:class:`Way`); ``None``: ``Way()``, chunks
            as :func:`auto_chunk_size` says.
        caller: the name that error messages start with (the algorithm's).
        model: the network ``fn`` runs, named in the message when it cannot
            run this way (:func:`maml_func.diagnosis.explain_model_error`).
        randomness: ``vmap``'s: ``"different"`` (default) gives each task its
            own random draws (Dropout, DropBlock) from torch's global
            generator; ``"error"`` refuses random operations.

    A ``meta`` dict with a ``"buffers"`` entry (a model's buffers) gives each
    task its own copy of them, so a layer may update them in place.

    Returns:
        ``fn``'s metrics with a leading task axis, e.g. ``{"loss": [T]}``.

    Example:
        >>> from maml_func import sample_sinusoid_tasks
        >>> fn = lambda meta, xs, ys, xq, yq: {"loss": (meta * ys).square().mean()}
        >>> map_tasks(fn, 2.0, sample_sinusoid_tasks(8))["loss"].shape
        torch.Size([8])
    """
    if not isinstance(batch, TaskBatch):
        raise TypeError(f"{caller}: expected a TaskBatch, got {type(batch).__name__}")
    way = Way() if way is None else way
    if not isinstance(way, Way):
        raise TypeError(f"{caller}: way must be a maml_func.Way such as Way(chunk_size=4) or LOOP, "
                        f"got {type(way).__name__}")
    try:
        if not way.vectorize:
            return stack_metrics([fn(meta, *task) for task in zip(*batch)])
        chunk = auto_chunk_size(batch) if way.chunk_size == "auto" else way.chunk_size
        if batch.x_support.device.type == "cpu" and way.channels_last:
            # vmap folds the tasks into the convolutions' channels: this layout makes that fold channels-last.
            batch = TaskBatch(*(tasks_channels_last(t) for t in batch))
        meta, meta_dims = _per_task_buffers(meta, batch.num_tasks)
        return vmap(fn, in_dims=(meta_dims, 0, 0, 0, 0), chunk_size=chunk, randomness=randomness)(meta, *batch)
    except (IndexError, RuntimeError, ValueError, TypeError) as err:
        _explain_labels(caller, batch, err)
        if model is not None:
            explain_model_error(caller, model, err, vectorized=way.vectorize)
        raise


def _explain_labels(caller: str, batch: TaskBatch, err: BaseException) -> None:
    """Turn a kernel's "target out of bounds" into a message with the fix; looked at only after a failure.

    Checking the labels up front would read them on the host every step (a
    device sync); the sampler's own batches are valid by construction, so the
    check runs only when something already failed.
    """
    labels = [y for y in (batch.y_support, batch.y_query) if not y.is_floating_point() and y.numel()]
    if not labels or "out of bounds" not in str(err):
        return
    low, high = min(int(y.min()) for y in labels), max(int(y.max()) for y in labels)
    raise ValueError(f"{caller}: the task labels must be class indices 0..n_way-1 of the model's outputs, but "
                     f"they run from {low} to {high} ({checks.brief(err)}); label each task's classes 0..n_way-1 "
                     f"(as EpisodeSampler does), or give the model {high + 1} outputs") from None
