"""Omniglot (Lake, Salakhutdinov & Tenenbaum, Science 2015): download, decode once, cache, split.

1623 handwritten characters from 50 alphabets, 20 drawings each (105×105 1-bit
PNGs), released as two archives: ``images_background.zip`` (30 alphabets, 964
characters) and ``images_evaluation.zip`` (20 alphabets, 659 characters).

Where the archives come from:

* ``download``: the official release URLs, each archive checked against the md5
  sum that torchvision's ``Omniglot`` uses. The download lands in a temporary
  folder and is moved into ``root`` only once its checksum matches.
* ``source``: an offline copy, a folder holding the two zips or their extracted
  trees (``images_background/<alphabet>/<character>/*.png``). Re-packed copies
  have other md5 sums than the official archives, so an offline source is
  trusted by its layout and counts (30/20 alphabets, 964/659 characters, 20
  drawings each), not by checksum. :func:`download_omniglot` records the md5 of
  the copies it makes into ``root`` in ``omniglot_trusted.json`` so later loads
  accept them.
* An archive found in ``root`` must match the official md5 or that record; if
  it matches neither, loading stops with an error and the file is left alone.

Decoding: each drawing is converted to grayscale, resized with LANCZOS to
``image_size`` and inverted so that strokes are bright (255) on a dark (0)
background, the MAML convention. All 32 460 drawings are decoded once into
``[1623, 20, 1, image_size, image_size]`` uint8 and cached in ``root`` as
``omniglot_<image_size>px.pt``; a second load reads only that file.
Classes are ordered background first (sorted ``alphabet/character`` names),
then evaluation; drawings by file name.

Splits (:func:`omniglot_splits`; all seeded, reproducible for a given torch
version, from sorted names so that the storage order does not matter):

* ``"maml"`` (Finn et al. 2017; Santoro et al. 2016): the 1623 characters are
  shuffled; the first 1200 are meta-training characters and the last 423 the
  meta-test set. 100 of the 1200 are held out for validation: train 1100,
  val 100, test 423.
* ``"lake"`` (alias ``"background"``): Lake et al.'s split, train on the
  background set and test on the evaluation set; 100 background characters are
  held out for validation: train 864, val 100, test 659.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from maml_func import checks
from maml_func.atomic import WriteError, atomic_write
from maml_func.data._files import existing_folder, fetch
from maml_func.data._files import md5 as _md5
from maml_func.data._io import decode_image, inspect_cache, write_cache
from maml_func.data.classes import ImageClasses

__all__ = ["download_omniglot", "load_omniglot", "omniglot_splits"]

URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
# (alphabets, characters) of each part of the official release; every character has _DRAWINGS drawings.
_LAYOUT = {"images_background": (30, 964), "images_evaluation": (20, 659)}
_DRAWINGS = 20
_TRUSTED = "omniglot_trusted.json"
_HOLDS = "images_background.zip and images_evaluation.zip (or their extracted folders)"

MAML_TRAIN, MAML_VAL = 1200, 100
LAKE_VAL = 100
SPLITS = ("maml", "lake", "background")

# A character: its name "alphabet/character" and its drawings (zip member names or file paths), sorted.
_Characters = list[tuple[str, list]]


def download_omniglot(root: str | Path, *, source: str | Path | None = None) -> Path:
    """Put the two Omniglot archives in ``root`` and return ``root``.

    Without ``source``, each archive missing from ``root`` is downloaded from the
    official release and checked against its md5 sum; an archive already there
    must match it (or a copy recorded by an earlier call with ``source``). With
    ``source`` (a folder holding ``images_background.zip`` and
    ``images_evaluation.zip``, or their extracted folders), the archives are
    checked by layout and counts and copied into ``root``; their md5 sums are
    recorded in ``root/omniglot_trusted.json``.

    Nothing already in ``root`` is overwritten or deleted.

    Raises:
        FileNotFoundError: ``source`` lacks an archive.
        ValueError: an archive fails its check (checksum, layout or counts), or
            ``root`` holds a different file under an archive's name.
        ConnectionError: the download failed (offline?); pass ``source``.

    Example:
        >>> root = download_omniglot("data/omniglot", source="/path/to/omniglot_zips")  # doctest: +SKIP
    """
    root = Path(root).expanduser()
    if source is not None:
        src = existing_folder(source, "download_omniglot", "source", _HOLDS)
        root.mkdir(parents=True, exist_ok=True)
        for part in _LAYOUT:
            location = _find_part(src, part)
            if location is None:
                raise FileNotFoundError(f"download_omniglot: source {src} holds neither {part}.zip nor a {part}/ "
                                        "folder; pass the folder that holds the two Omniglot archives")
            _characters(location, part)
            _copy_into(location, root / location.name, root)
        return root
    root.mkdir(parents=True, exist_ok=True)
    for part in _LAYOUT:
        location = _find_part(root, part)
        if location is None:
            _download(part, root)
        elif location.suffix == ".zip":
            _check_md5(location, root, "download_omniglot")
        else:
            _characters(location, part)
    return root


def load_omniglot(
    root: str | Path,
    *,
    image_size: int = 28,
    download: bool = False,
    source: str | Path | None = None,
) -> ImageClasses:
    """All 1623 Omniglot characters, ``[1623, 20, 1, image_size, image_size]`` uint8, cached in ``root``.

    Args:
        root: where the archives and the decoded cache live (created if needed).
        image_size: side of the square images (28 for MAML, 105 for the originals).
        download: fetch the official archives into ``root`` if they are missing.
        source: an offline folder holding the archives or their extracted trees;
            decoded straight from there (nothing is copied), the cache goes to
            ``root``.

    Returns:
        :class:`ImageClasses` with the 964 background characters first, then the
        659 evaluation ones; names ``"alphabet/character"``.

    Raises:
        FileNotFoundError: no archives in ``root`` and neither ``download`` nor ``source``.
        ValueError: an archive fails its checksum, layout or counts.

    Example:
        >>> omniglot = load_omniglot("data/omniglot", source="/path/to/omniglot_zips")  # doctest: +SKIP
        >>> omniglot.images.shape  # doctest: +SKIP
        torch.Size([1623, 20, 1, 28, 28])
    """
    checks.integer("load_omniglot", "image_size", image_size, minimum=1, expect="a positive int")
    root = Path(root).expanduser()
    cache = root / f"omniglot_{image_size}px.pt"
    meta = {"dataset": "omniglot", "image_size": image_size, "layout": [list(v) for v in _LAYOUT.values()]}
    cached, damage = inspect_cache(cache, meta)
    if cached is not None:
        return cached

    if source is not None:
        folder = existing_folder(source, "load_omniglot", "source", _HOLDS)
    else:
        folder = root
        if any(_find_part(root, part) is None for part in _LAYOUT):
            if not download:
                found = (f"only the cache {cache}, which is {damage}" if damage is not None else "no Omniglot data "
                         "(expected images_background.zip and images_evaluation.zip, their extracted folders, or a "
                         "cache omniglot_<size>px.pt)")
                raise FileNotFoundError(
                    f"load_omniglot: {root} holds {found}; pass download=True to fetch the official archives, or "
                    "source=<folder holding them>")
            download_omniglot(root)
    if damage is not None:
        warnings.warn(f"the cache {cache} is {damage}, so it is rebuilt from the source images.", stacklevel=2)

    parts = []
    for part in _LAYOUT:
        location = _find_part(folder, part)
        if location is None:
            raise FileNotFoundError(f"load_omniglot: {folder} holds neither {part}.zip nor a {part}/ folder; "
                                    "pass the folder that holds the two Omniglot archives")
        if source is None and location.suffix == ".zip":
            _check_md5(location, root, "load_omniglot")
        parts.append((location, _characters(location, part)))

    classes = _decode(parts, image_size)
    write_cache(cache, classes, meta)
    return classes


def omniglot_splits(classes: ImageClasses, split: str = "maml", seed: int = 0) -> dict[str, ImageClasses]:
    """Split the 1623 characters of :func:`load_omniglot` into ``"train"``, ``"val"`` and ``"test"``.

    ``"maml"``: 1100 / 100 / 423 characters drawn from all 1623 (the 1200
    meta-training characters of MAML minus 100 held out for validation).
    ``"lake"`` (or ``"background"``): 864 / 100 background characters, and the
    659 evaluation characters as the test set. Seeded by ``seed``; each split is
    in storage order.

    Example:
        >>> splits = omniglot_splits(load_omniglot("data/omniglot"))  # doctest: +SKIP
        >>> {k: len(v) for k, v in splits.items()}  # doctest: +SKIP
        {'train': 1100, 'val': 100, 'test': 423}
    """
    checks.choice("omniglot_splits", "split", split, SPLITS)
    n_background = _LAYOUT["images_background"][1]
    expected = sum(c for _, c in _LAYOUT.values())
    if len(classes) != expected:
        raise ValueError(f"omniglot_splits: expected the {expected} characters of load_omniglot, "
                         f"got {len(classes)} classes")
    generator = torch.Generator().manual_seed(seed)
    if split == "maml":
        # Shuffle sorted names, not storage positions, so the split depends only on the seed.
        pool = sorted(range(len(classes)), key=lambda i: classes.names[i])
        order = [pool[i] for i in torch.randperm(len(pool), generator=generator).tolist()]
        train, val, test = order[:MAML_TRAIN - MAML_VAL], order[MAML_TRAIN - MAML_VAL:MAML_TRAIN], order[MAML_TRAIN:]
    else:
        pool = sorted(range(n_background), key=lambda i: classes.names[i])
        order = [pool[i] for i in torch.randperm(len(pool), generator=generator).tolist()]
        val, train, test = order[:LAKE_VAL], order[LAKE_VAL:], list(range(n_background, len(classes)))
    return {name: classes.subset(sorted(rows)) for name, rows in (("train", train), ("val", val), ("test", test))}


def _find_part(folder: Path, part: str) -> Path | None:
    """``folder/part.zip`` if it exists, else the extracted ``folder/part/``, else ``None``."""
    for candidate in (folder / f"{part}.zip", folder / part):
        if candidate.exists():
            return candidate
    return None


def _characters(location: Path, part: str) -> _Characters:
    """The characters of one part, checked against the official layout and counts."""
    drawings: dict[str, list] = {}
    if location.suffix == ".zip":
        try:
            with zipfile.ZipFile(location) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile as exc:
            raise ValueError(f"Omniglot: {location} is not a readable zip archive ({checks.brief(exc)}); "
                             "re-download it "
                             "(download=True into an empty root) or point source at a good copy") from exc
        for name in names:
            bits = name.split("/")
            if len(bits) == 4 and bits[0] == part and bits[3].endswith(".png") and not bits[3].startswith("."):
                drawings.setdefault(f"{bits[1]}/{bits[2]}", []).append(name)
    else:
        for path in location.glob("*/*/*.png"):
            if not path.name.startswith("."):
                drawings.setdefault(f"{path.parent.parent.name}/{path.parent.name}", []).append(path)
    n_alphabets, n_characters = _LAYOUT[part]
    found_alphabets = len({name.split("/")[0] for name in drawings})
    odd = sorted(name for name, files in drawings.items() if len(files) != _DRAWINGS)
    if found_alphabets != n_alphabets or len(drawings) != n_characters or odd:
        detail = f"; characters without {_DRAWINGS} drawings: {odd[:3]}" if odd else ""
        raise ValueError(
            f"Omniglot: {location} does not have the layout of the official {part}: expected "
            f"{part}/<alphabet>/<character>/*.png with {n_alphabets} alphabets, {n_characters} characters and "
            f"{_DRAWINGS} drawings each, found {found_alphabets} alphabets and {len(drawings)} characters"
            f"{detail}; use the official archives (download=True) or a complete copy")
    return [(name, sorted(drawings[name], key=str)) for name in sorted(drawings)]


def _decode(parts: list[tuple[Path, _Characters]], image_size: int) -> ImageClasses:
    n_classes = sum(len(chars) for _, chars in parts)
    images = torch.empty(n_classes, _DRAWINGS, 1, image_size, image_size, dtype=torch.uint8)
    names: list[str] = []
    for location, characters in parts:
        with contextlib.ExitStack() as stack:
            archive = stack.enter_context(zipfile.ZipFile(location)) if location.suffix == ".zip" else None
            for name, files in characters:
                row = len(names)
                for j, file in enumerate(files):
                    try:
                        data = archive.read(file) if archive is not None else Path(file).read_bytes()
                        images[row, j], _ = decode_image(data, image_size, "L", invert=True)
                    except Exception as exc:  # noqa: BLE001 - PIL and zipfile fail in many ways; name the file
                        raise ValueError(f"Omniglot: cannot decode {file} in {location} ({checks.brief(exc)}); "
                                         "the copy is "
                                         "damaged, re-download it or point source at a good copy") from exc
                names.append(name)
    return ImageClasses(images, torch.full((n_classes,), _DRAWINGS, dtype=torch.int64), names)


def _trusted(root: Path) -> dict[str, str]:
    try:
        record = json.loads((root / _TRUSTED).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _check_md5(archive: Path, root: Path, fn: str) -> None:
    """An archive in ``root`` must match the official md5, or the one recorded when it was copied from a source."""
    part = archive.name.removesuffix(".zip")
    md5 = _md5(archive)
    if md5 != MD5[part] and md5 != _trusted(root).get(archive.name):
        raise ValueError(
            f"{fn}: {archive} has md5 {md5}, not the official {MD5[part]}; it was left untouched. If it is a "
            "complete offline copy (re-packed archives have other checksums), pass its folder as source=; "
            "otherwise delete it and load again with download=True")


def _download(part: str, root: Path) -> None:
    # The file reaches root only once its md5 matches, so a failed or corrupted download never leaves anything.
    filename = f"{part}.zip"
    fetch(URL + filename, MD5[part], root, filename, "download_omniglot",
          "without internet, pass source=<folder holding images_background.zip and images_evaluation.zip>")


def _copy_into(location: Path, dest: Path, root: Path) -> None:
    """Copy a verified source archive (zip or tree) to ``dest`` in ``root`` without overwriting anything."""
    if dest.exists():
        if dest.resolve() == location.resolve() or (
            dest.is_file() and location.is_file() and _md5(dest) == _md5(location)
        ):
            if location.is_file():
                _record(root, dest.name, _md5(dest))
            return
        if dest.is_dir() and location.is_dir():
            _characters(dest, dest.name)
            return
        raise ValueError(f"download_omniglot: {dest} already exists and differs from {location}; it was left "
                         "untouched. Move it away or choose another root")
    with tempfile.TemporaryDirectory(dir=root, prefix=".copy-") as tmp:
        staged = Path(tmp) / dest.name
        try:
            if location.is_dir():
                shutil.copytree(location, staged)
            else:
                shutil.copyfile(location, staged)
        except OSError as exc:  # a full disk; the temporary folder goes, so nothing is left
            raise WriteError(dest, exc, location.stat().st_size if location.is_file() else None) from exc
        os.replace(staged, dest)
    if location.is_file():
        _record(root, dest.name, _md5(dest))


def _record(root: Path, name: str, md5: str) -> None:
    record = _trusted(root)
    record[name] = md5
    atomic_write(root / _TRUSTED, json.dumps(record, indent=1, sort_keys=True))
