"""Any ImageFolder tree as :class:`~maml_func.data.ImageClasses`: one folder per class.

Two layouts are accepted under ``path``:

* flat: ``path/<class>/<image>`` (torchvision's ``ImageFolder``; miniImageNet);
* nested one level: ``path/<group>/<class>/<image>`` (Omniglot's
  ``alphabet/character``); the class is named ``"<group>/<class>"``.

Each top-level folder is a class if it holds files and a group if it holds
folders. Hidden entries (names starting with ``.``) are ignored, and so are
files directly under ``path`` (a README, a licence). Every other file in a class
folder must be a readable image, whatever its extension: a corrupt or non-image
file stops the load with an error naming it, unless ``skip_bad_files=True``
(then it is left out and reported in one warning).

Images are converted to grayscale (``channels=1``) or RGB (``channels=3``;
``None`` picks 3 if any image is in a colour mode, else 1) and resized to a
square ``image_size`` with LANCZOS (non-square images are stretched, as in the
usual miniImageNet preprocessing). Classes may hold different numbers of images.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from maml_func import checks
from maml_func.data._io import CACHE_FORMAT, decode_image, read_cache, write_cache
from maml_func.data.classes import ImageClasses

__all__ = ["load_folder"]

_LAYOUT_HELP = "expected <path>/<class>/<image> or <path>/<group>/<class>/<image>"


def load_folder(
    path: str | Path,
    *,
    image_size: int = 28,
    channels: int | None = None,
    skip_bad_files: bool = False,
    cache_dir: str | Path | None = None,
) -> ImageClasses:
    """Decode an ImageFolder tree into ``[n_classes, max_per_class, C, image_size, image_size]`` uint8.

    Args:
        path: the tree's root folder.
        image_size: side of the square images.
        channels: 1 (grayscale), 3 (RGB) or ``None`` (3 if any image is in colour, else 1).
        skip_bad_files: leave out files that are not readable images, with a
            warning, instead of raising.
        cache_dir: if given, the decoded tensor is cached there, keyed by the
            tree's file list (paths, sizes, modification times) and the settings,
            so that an unchanged tree loads in one ``torch.load``.

    Returns:
        :class:`ImageClasses`, classes in sorted name order, images in sorted file order.

    Raises:
        FileNotFoundError: ``path`` is not a folder.
        ValueError: no class folders, a bad layout, an empty class folder, or an
            unreadable file (without ``skip_bad_files``).

    Example:
        >>> classes = load_folder("data/mini-imagenet/train", image_size=84, channels=3)  # doctest: +SKIP
        >>> classes.images.shape  # doctest: +SKIP
        torch.Size([64, 600, 3, 84, 84])
    """
    checks.integer("load_folder", "image_size", image_size, minimum=1, expect="a positive int")
    if channels not in (None, 1, 3):
        raise ValueError(f"load_folder: channels must be 1, 3 or None (infer), got {channels!r}")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"load_folder: {root} is not a folder; {_LAYOUT_HELP}")
    classes = _scan(root, skip_bad_files)

    cache = None
    meta = {"dataset": "folder", "path": str(root.resolve()), "image_size": image_size, "channels": channels,
            "skip_bad_files": skip_bad_files}
    if cache_dir is not None:
        meta["files"] = _fingerprint(root, classes)
        cache = Path(cache_dir).expanduser() / f"folder_{root.name}_{image_size}px_{meta['files']}.pt"
        cached = read_cache(cache, meta)
        if cached is not None:
            return cached

    loaded = _decode(classes, image_size, channels, skip_bad_files)
    if cache is not None:
        write_cache(cache, loaded, meta)
    return loaded


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _scan(root: Path, skip_bad_files: bool) -> list[tuple[str, list[Path]]]:
    """``(class name, sorted files)`` for every class folder under ``root``."""
    classes: list[tuple[str, list[Path]]] = []
    empty: list[str] = []

    def add(name: str, folder: Path) -> None:
        entries = _visible(folder)
        nested = [p for p in entries if p.is_dir()]
        if nested:
            raise ValueError(f"load_folder: class folder {folder} holds folders ({nested[0].name}, ...); "
                             f"{_LAYOUT_HELP}, nested at most one level")
        if entries:
            classes.append((name, entries))
        else:
            empty.append(str(folder))

    for top in (p for p in _visible(root) if p.is_dir()):
        entries = _visible(top)
        dirs = [p for p in entries if p.is_dir()]
        if dirs and len(dirs) != len(entries):
            raise ValueError(f"load_folder: {top} holds both files and folders, so it is neither a class "
                             f"(images only) nor a group of classes (folders only); {_LAYOUT_HELP}")
        if dirs:
            for sub in dirs:
                add(f"{top.name}/{sub.name}", sub)
        else:
            add(top.name, top)

    if empty:
        message = f"load_folder: {len(empty)} class folder(s) hold no images: {empty[:3]}"
        if not skip_bad_files:
            raise ValueError(f"{message}; add images or remove them (or pass skip_bad_files=True, --skip-bad-files on "
                             "the command line, to skip them)")
        warnings.warn(f"{message}; skipped", stacklevel=3)
    if not classes:
        raise ValueError(f"load_folder: {root} holds no class folders with images; {_LAYOUT_HELP}")
    return classes


def _fingerprint(root: Path, classes: list[tuple[str, list[Path]]]) -> str:
    """A short digest of the file list, sizes and modification times: changes whenever the tree does."""
    digest = hashlib.sha256(str(CACHE_FORMAT).encode())
    for name, files in classes:
        for file in files:
            stat = file.stat()
            digest.update(json.dumps([name, file.name, stat.st_size, stat.st_mtime_ns]).encode())
    return digest.hexdigest()[:16]


def _decode(
    classes: list[tuple[str, list[Path]]], image_size: int, channels: int | None, skip_bad_files: bool
) -> ImageClasses:
    mode = "L" if channels == 1 else "RGB"
    width = 1 if channels == 1 else 3
    images = torch.zeros(len(classes), max(len(f) for _, f in classes), width, image_size, image_size,
                         dtype=torch.uint8)
    counts = [0] * len(classes)
    any_color = False
    bad: list[str] = []
    for i, (_, files) in enumerate(classes):
        for file in files:
            try:
                image, is_color = decode_image(file, image_size, mode)
            except Exception as exc:  # noqa: BLE001 - PIL fails in many ways on a bad file; all mean "not an image"
                if not skip_bad_files:
                    raise ValueError(f"load_folder: {file} is not a readable image "
                                     f"({type(exc).__name__}: {checks.brief(exc)}); "
                                     "delete or move it, or pass skip_bad_files=True (--skip-bad-files on the "
                                     "command line) to skip such files with a warning") from exc
                bad.append(str(file))
                continue
            images[i, counts[i]] = image
            counts[i] += 1
            any_color |= is_color
    if bad:
        warnings.warn(f"load_folder: skipped {len(bad)} unreadable file(s): {bad[:3]}", stacklevel=3)
    keep = torch.tensor(counts) > 0
    if not keep.all():
        dropped = [name for (name, _), k in zip(classes, keep.tolist()) if not k]
        warnings.warn(f"load_folder: dropped {len(dropped)} class(es) left without images: {dropped[:3]}",
                      stacklevel=3)
        if not keep.any():
            raise ValueError("load_folder: no readable image in any class folder")
    if channels is None and not any_color:
        images = images[:, :, :1]
    loaded = ImageClasses(images.contiguous(), torch.tensor(counts, dtype=torch.int64), [name for name, _ in classes])
    return loaded.subset(keep) if not keep.all() else loaded
