"""The execution policy: which way runs the per-task function of a meta-batch, chosen by measuring it.

Every way of running an algorithm's per-task function over a meta-batch
computes the same meta-gradient up to rounding: one ``vmap`` over all tasks,
``vmap`` in chunks of a few tasks, or a Python loop over tasks
(:func:`maml_func.batching.map_tasks`). Which is fastest depends on the
device, the shapes and the model more than any fixed rule captures (on a CPU
``vmap`` wins at Omniglot's 28x28 and loses to the loop at miniImageNet's
84x84; ``benchmarks/README.md``). So, as ``cudnn.benchmark`` does for
convolutions, ``"auto"`` times the candidates on the first meta-iterations of
a run, which are real training iterations (their gradients are applied), and
keeps the fastest for the rest of the run:

- candidates, from the least memory to the most: the loop, chunks of 2, 4 and
  8 tasks (those below the meta-batch), one ``vmap``; for image tasks on the
  CPU each vectorized one twice, with and without the channels-last layout of
  the tasks (``Way.channels_last``: it wins at 28x28 and loses at 84x84,
  ``benchmarks/README.md``); each runs ``ROUNDS``
  iterations: two in a row, least memory first (a warm-up, then the run
  whose memory counts), then the last round of every candidate once (so a
  slow minute of a shared machine hits every candidate alike); the fastest
  after the first counts (the first pays one-off costs, and a shared
  machine's hiccups only ever slow a run down). A chunk's memory grows with
  its size, so from the two largest ways measured so far the policy predicts
  the next one's and skips a candidate
  that would not fit (in the memory the system has available, or in
  ``max_memory_mb``); one that runs out of memory all the same is dropped and
  the iteration re-run the way chosen so far;
- the choice: among the candidates within 3% of the fastest, the one whose
  memory rose least (on the CPU the peak resident set over the process's
  before the search, which an allocator that keeps freed memory makes the
  honest measure; on CUDA the peak allocation), and never one over
  ``max_memory_mb`` when that is set;
- one backward per call: unless the run asks for its own
  ``tasks_per_backward``, each candidate differentiates each call of the
  per-task function on its own (each task of the loop, each chunk) and sums
  the gradients, so the autograd graph of one call is alive at a time and a
  candidate's memory grows with its tasks per call, not with the meta-batch.
  It costs no time (each call's backward is the same work; measured within
  noise at Omniglot and miniImageNet shapes, ``benchmarks/README.md``), and it
  is what lets a meta-batch of 32 miniImageNet tasks train where the graphs of
  all 32 would not fit;
- the choice and the timings are one line of the run's log and part of its
  checkpoint (``--resume`` keeps the choice and does not search again), and
  are cached per device, task shapes, model and algorithm
  (``$MAML_FUNC_CACHE_DIR``, default ``~/.cache/maml_func``; ``off`` turns
  the cache off), so a second run of the same set-up starts with the choice.

``"vmap"`` and ``"loop"`` skip the search (the policy's ``chunk_size``
applies to ``"vmap"``) and run one backward per ``tasks_per_backward`` tasks
(``None``: one for the meta-batch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from maml_func import checks
from maml_func.algorithms.base import Algorithm
from maml_func.atomic import atomic_write
from maml_func.batching import LOOP, VMAP, Way, check_chunk_size
from maml_func.diagnosis import is_out_of_memory
from maml_func.tasks import TaskBatch

__all__ = ["EXECUTIONS", "ROUNDS", "ExecutionPolicy", "PeakMemory", "default_cache_dir", "resident_bytes", "setup_key",
           "ways"]

#: The execution policies: measure and choose, always one ``vmap`` (with ``chunk_size``), always the loop.
EXECUTIONS = ("auto", "vmap", "loop")
#: Iterations each candidate runs during the search; all but the first are timed, the fastest counts.
ROUNDS = 3
# Candidates this close to the fastest count as fast; the one of them that needs least memory is taken.
_TIE = 0.03
_CHUNKS = (2, 4, 8)


def ways(num_tasks: int, layouts: bool = False) -> list[Way]:
    """The candidates for ``num_tasks`` tasks, least memory first: the loop, chunks of 2, 4, 8 below it, one vmap.

    ``layouts``: each vectorized candidate also without the channels-last
    layout of the tasks (``/nchw``), right after it: for image tasks on the
    CPU, where which layout is faster depends on the image size.
    """
    vectorized = [Way(c) for c in _CHUNKS if c < num_tasks] + [VMAP]
    if layouts:
        vectorized = [w for way in vectorized for w in (way, dataclasses.replace(way, channels_last=False))]
    return [LOOP, *vectorized] if num_tasks > 1 else vectorized


def _layouts_matter(batch: TaskBatch) -> bool:
    """Whether the channels-last layout applies to ``batch``: image tasks (``[T, B, C, H, W]``) on the CPU."""
    return batch.x_support.device.type == "cpu" and batch.x_support.dim() == 5 and batch.x_support.is_floating_point()


def _available_mb(device: torch.device) -> float | None:
    """Memory the system can still give (MiB): CUDA's free memory, or the kernel's MemAvailable; ``None``: unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def resident_bytes(field: str) -> int:
    """A field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; 0 where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """The peak memory rise of one call: CUDA's peak allocation, or the CPU's peak resident set (Linux).

    On the CPU the rise is counted from ``baseline``, the resident set before
    the search: glibc as the library tunes it keeps freed memory, so what an
    earlier candidate left resident is not this one's rise, while its peak over
    the baseline is what the run would need.
    """

    def __init__(self, device: torch.device, baseline: int) -> None:
        self.device, self.baseline = device, baseline
        self.cpu = device.type == "cpu" and Path("/proc/self/clear_refs").exists()

    def start(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        if self.cpu:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again from now
            except OSError:
                self.cpu = False
        return self.baseline

    def rise(self, before: int) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - before
        return resident_bytes("VmHWM") - before if self.cpu else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ExecutionPolicy:
    """Which way runs the tasks of each meta-iteration; with ``"auto"``, found by timing the candidates.

    Args:
        mode: one of :data:`EXECUTIONS`.
        chunk_size: with ``"vmap"``, tasks per ``vmap`` chunk (``None``: all
            at once; ``"auto"``: :func:`~maml_func.batching.auto_chunk_size`).
        max_memory_mb: with ``"auto"``, never choose a way whose memory rose
            by more than this many MiB in its timed iteration (the loop stays
            a candidate whatever it needs); ``None``: no limit.
        cache_dir: where choices are remembered per set-up; ``None``: no cache.
        tasks_per_backward: one backward per this many tasks, whatever the
            way (:func:`maml_func.step.meta_gradient`); ``None`` (default): with
            ``"auto"``, one backward per call of the way (per task of the
            loop, per chunk); with ``"vmap"`` and ``"loop"``, one backward for
            the whole meta-batch.

    Example:
        >>> policy = ExecutionPolicy("loop")
        >>> policy.way(32).name, policy.searching
        ('loop', False)
        >>> ExecutionPolicy("auto").tasks_per_backward_for(Way(4), 32)   # one backward per chunk of 4
        4
    """

    def __init__(self, mode: str = "auto", *, chunk_size: int | str | None = None,
                 max_memory_mb: float | None = None, cache_dir: str | Path | None = None,
                 tasks_per_backward: int | None = None) -> None:
        self.mode = checks.choice("ExecutionPolicy", "mode", mode, EXECUTIONS)
        self.chunk_size = check_chunk_size("ExecutionPolicy", chunk_size)
        self.max_memory_mb = checks.number("ExecutionPolicy", "max_memory_mb", max_memory_mb, positive=True,
                                           none_ok=True)
        self.tasks_per_backward = checks.integer("ExecutionPolicy", "tasks_per_backward", tasks_per_backward,
                                                 minimum=1, none_ok=True, expect="a positive int or None")
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.choice: str | None = None
        self.timings: dict[str, dict[str, Any]] = {}  # way -> {"runs": n, "seconds": s, "memory_mb": m}
        self.from_cache = False
        self._baseline: int | None = None  # the resident set before the search (CPU)
        self._layouts = False  # whether the candidates include both layouts (image tasks on the CPU)

    # ------------------------------------------------------------ the choice
    @property
    def searching(self) -> bool:
        """Whether the next iterations still time candidates."""
        return self.mode == "auto" and self.choice is None

    def way(self, num_tasks: int) -> Way:
        """The way to run the next meta-iteration of ``num_tasks`` tasks (``"vmap"``: in chunks of ``chunk_size``)."""
        if self.mode != "auto":
            return Way(self.chunk_size) if self.mode == "vmap" else LOOP
        if self.choice is not None:
            return Way.parse(self.choice)
        way = self._untimed(num_tasks)
        if way is not None:
            return way
        self.choice = self._choose()
        return Way.parse(self.choice)

    def tasks_per_backward_for(self, way: Way, num_tasks: int) -> int | None:
        """Tasks per backward when ``num_tasks`` tasks run ``way`` (``None``: one backward for all of them)."""
        if self.tasks_per_backward is not None or self.mode != "auto":
            return self.tasks_per_backward
        per_call = way.tasks_per_call(num_tasks)
        return None if per_call >= num_tasks else per_call

    def _untimed(self, num_tasks: int) -> Way | None:
        """The next candidate to run; ``None``: all ran ``ROUNDS`` times (or were skipped).

        Least memory first, each twice in a row (its warm-up, then the run
        whose memory counts: measured before any bigger way has raised the
        process's high-water mark); then the remaining rounds, every candidate
        once per round (so a slow minute of a shared machine hits all alike).
        """
        runs = {w: self.timings.get(w.name, {}).get("runs", 0) for w in ways(num_tasks, self._layouts)}
        left = [w for w, n in runs.items() if n < ROUNDS]
        if not left:
            return None
        warming = [w for w in left if runs[w] < 2]
        return warming[0] if warming else min(left, key=lambda w: runs[w])

    def _predicted_mb(self, way: Way, num_tasks: int) -> float | None:
        """The memory rise ``way`` would need, extrapolated linearly in tasks per call from the two largest
        measured (the nearest to it: a chunk's memory grows a little faster than linearly)."""
        most: dict[int, float] = {}  # tasks per call -> the most memory measured at it (either layout)
        for name, t in self.timings.items():
            if t.get("memory_mb") is not None:
                n = Way.parse(name).tasks_per_call(num_tasks)
                most[n] = max(most.get(n, 0.0), t["memory_mb"])
        if len(most) < 2:
            return None
        (n0, m0), (n1, m1) = sorted(most.items())[-2:]
        slope = max(m1 - m0, 0.0) / max(n1 - n0, 1)
        return m1 + slope * (way.tasks_per_call(num_tasks) - n1)

    def _skip_what_cannot_fit(self, num_tasks: int, device: torch.device) -> None:
        """Mark the untimed candidates predicted to exceed the budget or the available memory as skipped."""
        limit = [m for m in (self.max_memory_mb, _available_mb(device)) if m is not None]
        if not limit:
            return
        for way in ways(num_tasks, self._layouts):
            if self.timings.get(way.name, {}).get("runs", 0):
                continue
            predicted = self._predicted_mb(way, num_tasks)
            if predicted is not None and predicted > 0.9 * min(limit):
                self.timings[way.name] = {"runs": ROUNDS, "skipped": f"needs about {predicted:.0f} MiB"}

    def run(self, batch: TaskBatch, device: torch.device, step: Callable[[Way, int | None], Any]) -> Any:
        """``step(way, tasks_per_backward)`` the policy's way; while searching, timed and its memory measured.

        ``step`` is one meta-iteration of ``batch`` run ``way`` with one
        backward per ``tasks_per_backward`` tasks (e.g.
        :func:`maml_func.step.meta_gradient` with ``way=way,
        tasks_per_backward=tasks_per_backward``); see :meth:`tasks_per_backward_for`.
        """
        if self.searching:
            self._layouts = _layouts_matter(batch)
            self._skip_what_cannot_fit(batch.num_tasks, device)
        way = self.way(batch.num_tasks)
        if not self.searching:
            return step(way, self.tasks_per_backward_for(way, batch.num_tasks))
        if self._baseline is None:
            self._baseline = resident_bytes("VmRSS") if device.type == "cpu" else 0
        memory = PeakMemory(device, self._baseline)
        _sync(device)
        before, start = memory.start(), time.perf_counter()
        try:
            out = step(way, self.tasks_per_backward_for(way, batch.num_tasks))
        except (MemoryError, RuntimeError) as err:
            if way.name == "loop" or not is_out_of_memory(err):
                raise
            self.timings[way.name] = {"runs": ROUNDS, "skipped": "out of memory"}
            return self.run(batch, device, step)  # this iteration again, another way
        _sync(device)
        seconds, rise = time.perf_counter() - start, memory.rise(before)
        entry = self.timings.setdefault(way.name, {"runs": 0})
        entry["runs"] += 1
        if entry["runs"] > 1:  # the first run of a way pays its one-off costs: its time is not counted
            entry["seconds"] = min(seconds, entry.get("seconds", math.inf))
        if entry["runs"] == 2:  # memory: the run after the warm-up, before any bigger way ran (see _untimed)
            entry["memory_mb"] = None if rise is None else round(rise / 2**20, 1)
        if self._untimed(batch.num_tasks) is None:
            self.choice = self._choose()
        return out

    def _choose(self) -> str:
        timed = {name: t for name, t in self.timings.items() if t.get("runs", 0) >= ROUNDS and "seconds" in t}
        allowed = {name: t for name, t in timed.items() if name == "loop" or self.max_memory_mb is None
                   or t["memory_mb"] is None or t["memory_mb"] <= self.max_memory_mb} or timed
        fastest = min(t["seconds"] for t in allowed.values())
        close = [name for name, t in allowed.items() if t["seconds"] <= fastest * (1 + _TIE)]
        return min(close, key=lambda name: (allowed[name]["memory_mb"] or 0.0, allowed[name]["seconds"]))

    def summary(self) -> str:
        """One line: the choice, and each candidate's time and memory."""
        parts = ", ".join(f"{name} skipped: {t['skipped']}" if "skipped" in t else f"{name} {t['seconds'] * 1e3:.0f} ms"
                          + ("" if t.get("memory_mb") is None else f" +{t['memory_mb']:.0f} MiB")
                          for name, t in self.timings.items())
        source = " (cached)" if self.from_cache else ""
        return f"execution: {self.choice}{source}" + (f" ({parts})" if parts else "")

    # ------------------------------------------------------- state and cache
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the mode, the choice, the timings."""
        return {"mode": self.mode, "choice": self.choice, "timings": json.loads(json.dumps(self.timings)),
                "max_memory_mb": self.max_memory_mb, "tasks_per_backward": self.tasks_per_backward}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`state_dict`; a finished search is not run again."""
        if all(state.get(key) == getattr(self, key) for key in ("mode", "max_memory_mb", "tasks_per_backward")):
            self.choice, self.timings = state.get("choice"), dict(state.get("timings") or {})

    def _cache_file(self, key: dict[str, Any]) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.cache_dir / f"execution-{digest}.json"

    def recall(self, key: dict[str, Any]) -> bool:
        """Take the choice cached for the set-up ``key`` (see :func:`setup_key`), if any; whether one was found."""
        file = self._cache_file(key)
        if not self.searching or file is None or not file.is_file():
            return False
        try:
            saved = json.loads(file.read_text())
            Way.parse(saved["choice"])
        except (OSError, ValueError, KeyError, TypeError):
            return False  # a damaged cache entry is only a lost shortcut
        self.choice, self.timings, self.from_cache = saved["choice"], saved.get("timings", {}), True
        return True

    def remember(self, key: dict[str, Any]) -> None:
        """Write the choice for the set-up ``key``; a cache that cannot be written is skipped silently."""
        file = self._cache_file(key)
        if file is None or self.choice is None or self.from_cache:
            return
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(file, json.dumps({"key": key, "choice": self.choice, "timings": self.timings}))
        except OSError:  # WriteError included: a cache is a shortcut, never a reason to stop
            pass


def default_cache_dir() -> Path | None:
    """``$MAML_FUNC_CACHE_DIR`` (``off``: no cache), else ``~/.cache/maml_func`` (``$XDG_CACHE_HOME`` respected)."""
    if os.environ.get("MAML_FUNC_CACHE_DIR"):
        value = os.environ["MAML_FUNC_CACHE_DIR"]
        return None if value.lower() == "off" else Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "maml_func"


def setup_key(algorithm: Algorithm, batch: TaskBatch, *, tasks_per_backward: int | None = None) -> dict[str, Any]:
    """What the fastest way depends on: device, threads, task shapes and dtype, the model, the algorithm."""
    device = batch.x_support.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    model = algorithm.model
    options = {f.name: repr(getattr(algorithm, f.name)) for f in dataclasses.fields(algorithm)
               if f.init and f.name != "model"}
    return {
        "torch": torch.__version__, "device": name, "threads": torch.get_num_threads(),
        "shapes": [list(t.shape) for t in batch], "dtype": str(batch.x_support.dtype),
        "model": type(model).__name__, "parameters": [list(p.shape) for p in model.parameters()],
        "algorithm": type(algorithm).__name__, "options": options, "tasks_per_backward": tasks_per_backward,
    }
