"""A run, trained or loaded: :class:`TrainResult`, and what is done with a finished one.

:func:`load_run` (the model and meta-parameters of a checkpoint, to use in
Python) and :func:`evaluate_run` (the few-shot evaluation protocol,
:func:`maml_func.evaluate.evaluate`, on a checkpoint's held-out classes). The
run is rebuilt from its config with :mod:`maml_func.components`.

A run whose network was an object given to ``fit(model=...)`` records only its
class: :func:`load_run` and :func:`evaluate_run` then take the network as
``model=``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maml_func import checks
from maml_func.algorithms.base import Algorithm
from maml_func.atomic import removed_on_failure
from maml_func.checkpoint import BEST, LAST, Checkpoint, load_meta
from maml_func.components import (
    SPLITS,
    build_algorithm,
    check_buildable,
    check_outputs,
    load_splits,
    resolve_device,
    rng_scope,
    task_sampler,
)
from maml_func.config import TrainConfig
from maml_func.core import MetaParams
from maml_func.evaluate import BATCH_SIZE, NUM_TASKS, EvalResult, evaluate

__all__ = ["TrainResult", "evaluate_run", "load_run"]


@dataclass
class TrainResult:
    """A trained (or loaded) run.

    Attributes:
        config: the run's configuration (``channels`` resolved from the data).
        model: the template network. algorithm: the algorithm object.
        meta: the meta-parameters after the last iteration.
        iteration: iterations completed.
        best_val_accuracy, best_iteration: best validation accuracy and when (``None`` without validation).
        run_dir: the run directory (``None`` when nothing was written).
        history: the records of ``metrics.jsonl``.
        stopped: ``"completed"``, ``"time_limit"``, ``"interrupted"`` or ``"loaded"``.
    """

    config: TrainConfig
    model: nn.Module
    algorithm: Algorithm
    meta: MetaParams
    iteration: int
    best_val_accuracy: float | None = None
    best_iteration: int | None = None
    run_dir: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = "completed"

    @property
    def last_checkpoint(self) -> Path | None:
        return self.run_dir / LAST if self.run_dir is not None else None

    @property
    def best_checkpoint(self) -> Path | None:
        """``best.pt`` when validation wrote one, else ``None``."""
        path = self.run_dir / BEST if self.run_dir is not None else None
        return path if path is not None and path.exists() else None


def _read(checkpoint: str | Path | Checkpoint, origin: str) -> Checkpoint:
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    return Checkpoint.read(checkpoint, prefer_best=True, origin=origin)


def load_run(checkpoint: str | Path | Checkpoint, *, device: str | torch.device | None = "cpu",
             model: nn.Module | None = None) -> TrainResult:
    """Load a checkpoint (or a run directory's ``best.pt``, else ``last.pt``) for evaluation.

    Args:
        checkpoint: a ``.pt`` file, a run directory, or a :class:`~maml_func.checkpoint.Checkpoint` already read.
        device: where the meta-parameters go.
        model: the network, for a run trained with ``fit(model=...)`` (the
            checkpoint holds its weights, not its code); default: the one the
            config names. Moved to ``device`` and the run's dtype.

    Returns:
        A :class:`TrainResult` with ``config``, ``model``, ``algorithm`` and ``meta``.

    Example:
        >>> run = load_run("runs/5w1s")  # doctest: +SKIP
        >>> run.algorithm.adapt(run.meta, x_support, y_support)  # doctest: +SKIP
    """
    saved = _read(checkpoint, "load_run")
    config = TrainConfig.from_dict(saved.config, origin=f"load_run({str(saved.path)!r})")
    check_buildable(config, model, "load_run")
    model, algorithm = build_algorithm(config, model=model)
    device = torch.device(device) if device is not None else torch.device("cpu")
    model.to(device=device, dtype=getattr(torch, config.dtype))
    meta = algorithm.init()
    load_meta(meta, saved.state["meta"], "load_run")
    return TrainResult(config, model, algorithm, meta, saved.iteration, saved.state.get("best_val_accuracy"),
                       saved.state.get("best_iteration"), saved.path.parent, stopped="loaded")


def evaluate_run(
    checkpoint: str | Path | Checkpoint | None = None,
    *,
    config: TrainConfig | None = None,
    classes: str = "test",
    num_tasks: int = NUM_TASKS,
    steps: int | None = None,
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
    progress: bool = False,
    model: nn.Module | None = None,
) -> EvalResult:
    """The evaluation protocol on a checkpoint's (or a config's) data: tasks from held-out classes.

    Args:
        checkpoint: a checkpoint or run directory (its ``best.pt``, else ``last.pt``),
            or a :class:`~maml_func.checkpoint.Checkpoint` already read; ``None``
            evaluates a fresh initialization from ``config`` (seeded by
            ``config.seed``), the untrained baseline.
        config: the data, task shape and inner loop to evaluate with; defaults to
            the checkpoint's. ``n_way``, ``hidden`` and ``image_size`` must match the checkpoint.
        classes: ``"test"`` (meta-test classes), ``"val"`` or ``"train"``.
        num_tasks, steps, batch_size, seed, progress: as in :func:`maml_func.evaluate.evaluate`;
            ``steps`` defaults to ``config.eval_inner_steps``.
        model: the network, for a run trained with ``fit(model=...)`` (the
            checkpoint holds its weights, not its code); default: the one the
            config names. Moved to the config's device and dtype.

    Returns:
        An :class:`~maml_func.evaluate.EvalResult`.

    Example:
        >>> print(evaluate_run("runs/5w1s").summary())  # doctest: +SKIP
        5-way 1-shot: 97.2% ± 0.5 (600 tasks, 3 steps)
    """
    if checkpoint is None and config is None:
        raise ValueError("evaluate_run: pass a checkpoint, a config (for an untrained baseline), or both")
    checks.choice("evaluate_run", "classes", classes, tuple(SPLITS))
    # Checked here too, not only in evaluate(): a bad value must fail before the data is read and cached.
    for name, value, minimum in (("num_tasks", num_tasks, 1), ("batch_size", batch_size, 1), ("seed", seed, 0),
                                 ("steps", 0 if steps is None else steps, 0)):
        checks.integer("evaluate_run", name, value, minimum=minimum)
    saved = _read(checkpoint, "evaluate_run") if checkpoint is not None else None
    if config is None:
        assert saved is not None
        config = TrainConfig.from_dict(saved.config, origin=f"evaluate_run({str(saved.path)!r})")
    config.check_paths()
    check_buildable(config, model, "evaluate_run")  # before any data is read
    device, dtype = resolve_device(config.device), getattr(torch, config.dtype)
    with removed_on_failure(config.data_root):  # a refused evaluation leaves no cache or download behind
        splits = load_splits(config)
        sampler = task_sampler(config, splits, classes, device, "evaluate_run")
    with rng_scope(device):
        torch.manual_seed(config.seed)
        model, algorithm = build_algorithm(config, in_channels=int(splits[classes].images.shape[2]), model=model)
        model.to(device=device, dtype=dtype)
        check_outputs(model, sampler, config, dtype, "evaluate_run")
        meta = algorithm.init()
    if saved is not None:
        load_meta(meta, saved.state["meta"], "evaluate_run")
    return evaluate(algorithm, meta, sampler, num_tasks=num_tasks,
                    steps=config.eval_inner_steps if steps is None else steps, batch_size=batch_size, seed=seed,
                    progress=progress)
