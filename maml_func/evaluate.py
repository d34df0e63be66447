"""The few-shot evaluation protocol: many held-out tasks, mean accuracy ± 95% CI per inner step.

The standard protocol of MAML (Finn et al. 2017) and the benchmarks after it:
sample tasks from classes never seen in meta-training (600 by default), adapt
the meta-learned initialization to each support set, score the query set, and
report the mean query accuracy over tasks with the half-width of its 95%
confidence interval, ``1.96 · std / √n`` (``std`` over tasks, as the MAML
authors' code computes it with ``np.std``). The accuracy after every inner
step ``0..S`` is reported, step 0 being the unadapted initialization.

Tasks come from one ``torch.Generator`` seeded by ``seed``: the same seed,
sampler and ``batch_size`` give the same tasks, so two checkpoints are compared
on identical tasks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from maml_func import checks
from maml_func.batching import Way
from maml_func.core import MetaParams
from maml_func.distributed import World, gather_tasks, rank_seed, shard_sizes, world
from maml_func.tasks import TaskBatch

if TYPE_CHECKING:  # a type only, so that importing this module never imports the algorithms package
    from maml_func.algorithms.base import Algorithm

__all__ = ["BATCH_SIZE", "NUM_TASKS", "EvalResult", "evaluate"]

#: The protocol's defaults: tasks averaged over (600, as in Finn et al. 2017), and tasks adapted together.
NUM_TASKS, BATCH_SIZE = 600, 50
# 1.96: the two-sided 95% quantile of the normal distribution.
_Z95 = 1.96


class _Sampler(Protocol):
    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch: ...


@dataclass(frozen=True)
class EvalResult:
    """Query accuracy after each inner step, averaged over tasks.

    Attributes:
        n_way, k_shot, n_query: the task shape.
        num_tasks: tasks evaluated.
        steps: inner steps ``S``; the lists below have ``S + 1`` entries (step 0..S).
        accuracy: mean query accuracy per step, in [0, 1].
        ci95: half-width of the 95% confidence interval of ``accuracy``.
        loss: mean query loss per step.
    """

    n_way: int
    k_shot: int
    n_query: int
    num_tasks: int
    steps: int
    accuracy: list[float]
    ci95: list[float]
    loss: list[float]

    @property
    def final_accuracy(self) -> float:
        """Accuracy after the last inner step."""
        return self.accuracy[-1]

    @property
    def final_ci95(self) -> float:
        return self.ci95[-1]

    def summary(self) -> str:
        """One line, e.g. ``5-way 1-shot: 98.1% ± 0.4 (600 tasks, 3 steps)``."""
        return (f"{self.n_way}-way {self.k_shot}-shot: {100 * self.final_accuracy:.1f}% ± "
                f"{100 * self.final_ci95:.1f} ({self.num_tasks} tasks, {self.steps} steps)")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (what ``maml-func eval --json`` prints), with the summary line."""
        return {**asdict(self), "summary": self.summary()}


def _task_shape(batch: TaskBatch) -> tuple[int, int, int]:
    """``(n_way, k_shot, n_query)`` of a class-major classification batch."""
    if batch.y_support.dim() != 2 or batch.y_support.dtype != torch.int64:
        raise ValueError("evaluate: the sampler must give classification tasks (int64 labels y_support [T, N*K]), "
                         f"got y_support of shape {tuple(batch.y_support.shape)} and dtype {batch.y_support.dtype}")
    n_way = int(batch.y_support[0].max()) + 1
    return n_way, batch.y_support.shape[1] // n_way, batch.y_query.shape[1] // n_way


def _meta_dtype(meta: MetaParams) -> torch.dtype:
    return next(iter(meta["model"].values())).dtype


