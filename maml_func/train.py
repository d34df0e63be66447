"""Meta-training: :func:`fit` runs a :class:`~maml_func.config.TrainConfig` end to end.

One run: load the class splits once onto the device, build the network (or
take the one given as ``model=``) and the algorithm, check the network's output
size on one support set, make the :class:`~maml_func.state.TrainState` (or load
it from a checkpoint), then repeat {sample a meta-batch,
:func:`~maml_func.step.train_step`, maybe log / validate / save, maybe stop}.
The run directory (:class:`~maml_func.rundir.RunDirectory`) receives
``last.pt``, ``best.pt``, ``metrics.jsonl``, ``learning_curve.png`` and
``config.json``; the callbacks given to :func:`fit`
(:class:`~maml_func.callbacks.Callback`) see each record and checkpoint as it is written.

One stop rule ends a run early: a signal (SIGINT/SIGTERM: the iteration
finishes, ``last.pt`` is saved, :class:`TrainingInterrupted` is raised) or the
time limit (``max_minutes``: validated, saved, ``stopped="time_limit"``). Under
``torch.distributed`` the ranks agree on it with a collective before anyone
acts, so they stop at the same iteration; only rank 0 writes files, and holds
the run directory's lock from the start to the end of :func:`fit`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from maml_func import device as devices
from maml_func import step as _step
from maml_func import checks
from maml_func.atomic import WriteError, removed_on_failure
from maml_func.callbacks import Callback, check_callbacks
from maml_func.config import PRESETS, TrainConfig, make_config, object_model_name
from maml_func.distributed import World, agree, init_distributed, rank_seed
from maml_func.evaluate import evaluate
from maml_func.execution import ExecutionPolicy, default_cache_dir, setup_key
from maml_func.rundir import (BEST, LAST, RunDirectory, RunDirectoryLocked, check_creatable, check_unlocked,
                              checkpoint_path, claimed, read_history)
from maml_func.runs import (TrainResult, build_algorithm, check_buildable, check_outputs, evaluate_run,
                            load_run, load_splits, resolve_device, rng_scope, task_sampler)
from maml_func.state import Checkpoint, TrainState, check_resume
from maml_func.step import (
    FiniteGuard, MetaStepOutOfMemory, NonFiniteLossError, is_out_of_memory, meta_gradient, meta_lr_at, train_step,
)
from maml_func.tasks import EpisodeSampler, TaskBatch

__all__ = [
    "PRESETS", "MetaStepFailed", "MetaStepOutOfMemory", "NonFiniteLossError", "RunDirectoryLocked", "RunWriteError",
    "TrainConfig", "TrainResult", "TrainingInterrupted", "build_algorithm", "check_run_directory", "checkpoint_path",
    "evaluate_run", "fit", "load_run", "make_config", "meta_gradient", "meta_lr_at", "train_step",
]

# Validation tasks are the same at every validation and for every training
# seed, so validation curves of different runs are comparable.
VAL_SEED = 20_170_703


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


class RunWriteError(OSError):
    """A file of the run directory could not be written (a full disk): the run stopped; the message says what is kept.

    Attributes:
        path: the file that could not be written.
        checkpoint: the last checkpoint, intact, that ``--resume`` continues from (``None`` when none was written).
    """

    def __init__(self, message: str, path: Path, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.path, self.checkpoint = path, checkpoint


class MetaStepFailed(RuntimeError):
    """A meta-iteration raised an error (a model that cannot run on these tasks); its update was not applied.

    Attributes:
        iteration: the 1-based iteration that failed.
        checkpoint: the last checkpoint (``None`` when none was written).
    """

    def __init__(self, message: str, iteration: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.iteration, self.checkpoint = iteration, checkpoint


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


@dataclass
class _Run:
    """What one run works with besides its state: fixed from the start to the end of :func:`fit`."""

    config: TrainConfig
    model: torch.nn.Module
    algorithm: Any
    sampler: EpisodeSampler
    val_sampler: EpisodeSampler
    files: RunDirectory
    world: World
    dtype: torch.dtype
    last_saved: int | None  # the iteration of the run directory's last.pt, None before one is written
    callbacks: tuple[Callback, ...] = ()

    def start(self) -> None:
        """Tell the callbacks that the run starts: everything is checked, data and model loaded, nothing written."""
        if self.world.is_main:
            for callback in self.callbacks:
                callback.on_start(self.config)

    def log(self, record: dict[str, Any]) -> None:
        """Write a record to ``metrics.jsonl`` and show it to the callbacks (``on_log`` or ``on_validation``)."""
        self.files.log(record)
        if self.world.is_main:
            for callback in self.callbacks:
                (callback.on_validation if record["kind"] == "val" else callback.on_log)(dict(record))

    def save(self, name: str, state: TrainState) -> None:
        """Write checkpoint ``name`` of ``state`` and tell the callbacks (a collective under torch.distributed)."""
        path = self.files.save(name, state.to_checkpoint(self.config))
        if path is not None:
            for callback in self.callbacks:
                callback.on_checkpoint(path, state.iteration)

    def save_last(self, state: TrainState) -> Path | None:
        if self.last_saved != state.iteration:
            self.save(LAST, state)
            self.last_saved = state.iteration
        return self.files.file(LAST)

    def validate(self, state: TrainState, elapsed_s: float, train_s: float) -> float:
        """Evaluate on the validation classes, log it, keep ``best.pt``; the accuracy.

        ``elapsed_s``: wall time of the run so far; ``train_s``: of it, the time not spent validating.
        """
        config, device = self.config, state.device
        way = None  # the policy's way once it has chosen (evaluation uses the same policy)
        if state.execution is not None and not state.execution.searching:
            way = state.execution.way(min(config.meta_batch, config.val_tasks))
        ev = evaluate(self.algorithm, state.meta, self.val_sampler, num_tasks=config.val_tasks,
                      steps=config.eval_inner_steps, batch_size=max(1, min(config.meta_batch, config.val_tasks)),
                      generator=torch.Generator(device=device).manual_seed(rank_seed(VAL_SEED, self.world.rank)),
                      distributed=self.world.size > 1, way=way)
        self.log({"kind": "val", "iteration": state.iteration, "accuracy": ev.final_accuracy,
                  "ci95": ev.final_ci95, "loss": ev.loss[-1], "accuracy_per_step": ev.accuracy,
                  "tasks": ev.num_tasks, "steps": ev.steps, "elapsed_s": elapsed_s, "train_s": train_s})
        if state.best_val_accuracy is None or ev.final_accuracy > state.best_val_accuracy:
            state.best_val_accuracy, state.best_iteration = ev.final_accuracy, state.iteration
            self.save(BEST, state)
        self.files.plot()
        return ev.final_accuracy

    def search_started(self, state: TrainState, batch: TaskBatch) -> bool:
        """Whether this iteration is part of the execution search (a cached choice ends it before it starts)."""
        policy = state.execution
        if policy is None or not policy.searching:
            return False
        if not policy.timings:  # a search not begun yet: a choice cached for this set-up ends it at once
            policy.recall(setup_key(self.algorithm, batch, tasks_per_backward=self.config.tasks_per_backward))
        return True

    def search_ended(self, state: TrainState, batch: TaskBatch) -> str:
        """Log the execution policy's choice once (``metrics.jsonl``, the callbacks), cache it; the line to show."""
        policy = state.execution
        assert policy is not None
        policy.remember(setup_key(self.algorithm, batch, tasks_per_backward=self.config.tasks_per_backward))
        self.log({"kind": "execution", "iteration": state.iteration, "choice": policy.choice,
                  "cached": policy.from_cache, "timings": policy.timings})
        return f"fit: {policy.summary()}"

    def checkpoint(self) -> Path | None:
        """The checkpoint a run that stops now leaves to resume from, or ``None``."""
        last = self.files.file(LAST)
        return last if last is not None and last.exists() else None

    def kept(self) -> str:
        """What a run that stops now leaves behind, in words (:func:`claimed` removes a run without a checkpoint)."""
        last = self.checkpoint()
        if last is not None:
            at = f" (iteration {self.last_saved})" if self.last_saved is not None else ""
            return f"the last checkpoint, {last}{at}, is intact and --resume {last.parent} continues from it"
        if self.files.path is None:
            return "no checkpoint was written (save_to is None)"
        return f"no checkpoint had been written, so nothing of this run is left in {self.files.path}"

    def non_finite(self, err: NonFiniteLossError) -> NonFiniteLossError:
        """``err`` told with what was kept and what to change."""
        return NonFiniteLossError(
            f"fit: the {err.quantity} is {err.value} at iteration {err.iteration}; stopped without applying that "
            f"update ({self.kept()}). Lower inner_lr (now {self.config.inner_lr}) or meta_lr (now "
            f"{self.config.meta_lr}), or use dtype='float64'", err.iteration, self.checkpoint(),
            quantity=err.quantity, value=err.value)

    def step_failed(self, err: BaseException, iteration: int) -> BaseException:
        """``err`` of meta-iteration ``iteration`` told with what was kept and what to change."""
        if not is_out_of_memory(err):
            return MetaStepFailed(
                f"fit: meta-iteration {iteration} failed ({type(err).__name__}: {checks.brief(err)}); {self.kept()}. "
                "The model cannot run on these tasks: check model, model_options, image_size and channels against "
                "the data", iteration, self.checkpoint())
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        return MetaStepOutOfMemory(
            f"fit: meta-iteration {iteration} did not fit in memory ({first}); {self.kept()}. Lower the memory of a "
            "meta-iteration: backprop='adjoint' (exact second order with the activations of one inner step), "
            "tasks_per_backward (one backward per that many tasks), a smaller meta_batch or chunk_size, or "
            "first_order=True", iteration, self.checkpoint())

    def write_failed(self, err: WriteError) -> RunWriteError:
        """A checkpoint or ``config.json`` that could not be written, told with what is kept."""
        return RunWriteError(f"fit: {err}; {self.kept()}", err.path, self.checkpoint())

    def result(self, state: TrainState, stopped: str) -> TrainResult:
        return TrainResult(self.config, self.model, self.algorithm, state.meta, state.iteration,
                           state.best_val_accuracy, state.best_iteration, self.files.path, self.files.history, stopped)


