"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018), both from the official CIFAR-100.

CIFAR-100 (Krizhevsky 2009) has 100 classes of 600 32×32 images (500 in the
``train`` batch, 100 in ``test``), grouped into 20 superclasses of 5. The
few-shot splits use all 600 images of a class:

* CIFAR-FS: 64 / 16 / 20 classes drawn at random by Bertinetto et al.
  (:data:`CIFAR_FS_CLASSES`, the lists of their split files);
* FC100: split by superclass, 12 / 4 / 4 superclasses, so 60 / 20 / 20
  classes (:data:`FC100_SUPERCLASSES`): meta-test classes share no superclass
  with the training ones. Class names are ``"<superclass>/<class>"``.

The release is ``cifar-100-python.tar.gz`` from
https://www.cs.toronto.edu/~kriz/ (``download=True`` fetches it into ``root``),
with the public md5 :data:`MD5`; an archive found in ``root`` or ``source`` must
match it, else it is refused and left untouched. Its extracted folder
``cifar-100-python/`` is accepted too, its three files (``train``, ``test``,
``meta``: Python pickles) checked against their own public md5 sums. Images are
in file order, ``train`` before ``test``; the decoded splits are cached in
``root`` as ``cifarfs_<split>_<size>px.pt`` / ``fc100_<split>_<size>px.pt``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from maml_func.data._files import (
    check_counts,
    check_md5,
    describe,
    load_release,
    place_archive,
    read_pickle,
    tar_members,
)
from maml_func.data._io import SPLITS, resize_images, stack_classes
from maml_func.data.classes import ImageClasses

__all__ = ["CIFAR_FS_CLASSES", "FC100_SUPERCLASSES", "download_cifar100", "load_cifarfs", "load_fc100"]

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
MD5 = {
    ARCHIVE: "eb9058c3a382ffc7106e4002c42a8d85",
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
IMAGES_PER_CLASS = 600
CLASSES_PER_SUPERCLASS = 5
_SIDE = 32

#: CIFAR-FS, Bertinetto et al. 2019: the CIFAR-100 class names of each split.
CIFAR_FS_CLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "dolphin", "seal", "aquarium_fish", "ray", "trout", "orchid", "sunflower", "tulip", "bottle", "bowl", "can",
        "cup", "plate", "apple", "mushroom", "orange", "pear", "clock", "keyboard", "chair", "couch", "bee",
        "caterpillar", "cockroach", "bear", "lion", "tiger", "wolf", "bridge", "castle", "house", "road",
        "skyscraper", "cloud", "forest", "mountain", "elephant", "kangaroo", "porcupine", "possum", "raccoon",
        "skunk", "lobster", "spider", "boy", "girl", "dinosaur", "lizard", "snake", "turtle", "hamster", "mouse",
        "rabbit", "shrew", "squirrel", "oak_tree", "palm_tree", "pine_tree", "willow_tree", "bus", "train",
        "lawn_mower", "streetcar", "tank",
    ),
    "val": (
        "beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea", "camel",
        "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor",
    ),
    "test": (
        "whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe", "leopard", "plain",
        "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman", "bicycle", "pickup_truck", "rocket",
    ),
}

#: FC100, Oreshkin et al. 2018: the CIFAR-100 superclasses of each split.
FC100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
        "household_furniture", "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "reptiles", "trees",
        "vehicles_1", "vehicles_2",
    ),
    "val": ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals"),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}

_REMEDY = (f"Delete it and load again with download=True (it fetches {URL}), or pass source=<folder holding the "
           f"official {ARCHIVE} or its extracted {FOLDER}/>")


def load_cifarfs(root: str | Path, *, image_size: int = 32, source: str | Path | None = None,
                 download: bool = False) -> dict[str, ImageClasses]:
    """CIFAR-FS's ``{"train", "val", "test"}``: 64 / 16 / 20 CIFAR-100 classes of 600 images, cached in ``root``.

    Args:
        root: where the archive (without ``source``) and the decoded cache live.
        image_size: side of the square images (32 in the papers).
        source: a folder holding ``cifar-100-python.tar.gz`` or ``cifar-100-python/``.
        download: fetch the official archive into ``root`` when it is missing.

    Raises:
        FileNotFoundError: no archive and neither ``download`` nor ``source``.
        ValueError: a checksum does not match (the file is left untouched), or the archive is unreadable.
        ConnectionError: the download failed.

    Example:
        >>> splits = load_cifarfs("data/cifar", download=True)  # doctest: +SKIP
        >>> splits["train"].images.shape  # doctest: +SKIP
        torch.Size([64, 600, 3, 32, 32])
    """
    meta = {"dataset": "cifarfs", "classes": {k: list(v) for k, v in CIFAR_FS_CLASSES.items()}}
    return load_release("cifarfs", root, image_size=image_size, source=source, download=download, meta=meta,
                        build=lambda folder, fetch_, size: _split(folder, fetch_, size, "load_cifarfs", _cifarfs))


