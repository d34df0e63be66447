"""The run directory of a meta-training run: what is written there, and how.

A run directory holds ``last.pt`` and ``best.pt`` (checkpoints,
:mod:`maml_func.checkpoint`), ``metrics.jsonl`` (one JSON object per line),
``learning_curve.png`` and ``config.json``. Every file but the metrics log is
replaced whole with :func:`maml_func.atomic.atomic_write`; the log is appended
to line by line, and a line cut short by a kill is skipped when it is read back.
:class:`RunDirectory` is the one object that touches these files; without a
directory (``save_to=None``, or a rank other than 0) it writes nothing.

A run owns its directory for its whole life (:func:`claimed`): an exclusive
``flock`` on ``.lock`` inside it, which the kernel releases however the process
ends, so a second run into the same directory is refused
(:class:`RunDirectoryLocked`) instead of overwriting the first one's files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from maml_func.atomic import WriteError, atomic_write, remove_stale_temporaries, removed_on_failure
from maml_func.checkpoint import BEST, LAST, Checkpoint, save_checkpoint

__all__ = ["CONFIG", "CURVE", "LOCK", "METRICS", "RunDirectory", "RunDirectoryLocked", "check_creatable",
           "check_run_directory", "check_unlocked", "claimed", "plot_learning_curve", "read_history"]

# The run directory's files besides its checkpoints (maml_func.checkpoint.LAST and BEST).
METRICS, CURVE, CONFIG, LOCK = "metrics.jsonl", "learning_curve.png", "config.json", ".lock"

try:
    import fcntl
except ImportError:  # Windows: no flock, so no lock (one run per directory is then the user's care)
    fcntl = None  # type: ignore[assignment]


class RunDirectoryLocked(ValueError):
    """Another run (another process) is writing to this run directory."""


def _in_use(run_dir: Path, where: str) -> RunDirectoryLocked:
    try:
        pid = (run_dir / LOCK).read_text().strip()
    except OSError:
        pid = ""
    holder = f"process {pid}" if pid.isdigit() else "another process"
    return RunDirectoryLocked(f"{where}: run directory {str(run_dir)!r} is in use by {holder}, a run still writing "
                              "to it; wait for that run to end, or choose another save_to")


def check_unlocked(run_dir: Path, where: str) -> None:
    """Refuse ``run_dir`` if a live run holds its lock; take nothing, create nothing.

    Raises:
        RunDirectoryLocked: the lock is held.
    """
    if fcntl is None:
        return
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except OSError:  # no lock file: no run there
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(run_dir, where) from None
    finally:
        os.close(fd)  # which also drops the shared lock taken to look


@contextlib.contextmanager
def _locked(run_dir: Path, where: str) -> Iterator[None]:
    """Hold ``run_dir``'s exclusive lock for the block; a lock left by a run that died is taken over with a warning."""
    if fcntl is None:
        yield
        return
    path = run_dir / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(run_dir, where) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file between our open and our lock: lock the new one
    try:
        stale = os.read(fd, 64).decode(errors="replace").strip()
        if stale:  # a lock file whose lock is free: its run ended without releasing it (killed, crashed)
            warnings.warn(f"{where}: taking over run directory {str(run_dir)!r}: the run that held it (process "
                          f"{stale}) is gone; it was killed or crashed", stacklevel=2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it: whoever opens it next makes a new file
        os.close(fd)


@contextlib.contextmanager
def claimed(run_dir: Path | None, where: str) -> Iterator[None]:
    """Own ``run_dir`` for the block: create it, hold its lock, and leave nothing if the run ends without a checkpoint.

    On an exception with no ``last.pt`` in ``run_dir`` (a refused run, or one
    that stopped before its first checkpoint), what the block created is
    removed, folders above ``run_dir`` included: there is nothing to resume,
    so nothing is left. With a ``last.pt``, everything is kept for ``--resume``.

    Raises:
        RunDirectoryLocked: another run holds the lock.
    """
    if run_dir is None:
        yield
        return
    top = next(p for p in (*reversed(run_dir.parents), run_dir) if not p.exists() or p == run_dir)
    with removed_on_failure(top, keep=lambda: (run_dir / LAST).exists()):
        run_dir.mkdir(parents=True, exist_ok=True)
        with _locked(run_dir, where):
            yield

Record = dict[str, Any]


def check_creatable(run_dir: Path, where: str) -> None:
    """Fail early, before any data is read, if ``run_dir`` cannot be a run directory; create nothing.

    Raises:
        ValueError: ``run_dir`` (or a folder above it) is a file, or the
            nearest existing folder cannot be written to (permissions, a
            read-only file system).
    """
    blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"{where}: the run directory {str(run_dir)!r} cannot be created: {str(blocker)!r} is an "
                         "existing file; choose another save_to")
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    try:  # the only sure test of "writable" (root ignores permission bits, not a read-only mount)
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".maml_func-probe-"))
    except OSError as err:
        raise ValueError(f"{where}: cannot create the run directory {str(run_dir)!r}: {str(existing)!r} is not "
                         f"writable ({err.strerror}); choose a save_to in a folder you can write to") from None