def evaluate(
    algorithm: Algorithm,
    meta: MetaParams,
    sampler: _Sampler,
    *,
    num_tasks: int = NUM_TASKS,
    steps: int | None = None,
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    distributed: bool = False,
    way: Way | None = None,
) -> EvalResult:
    """Evaluate meta-parameters on ``num_tasks`` tasks from ``sampler``.

    Works on any meta-parameters, trained or fresh from ``algorithm.init()``
    (the baseline to compare against). Runs under ``torch.no_grad()`` with the
    network in ``eval()`` mode (DropBlock off; each module's mode restored after); the
    inner ``torch.func.grad`` adaptation still runs there.

    Args:
        algorithm: an algorithm of :mod:`maml_func.algorithms` (``MAML``, ...).
        meta: its meta-parameters.
        sampler: gives tasks, e.g. :class:`~maml_func.tasks.EpisodeSampler` over
            held-out classes; ``sampler.sample(T, generator) -> TaskBatch``.
        num_tasks: tasks to average over (:data:`NUM_TASKS` in the standard protocol).
        steps: inner steps ``S`` (default: ``algorithm.inner_steps``); the
            accuracy after each of ``0..S`` is reported.
        batch_size: tasks sampled and adapted together (memory vs. speed).
        seed: seeds a fresh generator on the sampler's device (ignored when
            ``generator`` is given).
        generator: draw the tasks from this generator instead.
        progress: show a tqdm bar over the tasks.
        distributed: shard the tasks over the ranks of the ``torch.distributed``
            process group and gather the scores: call it on every rank, each
            with its own task stream (``generator`` per rank, or ``seed``,
            which is then combined with the rank by
            :func:`maml_func.distributed.rank_seed`). Every rank gets the result.
        way: how each batch's tasks run (:class:`~maml_func.batching.Way`);
            ``None``: ``Way()``. The same scores any way, up to rounding.

    Returns:
        An :class:`EvalResult`; ``print(result.summary())``.

    Example:
        >>> import torch
        >>> from maml_func import MAML, Conv4
        >>> from maml_func.evaluate import evaluate
        >>> algo = MAML(Conv4(n_way=5, hidden=8, image_size=16), inner_lr=0.4)
        >>> evaluate(algo, algo.init(), sampler, num_tasks=20, steps=3).summary()  # doctest: +SKIP
        '5-way 1-shot: 31.0% ± 4.2 (20 tasks, 3 steps)'
    """
    checks.integer("evaluate", "num_tasks", num_tasks, minimum=1)
    checks.integer("evaluate", "batch_size", batch_size, minimum=1)
    steps = algorithm.inner_steps if steps is None else checks.integer("evaluate", "steps", steps, minimum=0)
    me = world() if distributed else World()
    if num_tasks < me.size:
        raise ValueError(f"evaluate: num_tasks={num_tasks} is fewer than the {me.size} ranks; evaluate at least "
                         "one task per rank")
    share = shard_sizes(num_tasks, me.size)[me.rank]  # this rank's tasks (all of them on one process)
    if generator is None:
        checks.integer("evaluate", "seed", seed, minimum=0)
        generator = torch.Generator(device=_sampler_device(sampler)).manual_seed(rank_seed(seed, me.rank))
    dtype = _meta_dtype(meta)
    accuracies: list[Tensor] = []
    losses: list[Tensor] = []
    shape: tuple[int, int, int] | None = None
    with torch.no_grad(), _eval_mode(getattr(algorithm, "model", None)), \
            tqdm(total=share, disable=not (progress and me.is_main), unit="task", desc="evaluate",
                 dynamic_ncols=True) as bar:
        for start in range(0, share, batch_size):
            batch = sampler.sample(min(batch_size, share - start), generator)
            if shape is None:
                shape = _task_shape(batch)
            if batch.x_support.dtype != dtype:
                batch = batch.to(dtype=dtype)
            scores = algorithm.scores(meta, batch, steps=steps, way=way)
            if "accuracy" not in scores:
                raise ValueError("evaluate: the algorithm reports no accuracy; evaluate() is for classification "
                                 "(loss='cross_entropy')")
            accuracies.append(scores["accuracy"].detach().double().cpu())
            losses.append(scores["loss"].detach().double().cpu())
            bar.update(batch.num_tasks)
    scores = {"accuracy": torch.cat(accuracies), "loss": torch.cat(losses)}  # [share, S+1]
    if me.size > 1:  # every rank's share, [num_tasks, S+1]
        scores = gather_tasks(scores)
    acc, loss = scores["accuracy"], scores["loss"]
    ci = _Z95 * acc.std(dim=0, correction=0) / math.sqrt(num_tasks)
    assert shape is not None
    return EvalResult(
        n_way=shape[0],
        k_shot=shape[1],
        n_query=shape[2],
        num_tasks=num_tasks,
        steps=steps,
        accuracy=acc.mean(dim=0).tolist(),
        ci95=ci.tolist(),
        loss=loss.mean(dim=0).tolist(),
    )


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """The network in ``eval()`` mode (DropBlock and dropout off) for the evaluation, each module's mode restored
    after. TaskBatchNorm normalizes by batch statistics in either mode, so nothing else changes."""
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, torch.nn.Module) else []
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _sampler_device(sampler: _Sampler) -> torch.device:
    """The device a sampler draws on (its generator must live there)."""
    device = getattr(sampler, "device", None)
    if device is None:
        classes = getattr(sampler, "classes", None)
        device = getattr(getattr(classes, "images", None), "device", None)
    return torch.device(device if device is not None else "cpu")