def load_fc100(root: str | Path, *, image_size: int = 32, source: str | Path | None = None,
               download: bool = False) -> dict[str, ImageClasses]:
    """FC100's ``{"train", "val", "test"}``: 60 / 20 / 20 classes from 12 / 4 / 4 superclasses, cached in ``root``.

    Arguments, errors and files as :func:`load_cifarfs`; class names are ``"<superclass>/<class>"``.

    Example:
        >>> splits = load_fc100("data/cifar", download=True)  # doctest: +SKIP
        >>> {k: len(v) for k, v in splits.items()}  # doctest: +SKIP
        {'train': 60, 'val': 20, 'test': 20}
    """
    meta = {"dataset": "fc100", "superclasses": {k: list(v) for k, v in FC100_SUPERCLASSES.items()}}
    return load_release("fc100", root, image_size=image_size, source=source, download=download, meta=meta,
                        build=lambda folder, fetch_, size: _split(folder, fetch_, size, "load_fc100", _fc100))


def download_cifar100(root: str | Path, *, source: str | Path | None = None) -> Path:
    """Put the official ``cifar-100-python.tar.gz`` (what CIFAR-FS and FC100 read) in ``root``; return ``root``.

    Downloaded from :data:`URL`, or copied from ``source``; either way checked
    against its public md5 first. An archive already in ``root`` must match it.

    Raises:
        FileNotFoundError: ``source`` has no archive.
        ValueError: an archive does not match the md5 (left untouched).
        ConnectionError: the download failed (offline?); pass ``source``.

    Example:
        >>> root = download_cifar100("data/cifar")  # doctest: +SKIP
        >>> splits = load_cifarfs(root)  # doctest: +SKIP
    """
    return place_archive(root, source, ARCHIVE, URL, MD5[ARCHIVE], "download_cifar100", _REMEDY)


# One CIFAR-100 class: its superclass, its name and its images [600, 3, 32, 32] uint8.
_Class = tuple[str, str, torch.Tensor]


def _cifarfs(classes: dict[str, _Class], split: str) -> list[tuple[str, torch.Tensor]]:
    missing = sorted(set(CIFAR_FS_CLASSES[split]) - set(classes))
    if missing:
        raise ValueError(f"load_cifarfs: the CIFAR-100 release has no classes {missing[:3]} of the CIFAR-FS "
                         f"{split} split; it is not the official release. " + _REMEDY)
    return [(name, classes[name][2]) for name in sorted(CIFAR_FS_CLASSES[split])]


def _fc100(classes: dict[str, _Class], split: str) -> list[tuple[str, torch.Tensor]]:
    chosen = [(f"{sup}/{name}", x) for sup, name, x in classes.values() if sup in FC100_SUPERCLASSES[split]]
    return sorted(chosen, key=lambda item: item[0])


def _split(folder: Path, download: bool, image_size: int, fn: str,
           select: Callable[[dict[str, _Class], str], list[tuple[str, torch.Tensor]]]) -> dict[str, ImageClasses]:
    classes = _read_cifar100(folder, download, fn)
    splits = {}
    for split in SPLITS:
        chosen = select(classes, split)
        splits[split] = stack_classes([n for n, _ in chosen], [resize_images(x, image_size) for _, x in chosen])
    expected = ({k: len(v) for k, v in CIFAR_FS_CLASSES.items()} if select is _cifarfs
                else {k: CLASSES_PER_SUPERCLASS * len(v) for k, v in FC100_SUPERCLASSES.items()})
    check_counts(fn, splits, expected, str(folder))
    return splits


