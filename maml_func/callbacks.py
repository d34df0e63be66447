"""User hooks into :func:`~maml_func.train.fit`: :class:`Callback`.

``fit`` calls every callback it is given when the run starts, then at the
points where it writes something: each line of training metrics, each
validation, each checkpoint.
A record is the same dict that goes to ``metrics.jsonl`` (a copy: changing it
changes nothing in the run). Under ``torch.distributed`` only rank 0, the one
that writes the files, calls them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from maml_func.config import TrainConfig

__all__ = ["Callback", "check_callbacks"]

Record = dict[str, Any]
_HOOKS = ("on_start", "on_log", "on_validation", "on_checkpoint")


class Callback:
    """Hooks called by :func:`~maml_func.train.fit`; each does nothing unless overridden.

    Example:
        >>> class Losses(Callback):
        ...     def __init__(self):
        ...         self.losses = []
        ...     def on_log(self, record):
        ...         self.losses.append(record["loss"])
        >>> losses = Losses()
        >>> fit(config, callbacks=[losses])  # doctest: +SKIP
    """

    def on_start(self, config: TrainConfig) -> None:
        """The run starts: its :class:`~maml_func.config.TrainConfig` (``channels`` resolved) has passed every check
        that needs no training (config, checkpoint, run directory, data, model), and nothing is written yet. A
        refused run never gets here."""

    def on_log(self, record: Record) -> None:
        """A line of training metrics: ``{"kind": "train", "iteration", "loss", "accuracy", "grad_norm",
        "tasks_per_s", "meta_lr", "elapsed_s"}``, every ``log_every`` iterations."""

    def on_validation(self, record: Record) -> None:
        """A validation: ``{"kind": "val", "iteration", "accuracy", "ci95", "loss", "accuracy_per_step", "tasks",
        "steps", "elapsed_s", "train_s"}``, every ``val_every`` iterations and at the end."""

    def on_checkpoint(self, path: Path, iteration: int) -> None:
        """A checkpoint written: ``path`` (the run directory's ``last.pt`` or ``best.pt``) holds ``iteration``."""


def check_callbacks(callbacks: Sequence[Any], where: str) -> tuple[Callback, ...]:
    """``callbacks`` as a tuple, each checked to have the four hooks (a :class:`Callback` or alike).

    Raises:
        TypeError: naming the callback and the hook it lacks.
    """
    if isinstance(callbacks, Callback) or not isinstance(callbacks, Sequence):
        raise TypeError(f"{where}: callbacks must be a list of Callback objects, got {type(callbacks).__name__}; "
                        "pass callbacks=[...]")
    for i, callback in enumerate(callbacks):
        missing = [hook for hook in _HOOKS if not callable(getattr(callback, hook, None))]
        if missing:
            raise TypeError(f"{where}: callbacks[{i}] ({type(callback).__name__}) has no {', '.join(missing)}; "
                            "subclass maml_func.Callback and override the hooks you need")
    return tuple(callbacks)