class _Window:
    """Training metrics summed on the device over the current logging window; tasks/s counts training time only.

    ``paused``: the seconds of the whole run spent outside training (validation).
    """

    def __init__(self, meta_batch: int) -> None:
        self.meta_batch, self.count, self.sums, self.start = meta_batch, 0, None, time.monotonic()
        self.paused = 0.0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        row = torch.stack([metrics["query_loss"], metrics["accuracy"], metrics["grad_norm"]])
        self.sums = row if self.sums is None else self.sums + row
        self.count += 1

    def means(self) -> dict[str, float]:
        """The window's means (one host read) and its tasks/s."""
        loss, accuracy, norm = (self.sums / self.count).tolist()
        tasks_per_s = self.count * self.meta_batch / max(time.monotonic() - self.start, 1e-9)
        return {"loss": loss, "accuracy": accuracy, "grad_norm": norm, "tasks_per_s": tasks_per_s}

    def pause(self, seconds: float) -> None:
        self.start += seconds
        self.paused += seconds

    def reset(self) -> None:
        self.count, self.sums, self.start = 0, None, time.monotonic()


def _loop(run: _Run, state: TrainState, progress: bool) -> TrainResult:
    """Meta-train ``state`` up to ``config.iterations``: sample, step, maybe log / validate / save, maybe stop."""
    config, world = run.config, run.world
    t0 = time.monotonic()
    deadline = t0 + 60 * config.max_minutes if config.max_minutes is not None else None
    window = _Window(config.meta_batch)
    # The finiteness check: at once on the CPU, kept on the device elsewhere (see batching.defer_host_reads).
    finite = FiniteGuard(state.device) if devices.defer_host_reads(state.device) else None

    def settle() -> None:  # before anything is logged, validated, saved or stopped on: no bad state goes out
        try:
            if finite is not None:
                finite.check()
        except NonFiniteLossError as err:
            raise run.non_finite(err) from None

    def validate() -> str:
        began = time.monotonic()
        accuracy = run.validate(state, began - t0, began - t0 - window.paused)
        window.pause(time.monotonic() - began)
        return f"{100 * accuracy:.1f}%"

    def due(every: int) -> bool:
        return (every > 0 and state.iteration % every == 0) or state.iteration == config.iterations

    with _SignalGuard() as signals, tqdm(total=config.iterations, initial=state.iteration, unit="it",
                                         disable=not (progress and world.is_main), dynamic_ncols=True,
                                         desc="meta-train") as bar:
        first = state.iteration == 0 and config.val_every > 0 and config.iterations > 0
        val_text = validate() if first else "-"
        while state.iteration < config.iterations:
            batch = run.sampler.sample(config.meta_batch // world.size, state.generator)
            if batch.x_support.dtype != run.dtype:
                batch = batch.to(dtype=run.dtype)
            searching = run.search_started(state, batch)
            try:
                window.add(_step.train_step(state, batch, run.algorithm, lr=meta_lr_at(config, state.iteration),
                                            tasks_per_backward=config.tasks_per_backward, guard=finite))
            except NonFiniteLossError as err:
                raise run.non_finite(err) from None
            except (MemoryError, RuntimeError) as err:
                raise run.step_failed(err, state.iteration + 1) from (None if is_out_of_memory(err) else err)
            bar.update(1)
            if searching and not state.execution.searching:  # the choice, logged once
                line = run.search_ended(state, batch)
                if progress and world.is_main:
                    bar.write(line)
            if due(config.log_every):
                settle()
                means = window.means()
                run.log({"kind": "train", "iteration": state.iteration, **means,
                         "meta_lr": state.optimizer.param_groups[0]["lr"], "elapsed_s": time.monotonic() - t0})
                bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{100 * means['accuracy']:.1f}%", val=val_text,
                                tasks_s=f"{means['tasks_per_s']:.0f}")
                window.reset()
            if due(config.val_every):
                settle()
                val_text = validate()
            if due(config.save_every):
                settle()
                run.save_last(state)
            received = signals.received or 0
            out_of_time = int(deadline is not None and time.monotonic() >= deadline
                              and state.iteration < config.iterations)
            if world.size > 1:
                received, out_of_time = agree([received, out_of_time])
            if received or out_of_time:
                settle()
                if out_of_time and not received and not due(config.val_every):
                    val_text = validate()  # the time limit is the run's end: best.pt may be its last iteration
                checkpoint = run.save_last(state)
                run.files.plot()
                if out_of_time and not received:
                    return run.result(state, "time_limit")
                raise TrainingInterrupted(
                    f"fit: {signal.Signals(received).name} received; stopped after iteration {state.iteration}"
                    + (f", checkpoint saved to {checkpoint}" if checkpoint is not None else " (save_to is None)"),
                    iteration=state.iteration, checkpoint=checkpoint, signum=received,
                    result=run.result(state, "interrupted"))
    settle()
    return run.result(state, "completed")


