"""Checkpoints that survive a crash mid-write and never execute code when loaded.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts.
:func:`save_checkpoint` writes it to a temporary file in the destination's
directory, flushes it to disk, and moves it into place with ``os.replace``,
which is atomic on POSIX and Windows: a reader (or a run killed with SIGKILL
at any instant) sees either the previous complete file or the new complete
file, never a torn one. :func:`load_checkpoint` uses
``torch.load(weights_only=True)``, which refuses anything but tensors and
plain containers, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_checkpoint", "save_checkpoint"]

_TMP_SUFFIX = ".tmp"


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, ``os.replace``).

    Args:
        state: tensors, numbers, strings, ``None`` and lists/dicts of them.
        path: the destination; its directory must exist.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Example:
        >>> import tempfile, torch
        >>> p = save_checkpoint({"w": torch.ones(2), "iteration": 3}, tempfile.mkdtemp() + "/last.pt")
        >>> load_checkpoint(p)["iteration"]
        3
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"save_checkpoint: directory {str(path.parent)!r} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: the destination is untouched, only the partial file goes.
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete partial files left next to ``path`` by a save that was killed; return them."""
    path = Path(path)
    stale = sorted(path.parent.glob(f"{_tmp_prefix(path)}*{_TMP_SUFFIX}"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path, *, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Args:
        path: the checkpoint file.
        map_location: where tensors go (default: the CPU).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a readable checkpoint (truncated, or not one of ours).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint at {str(path)!r}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as err:
        raise ValueError(f"load_checkpoint: {str(path)!r} is not a readable checkpoint ({err}); "
                         "use the run's other checkpoint (last.pt / best.pt) or start again") from None
    if not isinstance(state, dict):
        raise ValueError(f"load_checkpoint: {str(path)!r} holds a {type(state).__name__}, not a checkpoint dict")
    return state
