"""Meta-training: :func:`fit` runs a :class:`~maml_func.config.TrainConfig` end to end.

One run is: load the class splits once onto the device, build ``Conv4`` and the
algorithm, then repeat {sample a meta-batch, :func:`meta_gradient`, Adam step},
validating on held-out classes now and then. A run directory receives
``last.pt`` and ``best.pt`` (atomic checkpoints, see :mod:`maml_func.checkpoint`),
``metrics.jsonl`` (one JSON object per line), ``learning_curve.png`` and
``config.json``.

Exact resume. Everything the trajectory depends on is in the checkpoint: the
meta-parameters, Adam's state, the iteration, the state of the one generator
that draws training tasks and the global torch RNG. Nothing else feeds it:
validation draws its tasks from its own generator, re-seeded at every
validation, and wall time only decides *when* a run stops, never what it
computes. So a run interrupted at any iteration and resumed reaches the same
meta-parameters, bit for bit on the CPU, as one that never stopped.

Data-parallel training (``config.distributed``, see :mod:`maml_func.distributed`):
each of the ``W`` ranks draws ``meta_batch / W`` tasks from its own generator,
:func:`meta_gradient` (or ``fit(..., meta_gradient_fn=...)``) leaves the
meta-gradient of that share in ``.grad``, one ``all_reduce`` averages the
gradients and the loss, and every rank takes the same Adam step. Decisions
that could differ between ranks (a signal, the time limit) are agreed on by a
collective before anyone acts; only rank 0 writes files. A checkpoint holds
every rank's generator state, so a distributed run resumes exactly too (with
the same number of ranks).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from maml_func.algorithms import build
from maml_func.checkpoint import load_checkpoint, remove_stale_temporaries, save_checkpoint
from maml_func.config import PRESETS, RESUMABLE_FIELDS, TrainConfig, make_config
from maml_func.core import MetaParams
from maml_func.data import load_dataset
from maml_func.distributed import (World, agree, all_reduce_mean, gather_objects, gather_tasks, init_distributed,
                                   rank_seed)
from maml_func.evaluate import EvalResult, evaluate
from maml_func.models import Conv4
from maml_func.tasks import EpisodeSampler, TaskBatch

__all__ = [
    "PRESETS",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "build_algorithm",
    "checkpoint_path",
    "evaluate_run",
    "fit",
    "load_run",
    "make_config",
    "meta_gradient",
    "meta_lr_at",
]

Metrics = dict[str, Tensor]
MetaGradientFn = Callable[[Any, MetaParams, TaskBatch, int], tuple[Tensor, Metrics]]

CHECKPOINT_FORMAT = "maml_func.checkpoint/1"
LAST, BEST, METRICS, CURVE, CONFIG = "last.pt", "best.pt", "metrics.jsonl", "learning_curve.png", "config.json"
# Validation tasks are the same at every validation and for every training
# seed, so validation curves of different runs are comparable.
VAL_SEED = 20_170_703


class NonFiniteLossError(FloatingPointError):
    """The meta-loss or meta-gradient became NaN/inf; the bad state was not saved.

    Attributes:
        iteration: the 1-based iteration whose update was refused.
        checkpoint: the last good checkpoint (``None`` when none was written).
    """

    def __init__(self, message: str, iteration: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.iteration, self.checkpoint = iteration, checkpoint


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint to resume from.

    Attributes:
        iteration: iterations completed.
        checkpoint: the saved ``last.pt`` (``None`` when ``save_to`` is ``None``).
        signal: the signal number received.
        result: the :class:`TrainResult` up to the interruption.
    """

    def __init__(self, message: str, *, iteration: int, checkpoint: Path | None, signum: int,
                 result: TrainResult) -> None:
        super().__init__(message)
        self.iteration, self.checkpoint, self.signal, self.result = iteration, checkpoint, signum, result


@dataclass
class TrainResult:
    """A trained (or loaded) run.

    Attributes:
        config: the run's configuration (``channels`` resolved from the data).
        model: the template ``Conv4``. algorithm: the algorithm object.
        meta: the meta-parameters after the last iteration.
        iteration: iterations completed.
        best_val_accuracy, best_iteration: best validation accuracy and when (``None`` without validation).
        run_dir: the run directory (``None`` when nothing was written).
        history: the records of ``metrics.jsonl``.
        stopped: ``"completed"``, ``"time_limit"`` or ``"interrupted"``.
    """

    config: TrainConfig
    model: nn.Module
    algorithm: Any
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


