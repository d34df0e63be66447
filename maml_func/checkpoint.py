"""Checkpoints that survive a crash mid-write and never execute code when loaded.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts.
:func:`save_checkpoint` writes it with :func:`maml_func.atomic.atomic_write`
(temporary file, fsync, ``os.replace``): a reader, or a run killed with SIGKILL
at any instant, sees either the previous complete file or the new complete
file, never a torn one. :func:`load_checkpoint` uses
``torch.load(weights_only=True)``, which refuses anything but tensors and
plain containers, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from maml_func import checks
from maml_func.atomic import atomic_write, remove_stale_temporaries

__all__ = ["load_checkpoint", "remove_stale_temporaries", "save_checkpoint"]


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically and durably (:func:`maml_func.atomic.atomic_write`).

    Args:
        state: tensors, numbers, strings, ``None`` and lists/dicts of them.
        path: the destination; its directory must exist.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        maml_func.atomic.WriteError: the file system refused the write (a full
            disk); the previous file at ``path`` is untouched.

    Example:
        >>> import tempfile, torch
        >>> p = save_checkpoint({"w": torch.ones(2), "iteration": 3}, tempfile.mkdtemp() + "/last.pt")
        >>> load_checkpoint(p)["iteration"]
        3
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"save_checkpoint: directory {str(path.parent)!r} does not exist; create it first")
    # Serialized in memory first: torch.save reports a full disk as an unrelated RuntimeError ("unexpected pos"),
    # while a write of bytes fails with the file system's own error and the size it needed.
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return atomic_write(path, buffer.getvalue(), durable=True)


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
        with warnings.catch_warnings():  # torch's note on an unusual pickle protocol: the refusal below says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - damage fails in many ways (zip, pickle, EOF, index); all mean unreadable
        raise ValueError(_unreadable(path, err)) from None
    if not isinstance(state, dict):
        raise ValueError(f"load_checkpoint: {str(path)!r} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def _unreadable(path: Path, err: Exception) -> str:
    """Why ``path`` is not loaded, in one line; never torch's advice to turn its safe loader off.

    A refused global names the object the file would construct; any other
    refusal cannot tell a damaged file from a pickle of code, and says so.
    """
    text = str(err)
    hostile = re.search(r"Unsupported global: GLOBAL (\S+?)(?: was|\.?\s|$)", text)
    if hostile:
        return (f"load_checkpoint: {str(path)!r} is not a readable checkpoint: it asks to construct "
                f"{hostile.group(1)}, and unpickling an object runs code, so maml_func does not load it (checkpoints "
                "hold only tensors and plain containers); use a checkpoint written by maml_func")
    return (f"load_checkpoint: {str(path)!r} is not a readable checkpoint ({checks.brief(err)}); use the run's "
            "other checkpoint (last.pt / best.pt) or start again")
