"""The run directory of a meta-training run: what is written there, and how.

A run directory holds ``last.pt`` and ``best.pt`` (checkpoints,
:mod:`maml_func.checkpoint`), ``metrics.jsonl`` (one JSON object per line),
``learning_curve.png`` and ``config.json``. Every file but the metrics log is
replaced whole with :func:`maml_func.atomic.atomic_write`; the log is appended
to line by line, and a line cut short by a kill is skipped when it is read back.
:class:`RunDirectory` is the one object that touches these files; without a
directory (``save_to=None``, or a rank other than 0) it writes nothing.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any

from maml_func.atomic import atomic_write, remove_stale_temporaries
from maml_func.checkpoint import save_checkpoint

__all__ = ["BEST", "CONFIG", "CURVE", "LAST", "METRICS", "RunDirectory", "checkpoint_path", "plot_learning_curve",
           "read_history"]

LAST, BEST, METRICS, CURVE, CONFIG = "last.pt", "best.pt", "metrics.jsonl", "learning_curve.png", "config.json"

Record = dict[str, Any]


def checkpoint_path(path: str | Path, *, prefer_best: bool = False) -> Path:
    """The checkpoint file ``path`` names: the file itself, or one inside a run directory.

    In a run directory: ``last.pt`` (what resuming needs), or with
    ``prefer_best`` ``best.pt`` when validation wrote one (what evaluation wants).
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    return path / BEST if prefer_best and (path / BEST).exists() else path / LAST


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


def read_history(run_dir: Path, up_to: int) -> list[Record]:
    """The records of ``run_dir``'s ``metrics.jsonl`` up to iteration ``up_to`` (``[]`` without one)."""
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


class RunDirectory:
    """Checkpoints, metrics lines and the learning curve of one run (all no-ops when ``path`` is ``None``).

    Attributes:
        path: the directory, or ``None``.
        history: every record logged so far (also kept without a directory).
    """

    def __init__(self, path: Path | None, *, title: str = "") -> None:
        self.path = path
        self.title = title
        self.history: list[Record] = []
        self._log: IO[str] | None = None

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
        self._log = open(self.path / METRICS, "a", encoding="utf-8")

    def file(self, name: str) -> Path | None:
        """The path of ``name`` in the directory, or ``None`` without one."""
        return self.path / name if self.path is not None else None

    def log(self, record: Record) -> None:
        """Append one record to the history and to ``metrics.jsonl``."""
        self.history.append(record)
        if self._log is not None:
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()

    def save(self, name: str, state: dict[str, Any]) -> Path | None:
        """Write checkpoint ``name`` (``LAST`` or ``BEST``) atomically."""
        return save_checkpoint(state, self.path / name) if self.path is not None else None

    def plot(self) -> None:
        """Redraw ``learning_curve.png`` from the history."""
        if self.path is not None:
            plot_learning_curve(self.history, self.path / CURVE, title=self.title)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


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