# --------------------------------------------------------------------- pieces
def meta_gradient(
    algorithm: Any, meta: MetaParams, batch: TaskBatch, iteration: int, *, tasks_per_backward: int | None = None
) -> tuple[Tensor, Metrics]:
    """The meta-loss of ``batch`` and its gradient, left in each meta-tensor's ``.grad``.

    The one place where a meta-gradient is computed, so that a data-parallel
    wrapper can run it on its shard and average the ``.grad``\\ s across ranks.

    Args:
        algorithm: any algorithm of the family (its ``meta_loss`` is a mean over tasks).
        meta: its meta-parameters.
        batch: T tasks.
        iteration: the meta-training step, for algorithms with schedules.
        tasks_per_backward: ``None``: one backward over the whole meta-batch.
            An int ``c`` bounds memory: the meta-batch is cut into parts of at
            most ``c`` tasks, each part's loss (weighted by its share of T) is
            differentiated on its own and the gradients are summed, so the
            autograd graph of at most ``c`` tasks is alive at any time (peak
            memory grows with ``c``, not with T; ``chunk_size`` only bounds the
            temporaries of one ``vmap`` chunk). The same meta-gradient up to
            rounding; about as fast (each part is still vectorized).

    Returns:
        ``(loss [], metrics)``, both detached; ``metrics`` as ``algorithm.meta_loss``'s (per task, ``[T]``).
        Meta-tensors the loss does not depend on get ``.grad = None``.

    Raises:
        ValueError: ``tasks_per_backward`` is not a positive int or ``None``.
    """
    if tasks_per_backward is not None and (
        not isinstance(tasks_per_backward, int) or isinstance(tasks_per_backward, bool) or tasks_per_backward < 1
    ):
        raise ValueError(f"meta_gradient: tasks_per_backward must be a positive int or None, got {tasks_per_backward!r}")
    params = algorithm.parameters(meta)
    total = batch.num_tasks
    parts = [batch] if tasks_per_backward is None or tasks_per_backward >= total else batch.split(tasks_per_backward)
    grads: list[Tensor | None] = [None] * len(params)
    losses, all_metrics = [], []
    for part in parts:
        loss, metrics = algorithm.meta_loss(meta, part, iteration)
        if len(parts) > 1:
            loss = loss * (part.num_tasks / total)  # the mean over T tasks is the weighted sum of the parts' means
        for i, g in enumerate(torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                grads[i] = g if grads[i] is None else grads[i] + g
        losses.append(loss.detach())
        all_metrics.append({k: v.detach() for k, v in metrics.items()})
    for p, g in zip(params, grads):
        p.grad = g
    if len(parts) == 1:
        return losses[0], all_metrics[0]
    return torch.stack(losses).sum(), {k: torch.cat([m[k] for m in all_metrics]) for k in all_metrics[0]}


def _resolve_device(name: str, me: World | None = None) -> torch.device:
    """The device named by ``config.device``; under ``torch.distributed``, ``cuda`` means ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and me is not None and me.size > 1:
        device = torch.device("cuda", me.local_rank)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"fit: device {name!r} was asked for but CUDA is not available here; pass device='cpu'")
    return device


def _dtype(config: TrainConfig) -> torch.dtype:
    return getattr(torch, config.dtype)


def build_algorithm(config: TrainConfig, *, in_channels: int | None = None) -> tuple[nn.Module, Any]:
    """The ``Conv4`` and the algorithm that ``config`` describes (weights from the global RNG).

    Args:
        config: the run's configuration.
        in_channels: image channels (default: ``config.channels``, else 1).

    Raises:
        ValueError: when the algorithm rejects the config's options.
    """
    channels = in_channels if in_channels is not None else (config.channels or 1)
    model = Conv4(n_way=config.n_way, in_channels=channels, hidden=config.hidden, image_size=config.image_size)
    options: dict[str, Any] = {"inner_lr": config.inner_lr, "inner_steps": config.inner_steps,
                               "chunk_size": config.chunk_size, **config.algorithm_options}
    if config.first_order:
        options["first_order"] = True
    try:
        algorithm = build(config.algorithm, model, **options)
    except TypeError as err:
        raise ValueError(f"build_algorithm: algorithm {config.algorithm!r} does not accept these options "
                         f"({err}); remove them from the config") from None
    return model, algorithm


def checkpoint_path(path: str | Path, *, prefer_best: bool = False) -> Path:
    """The checkpoint file ``path`` names: the file itself, or one inside a run directory.

    In a run directory: ``last.pt`` (what resuming needs), or with
    ``prefer_best`` ``best.pt`` when validation wrote one (what evaluation wants).
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    return path / BEST if prefer_best and (path / BEST).exists() else path / LAST


def _meta_state(meta: MetaParams) -> dict[str, dict[str, Tensor]]:
    return {group: {k: v.detach().clone() for k, v in params.items()} for group, params in meta.items()}


def _load_meta(meta: MetaParams, saved: dict[str, dict[str, Tensor]], origin: str) -> None:
    for group, params in meta.items():
        saved_group = saved.get(group, {})
        if saved_group.keys() != params.keys():
            raise ValueError(f"{origin}: the checkpoint's {group!r} parameters {sorted(saved_group)[:4]}... do not "
                             f"match the model's {sorted(params)[:4]}...; was it written by another model or version?")
        with torch.no_grad():
            for k, p in params.items():
                if saved_group[k].shape != p.shape:
                    raise ValueError(f"{origin}: parameter {group}.{k} has shape {tuple(saved_group[k].shape)} in the "
                                     f"checkpoint but {tuple(p.shape)} in the model (n_way, hidden, image_size?)")
                p.copy_(saved_group[k])


def _check_resume(config: TrainConfig, saved: dict[str, Any], iteration: int) -> None:
    changed = []
    for name, value in config.to_dict().items():
        if name in RESUMABLE_FIELDS or name not in saved:
            continue
        if name == "channels" and (value is None or saved[name] is None):
            continue
        if saved[name] != value:
            changed.append(f"{name}={value!r} (checkpoint: {saved[name]!r})")
    if changed:
        raise ValueError(f"fit: cannot resume with a changed {', '.join(changed)}: a resumed run continues the same "
                         f"trajectory; only {', '.join(sorted(RESUMABLE_FIELDS))} may change")
    if config.lr_schedule != "constant" and saved.get("iterations") != config.iterations:
        raise ValueError(f"fit: cannot resume a {config.lr_schedule} lr_schedule with iterations={config.iterations} "
                         f"(checkpoint: {saved.get('iterations')!r}): the schedule is laid over the iterations; "
                         "keep them, or use lr_schedule='constant'")
    if config.iterations < iteration:
        raise ValueError(f"fit: iterations={config.iterations} but the checkpoint is already at iteration "
                         f"{iteration}; pass iterations >= {iteration}")


class _SignalGuard:
    """Turn the first SIGINT/SIGTERM into a flag checked between iterations.

    A second SIGINT raises ``KeyboardInterrupt`` at once (an impatient user);
    checkpoints are atomic, so that is safe too. Only installed in the main
    thread, where Python delivers signals.
    """

    _SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> _SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self._SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class _RunFiles:
    """The run directory: checkpoints, metrics lines, learning curve (all no-ops without one)."""

    def __init__(self, run_dir: Path | None) -> None:
        self.dir = run_dir
        self.history: list[dict[str, Any]] = []
        self._metrics: Any = None

    def open(self, config: TrainConfig, history: list[dict[str, Any]]) -> None:
        self.history = list(history)
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in (LAST, BEST, METRICS, CURVE, CONFIG):
            remove_stale_temporaries(self.dir / name)
        self._write_atomic(CONFIG, json.dumps(config.to_dict(), indent=2) + "\n")
        # Rewritten, not appended to: records past the resumed checkpoint belong to a trajectory that is replayed.
        self._write_atomic(METRICS, "".join(json.dumps(r) + "\n" for r in self.history))
        self._metrics = open(self.dir / METRICS, "a", encoding="utf-8")

    def _write_atomic(self, name: str, text: str) -> None:
        assert self.dir is not None
        tmp = self.dir / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.dir / name)

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def save(self, name: str, state: dict[str, Any]) -> Path | None:
        return save_checkpoint(state, self.dir / name) if self.dir is not None else None

    def plot(self, config: TrainConfig) -> None:
        if self.dir is None:
            return
        _plot_learning_curve(self.history, self.dir / CURVE, title=_run_title(config))

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def _run_title(config: TrainConfig) -> str:
    name = config.dataset if config.dataset == "omniglot" else Path(config.dataset).name
    return f"{config.algorithm} · {name} · {config.n_way}-way {config.k_shot}-shot"