def _read_cifar100(folder: Path, download: bool, fn: str) -> dict[str, _Class]:
    """Every CIFAR-100 class by name, from the archive or the extracted folder in ``folder``."""
    archive, extracted = folder / ARCHIVE, folder / FOLDER
    files: dict[str, bytes | Path] = {}
    if archive.is_file():
        check_md5(archive, MD5[ARCHIVE], fn, _REMEDY)
        wanted = {f"{FOLDER}/{part}": part for part in ("train", "test", "meta")}
        files = {wanted[name]: data for name, data in tar_members(archive, wanted.__contains__, fn, _REMEDY)}
    elif extracted.is_dir():
        for part in ("train", "test", "meta"):
            if (extracted / part).is_file():
                check_md5(extracted / part, MD5[part], fn, _REMEDY)
                files[part] = extracted / part
    elif download:
        place_archive(folder, None, ARCHIVE, URL, MD5[ARCHIVE], fn, _REMEDY)
        return _read_cifar100(folder, False, fn)
    else:
        raise FileNotFoundError(f"{fn}: {folder} holds neither {ARCHIVE} nor {FOLDER}/; pass download=True to "
                                f"fetch {URL}, or source=<folder holding it>")
    missing = sorted({"train", "test", "meta"} - set(files))
    if missing:
        where = archive if archive.is_file() else extracted
        raise ValueError(f"{fn}: {where} lacks {', '.join(missing)}; it is not a complete CIFAR-100 release. "
                         + _REMEDY)
    meta = read_pickle(files["meta"], fn, f"{FOLDER}/meta", _REMEDY)
    fine, coarse = (_label_names(meta, key, fn) for key in ("fine_label_names", "coarse_label_names"))
    images: list[list[torch.Tensor]] = [[] for _ in fine]
    superclass = ["" for _ in fine]
    for part in ("train", "test"):
        batch = read_pickle(files[part], fn, f"{FOLDER}/{part}", _REMEDY)
        data, labels, supers = _batch(batch, len(fine), len(coarse), f"{fn}: {FOLDER}/{part}")
        pixels = torch.from_numpy(data.reshape(-1, 3, _SIDE, _SIDE).copy())
        for c in range(len(fine)):
            rows = torch.from_numpy(np.flatnonzero(labels == c))
            images[c].append(pixels[rows])
            if len(rows):
                superclass[c] = coarse[int(supers[int(rows[0])])]
    out = {}
    for c, name in enumerate(fine):
        x = torch.cat(images[c])
        if len(x) != IMAGES_PER_CLASS:
            raise ValueError(f"{fn}: class {name} has {len(x)} images in {folder}, not {IMAGES_PER_CLASS}. " + _REMEDY)
        out[name] = (superclass[c], name, x)
    return out


def _label_names(meta: object, key: str, fn: str) -> list[str]:
    """``meta[key]``, checked: a non-empty list of names."""
    value = meta.get(key) if isinstance(meta, dict) else meta
    if not isinstance(value, list) or not value or not all(isinstance(n, str) for n in value):
        raise ValueError(f"{fn}: {FOLDER}/meta: {key} is {describe(value)}, not a list of class names. " + _REMEDY)
    return value


def _batch(batch: object, n_fine: int, n_coarse: int, origin: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch's ``data`` [N, 3072] uint8 and its fine and coarse labels [N], checked (types, shapes, ranges)."""
    entries = [batch.get(k) if isinstance(batch, dict) else None for k in ("data", "fine_labels", "coarse_labels")]
    arrays = [np.asarray(e) if isinstance(e, (list, np.ndarray)) else np.zeros((0, 0)) for e in entries]
    data, labels, supers = arrays
    well_formed = (data.dtype == np.uint8 and data.shape == (len(labels), 3 * _SIDE * _SIDE) and labels.ndim == 1
                   and supers.shape == labels.shape and all(np.issubdtype(a.dtype, np.integer) for a in arrays))
    if not well_formed:
        raise ValueError(f"{origin} is not a CIFAR-100 batch (a dict with data [N, 3072] uint8 and fine_labels and "
                         "coarse_labels, N ints each). " + _REMEDY)
    if len(labels) and (labels.min() < 0 or labels.max() >= n_fine or supers.min() < 0 or supers.max() >= n_coarse):
        raise ValueError(f"{origin} has labels outside the {n_fine} fine and {n_coarse} coarse classes of the meta "
                         "file. " + _REMEDY)
    return data, labels.astype(np.int64), supers.astype(np.int64)
