"""TensorBoard logging for :func:`~maml_func.train.fit`: :class:`TensorBoard`, a :class:`~maml_func.callbacks.Callback`.

It writes the scalars of ``metrics.jsonl`` as TensorBoard scalars, one per
numeric field of each record, at ``step = record["iteration"]``, tagged
``kind/field``: ``train/loss``, ``train/accuracy``, ``train/grad_norm``,
``train/tasks_per_s``, ``train/meta_lr``, ``train/elapsed_s``;
``val/accuracy``, ``val/ci95``, ``val/loss``, ... and the validation accuracy
after each inner step as ``val/accuracy_step_0``, ``val/accuracy_step_1``, ...
(from ``accuracy_per_step``). Fields that are not numbers (the execution
policy's choice, its timings) are not written.

``fit`` has no end-of-run hook, so every record is flushed to the event file
as soon as it is written: a run that stops at any point leaves its scalars on
disk. :meth:`TensorBoard.close` (or a ``with`` block) releases the file.

Needs the ``tensorboard`` package (``pip install maml-func[tensorboard]``),
imported only when a :class:`TensorBoard` is made.
"""

from __future__ import annotations

from collections.abc import Iterator
from numbers import Real
from pathlib import Path
from typing import Any

from maml_func.callbacks import Callback

__all__ = ["TensorBoard", "scalars"]

INSTALL = "pip install maml-func[tensorboard]"
Record = dict[str, Any]  # a metrics.jsonl record, as the callbacks receive it


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(f"TensorBoard: the tensorboard package is not installed ({err}); install it with: "
                          f"{INSTALL}") from err
    return SummaryWriter


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def scalars(record: Record) -> Iterator[tuple[str, float]]:
    """The ``(tag, value)`` pairs of one ``metrics.jsonl`` record, without its step (``iteration``).

    A number ``field`` becomes ``kind/field``; a list of numbers ``x_per_step``
    becomes ``kind/x_step_0``, ``kind/x_step_1``, ... (any other list of
    numbers ``field``: ``kind/field_0``, ...); anything else is left out.

    Example:
        >>> dict(scalars({"kind": "val", "iteration": 4, "accuracy": 0.5, "accuracy_per_step": [0.2, 0.5]}))
        {'val/accuracy': 0.5, 'val/accuracy_step_0': 0.2, 'val/accuracy_step_1': 0.5}
    """
    kind = record.get("kind", "train")
    for field, value in record.items():
        if field in ("kind", "iteration"):
            continue
        if _is_number(value):
            yield f"{kind}/{field}", float(value)
        elif isinstance(value, (list, tuple)) and value and all(_is_number(v) for v in value):
            name = field[: -len("_per_step")] + "_step" if field.endswith("_per_step") else field
            for i, v in enumerate(value):
                yield f"{kind}/{name}_{i}", float(v)


class TensorBoard(Callback):
    """Write the run's ``metrics.jsonl`` records to a TensorBoard log directory.

    Args:
        log_dir: where the event files go (created if needed); view them with
            ``tensorboard --logdir log_dir``.

    Raises:
        ImportError: the ``tensorboard`` package is missing (the text names
            ``pip install maml-func[tensorboard]``).

    Example:
        >>> from maml_func.tensorboard import TensorBoard
        >>> with TensorBoard("runs/tb/5w1s") as board:  # doctest: +SKIP
        ...     fit(config, callbacks=[board])
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer_class = _summary_writer_class()  # fails here, before any training, when tensorboard is missing
        self._writer: Any = None

    def _open(self) -> Any:
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.log_dir))
        return self._writer

    def _write(self, record: Record) -> None:
        writer = self._open()
        step = int(record["iteration"])
        for tag, value in scalars(record):
            writer.add_scalar(tag, value, global_step=step)
        writer.flush()  # fit has no end hook: what is logged is on disk at once

    def on_start(self, config: Any) -> None:
        self._open()

    def on_log(self, record: Record) -> None:
        self._write(record)

    def on_validation(self, record: Record) -> None:
        self._write(record)

    def on_checkpoint(self, path: Path, iteration: int) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file; a later record opens a new one."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoard:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