def _plot_learning_curve(history: list[dict[str, Any]], path: Path, *, title: str) -> None:
    """Training loss, training and validation accuracy against iterations, to a PNG."""
    # The object-oriented API with the Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in history if r.get("kind") == "train"]
    val = [r for r in history if r.get("kind") == "val"]
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    if train:
        it = [r["iteration"] for r in train]
        ax_loss.plot(it, [r["loss"] for r in train], lw=1, label="meta-train (query loss)")
        ax_acc.plot(it, [r["accuracy"] for r in train], lw=1, label="meta-train query accuracy")
    if val:
        it = [r["iteration"] for r in val]
        acc = [r["accuracy"] for r in val]
        ci = [r["ci95"] for r in val]
        ax_loss.plot(it, [r["loss"] for r in val], "o-", ms=3, color="C1", label="validation")
        ax_acc.plot(it, acc, "o-", ms=3, color="C1", label=f"validation ({val[-1]['steps']} steps, 95% CI)")
        ax_acc.fill_between(it, [a - c for a, c in zip(acc, ci)], [a + c for a, c in zip(acc, ci)], color="C1",
                            alpha=0.2)
    ax_loss.set(xlabel="iteration", ylabel="loss", title="loss")
    ax_acc.set(xlabel="iteration", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def _read_history(run_dir: Path, up_to: int) -> list[dict[str, Any]]:
    path = run_dir / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(record, dict) and record.get("iteration", math.inf) <= up_to:
            records.append(record)
    return records


def _load_splits(config: TrainConfig) -> dict[str, Any]:
    """The train/val/test classes (on the CPU) of the config's dataset."""
    omniglot = config.dataset == "omniglot"
    return load_dataset(
        config.dataset, root=config.data_root, image_size=config.image_size, channels=config.channels,
        split=config.split, seed=config.split_seed,
        # download and source mean something for Omniglot only; a folder tree is read where it is.
        download=config.download and omniglot, source=config.source if omniglot else None,
    )


@contextlib.contextmanager
def _rng_scope(device: torch.device) -> Iterator[None]:
    """The global RNGs as the run sets them, restored for the caller afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


# ------------------------------------------------------------------------ fit
def fit(
    config: TrainConfig,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    meta_gradient_fn: MetaGradientFn = meta_gradient,
) -> TrainResult:
    """Meta-train as ``config`` says; write checkpoints and metrics to ``config.save_to``.

    Args:
        config: the run (see :class:`~maml_func.config.TrainConfig`, :func:`make_config`).
        resume: a run directory or checkpoint to continue exactly. ``config``
            must equal the checkpoint's config except for the fields in
            ``maml_func.config.RESUMABLE_FIELDS`` (e.g. a larger ``iterations``).
        progress: show a tqdm bar (loss, accuracy, tasks/s).
        meta_gradient_fn: replaces :func:`meta_gradient` (the data-parallel seam);
            ``config.tasks_per_backward`` is passed to the default one only.

    Returns:
        A :class:`TrainResult` (``stopped="time_limit"`` when ``max_minutes`` ran out).

    Raises:
        ValueError, FileNotFoundError: bad config, data or checkpoint; raised
            before anything is written.
        NonFiniteLossError: the loss or gradient became NaN/inf; the last good
            checkpoint is kept and the bad update is not applied.
        TrainingInterrupted: on SIGINT/SIGTERM, after saving ``last.pt``.

    Example:
        >>> from maml_func.config import make_config
        >>> result = fit(make_config(preset="omniglot-5w1s", iterations=2000, save_to="runs/5w1s"))  # doctest: +SKIP
        >>> result.best_val_accuracy  # doctest: +SKIP
        0.95
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"fit: config must be a TrainConfig (see make_config), got {type(config).__name__}")
    config.check_paths()
    me = World()
    if config.distributed:
        me = init_distributed()
        if config.meta_batch % me.size:
            raise ValueError(f"fit: meta_batch={config.meta_batch} does not split evenly over {me.size} ranks; "
                             f"choose a multiple of {me.size} (each rank adapts meta_batch / ranks tasks)")
        if config.val_tasks < me.size:
            raise ValueError(f"fit: val_tasks={config.val_tasks} is fewer than the {me.size} ranks")
    device, dtype = _resolve_device(config.device, me), _dtype(config)
    run_dir = Path(config.save_to).expanduser() if config.save_to is not None else None

    state: dict[str, Any] | None = None
    resume_file: Path | None = None
    history: list[dict[str, Any]] = []
    if resume is not None:
        resume_file = checkpoint_path(resume)
        state = load_checkpoint(resume_file)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"fit: {str(resume_file)!r} is not a maml_func training checkpoint")
        _check_resume(config, state["config"], state["iteration"])
        if state.get("world_size", 1) != me.size:
            raise ValueError(f"fit: {str(resume_file)!r} was written by a run on {state.get('world_size', 1)} "
                             f"rank(s), this one has {me.size}; resume with the same number of ranks (each "
                             "rank's task stream is in the checkpoint)")
        history = _read_history(resume_file.parent, state["iteration"])
    # Resuming from the run directory's own last.pt: it already holds the starting state.
    in_place = run_dir is not None and resume_file is not None and resume_file.resolve() == (run_dir / LAST).resolve()
    if run_dir is not None and (run_dir / LAST).exists() and not (
        resume_file is not None and resume_file.parent.resolve() == run_dir.resolve()
    ):
        raise ValueError(f"fit: run directory {str(run_dir)!r} already holds a checkpoint; resume it "
                         f"(fit(..., resume={str(run_dir)!r}) / --resume) or choose another save_to")

    splits = _load_splits(config)
    train_classes, val_classes = splits["train"].to(device), splits["val"].to(device)
    if config.channels is None:
        config = config.replace(channels=int(train_classes.images.shape[2]))
    sampler = EpisodeSampler(train_classes, config.n_way, config.k_shot, config.n_query, rotations=config.rotations)
    val_sampler = EpisodeSampler(val_classes, config.n_way, config.k_shot, config.n_query,
                                 rotations=config.rotations)

    with _rng_scope(device):
        torch.manual_seed(config.seed)
        model, algorithm = build_algorithm(config)
        model.to(device=device, dtype=dtype)
        meta = algorithm.init()
        optimizer = torch.optim.Adam(algorithm.parameters(meta), lr=config.meta_lr)
        generator = torch.Generator(device=device).manual_seed(rank_seed(config.seed, me.rank))
        start, best, best_iteration = 0, None, None
        if state is not None:
            _load_meta(meta, state["meta"], "fit")
            optimizer.load_state_dict(state["optimizer"])
            start, best, best_iteration = state["iteration"], state["best_val_accuracy"], state["best_iteration"]
            _restore_rngs(state, generator, device, config, start, me)
        files = _RunFiles(run_dir if me.is_main else None)
        files.open(config, history)
        if meta_gradient_fn is meta_gradient and config.tasks_per_backward is not None:
            meta_gradient_fn = functools.partial(meta_gradient, tasks_per_backward=config.tasks_per_backward)
        try:
            return _loop(config, model, algorithm, meta, optimizer, generator, sampler, val_sampler, files,
                         start=start, best=best, best_iteration=best_iteration, progress=progress, device=device,
                         dtype=dtype, meta_gradient_fn=meta_gradient_fn,
                         resumed_in_place=in_place, world=me)
        finally:
            files.close()


