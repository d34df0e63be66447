"""Few-shot image data held as whole tensors: Omniglot and any ImageFolder tree.

:func:`load_dataset` is the entry point: it returns the ``"train"``, ``"val"``
and ``"test"`` classes of a benchmark as :class:`ImageClasses` (uint8, on the
CPU; move them to the device once with ``.to(device)``), ready for
:class:`~maml_func.tasks.EpisodeSampler`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from maml_func import checks
from maml_func.data.classes import ImageClasses
from maml_func.data.folder import load_folder
from maml_func.data.omniglot import download_omniglot, load_omniglot, omniglot_splits

__all__ = ["ImageClasses", "download_omniglot", "load_dataset", "load_folder", "load_omniglot", "omniglot_splits"]

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
        dataset: ``"omniglot"``, or the path of an ImageFolder tree (see
            :func:`load_folder` for the layouts).
        root: where archives and decoded caches live (created if needed). For a
            folder tree only the cache goes there.
        image_size: side of the square images.
        channels: Omniglot is grayscale (``None`` or 1); for a folder tree 1, 3
            or ``None`` (infer).
        split: Omniglot's split, ``"maml"`` (train 1100 / val 100 / test 423
            characters of all 1623) or ``"lake"`` (alias ``"background"``: 864 /
            100 background characters, the 659 evaluation ones as test); see
            :mod:`maml_func.data.omniglot`. A folder tree is split by its
            ``train/``, ``val/`` and ``test/`` subfolders when it has them, else
            by classes at random, 64% / 16% / 20% (``split`` is ignored).
        seed: seeds the random class splits.
        download: Omniglot only: fetch the official archives if missing.
        source: Omniglot only: an offline folder holding the two archives (or
            their extracted trees), trusted by layout and counts.
        skip_bad_files: folder trees only: skip unreadable files with a warning
            instead of raising.

    Returns:
        ``{"train": ImageClasses, "val": ImageClasses, "test": ImageClasses}``.

    Example:
        >>> from maml_func import EpisodeSampler, load_dataset
        >>> data = load_dataset("omniglot", root="data/omniglot", source="../shared/data/omniglot")  # doctest: +SKIP
        >>> sampler = EpisodeSampler(data["train"], n_way=5, k_shot=1, n_query=15, rotations=True)  # doctest: +SKIP
    """
    if not isinstance(dataset, (str, Path)):
        raise TypeError(f"load_dataset: dataset must be 'omniglot' or a folder path, got {type(dataset).__name__}")
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

    for name, value in (("download", download), ("source", source)):
        if value not in (False, None):
            raise ValueError(f"load_dataset: {name} applies to dataset='omniglot' only, got {name}={value!r} "
                             f"for the folder {dataset}")
    path = Path(dataset).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"load_dataset: dataset {dataset!r} is neither 'omniglot' nor an existing folder; "
                                "pass 'omniglot' or the path of an ImageFolder tree (one folder per class)")
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
