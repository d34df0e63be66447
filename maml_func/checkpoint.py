"""Training checkpoints: the file, written so that it survives a crash mid-write and never runs code when read,
and what a run reads back from it.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts.
:func:`save_checkpoint` writes it with :func:`maml_func.atomic.atomic_write`
(temporary file, fsync, ``os.replace``): a reader, or a run killed with SIGKILL
at any instant, sees either the previous complete file or the new complete
file, never a torn one. :func:`load_checkpoint` uses
``torch.load(weights_only=True)``, which refuses anything but tensors and
plain containers, so a checkpoint from elsewhere cannot run code.

A run directory holds two, :data:`LAST` (what resuming needs) and :data:`BEST`
(the best validation so far, what evaluation wants); :func:`checkpoint_path`
says which file a path names. :class:`Checkpoint` is a training checkpoint
read and checked once; :func:`check_resume` refuses to continue it with a
config that would change its trajectory; :func:`load_meta` puts its
meta-parameters into a model's.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from maml_func import checks
from maml_func.atomic import atomic_write
from maml_func.config import RESUMABLE_FIELDS, TrainConfig
from maml_func.core import MetaParams
from maml_func.distributed import World

__all__ = ["BEST", "CHECKPOINT_FORMAT", "LAST", "Checkpoint", "check_resume", "checkpoint_path", "copy_meta",
           "load_checkpoint", "load_meta", "save_checkpoint"]

#: The checkpoints of a run directory: the last iteration saved, and the best validation so far.
LAST, BEST = "last.pt", "best.pt"
CHECKPOINT_FORMAT = "maml_func.checkpoint/1"

# Every entry fit writes into a training checkpoint, and its type: checked once, when a checkpoint is read.
_ENTRIES: dict[str, type | tuple[type, ...]] = {
    "config": dict, "iteration": int, "meta": dict, "optimizer": dict, "cpu_rng": Tensor, "train_generator": Tensor,
    "train_generator_device": str, "best_val_accuracy": (float, int, type(None)), "best_iteration": (int, type(None)),
}


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


def checkpoint_path(path: str | Path, *, prefer_best: bool = False) -> Path:
    """The checkpoint file ``path`` names: the file itself, or one inside a run directory.

    In a run directory: ``last.pt`` (what resuming needs), or with
    ``prefer_best`` ``best.pt`` when validation wrote one (what evaluation wants).
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    return path / BEST if prefer_best and (path / BEST).exists() else path / LAST


@dataclass(frozen=True)
class Checkpoint:
    """A training checkpoint read from disk once: its path and its contents.

    Attributes:
        path: the ``.pt`` file.
        state: the dict :meth:`TrainState.to_checkpoint` wrote.
    """

    path: Path
    state: dict[str, Any]

    @classmethod
    def read(cls, path: str | Path, *, prefer_best: bool = False, origin: str = "Checkpoint.read") -> Checkpoint:
        """Read the checkpoint ``path`` names (a file, or a run directory's ``last.pt`` / ``best.pt``).

        Raises:
            FileNotFoundError: nothing at ``path``.
            ValueError: not a readable maml_func training checkpoint (``origin`` names the caller).
        """
        file = checkpoint_path(path, prefer_best=prefer_best)
        state = load_checkpoint(file)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{origin}: {str(file)!r} is not a maml_func training checkpoint")
        problem = _damage(state)
        if problem is not None:
            raise ValueError(f"{origin}: {str(file)!r} is a damaged training checkpoint: {problem}; use the run's "
                             "other checkpoint (last.pt / best.pt) or start again")
        return cls(file, state)

    @property
    def config(self) -> dict[str, Any]:
        """The config of the run that wrote it, as a dict."""
        return dict(self.state.get("config", {}))

    @property
    def iteration(self) -> int:
        return int(self.state["iteration"])


def _damage(state: dict[str, Any]) -> str | None:
    """What is missing or of the wrong type in a training checkpoint's entries, or ``None``."""
    for name, kind in _ENTRIES.items():
        if name not in state:
            return f"it has no {name!r} entry"
        if not isinstance(state[name], kind) or isinstance(state[name], bool):
            return f"its {name!r} entry is a {type(state[name]).__name__}"
    groups = state["meta"].values()
    if not all(isinstance(g, dict) and all(isinstance(v, Tensor) for v in g.values()) for g in groups):
        return "its 'meta' entry is not a dict of tensor dicts"
    return None


def copy_meta(meta: MetaParams) -> dict[str, dict[str, Tensor]]:
    """Detached copies of every meta-parameter (what a checkpoint stores)."""
    return {group: {k: v.detach().clone() for k, v in params.items()} for group, params in meta.items()}


def load_meta(meta: MetaParams, saved: dict[str, dict[str, Tensor]], origin: str) -> None:
    """Copy saved meta-parameters into ``meta`` in place, checking names and shapes."""
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


def check_resume(config: TrainConfig, checkpoint: Checkpoint, world: World) -> None:
    """Refuse to resume ``checkpoint`` with a config or world that would change the trajectory.

    Only the fields of :data:`maml_func.config.RESUMABLE_FIELDS` may differ.
    """
    saved, iteration = checkpoint.config, checkpoint.iteration
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
    ranks = checkpoint.state.get("world_size", 1)
    if ranks != world.size:
        raise ValueError(f"fit: {str(checkpoint.path)!r} was written by a run on {ranks} rank(s), this one has "
                         f"{world.size}; resume with the same number of ranks (each rank's task stream is in the "
                         "checkpoint)")