def _restore_rngs(state: dict[str, Any], generator: torch.Generator, device: torch.device, config: TrainConfig,
                  iteration: int, me: World) -> None:
    torch.set_rng_state(state["cpu_rng"])
    if state["train_generator_device"] == device.type:
        generator.set_state(state["train_generators"][me.rank] if "train_generators" in state
                            else state["train_generator"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
    else:
        warnings.warn(f"fit: the checkpoint's task generator ran on {state['train_generator_device']!r}, this run on "
                      f"{device.type!r}; its state cannot move across device types, so the tasks from iteration "
                      f"{iteration} on are drawn from a new seed (the resumed run is not bitwise the same)",
                      stacklevel=3)
        generator.manual_seed(rank_seed(config.seed + 7_919 * iteration, me.rank))


def _checkpoint_state(config: TrainConfig, meta: MetaParams, optimizer: torch.optim.Optimizer,
                      generator: torch.Generator, device: torch.device, iteration: int, best: float | None,
                      best_iteration: int | None, me: World) -> dict[str, Any]:
    """The checkpoint of this moment; a collective under ``torch.distributed`` (call it on every rank)."""
    from maml_func import __version__

    generators = gather_objects(generator.get_state()) if me.size > 1 else [generator.get_state()]

    state: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": __version__,
        "config": config.to_dict(),
        "iteration": iteration,
        "meta": _meta_state(meta),
        "optimizer": optimizer.state_dict(),
        "train_generator": generators[0],
        "train_generators": generators,
        "world_size": me.size,
        "train_generator_device": device.type,
        "cpu_rng": torch.get_rng_state(),
        "best_val_accuracy": best,
        "best_iteration": best_iteration,
    }
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def meta_lr_at(config: TrainConfig, iteration: int) -> float:
    """The Adam step size of the update from ``iteration`` to ``iteration + 1`` under ``config.lr_schedule``."""
    if config.lr_schedule == "constant":
        return config.meta_lr
    progress = min(iteration / config.iterations, 1.0)
    floor = config.final_lr_factor
    return config.meta_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _grad_norm(params: list[Tensor]) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))


