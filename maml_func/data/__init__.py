"""Few-shot image data held as whole tensors: the standard benchmarks and any ImageFolder tree.

:func:`load_dataset` is the entry point: it returns the ``"train"``, ``"val"``
and ``"test"`` classes of a benchmark as :class:`ImageClasses` (uint8, on the
CPU; move them to the device once with ``.to(device)``), ready for
:class:`~maml_func.tasks.EpisodeSampler`. The named benchmarks
(:data:`DATASETS`) are Omniglot (:mod:`~maml_func.data.omniglot`),
miniImageNet (:mod:`~maml_func.data.miniimagenet`), tieredImageNet
(:mod:`~maml_func.data.tieredimagenet`), CIFAR-FS and FC100
(:mod:`~maml_func.data.cifar`) and CUB-200-2011 (:mod:`~maml_func.data.cub`),
each with its standard split, read from the files researchers hold, checked,
decoded once and cached in ``root``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from maml_func import checks
from maml_func.data import cifar, cub, miniimagenet, tieredimagenet
from maml_func.data.cifar import download_cifar100, load_cifarfs, load_fc100
from maml_func.data.classes import ImageClasses
from maml_func.data.cub import download_cub, load_cub
from maml_func.data.folder import load_folder
from maml_func.data.miniimagenet import load_miniimagenet
from maml_func.data.omniglot import download_omniglot, load_omniglot, omniglot_splits
from maml_func.data.tieredimagenet import load_tieredimagenet

__all__ = ["BENCHMARKS", "DATASETS", "DOWNLOADABLE", "SOURCE_FILES", "ImageClasses", "download_cifar100",
           "download_cub", "download_dataset", "download_omniglot", "load_cifarfs", "load_cub", "load_dataset",
           "load_fc100", "load_folder", "load_miniimagenet", "load_omniglot", "load_tieredimagenet", "omniglot_splits"]

#: The RGB benchmarks by name: ``loader(root, image_size=, source=, download=) -> {"train", "val", "test"}``.
BENCHMARKS: dict[str, Callable[..., dict[str, ImageClasses]]] = {
    "miniimagenet": load_miniimagenet,
    "tieredimagenet": load_tieredimagenet,
    "cifarfs": load_cifarfs,
    "fc100": load_fc100,
    "cub": load_cub,
}
#: Every name :func:`load_dataset` accepts besides a folder path.
DATASETS = ("omniglot", *BENCHMARKS)
#: The named datasets whose release has a stable public URL (:func:`download_dataset` fetches them).
DOWNLOADABLE = ("omniglot", "cifarfs", "fc100", "cub")
_CIFAR = f"{cifar.ARCHIVE} (or its extracted {cifar.FOLDER}/)"
#: What an offline ``source`` folder of each named dataset holds: the release's own file names.
SOURCE_FILES = {
    "omniglot": "images_background.zip and images_evaluation.zip",
    "miniimagenet": (f"{miniimagenet.PICKLE.format(split='{train,val,test}')}, or images/ with train.csv, val.csv "
                     "and test.csv"),
    "tieredimagenet": (f"{tieredimagenet.IMAGES.format(split='{train,val,test}')} and "
                       f"{tieredimagenet.LABELS.format(split='{train,val,test}')}"),
    "cifarfs": _CIFAR,
    "fc100": _CIFAR,
    "cub": f"{cub.ARCHIVE} (or its extracted {cub.FOLDER}/)",
}

# Class fractions of a folder tree without train/val/test subfolders: miniImageNet's 64/16/20 of 100.
FOLDER_FRACTIONS = {"val": 0.16, "test": 0.20}
_FOLDER_PARTS = ("train", "val", "test")


def load_dataset(
    dataset: str | Path,
    *,
    root: str | Path,
    image_size: int = 28,
    channels: int | None = None,
    split: str = "maml",
    seed: int = 0,
    download: bool = False,
    source: str | Path | None = None,
    skip_bad_files: bool = False,
) -> dict[str, ImageClasses]:
    """Load a few-shot benchmark as ``{"train", "val", "test"}`` disjoint sets of classes.

    Args:
        dataset: a name of :data:`DATASETS` (``"omniglot"``, ``"miniimagenet"``,
            ``"tieredimagenet"``, ``"cifarfs"``, ``"fc100"``, ``"cub"``), or the
            path of an ImageFolder tree (see :func:`load_folder` for the layouts).
        root: where archives and decoded caches live (created if needed). For a
            folder tree only the cache goes there.
        image_size: side of the square images.
        channels: Omniglot is grayscale (``None`` or 1), the other named
            benchmarks RGB (``None`` or 3); for a folder tree 1, 3 or ``None`` (infer).
        split: Omniglot's split, ``"maml"`` (train 1100 / val 100 / test 423
            characters of all 1623) or ``"lake"`` (alias ``"background"``: 864 /
            100 background characters, the 659 evaluation ones as test); see
            :mod:`maml_func.data.omniglot`. A folder tree is split by its
            ``train/``, ``val/`` and ``test/`` subfolders when it has them, else
            by classes at random, 64% / 16% / 20% (``split`` is ignored). The
            other named benchmarks have one standard split each (``split`` is ignored).
        seed: seeds the random class splits.
        download: named benchmarks: fetch the official archives if missing
            (Omniglot, CIFAR-FS, FC100, CUB; miniImageNet and tieredImageNet have
            no stable public URL, and their error names the files to fetch).
        source: named benchmarks: an offline folder holding the release files
            (see each loader's module for the layouts and checks).
        skip_bad_files: folder trees only: skip unreadable files with a warning
            instead of raising.

    Returns:
        ``{"train": ImageClasses, "val": ImageClasses, "test": ImageClasses}``.

    Example:
        >>> from maml_func import EpisodeSampler, load_dataset
        >>> data = load_dataset("omniglot", root="data/omniglot", source="/path/to/omniglot_zips")  # doctest: +SKIP
        >>> sampler = EpisodeSampler(data["train"], n_way=5, k_shot=1, n_query=15, rotations=True)  # doctest: +SKIP
    """
    if not isinstance(dataset, (str, Path)):
        raise TypeError(f"load_dataset: dataset must be a name of {DATASETS} or a folder path, got "
                        f"{type(dataset).__name__}")
    if not checks.is_int(seed):
        raise TypeError(f"load_dataset: seed must be an int, got {seed!r}")
    if isinstance(dataset, str) and dataset.lower() == "omniglot":
        if channels not in (None, 1):
            raise ValueError(f"load_dataset: Omniglot is grayscale; channels must be 1 or None, got {channels!r}")
        if skip_bad_files:
            raise ValueError("load_dataset: skip_bad_files applies to folder trees; Omniglot archives are checked "
                             "by checksum or layout instead")
        classes = load_omniglot(root, image_size=image_size, download=download, source=source)
        return omniglot_splits(classes, split, seed)
    if isinstance(dataset, str) and dataset.lower() in BENCHMARKS:
        name = dataset.lower()
        if channels not in (None, 3):
            raise ValueError(f"load_dataset: {name} is RGB; channels must be 3 or None, got {channels!r}")
        if skip_bad_files:
            raise ValueError(f"load_dataset: skip_bad_files applies to folder trees; {name}'s files are checked by "
                             "checksum or content instead")
        return BENCHMARKS[name](root, image_size=image_size, source=source, download=download)

    for name, value in (("download", download), ("source", source)):
        if value not in (False, None):
            raise ValueError(f"load_dataset: {name} applies to a named dataset only ({', '.join(DATASETS)}), got "
                             f"{name}={value!r} for the folder {dataset}")
    path = Path(dataset).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"load_dataset: dataset {dataset!r} is neither a named dataset ({', '.join(DATASETS)}) "
                                "nor an existing folder; pass one of those names or the path of an ImageFolder tree "
                                "(one folder per class)")
    options = {"image_size": image_size, "channels": channels, "skip_bad_files": skip_bad_files, "cache_dir": root}
    parts = {p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if parts & {"train", "test"}:
        if parts != set(_FOLDER_PARTS):
            raise ValueError(f"load_dataset: {path} has the subfolders {sorted(parts)}; a pre-split tree needs "
                             "exactly train/, val/ and test/ (each one folder per class)")
        return {name: load_folder(path / name, **options) for name in _FOLDER_PARTS}

    classes = load_folder(path, **options)
    n = len(classes)
    if n < 3:
        raise ValueError(f"load_dataset: {path} has {n} class(es); a train/val/test split needs at least 3")
    n_val, n_test = (max(1, round(FOLDER_FRACTIONS[k] * n)) for k in ("val", "test"))
    pool = sorted(range(n), key=lambda i: classes.names[i])
    order = [pool[i] for i in torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()]
    rows = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {name: classes.subset(sorted(rows[name])) for name in _FOLDER_PARTS}


def download_dataset(dataset: str, root: str | Path, *, source: str | Path | None = None) -> Path:
    """Put the release files of the named ``dataset`` in ``root``, checked; return ``root``.

    Omniglot: :func:`download_omniglot`. CIFAR-FS and FC100 (both read
    ``cifar-100-python.tar.gz``): :func:`download_cifar100`. CUB:
    :func:`download_cub`. Each downloads the official archive and checks its
    md5, or copies it from ``source`` (checked the same way); afterwards
    ``load_dataset(dataset, root=root)`` reads it there. miniImageNet and
    tieredImageNet have no stable public URL: for them the error names the
    files to fetch, where to get them and where to put them.

    Raises:
        ValueError: ``dataset`` is not a name of :data:`DATASETS`, or an archive fails its check.
        FileNotFoundError: the dataset cannot be downloaded (the message names
            its files), or ``source`` lacks them.
        ConnectionError: the download failed (offline?); pass ``source``.

    Example:
        >>> root = download_dataset("cifarfs", "data/cifar")  # doctest: +SKIP
        >>> splits = load_dataset("cifarfs", root=root, image_size=32)  # doctest: +SKIP
    """
    checks.choice("download_dataset", "dataset", dataset, DATASETS, expect=f"one of {', '.join(DATASETS)}")
    if dataset == "omniglot":
        return download_omniglot(root, source=source)
    if dataset in ("cifarfs", "fc100"):
        return download_cifar100(root, source=source)
    if dataset == "cub":
        return download_cub(root, source=source)
    release = {"miniimagenet": miniimagenet.RELEASE, "tieredimagenet": tieredimagenet.RELEASE}[dataset]
    if source is not None:
        raise FileNotFoundError(f"download_dataset: {dataset} has no stable public URL, and nothing needs copying: "
                                f"its files are read where they are; pass source={str(source)!r} when loading "
                                f"instead (it must hold {SOURCE_FILES[dataset]})")
    raise FileNotFoundError(f"download_dataset: {dataset} has no stable public URL, so it cannot be downloaded; "
                            f"put {SOURCE_FILES[dataset]} in {Path(root).expanduser()} (or in any folder, and pass "
                            f"source=<that folder> when loading). They are {release}")
