"""The meta-training loop of one run: sample, step, maybe log / validate / save, maybe stop.

:class:`Run` is what a run works with besides its :class:`~maml_func.state.TrainState`
(the config, the network and algorithm, the task samplers, the run directory,
the callbacks), fixed by :func:`maml_func.train.fit` before the first
iteration, with what the run does at each event: log a record, save a
checkpoint, validate, explain a failure with what was kept. :func:`loop`
repeats {sample a meta-batch, ``run.step`` (:func:`~maml_func.step.train_step`),
maybe log / validate / save, maybe stop} up to ``config.iterations``.

One stop rule ends a run early: a signal (SIGINT/SIGTERM: the iteration
finishes, ``last.pt`` is saved, :class:`TrainingInterrupted` is raised) or the
time limit (``max_minutes``: validated, saved, ``stopped="time_limit"``). Under
``torch.distributed`` the ranks agree on it with a collective before anyone
acts, so they stop at the same iteration.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from maml_func import checks
from maml_func import device as devices
from maml_func.algorithms.base import Algorithm
from maml_func.atomic import WriteError
from maml_func.callbacks import Callback
from maml_func.checkpoint import BEST, LAST
from maml_func.config import TrainConfig
from maml_func.distributed import World, agree, rank_seed
from maml_func.evaluate import evaluate
from maml_func.execution import setup_key
from maml_func.rundir import RunDirectory
from maml_func.runs import TrainResult
from maml_func.state import TrainState
from maml_func.step import FiniteGuard, MetaStepOutOfMemory, NonFiniteLossError, is_out_of_memory, meta_lr_at
from maml_func.tasks import EpisodeSampler, TaskBatch

__all__ = ["VAL_SEED", "MetaStepFailed", "Run", "RunWriteError", "Step", "TrainingInterrupted", "loop"]

#: What makes one meta-update: :func:`maml_func.step.train_step`'s signature, returning the step's metrics.
Step = Callable[..., dict[str, torch.Tensor]]

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
class Run:
    """What one run works with besides its state, fixed from the start to the end of :func:`maml_func.train.fit`.

    ``step`` makes one meta-update (:func:`maml_func.step.train_step`, or a
    function given to ``fit(step=...)`` that wraps it).
    """

    config: TrainConfig
    model: torch.nn.Module
    algorithm: Algorithm
    sampler: EpisodeSampler
    val_sampler: EpisodeSampler
    files: RunDirectory
    world: World
    dtype: torch.dtype
    last_saved: int | None  # the iteration of the run directory's last.pt, None before one is written
    callbacks: tuple[Callback, ...]
    step: Step

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


def loop(run: Run, state: TrainState, progress: bool) -> TrainResult:
    """Meta-train ``state`` up to ``config.iterations``: sample, step, maybe log / validate / save, maybe stop."""
    config, world = run.config, run.world
    t0 = time.monotonic()
    deadline = t0 + 60 * config.max_minutes if config.max_minutes is not None else None
    window = _Window(config.meta_batch)
    # The finiteness check: at once on the CPU, kept on the device elsewhere (see maml_func.device.defer_host_reads).
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
                window.add(run.step(state, batch, run.algorithm, lr=meta_lr_at(config, state.iteration),
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
