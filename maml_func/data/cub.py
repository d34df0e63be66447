"""CUB-200-2011 (Wah et al. 2011) with the few-shot split of Chen et al. 2019: 100 / 50 / 50 bird species.

200 species, 11 788 photographs (41 to 60 per species). The split is the one of
"A Closer Look at Few-shot Classification" (Chen et al. 2019, the
``filelists/CUB/write_CUB_filelist.py`` of their code): with the species
folders in sorted order and ``i`` the 0-based index, species ``i % 2 == 0`` are
meta-training, ``i % 4 == 1`` validation and ``i % 4 == 3`` meta-test. The
folders are numbered ``001.Black_footed_Albatross`` to ``200.Common_Yellowthroat``,
so training is the odd numbers, validation 002, 006, ..., meta-test 004, 008, ....

The release is ``CUB_200_2011.tgz`` from CaltechDATA (:data:`URL`,
``download=True`` fetches it into ``root``) with the public md5 :data:`MD5`; an
archive found in ``root`` or ``source`` must match it, else it is refused and
left untouched. Its extracted ``CUB_200_2011/`` folder is accepted too, checked
by its counts (:data:`N_CLASSES` species, :data:`N_IMAGES` images under
``CUB_200_2011/images/<species>/``). Photographs are converted to RGB and
resized (stretched) to a square; images are in file-name order; the decoded
splits are cached in ``root`` as ``cub_<split>_<size>px.pt``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from maml_func import checks
from maml_func.data._files import check_counts, check_md5, load_release, place_archive, tar_members
from maml_func.data._io import SPLITS, decode_image, stack_classes
from maml_func.data.classes import ImageClasses

__all__ = ["cub_split", "download_cub", "load_cub"]

URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
ARCHIVE = "CUB_200_2011.tgz"
FOLDER = "CUB_200_2011"
MD5 = "97eceeb196236b17998738112f37df78"
N_CLASSES, N_IMAGES = 200, 11_788
CLASS_COUNTS = {"train": 100, "val": 50, "test": 50}

_FN = "load_cub"
_REMEDY = (f"Delete it and load again with download=True (it fetches {URL}), or pass source=<folder holding the "
           f"official {ARCHIVE} or its extracted {FOLDER}/>")


def cub_split(index: int) -> str:
    """The split of the species at 0-based ``index`` in sorted order (Chen et al. 2019).

    Example:
        >>> [cub_split(i) for i in range(4)]
        ['train', 'val', 'train', 'test']
    """
    return "train" if index % 2 == 0 else "val" if index % 4 == 1 else "test"


def load_cub(root: str | Path, *, image_size: int = 84, source: str | Path | None = None,
             download: bool = False) -> dict[str, ImageClasses]:
    """CUB-200-2011's ``{"train", "val", "test"}``: 100 / 50 / 50 species (Chen et al. 2019), cached in ``root``.

    Args:
        root: where the archive (without ``source``) and the decoded cache live.
        image_size: side of the square images (84 for Conv4 in Chen et al.).
        source: a folder holding ``CUB_200_2011.tgz`` or ``CUB_200_2011/``.
        download: fetch the official archive into ``root`` when it is missing.

    Returns:
        ``{split: ImageClasses}``; species hold 41 to 60 images (padded to the largest).

    Raises:
        FileNotFoundError: no archive and neither ``download`` nor ``source``.
        ValueError: the checksum does not match (the file is left untouched), the
            archive is unreadable, or the counts are not the release's.
        ConnectionError: the download failed.

    Example:
        >>> splits = load_cub("data/cub", download=True)  # doctest: +SKIP
        >>> {k: len(v) for k, v in splits.items()}  # doctest: +SKIP
        {'train': 100, 'val': 50, 'test': 50}
    """
    meta = {"dataset": "cub", "classes": N_CLASSES, "images": N_IMAGES, "split": "chen2019"}
    return load_release("cub", root, image_size=image_size, source=source, download=download, meta=meta,
                        build=_build)


def download_cub(root: str | Path, *, source: str | Path | None = None) -> Path:
    """Put the official ``CUB_200_2011.tgz`` (from :data:`URL`, or copied from ``source``) in ``root``; return it.

    Checks and errors as :func:`maml_func.data.cifar.download_cifar100` (and
    :func:`maml_func.data._files.place_archive`, which both use).

    Example:
        >>> splits = load_cub(download_cub("data/cub"))  # doctest: +SKIP
    """
    return place_archive(root, source, ARCHIVE, URL, MD5, "download_cub", _REMEDY)


def _build(folder: Path, download: bool, image_size: int) -> dict[str, ImageClasses]:
    archive, extracted = folder / ARCHIVE, folder / FOLDER / "images"
    photos: dict[str, dict[str, torch.Tensor]] = {}

    def add(species: str, name: str, data: bytes | Path, origin: str) -> None:
        try:
            photos.setdefault(species, {})[name], _ = decode_image(data, image_size, "RGB")
        except Exception as exc:  # noqa: BLE001 - PIL fails in many ways on a damaged file; name it
            raise ValueError(f"{_FN}: cannot decode {origin} ({checks.brief(exc)}); the copy is damaged. "
                             + _REMEDY) from exc

    if archive.is_file():
        check_md5(archive, MD5, _FN, _REMEDY)
        for member, data in tar_members(archive, _is_photo, _FN, _REMEDY):
            parts = member.split("/")
            add(parts[-2], parts[-1], data, f"{member} in {archive}")
        origin = str(archive)
    elif extracted.is_dir():
        for path in sorted(extracted.glob("*/*")):
            if path.is_file() and not path.name.startswith("."):
                add(path.parent.name, path.name, path, str(path))
        origin = str(extracted)
    elif download:
        place_archive(folder, None, ARCHIVE, URL, MD5, _FN, _REMEDY)
        return _build(folder, False, image_size)
    else:
        raise FileNotFoundError(f"{_FN}: {folder} holds neither {ARCHIVE} nor {FOLDER}/images/; pass "
                                f"download=True to fetch {URL}, or source=<folder holding it>")
    n_images = sum(len(v) for v in photos.values())
    if len(photos) != N_CLASSES or n_images != N_IMAGES:
        raise ValueError(f"{_FN}: {origin} has {len(photos)} species and {n_images} images, not the "
                         f"{N_CLASSES} and {N_IMAGES} of CUB-200-2011; it is incomplete. " + _REMEDY)
    chosen: dict[str, list[str]] = {split: [] for split in SPLITS}
    for i, species in enumerate(sorted(photos)):
        chosen[cub_split(i)].append(species)
    splits = {split: stack_classes(names, [torch.stack([photos[s][f] for f in sorted(photos[s])]) for s in names])
              for split, names in chosen.items()}
    check_counts(_FN, splits, CLASS_COUNTS, origin)
    return splits


def _is_photo(name: str) -> bool:
    parts = name.split("/")
    return len(parts) >= 4 and parts[-4] == FOLDER and parts[-3] == "images" and not parts[-1].startswith(".")
