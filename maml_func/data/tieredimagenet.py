"""tieredImageNet (Ren et al. 2018): 351 / 97 / 160 ImageNet classes, split by 20 / 6 / 8 high-level categories.

608 classes (779 165 images at 84×84) grouped under 34 categories of the
ImageNet hierarchy; the splits are disjoint by category, so meta-test classes
are semantically far from the training ones. The release
(``tiered-imagenet.tar`` from the README of
github.com/renmengye/few-shot-ssl-public; 12.9 GB, no stable public URL, so
``download=True`` cannot fetch it) holds, per split:

* ``<split>_images_png.pkl``: a pickled list with one PNG-encoded image per
  entry (numpy uint8 arrays of the PNG bytes, as ``cv2.imencode`` returns them);
* ``<split>_labels.pkl``: a dict with ``label_specific`` (the class index of
  each image), ``label_specific_str`` (the class wnids), ``label_general`` and
  ``label_general_str`` (the category of each image, the category names).

The files are read from ``source`` or ``root``, or from a ``tiered-imagenet/``
folder inside it (where the tar unpacks). They have no published checksum, so
they are checked by content: the published numbers of classes and categories
per split (:data:`CLASS_COUNTS`, :data:`CATEGORY_COUNTS`) and one label per
image. Classes keep the release's order (names are the wnids), images their
file order; classes hold different numbers of images (the tensor is padded to
the largest). The decoded splits are cached in ``root`` as
``tieredimagenet_<split>_<size>px.pt``; at 84×84 the training split alone is
about 9.5 GB of uint8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from maml_func import checks
from maml_func.data._files import check_counts, describe, find_first, load_release, read_pickle
from maml_func.data._io import SPLITS, decode_image
from maml_func.data.classes import ImageClasses

__all__ = ["CATEGORY_COUNTS", "CLASS_COUNTS", "RELEASE", "load_tieredimagenet"]

CLASS_COUNTS = {"train": 351, "val": 97, "test": 160}
CATEGORY_COUNTS = {"train": 20, "val": 6, "test": 8}
IMAGES = "{split}_images_png.pkl"
LABELS = "{split}_labels.pkl"
SUBFOLDER = "tiered-imagenet"

_FN = "load_tieredimagenet"
_WHERE = ("the tieredImageNet release of Ren et al. 2018 (tiered-imagenet.tar, linked from the README of "
          "github.com/renmengye/few-shot-ssl-public; unpack it and pass the folder as source)")
#: Which files to fetch and from where (there is no stable public URL).
RELEASE = (f"the six files {IMAGES.format(split='{train,val,test}')} and {LABELS.format(split='{train,val,test}')} "
           f"of {_WHERE}")


def load_tieredimagenet(root: str | Path, *, image_size: int = 84, source: str | Path | None = None,
                        download: bool = False) -> dict[str, ImageClasses]:
    """tieredImageNet's ``{"train", "val", "test"}``: 351 / 97 / 160 classes of RGB images, cached in ``root``.

    Args:
        root: the folder of the decoded cache; without ``source``, also of the six files.
        image_size: the side, in pixels, that the images are resized to (84 as published).
        source: a folder holding the six files (or a ``tiered-imagenet/`` folder with them).
        download: accepted for symmetry; there is no stable public URL, so a
            missing release is an error that names the files and where to get them.

    Returns:
        ``{split: ImageClasses}`` (class names are wnids).

    Raises:
        FileNotFoundError: a file of the release is missing (named).
        ValueError: a file is truncated or not the release's, or the counts differ.

    Example:
        >>> splits = load_tieredimagenet("data/tiered", source="~/datasets/tiered-imagenet")  # doctest: +SKIP
        >>> {k: len(v) for k, v in splits.items()}  # doctest: +SKIP
        {'train': 351, 'val': 97, 'test': 160}
    """
    meta = {"dataset": "tieredimagenet", "classes": CLASS_COUNTS, "categories": CATEGORY_COUNTS}
    return load_release("tieredimagenet", root, image_size=image_size, source=source, download=download, meta=meta,
                        build=_build)


def _build(folder: Path, download: bool, image_size: int) -> dict[str, ImageClasses]:
    candidates = [folder, folder / SUBFOLDER]
    files = {}
    for split in SPLITS:
        for pattern in (IMAGES, LABELS):
            name = pattern.format(split=split)
            found = find_first(candidates, [name])
            if found is None:
                url = " There is no stable public URL, so download=True cannot fetch it." if download else ""
                raise FileNotFoundError(f"{_FN}: {folder} (or {folder / SUBFOLDER}) lacks {name}; put all six "
                                        f"files of {_WHERE} there.{url}")
            files[split, pattern] = found
    splits = {split: _decode_split(files[split, IMAGES], files[split, LABELS], split, image_size)
              for split in SPLITS}
    check_counts(_FN, splits, CLASS_COUNTS, str(folder))
    return splits


def _decode_split(images_file: Path, labels_file: Path, split: str, image_size: int) -> ImageClasses:
    remedy = f"Fetch it again: {_WHERE}."
    labels = read_pickle(labels_file, _FN, str(labels_file), remedy)
    keys = ("label_specific", "label_specific_str", "label_general", "label_general_str")
    if not isinstance(labels, dict) or any(k not in labels for k in keys):
        raise ValueError(f"{_FN}: {labels_file} is not a tieredImageNet labels file: expected a dict with "
                         f"{', '.join(keys)}. {remedy}")
    specific = _indices(labels_file, "label_specific", labels["label_specific"], remedy)
    _indices(labels_file, "label_general", labels["label_general"], remedy)
    names = _names(labels_file, "label_specific_str", labels["label_specific_str"], remedy)
    categories = len(_names(labels_file, "label_general_str", labels["label_general_str"], remedy))
    if len(names) != CLASS_COUNTS[split] or categories != CATEGORY_COUNTS[split]:
        raise ValueError(f"{_FN}: {labels_file} names {len(names)} classes in {categories} categories, not the "
                         f"published {CLASS_COUNTS[split]} in {CATEGORY_COUNTS[split]} for {split}. {remedy}")
    encoded = read_pickle(images_file, _FN, str(images_file), remedy)
    if not isinstance(encoded, (list, tuple)) or len(encoded) != len(specific):
        count = len(encoded) if isinstance(encoded, (list, tuple)) else type(encoded).__name__
        raise ValueError(f"{_FN}: {images_file} holds {count} images but {labels_file} labels {len(specific)}; "
                         f"the two files must come from the same release. {remedy}")
    if len(specific) and (specific.min() < 0 or specific.max() >= len(names)):
        raise ValueError(f"{_FN}: {labels_file} has class indices outside 0..{len(names) - 1}. {remedy}")
    order = np.argsort(specific, kind="stable")
    bounds = np.searchsorted(specific[order], np.arange(len(names) + 1))
    counts = torch.from_numpy(np.diff(bounds)).to(torch.int64)
    if len(specific) == 0 or int(counts.min()) == 0:
        raise ValueError(f"{_FN}: some classes of {labels_file} have no images. {remedy}")
    # Filled in place: the training split is gigabytes, so no per-class copies.
    images = torch.zeros(len(names), int(counts.max()), 3, image_size, image_size, dtype=torch.uint8)
    for c in range(len(names)):
        for j, row in enumerate(order[bounds[c]:bounds[c + 1]].tolist()):
            try:
                images[c, j], _ = decode_image(np.asarray(encoded[row], dtype=np.uint8).tobytes(), image_size, "RGB")
            except Exception as exc:  # noqa: BLE001 - PIL fails in many ways on damaged bytes; name the image
                raise ValueError(f"{_FN}: image {row} of {images_file} is not a readable PNG "
                                 f"({checks.brief(exc)}). {remedy}") from exc
    return ImageClasses(images, counts, names)


def _indices(labels_file: Path, key: str, value: object, remedy: str) -> np.ndarray:
    """Entry ``key`` of a labels file as int64 indices (one per image), or a ``ValueError`` naming it."""
    array = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if array is None or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{_FN}: {labels_file}: {key} is {describe(value)}, not one integer index per image. "
                         + remedy)
    return array.astype(np.int64).ravel()


def _names(labels_file: Path, key: str, value: object, remedy: str) -> list[str]:
    """Entry ``key`` of a labels file as a list of names, or a ``ValueError`` naming it."""
    if not isinstance(value, (list, tuple, np.ndarray)) or not all(isinstance(n, (str, bytes)) for n in value):
        raise ValueError(f"{_FN}: {labels_file}: {key} is {describe(value)}, not a list of names. {remedy}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in value]