def _loop(config: TrainConfig, model: nn.Module, algorithm: Any, meta: MetaParams,
          optimizer: torch.optim.Optimizer, generator: torch.Generator, sampler: EpisodeSampler,
          val_sampler: EpisodeSampler, files: _RunFiles, *, start: int, best: float | None,
          best_iteration: int | None, progress: bool, device: torch.device, dtype: torch.dtype,
          meta_gradient_fn: MetaGradientFn, resumed_in_place: bool, world: World) -> TrainResult:
    params = algorithm.parameters(meta)
    result = TrainResult(config, model, algorithm, meta, start, best, best_iteration, files.dir, files.history)
    t0 = time.monotonic()
    deadline = t0 + 60 * config.max_minutes if config.max_minutes is not None else None
    window: list[tuple[float, float, float]] = []
    window_start = time.monotonic()
    last_saved = start if resumed_in_place else None

    def state() -> dict[str, Any]:
        return _checkpoint_state(config, meta, optimizer, generator, device, result.iteration, result.best_val_accuracy,
                                 result.best_iteration, world)

    def save_last() -> Path | None:
        nonlocal last_saved
        if last_saved != result.iteration:
            files.save(LAST, state())
            last_saved = result.iteration
        return files.dir / LAST if files.dir is not None else None

    def validate() -> EvalResult:
        nonlocal window_start
        began = time.monotonic()
        ev = evaluate(algorithm, meta, val_sampler, num_tasks=config.val_tasks, steps=config.eval_inner_steps,
                      batch_size=max(1, min(config.meta_batch, config.val_tasks)),
                      generator=torch.Generator(device=device).manual_seed(rank_seed(VAL_SEED, world.rank)),
                      distributed=world.size > 1)
        files.log({"kind": "val", "iteration": result.iteration, "accuracy": ev.final_accuracy,
                   "ci95": ev.final_ci95, "loss": ev.loss[-1], "accuracy_per_step": ev.accuracy,
                   "tasks": ev.num_tasks, "steps": ev.steps})
        if result.best_val_accuracy is None or ev.final_accuracy > result.best_val_accuracy:
            result.best_val_accuracy, result.best_iteration = ev.final_accuracy, result.iteration
            files.save(BEST, state())
        files.plot(config)
        window_start += time.monotonic() - began  # tasks/s counts training time only
        return ev

    local_batch = config.meta_batch // world.size
    with _SignalGuard() as guard, tqdm(total=config.iterations, initial=start, disable=not (progress and world.is_main),
                                       dynamic_ncols=True, unit="it", desc="meta-train") as bar:
        val_text = "-"
        if start == 0 and config.val_every > 0 and start < config.iterations:
            val_text = f"{100 * validate().final_accuracy:.1f}%"
        while result.iteration < config.iterations:
            batch = sampler.sample(local_batch, generator)
            if batch.x_support.dtype != dtype:
                batch = batch.to(dtype=dtype)
            loss, metrics = meta_gradient_fn(algorithm, meta, batch, result.iteration)
            if world.size > 1:  # the meta-gradient and loss of the whole meta-batch, on every rank
                loss = loss.detach().to(dtype=dtype).clone()
                all_reduce_mean([loss, *(p.grad for p in params if p.grad is not None)],
                                what=f"averaging the meta-gradients of iteration {result.iteration + 1}")
                metrics = gather_tasks(metrics)
            loss_value, norm = loss.item(), _grad_norm(params).item()
            if not (math.isfinite(loss_value) and math.isfinite(norm)):
                what = "meta-loss" if not math.isfinite(loss_value) else "meta-gradient"
                kept = (f"the last good checkpoint, {files.dir / LAST} (iteration {last_saved}), is kept"
                        if last_saved is not None else "no checkpoint was written")
                raise NonFiniteLossError(
                    f"fit: the {what} is {loss_value if what == 'meta-loss' else norm} at iteration "
                    f"{result.iteration + 1}; stopped without applying that update ({kept}). Lower inner_lr "
                    f"(now {config.inner_lr}) or meta_lr (now {config.meta_lr}), or use dtype='float64'",
                    result.iteration + 1, files.dir / LAST if last_saved is not None else None)
            for group in optimizer.param_groups:
                group["lr"] = meta_lr_at(config, result.iteration)
            optimizer.step()
            result.iteration += 1
            accuracy = metrics["accuracy"].mean().item() if "accuracy" in metrics else float("nan")
            # The post-adaptation query loss, comparable across algorithms (Reptile's objective is a distance).
            query_loss = metrics["loss"].mean().item() if "loss" in metrics else loss_value
            window.append((query_loss, accuracy, norm))
            now = time.monotonic()
            tasks_per_s = len(window) * config.meta_batch / max(now - window_start, 1e-9)
            # Means over the current logging window: steadier to read than one meta-batch.
            mean_loss, mean_accuracy, mean_norm = (sum(column) / len(window) for column in zip(*window))
            if result.iteration % config.log_every == 0 or result.iteration == config.iterations:
                files.log({"kind": "train", "iteration": result.iteration, "loss": mean_loss,
                           "accuracy": mean_accuracy, "grad_norm": mean_norm, "tasks_per_s": tasks_per_s,
                           "meta_lr": optimizer.param_groups[0]["lr"],
                           "elapsed_s": now - t0})
                window, window_start = [], now
            if (config.val_every > 0 and result.iteration % config.val_every == 0) \
                    or result.iteration == config.iterations:
                val_text = f"{100 * validate().final_accuracy:.1f}%"
            bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{100 * mean_accuracy:.1f}%", val=val_text,
                            tasks_s=f"{tasks_per_s:.0f}", refresh=False)
            bar.update(1)
            if result.iteration % config.save_every == 0 or result.iteration == config.iterations:
                save_last()
            received, out_of_time = guard.received or 0, int(
                deadline is not None and time.monotonic() >= deadline and result.iteration < config.iterations)
            if world.size > 1:
                received, out_of_time = agree([received, out_of_time])
            if received:
                result.stopped = "interrupted"
                checkpoint = save_last()
                files.plot(config)
                name = signal.Signals(received).name
                raise TrainingInterrupted(
                    f"fit: {name} received; stopped after iteration {result.iteration}"
                    + (f", checkpoint saved to {checkpoint}" if checkpoint is not None else " (save_to is None)"),
                    iteration=result.iteration, checkpoint=checkpoint, signum=received, result=result)
            if out_of_time:
                result.stopped = "time_limit"
                save_last()
                files.plot(config)
                break
    return result