def check_run_directory(config: TrainConfig, resume: Checkpoint | None = None) -> None:
    """Refuse a ``save_to`` that cannot hold this run, before anything is loaded or written.

    Raises:
        ValueError: ``save_to`` is a file or not writable, or it already holds
            another run's checkpoint (and ``resume`` is not from it).
    """
    if config.save_to is None:
        return
    run_dir = Path(config.save_to).expanduser()
    check_creatable(run_dir, "fit")
    check_unlocked(run_dir, "fit")
    if (run_dir / LAST).exists() and not (resume is not None and resume.path.parent.resolve() == run_dir.resolve()):
        raise ValueError(f"fit: run directory {str(run_dir)!r} already holds a checkpoint; resume it "
                         f"(fit(..., resume={str(run_dir)!r}) / --resume) or choose another save_to")


@contextlib.contextmanager
def _owned(config: TrainConfig, saved: Checkpoint | None, me: World) -> Iterator[None]:
    """The run directory, checked and claimed by the rank that writes it (see :func:`claimed`) for the block.

    Every rank learns whether rank 0 refused it, so all stop together.
    """
    with contextlib.ExitStack() as stack:
        refusal: ValueError | None = None
        if me.is_main:
            try:
                check_run_directory(config, saved)
                run_dir = Path(config.save_to).expanduser() if config.save_to is not None else None
                stack.enter_context(claimed(run_dir, "fit"))
            except ValueError as err:
                refusal = err
        if agree([int(refusal is not None)])[0]:
            raise refusal or ValueError(f"fit: rank 0 refused the run directory {config.save_to!r}; its error says why")
        yield