def check_run_directory(save_to: str | Path | None, resume: Checkpoint | None, where: str) -> None:
    """Refuse a ``save_to`` that cannot hold a run, before anything is loaded or written; create nothing.

    Raises:
        ValueError: ``save_to`` is a file or not writable, or it already holds
            another run's checkpoint (and ``resume`` is not from it);
            :class:`RunDirectoryLocked`: a live run holds it.
    """
    if save_to is None:
        return
    run_dir = Path(save_to).expanduser()
    check_creatable(run_dir, where)
    check_unlocked(run_dir, where)
    if (run_dir / LAST).exists() and not (resume is not None and resume.path.parent.resolve() == run_dir.resolve()):
        raise ValueError(f"{where}: run directory {str(run_dir)!r} already holds a checkpoint; resume it "
                         f"(fit(..., resume={str(run_dir)!r}) / --resume) or choose another save_to")


def read_history(run_dir: Path, up_to: int) -> list[Record]:
    """The records of ``run_dir``'s ``metrics.jsonl`` up to iteration ``up_to`` (``[]`` without one)."""
    path = run_dir / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():  # a stray byte does not stop a resume
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(record, dict) and record.get("iteration", math.inf) <= up_to:
            records.append(record)
    return records


class RunDirectory:
    """Checkpoints, metrics lines and the learning curve of one run (all no-ops when ``path`` is ``None``).

    A checkpoint or ``config.json`` that cannot be written raises
    :class:`~maml_func.atomic.WriteError` (the run cannot go on safely). A
    metrics line or the plot that cannot be written is warned about once and
    the run goes on: the checkpoints hold its state, and the history stays in
    memory. A metrics line is written whole or not at all.

    Attributes:
        path: the directory, or ``None``.
        history: every record logged so far (also kept without a directory).
    """

    def __init__(self, path: Path | None, *, title: str = "") -> None:
        self.path = path
        self.title = title
        self.history: list[Record] = []
        self._log: IO[bytes] | None = None
        self._warned: set[str] = set()

    def open(self, config: Record, history: list[Record]) -> None:
        """Start (or continue) the run: write ``config.json``, replay ``history`` into ``metrics.jsonl``."""
        self.history = list(history)
        if self.path is None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        for name in (LAST, BEST, METRICS, CURVE, CONFIG):
            remove_stale_temporaries(self.path / name)
        atomic_write(self.path / CONFIG, json.dumps(config, indent=2) + "\n")
        # Rewritten, not appended to: records past the resumed checkpoint belong to a trajectory that is replayed.
        atomic_write(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in self.history))
        self._log = open(self.path / METRICS, "ab", buffering=0)  # unbuffered: a failed line is known at once

    def file(self, name: str) -> Path | None:
        """The path of ``name`` in the directory, or ``None`` without one."""
        return self.path / name if self.path is not None else None

    def log(self, record: Record) -> None:
        """Append one record to the history and to ``metrics.jsonl``."""
        self.history.append(record)
        if self._log is None:
            return
        line = memoryview((json.dumps(record) + "\n").encode("utf-8"))
        start = self._log.seek(0, os.SEEK_END)  # not tell(): appending does not follow a truncation
        try:
            while line:
                line = line[self._log.write(line):]
        except OSError as err:
            with contextlib.suppress(OSError):
                self._log.truncate(start)  # no half line: the next one starts clean
            failure = WriteError(self.path / METRICS, err)  # type: ignore[operator]
            self._warn_once(METRICS, failure, "this and later lines may be missing from it")

    def save(self, name: str, state: dict[str, Any]) -> Path | None:
        """Write checkpoint ``name`` (``LAST`` or ``BEST``) atomically."""
        return save_checkpoint(state, self.path / name) if self.path is not None else None

    def plot(self) -> None:
        """Redraw ``learning_curve.png`` from the history."""
        if self.path is None:
            return
        try:
            plot_learning_curve(self.history, self.path / CURVE, title=self.title)
        except OSError as err:
            self._warn_once(CURVE, err, "it is not updated while that lasts")

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _warn_once(self, name: str, err: OSError, consequence: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(f"{err}; {consequence}, and the run goes on (its checkpoints are written as before)",
                          stacklevel=3)


def plot_learning_curve(history: list[Record], path: Path, *, title: str) -> None:
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
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