# --------------------------------------------------------------- load a run
def load_run(checkpoint: str | Path, *, device: str | torch.device | None = "cpu") -> TrainResult:
    """Load a checkpoint (or a run directory's ``best.pt``, else ``last.pt``) for evaluation.

    Args:
        checkpoint: a ``.pt`` file or a run directory.
        device: where the meta-parameters go.

    Returns:
        A :class:`TrainResult` with ``config``, ``model``, ``algorithm`` and ``meta``.

    Example:
        >>> run = load_run("runs/5w1s")  # doctest: +SKIP
        >>> run.algorithm.adapt(run.meta, x_support, y_support)  # doctest: +SKIP
    """
    path = checkpoint_path(checkpoint, prefer_best=True)
    state = load_checkpoint(path)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"load_run: {str(path)!r} is not a maml_func training checkpoint")
    config = TrainConfig.from_dict(state["config"], origin=f"load_run({str(path)!r})")
    model, algorithm = build_algorithm(config)
    device = torch.device(device) if device is not None else torch.device("cpu")
    model.to(device=device, dtype=_dtype(config))
    meta = algorithm.init()
    _load_meta(meta, state["meta"], "load_run")
    return TrainResult(config, model, algorithm, meta, state["iteration"], state.get("best_val_accuracy"),
                       state.get("best_iteration"), path.parent, stopped="loaded")


