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

    Example:
        >>> import tempfile, torch
        >>> p = save_checkpoint({"w": torch.ones(2), "iteration": 3}, tempfile.mkdtemp() + "/last.pt")
        >>> load_checkpoint(p)["iteration"]
        3
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"save_checkpoint: directory {str(path.parent)!r} does not exist; create it first")
    return atomic_write(path, lambda f: torch.save(dict(state), f), durable=True)


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
    except Exception as err:  # noqa: BLE001 - damage fails in many ways (zip, pickle, EOF, index); all mean unreadable
        raise ValueError(f"load_checkpoint: {str(path)!r} is not a readable checkpoint ({checks.brief(err)}); "
                         "use the run's other checkpoint (last.pt / best.pt) or start again") from None
    if not isinstance(state, dict):
        raise ValueError(f"load_checkpoint: {str(path)!r} holds a {type(state).__name__}, not a checkpoint dict")
    return state
