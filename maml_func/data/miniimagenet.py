"""miniImageNet (Vinyals et al. 2016) with the split of Ravi & Larochelle 2017: 64 / 16 / 20 classes of 600.

100 ImageNet classes, 600 images each, split into 64 meta-training, 16
validation and 20 meta-test classes, the split every paper since MAML uses.
The release has no stable public URL (it is a derivative of ImageNet, shared
through Google Drive), so ``download=True`` cannot fetch it; the loader reads
either of the two layouts researchers hold, from ``source`` or ``root``:

* the raw images with Ravi & Larochelle's split files: ``images/<filename>``
  (JPEG, 84×84 in the common copies; any size is resized) and ``train.csv``,
  ``val.csv``, ``test.csv`` with the header ``filename,label`` and one row per
  image (``n0153282900000005.jpg,n01532829``). The CSVs are in the repository
  of Ravi & Larochelle (github.com/twitter-research/meta-learning-lstm,
  ``data/miniImagenet/``).
* the three pickles of Ren et al. 2018 (``mini-imagenet.tar.gz`` from the
  README of github.com/renmengye/few-shot-ssl-public):
  ``mini-imagenet-cache-{train,val,test}.pkl``, each a dict with
  ``image_data`` (``[N, 84, 84, 3]`` uint8 RGB) and ``class_dict``
  (``{wnid: [row indices]}``).

Neither has a published checksum (the copies in circulation differ), so a
release is checked by content: every split must hold exactly the classes of
:data:`CLASSES` (a file whose classes are another split's is named as such),
each with :data:`IMAGES_PER_CLASS` images. Classes are in sorted wnid order,
images in file order; the decoded splits are cached in ``root`` as
``miniimagenet_<split>_<size>px.pt``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from maml_func import checks
from maml_func.data._files import check_counts, describe, load_release, read_pickle
from maml_func.data._io import SPLITS, decode_image, resize_images, stack_classes
from maml_func.data.classes import ImageClasses

__all__ = ["CLASSES", "RELEASE", "load_miniimagenet"]

#: The wnids of each split (Ravi & Larochelle 2017), sorted.
CLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "n01532829", "n01558993", "n01704323", "n01749939", "n01770081", "n01843383", "n01910747", "n02074367",
        "n02089867", "n02091831", "n02101006", "n02105505", "n02108089", "n02108551", "n02108915", "n02111277",
        "n02113712", "n02120079", "n02165456", "n02457408", "n02606052", "n02687172", "n02747177", "n02795169",
        "n02823428", "n02966193", "n03017168", "n03047690", "n03062245", "n03207743", "n03220513", "n03337140",
        "n03347037", "n03400231", "n03476684", "n03527444", "n03676483", "n03838899", "n03854065", "n03888605",
        "n03908618", "n03924679", "n03998194", "n04067472", "n04243546", "n04251144", "n04258138", "n04275548",
        "n04296562", "n04389033", "n04435653", "n04443257", "n04509417", "n04515003", "n04596742", "n04604644",
        "n04612504", "n06794110", "n07584110", "n07697537", "n07747607", "n09246464", "n13054560", "n13133613",
    ),
    "val": (
        "n01855672", "n02091244", "n02114548", "n02138441", "n02174001", "n02950826", "n02971356", "n02981792",
        "n03075370", "n03417042", "n03535780", "n03584254", "n03770439", "n03773504", "n03980874", "n09256479",
    ),
    "test": (
        "n01930112", "n01981276", "n02099601", "n02110063", "n02110341", "n02116738", "n02129165", "n02219486",
        "n02443484", "n02871525", "n03127925", "n03146219", "n03272010", "n03544143", "n03775546", "n04146614",
        "n04149813", "n04418357", "n04522168", "n07613480",
    ),
}
IMAGES_PER_CLASS = 600
PICKLE = "mini-imagenet-cache-{split}.pkl"
CSV_HEADER = ["filename", "label"]

_FN = "load_miniimagenet"
_WHERE_PICKLES = ("the three pickles of Ren et al. 2018 (mini-imagenet.tar.gz, linked from the README of "
                  "github.com/renmengye/few-shot-ssl-public)")
_WHERE_CSVS = ("Ravi & Larochelle's split files train.csv, val.csv and test.csv (github.com/twitter-research/"
               "meta-learning-lstm, data/miniImagenet/) beside the images/ folder")
#: Which files to fetch and from where (there is no stable public URL).
RELEASE = f"{_WHERE_PICKLES}, or the raw images as images/<filename> with {_WHERE_CSVS}"


def load_miniimagenet(root: str | Path, *, image_size: int = 84, source: str | Path | None = None,
                      download: bool = False) -> dict[str, ImageClasses]:
    """miniImageNet's ``{"train", "val", "test"}``: 64 / 16 / 20 classes of 600 RGB images, cached in ``root``.

    Args:
        root: where the decoded cache lives (and the release, without ``source``).
        image_size: side of the square images (84 in the papers).
        source: a folder holding either layout (see the module docstring).
        download: accepted for symmetry with the other loaders; there is no
            stable public URL, so a missing release is an error that says which
            files to fetch and where to put them.

    Returns:
        ``{split: ImageClasses}``, images ``[classes, 600, 3, image_size, image_size]`` uint8.

    Raises:
        FileNotFoundError: neither layout is complete (the missing file is named).
        ValueError: a file is truncated or not the release's, or a split holds other classes.

    Example:
        >>> splits = load_miniimagenet("data/mini", source="~/datasets/mini-imagenet")  # doctest: +SKIP
        >>> splits["train"].images.shape  # doctest: +SKIP
        torch.Size([64, 600, 3, 84, 84])
    """
    meta = {"dataset": "miniimagenet", "classes": {k: list(v) for k, v in CLASSES.items()},
            "images_per_class": IMAGES_PER_CLASS}
    return load_release("miniimagenet", root, image_size=image_size, source=source, download=download, meta=meta,
                        build=_build)


def _build(folder: Path, download: bool, image_size: int) -> dict[str, ImageClasses]:
    pickles = {split: folder / PICKLE.format(split=split) for split in SPLITS}
    csvs = {split: folder / f"{split}.csv" for split in SPLITS}
    have_pickles = [p.name for p in pickles.values() if p.is_file()]
    have_csvs = [p.name for p in csvs.values() if p.is_file()]
    if len(have_pickles) == len(SPLITS):
        splits = {split: _from_pickle(path, split, image_size) for split, path in pickles.items()}
    elif len(have_csvs) == len(SPLITS) and (folder / "images").is_dir():
        splits = {split: _from_csv(folder, path, split, image_size) for split, path in csvs.items()}
    else:
        raise FileNotFoundError(_missing(folder, have_pickles, have_csvs, download))
    check_counts(_FN, splits, {k: len(v) for k, v in CLASSES.items()}, str(folder))
    return splits


def _missing(folder: Path, have_pickles: list[str], have_csvs: list[str], download: bool) -> str:
    url = (" There is no stable public URL for miniImageNet, so download=True cannot fetch it."
           if download else "")
    if have_pickles:
        lacking = [PICKLE.format(split=s) for s in SPLITS if PICKLE.format(split=s) not in have_pickles]
        return (f"{_FN}: {folder} lacks {', '.join(lacking)} (it has {', '.join(have_pickles)}); put all of "
                f"{_WHERE_PICKLES} there.{url}")
    if have_csvs:
        lacking = [f"{s}.csv" for s in SPLITS if f"{s}.csv" not in have_csvs]
        if not (folder / "images").is_dir():
            lacking.append("images/")
        return f"{_FN}: {folder} lacks {', '.join(lacking)}; put {_WHERE_CSVS} there.{url}"
    return (f"{_FN}: {folder} holds no miniImageNet release; put {_WHERE_PICKLES} there, or the raw images "
            f"as images/<filename> with {_WHERE_CSVS}, or pass source=<folder holding them>.{url}")


def _wrong_classes(origin: str, split: str, found: set[str]) -> str | None:
    want = set(CLASSES[split])
    if found == want:
        return None
    for other in SPLITS:
        if other != split and found == set(CLASSES[other]):
            return (f"{_FN}: {origin} holds the {other} classes of Ravi & Larochelle's split, not the {split} "
                    f"ones; the files were renamed or made from swapped split files. Rename them so that each "
                    f"split's file holds its own classes")
    extra, missing = sorted(found - want), sorted(want - found)
    return (f"{_FN}: {origin} does not hold the {len(want)} {split} classes of Ravi & Larochelle's split "
            f"(unexpected {extra[:3]}, missing {missing[:3]}); use an unmodified copy of the release")


def _from_pickle(path: Path, split: str, image_size: int) -> ImageClasses:
    remedy = f"Fetch it again: {_WHERE_PICKLES}."
    data = read_pickle(path, _FN, str(path), remedy)
    images, class_dict = (data.get("image_data"), data.get("class_dict")) if isinstance(data, dict) else (None, None)
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
            and images.shape[-1] == 3 and isinstance(class_dict, dict)):
        raise ValueError(f"{_FN}: {path} is not a miniImageNet cache of Ren et al.: expected a dict with "
                         "image_data ([N, 84, 84, 3] uint8) and class_dict ({wnid: [indices]}). " + remedy)
    class_dict = {k.decode() if isinstance(k, bytes) else str(k): v for k, v in class_dict.items()}
    problem = _wrong_classes(str(path), split, set(class_dict))
    if problem is not None:
        raise ValueError(problem)
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # [N, 3, H, W]
    names = sorted(class_dict)
    rows = [_rows(path, name, class_dict[name], len(pixels), remedy) for name in names]  # all checked first
    return stack_classes(names, [resize_images(pixels[r], image_size) for r in rows])


def _rows(path: Path, name: str, value: object, n_images: int, remedy: str) -> torch.Tensor:
    """``class_dict[name]`` as row indices into ``image_data``: :data:`IMAGES_PER_CLASS` ints in range."""
    entry = f"{_FN}: {path}: class_dict[{name!r}]"
    rows = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if rows is None or rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
        raise ValueError(f"{entry} is {describe(value)}, not a list of row indices into image_data. {remedy}")
    if len(rows) != IMAGES_PER_CLASS:
        raise ValueError(f"{entry} lists {len(rows)} images, not {IMAGES_PER_CLASS}. {remedy}")
    if rows.min() < 0 or rows.max() >= n_images:
        raise ValueError(f"{entry} has indices {rows.min()}..{rows.max()}, outside image_data's 0..{n_images - 1}. "
                         + remedy)
    return torch.from_numpy(rows.astype(np.int64))


def _from_csv(folder: Path, path: Path, split: str, image_size: int) -> ImageClasses:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{_FN}: {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                         f"{err.start}), so not one of Ravi & Larochelle's split files; use the files of "
                         "github.com/twitter-research/meta-learning-lstm (data/miniImagenet/)") from None
    rows = [row for row in csv.reader(io.StringIO(text)) if row]
    if not rows or [c.strip() for c in rows[0]] != CSV_HEADER or any(len(r) != 2 for r in rows[1:]):
        raise ValueError(f"{_FN}: {path} is not one of Ravi & Larochelle's split files: expected the header "
                         f"{','.join(CSV_HEADER)} and rows <filename>,<wnid>; use the files of "
                         "github.com/twitter-research/meta-learning-lstm (data/miniImagenet/)")
    files: dict[str, list[str]] = {}
    for filename, label in rows[1:]:
        files.setdefault(label.strip(), []).append(filename.strip())
    problem = _wrong_classes(str(path), split, set(files))
    if problem is not None:
        raise ValueError(problem)
    names = sorted(files)
    stacks = []
    for name in names:
        if len(files[name]) != IMAGES_PER_CLASS:
            raise ValueError(f"{_FN}: {path} lists {len(files[name])} images of class {name}, not "
                             f"{IMAGES_PER_CLASS}; use an unmodified copy of the split files")
        stack = torch.empty(len(files[name]), 3, image_size, image_size, dtype=torch.uint8)
        for j, filename in enumerate(files[name]):
            image = folder / "images" / filename
            if not image.is_file():
                raise FileNotFoundError(f"{_FN}: {path} lists {filename}, but {image} does not exist; put all "
                                        f"{IMAGES_PER_CLASS * len(CLASSES[split])} {split} images in "
                                        f"{folder / 'images'}")
            try:
                stack[j], _ = decode_image(image, image_size, "RGB")
            except Exception as exc:  # noqa: BLE001 - PIL fails in many ways on a damaged file; name it
                raise ValueError(f"{_FN}: cannot decode {image} ({checks.brief(exc)}); the copy is damaged, "
                                 "replace it with a good one") from exc
        stacks.append(stack)
    return stack_classes(names, stacks)
