"""Shared by the loaders: decoding one image, and the on-disk cache of decoded classes.

Decoding thousands of small images is slow next to reading one tensor file, so
the decoded classes are cached and every later load is a single ``torch.load``.
A cache is written with :func:`~maml_func.atomic.atomic_write`, so a crash never
leaves a half-written cache under the real name; a cache that cannot be read
anyway (truncated by a full disk, edited) is reported with a warning and
rebuilt, never trusted.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from maml_func import checks
from maml_func.atomic import WriteError, atomic_write
from maml_func.data.classes import ImageClasses

CACHE_FORMAT = 1
#: The three splits every benchmark loader returns, in this order.
SPLITS = ("train", "val", "test")

# Modes whose pixels carry no colour; everything else (RGB, RGBA, P, CMYK, ...) is colour.
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def decode_image(source: bytes | Path, size: int, mode: str, *, invert: bool = False) -> tuple[Tensor, bool]:
    """Decode one image to a ``[C, size, size]`` uint8 tensor (``mode`` ``"L"``: C=1, ``"RGB"``: C=3).

    Returns the tensor and whether the file was in a colour mode. Raises whatever
    PIL raises for a file it cannot read (the callers name the file).
    """
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        is_color = im.mode not in _GRAY_MODES
        # JPEG can decode at 1/2, 1/4 or 1/8 scale directly; far cheaper than a full decode then a resize.
        im.draft(mode, (size, size))
        im = im.convert(mode)
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.LANCZOS)
        pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    channels = 1 if mode == "L" else 3
    image = pixels.view(size, size, channels).permute(2, 0, 1)
    if invert:
        image = 255 - image
    return image, is_color


def write_cache(path: Path, classes: ImageClasses, meta: dict[str, Any]) -> None:
    """Save ``classes`` (on the CPU) and ``meta`` to ``path`` atomically; warn if the folder is not writable."""
    payload = {"format": CACHE_FORMAT, "images": classes.images.cpu(), "counts": classes.counts.cpu(),
               "names": list(classes.names), "meta": meta}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(payload, f))
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write (disk full) as RuntimeError
        failure = str(exc) if isinstance(exc, WriteError) else f"could not write the cache {path} ({checks.brief(exc)})"
        warnings.warn(f"{failure}; the data will be decoded again on the next load. Point root at a writable "
                      "folder with space to keep a cache.", stacklevel=3)


def inspect_cache(path: Path, meta: dict[str, Any]) -> tuple[ImageClasses | None, str | None]:
    """``(classes, None)`` for a good cache of ``meta``; ``(None, damage)`` for a damaged one; else ``(None, None)``.

    ``damage`` says what is wrong with a cache that exists but cannot be used
    (unreadable: truncated or corrupt; or inconsistent). A cache written for
    other settings is not damage: its name differs in practice, so this only
    guards against a mix-up. Warns about nothing: the caller knows whether the
    data can be rebuilt, and says so once.
    """
    if not path.is_file():
        return None, None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - damage fails in many ways (zip, pickle, EOF); all mean "rebuild"
        return None, f"unreadable ({type(exc).__name__}: {checks.brief(exc)}); it is probably truncated or corrupt"
    problem = _cache_problem(payload)
    if problem is not None:
        return None, f"inconsistent ({problem})"
    if payload["meta"] != meta:
        return None, None
    return ImageClasses(payload["images"], payload["counts"], payload["names"]), None


def read_cache(path: Path, meta: dict[str, Any]) -> ImageClasses | None:
    """The classes cached at ``path`` (see :func:`inspect_cache`); a damaged cache is warned about and rebuilt."""
    classes, damage = inspect_cache(path, meta)
    if damage is not None:
        warnings.warn(f"the cache {path} is {damage}, so it is rebuilt from the source images.", stacklevel=3)
    return classes


def _cache_problem(payload: Any) -> str | None:
    if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
        return f"not a format-{CACHE_FORMAT} cache"
    images, counts, names = payload.get("images"), payload.get("counts"), payload.get("names")
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 5:
        return "images is not a 5-d uint8 tensor"
    if not isinstance(counts, Tensor) or counts.dtype != torch.int64 or counts.shape != images.shape[:1]:
        return "counts does not match images"
    if not isinstance(names, list) or len(names) != images.shape[0]:
        return "names does not match images"
    if counts.numel() and (int(counts.min()) < 1 or int(counts.max()) > images.shape[1]):
        return "counts out of range"
    return None


def resize_images(images: Tensor, size: int) -> Tensor:
    """``[N, C, H, W]`` uint8 -> ``[N, C, size, size]`` uint8, resized with LANCZOS like :func:`decode_image`.

    Images already ``size × size`` are returned as they are.
    """
    if images.shape[-2:] == (size, size):
        return images
    mode = "L" if images.shape[1] == 1 else "RGB"
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.uint8)
    for i, image in enumerate(images):
        pixels = image.permute(1, 2, 0).contiguous().numpy()
        im = Image.fromarray(pixels[:, :, 0] if mode == "L" else pixels, mode=mode)
        resized = im.resize((size, size), Image.Resampling.LANCZOS)
        out[i] = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).view(size, size, -1).permute(2, 0, 1)
    return out


def stack_classes(names: list[str], images: list[Tensor]) -> ImageClasses:
    """One :class:`ImageClasses` from per-class ``[n_i, C, H, W]`` uint8 stacks, padded to the largest class."""
    counts = [len(x) for x in images]
    padded = torch.zeros(len(images), max(counts), *images[0].shape[1:], dtype=torch.uint8)
    for i, x in enumerate(images):
        padded[i, :len(x)] = x
    return ImageClasses(padded, torch.tensor(counts, dtype=torch.int64), list(names))


def cached_splits(root: Path, dataset: str, image_size: int,
                  meta: dict[str, Any]) -> tuple[dict[str, ImageClasses] | None, list[str]]:
    """The three splits cached in ``root`` (``<dataset>_<split>_<image_size>px.pt``), or ``None`` and what is damaged.

    Every split must be cached for ``meta`` (plus its own name); one missing or
    damaged split means all three are rebuilt.
    """
    splits: dict[str, ImageClasses] = {}
    damage: list[str] = []
    for split in SPLITS:
        path = split_cache(root, dataset, split, image_size)
        classes, problem = inspect_cache(path, {**meta, "split": split})
        if problem is not None:
            damage.append(f"the cache {path} is {problem}")
        if classes is not None:
            splits[split] = classes
    return (splits if len(splits) == len(SPLITS) else None), damage


def write_splits(root: Path, dataset: str, image_size: int, meta: dict[str, Any],
                 splits: dict[str, ImageClasses]) -> None:
    """Cache each split for :func:`cached_splits`."""
    for split in SPLITS:
        write_cache(split_cache(root, dataset, split, image_size), splits[split], {**meta, "split": split})


def split_cache(root: Path, dataset: str, split: str, image_size: int) -> Path:
    return root / f"{dataset}_{split}_{image_size}px.pt"