def fit(
    config: TrainConfig,
    *,
    model: torch.nn.Module | None = None,
    callbacks: Sequence[Callback] = (),
    resume: str | Path | Checkpoint | None = None,
    progress: bool = True,
    meta_gradient_fn: Any = None,
) -> TrainResult:
    """Meta-train as ``config`` says; write checkpoints and metrics to ``config.save_to``.

    Args:
        config: the run (see :class:`~maml_func.config.TrainConfig`, :func:`make_config`).
        model: your network, meta-trained instead of the one ``config.model``
            names (the config gives everything else: algorithm, inner_lr, ...).
            It must give ``n_way`` logits per image. What runs is ``model``
            itself, or its copy with normalization layers in exact form where
            it has some (:func:`~maml_func.normalization.exact_model`); that
            network moves to the run's device and dtype like a built one and
            is ``result.model``. The run's config records its
            class, not its code: load the run back with ``load_run(RUN,
            model=...)`` / ``evaluate_run(RUN, model=...)``, and resume it
            with the same ``model=``.
        callbacks: :class:`~maml_func.callbacks.Callback` objects, called at
            each line of metrics, validation and checkpoint with the records of
            ``metrics.jsonl``.
        resume: a run directory or checkpoint (or a :class:`~maml_func.state.Checkpoint`
            already read) to continue exactly. ``config`` must equal the
            checkpoint's config except for the fields in
            ``maml_func.config.RESUMABLE_FIELDS`` (e.g. a larger ``iterations``).
        progress: show a tqdm bar (loss, accuracy, tasks/s).
        meta_gradient_fn: deprecated; replaces :func:`meta_gradient` inside
            :func:`~maml_func.step.train_step` (wrap ``maml_func.step.train_step`` instead).

    Returns:
        A :class:`TrainResult` (``stopped="time_limit"`` when ``max_minutes`` ran out).

    Raises:
        ValueError, FileNotFoundError: bad config, data, run directory or
            checkpoint; raised before anything is written.
        RunDirectoryLocked: (a ``ValueError``) another run is writing to
            ``save_to``; nothing of it is touched. The run directory is this
            run's from its first moment to its end.
        NonFiniteLossError, MetaStepOutOfMemory, MetaStepFailed: a
            meta-iteration failed (NaN/inf, out of memory, another error); its
            update is not applied.
        RunWriteError: a checkpoint could not be written (a full disk); the
            previous one is intact. A metrics line or the plot that cannot be
            written is only warned about.
        TrainingInterrupted: on SIGINT/SIGTERM, after saving ``last.pt``.

    A run that stops with an error keeps ``save_to`` if it holds a
    ``last.pt`` to resume from, and otherwise leaves nothing there; the
    error's message says which.

    Example:
        >>> from maml_func.config import make_config
        >>> result = fit(make_config(preset="omniglot-5w1s", iterations=2000, save_to="runs/5w1s"))  # doctest: +SKIP
        >>> result.best_val_accuracy  # doctest: +SKIP
        0.95
        >>> import torchvision  # doctest: +SKIP
        >>> fit(make_config(dataset="path/to/folders", channels=3, image_size=32),  # doctest: +SKIP
        ...     model=torchvision.models.resnet18(num_classes=5))
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"fit: config must be a TrainConfig (see make_config), got {type(config).__name__}")
    callbacks = check_callbacks(callbacks, "fit")
    if model is not None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"fit: model must be an nn.Module, got {type(model).__name__}; pass the network object "
                            "(or leave it out and name one in config.model)")
        # The checkpoint records the class: a Python object cannot be rebuilt from a config.
        config = config.replace(model=object_model_name(model), model_options={})
    if meta_gradient_fn is not None:
        warnings.warn("fit: meta_gradient_fn is deprecated; wrap maml_func.step.train_step instead",
                      DeprecationWarning, stacklevel=2)
        return _with_meta_gradient(meta_gradient_fn, config, resume, progress, model, callbacks)
    config.check_paths()
    check_buildable(config, model, "fit")
    me = init_distributed() if config.distributed else World()
    if config.meta_batch % me.size:
        raise ValueError(f"fit: meta_batch={config.meta_batch} does not split evenly over {me.size} ranks; "
                         f"choose a multiple of {me.size} (each rank adapts meta_batch / ranks tasks)")
    if config.val_tasks < me.size:
        raise ValueError(f"fit: val_tasks={config.val_tasks} is fewer than the {me.size} ranks")
    device = resolve_device(config.device, me)
    devices.configure_device(device)
    saved = None
    if resume is not None:
        saved = resume if isinstance(resume, Checkpoint) else Checkpoint.read(resume, origin="fit")
        check_resume(config, saved, me)
    with _owned(config, saved, me):
        return _train(config, saved, me, device, progress, model, callbacks)


def _train(config: TrainConfig, saved: Checkpoint | None, me: World, device: torch.device, progress: bool,
           model: torch.nn.Module | None, callbacks: tuple[Callback, ...]) -> TrainResult:
    """:func:`fit` once its arguments and run directory are settled: load, build, loop."""
    run_dir = Path(config.save_to).expanduser() if config.save_to is not None else None
    with removed_on_failure(config.data_root):  # a refused run leaves no cache or download behind
        splits = load_splits(config)
        sampler, val_sampler = (task_sampler(config, splits, name, device, "fit") for name in ("train", "val"))
    if config.channels is None:
        config = config.replace(channels=int(splits["train"].images.shape[2]))
    dtype = getattr(torch, config.dtype)
    with rng_scope(device):
        torch.manual_seed(config.seed)
        model, algorithm = build_algorithm(config, model=model)
        model.to(device=device, dtype=dtype)
        check_outputs(model, sampler, config, dtype, "fit")
        meta = algorithm.init()
        # capturable on CUDA: Adam's step counts live on the device, so the finiteness guard never reads them back.
        optimizer = torch.optim.Adam(algorithm.parameters(meta), lr=config.meta_lr,
                                     capturable=device.type == "cuda")
        # Across ranks each would time alone and might choose another way: they run one vmap (chunk_size) instead.
        mode = "vmap" if config.execution == "auto" and me.size > 1 else config.execution
        policy = ExecutionPolicy(mode, chunk_size=config.chunk_size, max_memory_mb=config.max_memory_mb,
                                 cache_dir=default_cache_dir())
        state = TrainState(meta, optimizer,
                           torch.Generator(device=device).manual_seed(rank_seed(config.seed, me.rank)), world=me,
                           execution=policy)
        if saved is not None:
            state.load(saved, config.seed)
        # Resuming from the run directory's own last.pt: it already holds the starting state.
        in_place = saved is not None and run_dir is not None and saved.path.resolve() == (run_dir / LAST).resolve()
        files = RunDirectory(run_dir if me.is_main else None, title=_run_title(config))
        run = _Run(config, model, algorithm, sampler, val_sampler, files, me, dtype,
                   state.iteration if in_place else None, callbacks)
        run.start()
        try:
            files.open(config.to_dict(), read_history(saved.path.parent, saved.iteration) if saved else [])
            return _loop(run, state, progress)
        except WriteError as err:
            raise run.write_failed(err) from None
        finally:
            files.close()


def _with_meta_gradient(meta_gradient_fn: Any, config: TrainConfig, resume: Any, progress: bool,
                        model: torch.nn.Module | None, callbacks: Sequence[Callback]) -> TrainResult:
    """``fit`` with ``train_step`` computing its meta-gradient with ``meta_gradient_fn`` (the old seam)."""
    original = _step.meta_gradient

    def patched(algorithm: Any, meta: Any, batch: Any, iteration: int, **_: Any) -> Any:
        return meta_gradient_fn(algorithm, meta, batch, iteration)

    _step.meta_gradient = patched
    try:
        return fit(config, model=model, callbacks=callbacks, resume=resume, progress=progress)
    finally:
        _step.meta_gradient = original


def _run_title(config: TrainConfig) -> str:
    name = config.dataset if config.dataset == "omniglot" else Path(config.dataset).name
    return f"{config.algorithm} · {name} · {config.n_way}-way {config.k_shot}-shot"