def evaluate_run(
    checkpoint: str | Path | None = None,
    *,
    config: TrainConfig | None = None,
    classes: str = "test",
    num_tasks: int = 600,
    steps: int | None = None,
    batch_size: int = 50,
    seed: int = 0,
    progress: bool = False,
) -> EvalResult:
    """The evaluation protocol on a checkpoint's (or a config's) data: tasks from held-out classes.

    Args:
        checkpoint: a checkpoint or run directory (its ``best.pt``, else ``last.pt``);
            ``None`` evaluates a fresh initialization from ``config`` (seeded by
            ``config.seed``), the untrained baseline.
        config: the data, task shape and inner loop to evaluate with; defaults to
            the checkpoint's. ``n_way``, ``hidden`` and ``image_size`` must match the checkpoint.
        classes: ``"test"`` (meta-test classes), ``"val"`` or ``"train"``.
        num_tasks, steps, batch_size, seed, progress: as in :func:`maml_func.evaluate.evaluate`;
            ``steps`` defaults to ``config.eval_inner_steps``.

    Returns:
        An :class:`~maml_func.evaluate.EvalResult`.

    Example:
        >>> print(evaluate_run("runs/5w1s").summary())  # doctest: +SKIP
        5-way 1-shot: 97.2% ± 0.5 (600 tasks, 3 steps)
    """
    if checkpoint is None and config is None:
        raise ValueError("evaluate_run: pass a checkpoint, a config (for an untrained baseline), or both")
    if classes not in ("train", "val", "test"):
        raise ValueError(f"evaluate_run: classes must be 'train', 'val' or 'test', got {classes!r}")
    # Checked here too, not only in evaluate(): a bad value must fail before the data is read and cached.
    for name, value, minimum in (("num_tasks", num_tasks, 1), ("batch_size", batch_size, 1), ("seed", seed, 0),
                                 ("steps", 0 if steps is None else steps, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"evaluate_run: {name} must be an int >= {minimum}, got {value!r}")
    state = None
    if checkpoint is not None:
        path = checkpoint_path(checkpoint, prefer_best=True)
        state = load_checkpoint(path)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"evaluate_run: {str(path)!r} is not a maml_func training checkpoint")
        if config is None:
            config = TrainConfig.from_dict(state["config"], origin=f"evaluate_run({str(path)!r})")
    assert config is not None
    config.check_paths()
    device, dtype = _resolve_device(config.device), _dtype(config)
    splits = _load_splits(config)
    pool = splits[classes].to(device)
    with _rng_scope(device):
        torch.manual_seed(config.seed)
        model, algorithm = build_algorithm(config, in_channels=int(pool.images.shape[2]))
        model.to(device=device, dtype=dtype)
        meta = algorithm.init()
    if state is not None:
        _load_meta(meta, state["meta"], "evaluate_run")
    sampler = EpisodeSampler(pool, config.n_way, config.k_shot, config.n_query, rotations=config.rotations)
    return evaluate(algorithm, meta, sampler, num_tasks=num_tasks,
                    steps=config.eval_inner_steps if steps is None else steps, batch_size=batch_size, seed=seed,
                    progress=progress)
