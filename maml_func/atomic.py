"""One way to write a file so that a crash never leaves it torn: :func:`atomic_write`.

The content goes to a temporary file in the destination's directory, is
flushed (and with ``durable=True`` fsynced), and is moved into place with
``os.replace``, which is atomic on POSIX and Windows: a reader, or a process
killed with SIGKILL at any instant, sees either the previous complete file or
the new complete one. Checkpoints, caches, the run directory's text files and
plots, and the data loaders' records all go through here. A write the file
system refuses (a full disk, a quota, a read-only mount) is a
:class:`WriteError` that names the file and the space left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["WriteError", "atomic_write", "remove_stale_temporaries", "removed_on_failure"]

_TMP_SUFFIX = ".tmp"


class WriteError(OSError):
    """A file could not be written (full disk, quota, read-only file system); the destination is untouched.

    Attributes:
        path: the file. errno: the file system's error number (``errno.ENOSPC`` for a full disk).
    """

    def __init__(self, path: Path, cause: OSError, needed: int | None = None) -> None:
        reason = cause.strerror or type(cause).__name__
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        space = "".join([f"; it needs {_megabytes(needed)}" if needed is not None else "",
                         f"; {_megabytes(free)} free there" if free is not None else ""])
        super().__init__(f"could not write {path} ({reason}{space})")
        self.path, self.errno = path, cause.errno


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def _prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_write(path: str | Path, write: Callable[[IO[Any]], object] | str | bytes, *,
                 durable: bool = False) -> Path:
    """Write ``path`` atomically: to a temporary file beside it, then ``os.replace``.

    Args:
        path: the destination; its directory must exist.
        write: the content (``str`` is written as UTF-8), or a function given
            the open binary file to write into (e.g. ``lambda f: torch.save(obj, f)``).
        durable: fsync the file and the directory, so the new content also
            survives a power cut (checkpoints), not only a crash of this process.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        WriteError: the file system refused the write (``OSError``: a full
            disk, a quota, a read-only mount).
        Whatever else the write raises. Either way the destination is
        untouched and the temporary file is gone (also on ``KeyboardInterrupt``).

    Example:
        >>> import tempfile
        >>> p = atomic_write(tempfile.mkdtemp() + "/config.json", "{}\\n")
        >>> p.read_text()
        '{}\\n'
    """
    path = Path(path)
    content = write.encode("utf-8") if isinstance(write, str) else write
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_prefix(path), suffix=_TMP_SUFFIX)
    except OSError as err:
        raise WriteError(path, err) from err
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, bytes):
                f.write(content)
            else:
                content(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(path, err, len(content) if isinstance(content, bytes) else None) from err
        raise
    if durable:
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
    """Delete partial files that a killed :func:`atomic_write` of ``path`` left beside it; return them."""
    path = Path(path)
    stale = sorted(path.parent.glob(f"{_prefix(path)}*{_TMP_SUFFIX}"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def removed_on_failure(folder: str | Path, *, keep: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """On an exception inside the block, remove what it created in ``folder`` (the folder too, if it was new).

    For work that a later check may still refuse (a data load followed by a
    check of the task shape, a download followed by a check of the files): a
    refused run leaves nothing behind. Only entries that did not exist on
    entry are removed; nothing that was there before is touched. ``keep``,
    asked after the exception, keeps everything when it returns ``True`` (a
    run that failed after writing a checkpoint to resume from).
    """
    folder = Path(folder).expanduser()
    existed = folder.exists()
    before = set(os.listdir(folder)) if folder.is_dir() else set()
    try:
        yield
    except BaseException:
        if keep():
            raise
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        elif folder.is_dir():
            for name in set(os.listdir(folder)) - before:
                path = folder / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise
