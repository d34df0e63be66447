"""Shared by the loaders: checksums, checked downloads, safe pickles, archives and finding release files.

A file a loader reads comes from one of three places: ``root`` (where the
downloads and caches live), an offline ``source`` folder, or a download. An
archive with a public md5 is checked against it wherever it is found; one that
does not match is refused and left exactly as it was. A download lands in a
temporary folder inside ``root`` and is moved into place only once its md5
matches, so a failed or altered download leaves nothing behind.

The releases of miniImageNet, tieredImageNet and CIFAR-100 are Python pickles.
:func:`read_pickle` unpickles them with an allow-list of the few numpy
constructors those files need, so a file from elsewhere cannot run code (the
same promise as ``torch.load(weights_only=True)`` for checkpoints).
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import io
import os
import pickle
import reprlib
import shutil
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from maml_func import checks
from maml_func.atomic import WriteError
from maml_func.data._io import cached_splits, write_splits
from maml_func.data.classes import ImageClasses

# What the releases' pickles may construct: numpy arrays, dtypes and scalars (numpy 1 and 2 module names).
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"), ("_codecs", "encode"),
}


def md5(path: Path) -> str:
    """The md5 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_md5(path: Path, expected: str, fn: str, remedy: str) -> None:
    """Refuse ``path`` unless its md5 is ``expected``; the file is never touched.

    Raises:
        ValueError: naming the file, both checksums and ``remedy``.
    """
    found = md5(path)
    if found != expected:
        raise ValueError(f"{fn}: {path} has md5 {found}, not the official {expected}; it was left untouched. "
                         f"{remedy}")


def fetch(url: str, expected_md5: str, root: Path, filename: str, fn: str, offline_hint: str) -> Path:
    """Download ``url`` to ``root/filename``, checked against ``expected_md5``; return the path.

    Raises:
        ConnectionError: the download failed; the message ends with ``offline_hint``.
        maml_func.atomic.WriteError: ``root`` is full; nothing is left there.
        ValueError: the download does not match its md5 (it is discarded).
    """
    from torchvision.datasets.utils import check_integrity, download_url

    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        try:
            download_url(url, tmp, filename=filename)
        except OSError as exc:  # urllib's errors are OSErrors too
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the disk, not the network
                raise WriteError(root / filename, exc) from exc
            raise ConnectionError(f"{fn}: could not download {url} ({checks.brief(exc)}); {offline_hint}") from exc
        fetched = Path(tmp) / filename
        if not check_integrity(str(fetched), expected_md5):
            raise ValueError(f"{fn}: the download of {url} does not match its md5 {expected_md5} (interrupted "
                             "or altered); it was discarded, try again")
        os.replace(fetched, root / filename)
    return root / filename


def place_archive(root: str | Path, source: str | Path | None, filename: str, url: str, expected_md5: str,
                  fn: str, remedy: str) -> Path:
    """Make sure ``root/filename`` is the official archive; return ``root``.

    An archive already in ``root`` is checked against ``expected_md5`` and
    kept; otherwise it is copied from ``source`` (checked first, staged in
    ``root`` and moved into place) or, without ``source``, downloaded with
    :func:`fetch`. Nothing in ``root`` or ``source`` is ever overwritten.

    Raises:
        FileNotFoundError: ``source`` is not a folder or has no ``filename``.
        ValueError: an archive does not match ``expected_md5`` (left untouched; the message ends with ``remedy``).
        ConnectionError: the download failed.
        maml_func.atomic.WriteError: ``root`` is full; nothing is left there.
    """
    root = Path(root).expanduser()
    target = root / filename
    if target.is_file():
        check_md5(target, expected_md5, fn, remedy)
        return root
    if source is None:
        fetch(url, expected_md5, root, filename, fn, f"without internet, pass source=<folder holding {filename}>")
        return root
    found = existing_folder(source, fn, "source", f"the official {filename}") / filename
    if not found.is_file():
        raise FileNotFoundError(f"{fn}: source {found.parent} has no {filename}; pass the folder that holds the "
                                f"official {filename} (an extracted copy is read where it is: pass it as source "
                                "when loading instead)")
    check_md5(found, expected_md5, fn, remedy)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".copy-") as tmp:
        try:
            shutil.copyfile(found, Path(tmp) / filename)
        except OSError as exc:
            raise WriteError(target, exc, found.stat().st_size) from exc
        os.replace(Path(tmp) / filename, target)
    return root


class _ReleaseUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to construct {module}.{name}: the dataset releases hold only "
                                         "numpy arrays, lists, dicts, strings and numbers")
        if module.startswith("numpy.core."):  # numpy 1's name for numpy 2's numpy._core (deprecated there)
            try:
                return getattr(importlib.import_module("numpy._core." + module[len("numpy.core."):]), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def read_pickle(source: Path | bytes, fn: str, what: str, remedy: str) -> Any:
    """Unpickle a release file (numpy arrays, containers, strings, numbers only), string keys as ``str``.

    Python 2 pickles (CIFAR-100's, the ImageNet caches') are read with the
    latin-1 encoding numpy asks for; ``bytes`` dict keys become ``str``.

    Raises:
        ValueError: the file is truncated, not a pickle, or holds other objects;
            the message names ``what`` and ends with ``remedy``.
    """
    try:
        if isinstance(source, bytes):
            value = _ReleaseUnpickler(io.BytesIO(source), encoding="latin1").load()
        else:
            with source.open("rb") as f:
                value = _ReleaseUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - EOF, unpickling, numpy and memory errors all mean "bad file"
        raise ValueError(f"{fn}: cannot read {what} ({type(exc).__name__}: {checks.brief(exc)}); it is truncated "
                         f"or not the release's pickle. {remedy}") from exc
    if isinstance(value, dict):
        value = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in value.items()}
    return value


def describe(value: object) -> str:
    """A value found where a release file should hold something else, for a message: ``"an int (5)"``."""
    kind = type(value).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} ({reprlib.repr(value)})"


def tar_members(archive: Path, wanted: Callable[[str], bool], fn: str, remedy: str) -> Iterator[tuple[str, bytes]]:
    """``(name, content)`` of every regular file of a tar (``.tar.gz``/``.tgz``) whose name is ``wanted``.

    The archive is streamed once, in its own order; only wanted members are
    held in memory, one at a time.

    Raises:
        ValueError: the archive is truncated or not a tar archive.
    """
    try:
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                if member.isfile() and wanted(member.name):
                    handle = tar.extractfile(member)
                    if handle is not None:
                        yield member.name, handle.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ValueError(f"{fn}: {archive} is not a readable tar archive ({type(exc).__name__}: "
                         f"{checks.brief(exc)}); it is truncated or damaged. {remedy}") from exc


def existing_folder(path: str | Path, fn: str, name: str, holds: str = "the dataset's files") -> Path:
    """``path`` as a folder that exists, else a ``FileNotFoundError`` naming the argument and what it should hold."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{fn}: {name} {folder} is not a folder; pass the folder that holds {holds}")
    return folder


def find_first(folders: Sequence[Path], names: Sequence[str]) -> Path | None:
    """The first ``folder/name`` that exists, trying every name in each folder in turn."""
    for folder in folders:
        for name in names:
            if (folder / name).exists():
                return folder / name
    return None


#: ``build(folder, download, image_size) -> splits``: decode a release found in ``folder`` (``download``:
#: fetch what is missing into it first).
Build = Callable[[Path, bool, int], dict[str, ImageClasses]]


def load_release(dataset: str, root: str | Path, *, image_size: int, source: str | Path | None, download: bool,
                 meta: dict[str, Any], build: Build) -> dict[str, ImageClasses]:
    """The flow every benchmark loader shares: the cache in ``root``, else ``build`` from ``source`` or ``root``.

    Args:
        dataset: the loader's name, in messages and cache file names.
        root: where caches (and downloads) go; created if needed.
        image_size: side of the square images.
        source: an offline folder holding the release files; read where it
            is, nothing is copied or downloaded into it.
        download: without ``source``, let ``build`` fetch missing files into ``root``.
        meta: what the cache must have been written for (the dataset, its counts).
        build: decodes the release; its splits are cached in ``root``.
    """
    fn = f"load_{dataset}"
    checks.integer(fn, "image_size", image_size, minimum=1, expect="a positive int")
    checks.flag(fn, "download", download)
    root = Path(root).expanduser()
    meta = {**meta, "image_size": image_size}
    cached, damage = cached_splits(root, dataset, image_size, meta)
    if cached is not None:
        return cached
    folder = existing_folder(source, fn, "source") if source is not None else root
    for problem in damage:
        warnings.warn(f"{problem}, so it is rebuilt from the release files.", stacklevel=3)
    splits = build(folder, download and source is None, image_size)
    write_splits(root, dataset, image_size, meta, splits)
    return splits


def check_counts(fn: str, splits: dict[str, ImageClasses], expected: dict[str, int], origin: str) -> None:
    """Each split must hold the published number of classes; else a ``ValueError`` naming the counts."""
    found = {split: len(classes) for split, classes in splits.items()}
    if found != expected:
        raise ValueError(f"{fn}: {origin} gives {found} classes per split, not the published {expected}; it is "
                         "an incomplete or different release, use the official files")
