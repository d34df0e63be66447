"""The benchmark loaders on small synthetic releases written in the exact published formats.

Each release is written as researchers hold it (the same file names, archive
layout, pickle keys, CSV columns and image encodings), only with a few tiny
classes; the loaders' published counts and class lists are monkeypatched to the
synthetic ones, and the real lists are checked by their counts. Nothing is
downloaded: a download is served from a ``file://`` URL.
"""

from __future__ import annotations

import csv
import hashlib
import io
import pickle
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import forbid, run, serve, snapshot
from PIL import Image

from maml_func.checkpoint import load_checkpoint
from maml_func.cli import _offline_hint
from maml_func.config import make_config
from maml_func.data import DATASETS, cifar, cub, load_dataset, miniimagenet, tieredimagenet
from maml_func.data import _files as files_module
from maml_func.tasks import EpisodeSampler

MINI = {"train": ("n01532829", "n01558993", "n01704323", "n01749939", "n01770081"),
        "val": ("n01855672", "n02091244", "n02114548", "n02138441", "n02174001"),
        "test": ("n01930112", "n01981276", "n02099601", "n02110063", "n02110341")}
MINI_PER_CLASS = 16  # 1 shot + 15 queries: the miniImageNet presets' tasks
CIFAR_FINE = ["apple", "bed", "bee", "camel", "dolphin", "fox", "otter", "rose"]
CIFAR_COARSE = ["fruit_and_vegetables", "household_furniture", "insects", "large_omnivores_and_herbivores"]
CIFAR_SUPER = [0, 1, 2, 3, 0, 1, 3, 2]  # the superclass of each fine class: two each
CUB_SPECIES = [f"{i:03d}.Bird_{i}" for i in range(1, 9)]


def noise(seed: int, size: int = 84, mode: str = "RGB") -> Image.Image:
    pixels = torch.randint(0, 256, (size, size, 3 if mode == "RGB" else 1),
                           generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).numpy()
    return Image.fromarray(pixels if mode == "RGB" else pixels[:, :, 0], mode=mode)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class RunsCode:
    """A pickle that would call a function when loaded: what the loaders' unpickler must refuse."""

    def __reduce__(self) -> tuple:
        return print, ("a pickle ran code",)


def forbid_building(monkeypatch: pytest.MonkeyPatch) -> None:
    builders = [(module, "_build") for module in (miniimagenet, tieredimagenet, cub)]
    forbid(monkeypatch, *builders, (cifar, "_read_cifar100"))


def test_real_class_lists_have_the_published_counts() -> None:
    def disjoint_counts(lists: dict[str, tuple[str, ...]]) -> dict[str, int]:
        assert len(set().union(*lists.values())) == sum(map(len, lists.values())), "splits overlap"
        return {k: len(v) for k, v in lists.items()}

    assert disjoint_counts(miniimagenet.CLASSES) == {"train": 64, "val": 16, "test": 20}
    assert all(len(w) == 9 and w.startswith("n") for w in sum(map(list, miniimagenet.CLASSES.values()), []))
    assert disjoint_counts(cifar.CIFAR_FS_CLASSES) == {"train": 64, "val": 16, "test": 20}
    assert disjoint_counts(cifar.FC100_SUPERCLASSES) == {"train": 12, "val": 4, "test": 4}
    assert (cifar.IMAGES_PER_CLASS, cifar.CLASSES_PER_SUPERCLASS, miniimagenet.IMAGES_PER_CLASS) == (600, 5, 600)
    assert tieredimagenet.CLASS_COUNTS == {"train": 351, "val": 97, "test": 160}
    assert tieredimagenet.CATEGORY_COUNTS == {"train": 20, "val": 6, "test": 8}
    chen = [cub.cub_split(i) for i in range(cub.N_CLASSES)]
    assert {s: chen.count(s) for s in ("train", "val", "test")} == cub.CLASS_COUNTS == {"train": 100, "val": 50,
                                                                                        "test": 50}
    assert [i + 1 for i, s in enumerate(chen) if s == "val"][:3] == [2, 6, 10]  # 002, 006, 010 (torchmeta's list)
    assert [i + 1 for i, s in enumerate(chen) if s == "test"][-2:] == [196, 200]
    assert DATASETS == ("omniglot", "miniimagenet", "tieredimagenet", "cifarfs", "fc100", "cub")


# ---------------------------------------------------------------- miniImageNet


@pytest.fixture
def mini_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(miniimagenet, "CLASSES", MINI)
    monkeypatch.setattr(miniimagenet, "IMAGES_PER_CLASS", MINI_PER_CLASS)


@pytest.fixture(scope="module")
def mini_release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both layouts: Ravi & Larochelle's images/ + CSVs, and Ren et al.'s pickles made from the same JPEGs."""
    raw, pickles = tmp_path_factory.mktemp("mini_raw"), tmp_path_factory.mktemp("mini_pkl")
    (raw / "images").mkdir()
    for s, (split, wnids) in enumerate(MINI.items()):
        rows, pixels, class_dict = [["filename", "label"]], [], {}
        for c, wnid in enumerate(wnids):
            for j in range(MINI_PER_CLASS):
                name = f"{wnid}{j + 1:08d}.jpg"
                (raw / "images" / name).write_bytes(encoded(noise(1000 * s + 100 * c + j), "JPEG"))
                rows.append([name, wnid])
                class_dict.setdefault(wnid, []).append(len(pixels))
                with Image.open(raw / "images" / name) as im:
                    pixels.append(np.asarray(im.convert("RGB")))
        with (raw / f"{split}.csv").open("w", newline="") as f:
            csv.writer(f).writerows(rows)
        data = {"image_data": np.stack(pixels), "class_dict": class_dict}
        (pickles / f"mini-imagenet-cache-{split}.pkl").write_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
    return {"raw": raw, "pickles": pickles}


@pytest.mark.usefixtures("mini_lists")
def test_miniimagenet_both_layouts_give_the_same_splits(mini_release: dict[str, Path], tmp_path: Path) -> None:
    before = snapshot(mini_release["raw"])
    raw = load_dataset("miniimagenet", root=tmp_path / "a", image_size=84, source=mini_release["raw"])
    pkl = load_dataset("miniimagenet", root=tmp_path / "b", image_size=84, source=mini_release["pickles"])
    for split in ("train", "val", "test"):
        assert raw[split].images.shape == (5, MINI_PER_CLASS, 3, 84, 84) and raw[split].images.dtype == torch.uint8
        assert raw[split].names == list(MINI[split]) == pkl[split].names
        assert torch.equal(raw[split].images, pkl[split].images)
    assert snapshot(mini_release["raw"]) == before, "the source must not be modified"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [f"miniimagenet_{s}_84px.pt"
                                                                  for s in ("test", "train", "val")]
    small = load_dataset("miniimagenet", root=tmp_path / "b", image_size=16, source=mini_release["pickles"])
    assert small["test"].images.shape == (5, MINI_PER_CLASS, 3, 16, 16)
    batch = EpisodeSampler(small["train"], 5, 1, 15).sample(2, torch.Generator().manual_seed(0))
    assert batch.x_query.shape == (2, 75, 3, 16, 16)


@pytest.mark.usefixtures("mini_lists")
def test_miniimagenet_second_load_reads_the_cache(mini_release: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_dataset("miniimagenet", root=tmp_path, image_size=32, source=mini_release["pickles"])
    forbid_building(monkeypatch)
    start = time.perf_counter()
    again = load_dataset("miniimagenet", root=tmp_path, image_size=32)  # no source needed any more
    assert time.perf_counter() - start < 0.5
    assert all(torch.equal(first[s].images, again[s].images) for s in first)


@pytest.mark.usefixtures("mini_lists")
def test_miniimagenet_missing_files_are_named_with_where_to_get_them(mini_release: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    for split in ("train", "test"):
        name = f"mini-imagenet-cache-{split}.pkl"
        (partial / name).write_bytes((mini_release["pickles"] / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=r"lacks mini-imagenet-cache-val\.pkl.*renmengye/few-shot-ssl-public"):
        load_dataset("miniimagenet", root=tmp_path / "root", source=partial)
    csvs = tmp_path / "csvs"
    csvs.mkdir()
    (csvs / "train.csv").write_text("filename,label\n")
    with pytest.raises(FileNotFoundError, match=r"lacks val\.csv, test\.csv, images/.*meta-learning-lstm"):
        load_dataset("miniimagenet", root=tmp_path / "root", source=csvs)
    with pytest.raises(FileNotFoundError, match=r"no miniImageNet release.*no stable public URL"):
        load_dataset("miniimagenet", root=tmp_path / "empty", download=True)


@pytest.mark.usefixtures("mini_lists")
def test_miniimagenet_bad_files_are_refused_clearly(mini_release: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for split in ("train", "val", "test"):
        name = f"mini-imagenet-cache-{split}.pkl"
        (bad / name).write_bytes((mini_release["pickles"] / name).read_bytes())
    data = (bad / "mini-imagenet-cache-val.pkl").read_bytes()
    (bad / "mini-imagenet-cache-val.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*val\.pkl .*truncated"):
        load_dataset("miniimagenet", root=tmp_path / "root", source=bad)
    (bad / "mini-imagenet-cache-val.pkl").write_bytes((mini_release["pickles"] / "mini-imagenet-cache-test.pkl")
                                                      .read_bytes())
    with pytest.raises(ValueError, match="holds the test classes .* not the val ones"):
        load_dataset("miniimagenet", root=tmp_path / "root", source=bad)
    (bad / "mini-imagenet-cache-val.pkl").write_bytes(pickle.dumps(RunsCode()))
    with pytest.raises(ValueError, match="refusing to construct builtins.print"):
        load_dataset("miniimagenet", root=tmp_path / "root", source=bad)
    assert not (tmp_path / "root").exists() or not list((tmp_path / "root").glob("*.pt"))


# ---------------------------------------------------------------- tieredImageNet


def write_tiered(folder: Path) -> dict[str, list[int]]:
    """Ren et al.'s six files: PNG bytes as uint8 arrays (cv2.imencode's [n, 1]) and the label dicts."""
    layout = {"train": [3, 2, 4], "val": [2, 3], "test": [3, 2]}  # images per class
    folder.mkdir(parents=True)
    for s, (split, counts) in enumerate(layout.items()):
        specific = np.repeat(np.arange(len(counts)), counts)[::-1].copy()  # images of a class need not be together
        images = [np.frombuffer(encoded(noise(100 * s + i), "PNG"), dtype=np.uint8).reshape(-1, 1)
                  for i in range(len(specific))]
        labels = {"label_specific": specific.astype(np.int32), "label_general": np.zeros(len(specific), np.int32),
                  "label_specific_str": [f"n0{s}00000{c}" for c in range(len(counts))],
                  "label_general_str": ["n09999999"]}
        (folder / f"{split}_images_png.pkl").write_bytes(pickle.dumps(images, protocol=pickle.HIGHEST_PROTOCOL))
        (folder / f"{split}_labels.pkl").write_bytes(pickle.dumps(labels, protocol=pickle.HIGHEST_PROTOCOL))
    return layout


def test_tieredimagenet_from_the_release_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tieredimagenet, "CLASS_COUNTS", {"train": 3, "val": 2, "test": 2})
    monkeypatch.setattr(tieredimagenet, "CATEGORY_COUNTS", {"train": 1, "val": 1, "test": 1})
    layout = write_tiered(tmp_path / "source" / "tiered-imagenet")  # where the tar unpacks
    splits = load_dataset("tieredimagenet", root=tmp_path / "root", image_size=20, source=tmp_path / "source")
    assert {k: v.counts.tolist() for k, v in splits.items()} == layout
    assert splits["train"].images.shape == (3, 4, 3, 20, 20) and splits["val"].names == ["n01000000", "n01000001"]
    assert splits["train"].images[1, 2:].eq(0).all() and splits["train"].images[1, :2].ne(0).any(), "padding"

    (tmp_path / "source" / "tiered-imagenet" / "val_labels.pkl").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks val_labels\.pkl.*tiered-imagenet\.tar"):
        load_dataset("tieredimagenet", root=tmp_path / "other", source=tmp_path / "source")
    write_tiered(tmp_path / "two")
    images = tmp_path / "two" / "test_images_png.pkl"
    images.write_bytes(images.read_bytes()[:-200])
    with pytest.raises(ValueError, match=r"cannot read .*test_images_png\.pkl.*truncated"):
        load_dataset("tieredimagenet", root=tmp_path / "other", source=tmp_path / "two")
    monkeypatch.setattr(tieredimagenet, "CLASS_COUNTS", {"train": 351, "val": 97, "test": 160})
    write_tiered(tmp_path / "three")
    with pytest.raises(ValueError, match="names 3 classes in 1 categories, not the published 351 in 1"):
        load_dataset("tieredimagenet", root=tmp_path / "other", source=tmp_path / "three")


# ---------------------------------------------------------------- CIFAR-FS and FC100


def cifar_members(per_class: tuple[int, int] = (5, 1)) -> dict[str, bytes]:
    """cifar-100-python/{train,test,meta,file.txt~}: Python-2-style pickles with the official keys."""
    members = {}
    for part, n in zip(("train", "test"), per_class):
        fine = np.repeat(np.arange(len(CIFAR_FINE)), n)
        data = np.stack([np.asarray(noise(7 * i + n, 32)).transpose(2, 0, 1).reshape(-1) for i in range(len(fine))])
        batch = {"filenames": [f"img_{i}.png" for i in range(len(fine))], "batch_label": f"{part} batch",
                 "fine_labels": fine.tolist(), "coarse_labels": [CIFAR_SUPER[f] for f in fine], "data": data}
        # The release was pickled by Python 2 with numpy 1, whose arrays name numpy.core (numpy 2: numpy._core).
        members[f"cifar-100-python/{part}"] = pickle.dumps(batch, protocol=2).replace(b"numpy._core", b"numpy.core")
    members["cifar-100-python/meta"] = pickle.dumps({"fine_label_names": CIFAR_FINE,
                                                     "coarse_label_names": CIFAR_COARSE}, protocol=2)
    members["cifar-100-python/file.txt~"] = b""
    return members


@pytest.fixture
def cifar_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(cifar, "CIFAR_FS_CLASSES", {"train": ("apple", "bed", "bee", "camel"), "val": ("dolphin",
                                                    "fox"), "test": ("otter", "rose")})
    monkeypatch.setattr(cifar, "FC100_SUPERCLASSES", {"train": tuple(CIFAR_COARSE[:2]), "val": (CIFAR_COARSE[2],),
                                                      "test": (CIFAR_COARSE[3],)})
    monkeypatch.setattr(cifar, "IMAGES_PER_CLASS", 6)
    monkeypatch.setattr(cifar, "CLASSES_PER_SUPERCLASS", 2)
    (tmp_path / "source").mkdir()
    archive = tar_gz(tmp_path / "source" / cifar.ARCHIVE, cifar_members())
    monkeypatch.setattr(cifar, "MD5", {**cifar.MD5, cifar.ARCHIVE: md5_of(archive)})
    return tmp_path / "source"


def test_cifarfs_and_fc100_from_the_official_archive(cifar_release: Path, tmp_path: Path) -> None:
    before = snapshot(cifar_release)
    fs = load_dataset("cifarfs", root=tmp_path / "root", image_size=32, source=cifar_release)
    assert {k: v.names for k, v in fs.items()} == {"train": ["apple", "bed", "bee", "camel"],
                                                   "val": ["dolphin", "fox"], "test": ["otter", "rose"]}
    assert fs["train"].images.shape == (4, 6, 3, 32, 32) and fs["train"].counts.tolist() == [6] * 4
    # Row-major CHW bytes: the first training image of "apple" is noise(5) as stored.
    assert torch.equal(fs["train"].images[0, 0], torch.from_numpy(np.array(noise(5, 32))).permute(2, 0, 1))
    fc = load_dataset("fc100", root=tmp_path / "root", image_size=16, source=cifar_release)
    assert fc["train"].names == ["fruit_and_vegetables/apple", "fruit_and_vegetables/dolphin",
                                 "household_furniture/bed", "household_furniture/fox"]
    assert fc["test"].names == ["large_omnivores_and_herbivores/camel", "large_omnivores_and_herbivores/otter"]
    assert fc["val"].images.shape == (2, 6, 3, 16, 16)
    assert snapshot(cifar_release) == before


def test_cifar_extracted_folder_is_checked_file_by_file(cifar_release: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "extracted" / cifar.FOLDER
    folder.mkdir(parents=True)
    for name, data in cifar_members().items():
        (folder / name.split("/")[1]).write_bytes(data)
    monkeypatch.setattr(cifar, "MD5", {**cifar.MD5, **{p: md5_of(folder / p) for p in ("train", "test", "meta")}})
    fs = load_dataset("cifarfs", root=tmp_path / "root", image_size=32, source=folder.parent)
    assert len(fs["train"]) == 4
    (folder / "test").write_bytes(b"not the official test batch")
    with pytest.raises(ValueError, match=r"test has md5 [0-9a-f]{32}, not the official.*left untouched"):
        load_dataset("fc100", root=tmp_path / "root2", source=folder.parent)
    assert (folder / "test").read_bytes() == b"not the official test batch"


def test_cifar_wrong_checksum_truncation_and_download(cifar_release: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      request: pytest.FixtureRequest) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / cifar.ARCHIVE).write_bytes(b"an unofficial archive")
    with pytest.raises(ValueError, match=r"has md5 [0-9a-f]{32}, not the official.*left untouched.*download=True"):
        load_dataset("cifarfs", root=root, download=True)
    assert (root / cifar.ARCHIVE).read_bytes() == b"an unofficial archive"

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    data = (cifar_release / cifar.ARCHIVE).read_bytes()
    (truncated / cifar.ARCHIVE).write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(cifar, "MD5", {**cifar.MD5, cifar.ARCHIVE: md5_of(truncated / cifar.ARCHIVE)})
    with pytest.raises(ValueError, match="is not a readable tar archive.*truncated"):
        load_dataset("cifarfs", root=tmp_path / "r", source=truncated)

    with pytest.raises(FileNotFoundError, match=r"neither cifar-100-python\.tar\.gz nor.*download=True"):
        load_dataset("fc100", root=tmp_path / "empty")
    monkeypatch.setattr(cifar, "MD5", {**cifar.MD5, cifar.ARCHIVE: md5_of(cifar_release / cifar.ARCHIVE)})
    monkeypatch.setattr(cifar, "URL", serve(cifar_release, request) + cifar.ARCHIVE)
    fc = load_dataset("fc100", root=tmp_path / "fetched", download=True)
    assert len(fc["val"]) == 2 and (tmp_path / "fetched" / cifar.ARCHIVE).is_file()
    monkeypatch.setattr(cifar, "URL", (tmp_path / "nowhere.tar.gz").as_uri())
    with pytest.raises(ConnectionError, match="could not download.*source="):
        load_dataset("fc100", root=tmp_path / "offline", download=True)


# ---------------------------------------------------------------- CUB-200-2011


def cub_members() -> dict[str, bytes]:
    members = {"attributes.txt": b"1 has_bill_shape::curved\n", "CUB_200_2011/README": b"CUB-200-2011\n"}
    for c, species in enumerate(CUB_SPECIES):
        for j in range(2 + c % 3):  # 2 to 4 photographs per species
            mode = "L" if j == 1 else "RGB"  # a few CUB photographs are grayscale
            name = f"{species.split('.')[1]}_{j + 1:04d}_{100 + c}.jpg"
            members[f"CUB_200_2011/images/{species}/{name}"] = encoded(noise(31 * c + j, 40, mode), "JPEG")
    members["CUB_200_2011/images.txt"] = b"1 001.Bird_1/Bird_1_0001_100.jpg\n"
    return members


@pytest.fixture
def cub_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    members = cub_members()
    monkeypatch.setattr(cub, "N_CLASSES", len(CUB_SPECIES))
    monkeypatch.setattr(cub, "N_IMAGES", sum(n.endswith(".jpg") for n in members))
    monkeypatch.setattr(cub, "CLASS_COUNTS", {"train": 4, "val": 2, "test": 2})
    (tmp_path / "source").mkdir()
    archive = tar_gz(tmp_path / "source" / cub.ARCHIVE, members)
    monkeypatch.setattr(cub, "MD5", md5_of(archive))
    return tmp_path / "source"


def test_cub_from_the_archive_and_the_extracted_folder_with_chens_split(cub_release: Path, tmp_path: Path) -> None:
    splits = load_dataset("cub", root=tmp_path / "a", image_size=24, source=cub_release)
    assert {k: v.names for k, v in splits.items()} == {
        "train": ["001.Bird_1", "003.Bird_3", "005.Bird_5", "007.Bird_7"],
        "val": ["002.Bird_2", "006.Bird_6"], "test": ["004.Bird_4", "008.Bird_8"]}
    assert splits["train"].counts.tolist() == [2, 4, 3, 2] and splits["train"].images.shape == (4, 4, 3, 24, 24)
    gray = splits["train"].images[0, 1].float()  # the grayscale photograph, converted to RGB
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    with tarfile.open(cub_release / cub.ARCHIVE) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    again = load_dataset("cub", root=tmp_path / "b", image_size=24, source=tmp_path / "extracted")
    assert all(torch.equal(splits[s].images, again[s].images) for s in splits)


def test_cub_wrong_checksum_truncation_and_missing_archive(cub_release: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cub, "MD5", "0" * 32)
    before = snapshot(cub_release)
    with pytest.raises(ValueError, match=r"has md5 [0-9a-f]{32}, not the official 0{32}; it was left untouched"):
        load_dataset("cub", root=tmp_path / "root", source=cub_release)
    assert snapshot(cub_release) == before
    data = (cub_release / cub.ARCHIVE).read_bytes()
    (cub_release / cub.ARCHIVE).write_bytes(data[: len(data) * 2 // 3])
    monkeypatch.setattr(cub, "MD5", md5_of(cub_release / cub.ARCHIVE))
    with pytest.raises(ValueError, match="not a readable tar archive"):
        load_dataset("cub", root=tmp_path / "root", source=cub_release)
    with pytest.raises(FileNotFoundError, match=r"neither CUB_200_2011\.tgz nor.*download=True.*data\.caltech\.edu"):
        load_dataset("cub", root=tmp_path / "empty")


# ---------------------------------------------------------------- maml-func download


def test_download_command_copies_or_fetches_the_official_archive(cifar_release: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(cifar_release)
    code, out, err = run(["download", "--dataset", "cifarfs", "--root", str(tmp_path / "c"), "--source",
                          str(cifar_release)], capsys)
    assert code == 0, err
    assert out.startswith(f"cifarfs is ready at {tmp_path / 'c'}; train with: maml-func train --dataset cifarfs")
    assert snapshot(tmp_path / "c") == before and snapshot(cifar_release) == before
    assert len(load_dataset("cifarfs", root=tmp_path / "c")["train"]) == 4, "the loader reads it from root"

    fetched = []

    def fake_fetch(url: str, md5: str, root: Path, filename: str, fn: str, hint: str) -> Path:
        fetched.append((url, md5, fn))  # what a download would write, without a network
        root.mkdir(parents=True, exist_ok=True)
        (root / filename).write_bytes((cifar_release / filename).read_bytes())
        return root / filename

    monkeypatch.setattr(files_module, "fetch", fake_fetch)
    code, out, err = run(["download", "--dataset", "fc100", "--root", str(tmp_path / "f")], capsys)
    assert code == 0, err
    assert fetched == [(cifar.URL, cifar.MD5[cifar.ARCHIVE], "download_cifar100")]
    code, _, _ = run(["download", "--dataset", "fc100", "--root", str(tmp_path / "f")], capsys)
    assert code == 0 and len(fetched) == 1, "an archive already in root is checked, not fetched again"


def test_download_command_copies_cub(cub_release: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(["download", "--dataset", "cub", "--root", str(tmp_path / "b"), "--source",
                          str(cub_release)], capsys)
    assert code == 0 and out.startswith("cub is ready at"), err
    assert (tmp_path / "b" / cub.ARCHIVE).read_bytes() == (cub_release / cub.ARCHIVE).read_bytes()
    assert list(load_dataset("cub", root=tmp_path / "b", image_size=16)) == ["train", "val", "test"]


def test_download_command_failures_name_the_files(cifar_release: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object) -> None:
        raise ConnectionError("download_cifar100: could not download https://... (no network)")

    monkeypatch.setattr(files_module, "fetch", offline)
    code, out, err = run(["download", "--dataset", "fc100", "--root", str(tmp_path / "new")], capsys)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert ("Offline? Pass --source DIR (a folder holding cifar-100-python.tar.gz (or its extracted "
            "cifar-100-python/)), or copy them once with: maml-func download --dataset fc100 --root DATA_ROOT "
            "--source DIR") in err
    assert not (tmp_path / "new").exists(), "a failed download leaves no root"

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / cifar.ARCHIVE).write_bytes(b"an unofficial archive")
    code, _, err = run(["download", "--dataset", "cifarfs", "--root", str(tmp_path / "bad")], capsys)
    assert code == 2 and "not the official" in err and "left untouched" in err
    assert (tmp_path / "bad" / cifar.ARCHIVE).read_bytes() == b"an unofficial archive"
    code, _, err = run(["download", "--dataset", "cub", "--root", str(tmp_path / "r"), "--source",
                        str(cifar_release)], capsys)
    assert code == 2 and "has no CUB_200_2011.tgz" in err and not (tmp_path / "r").exists()
    code, _, err = run(["download", "--dataset", "cub", "--root", str(tmp_path / "r"), "--source",
                        str(tmp_path / "none")], capsys)
    assert code == 2 and "does not exist; pass the folder holding CUB_200_2011.tgz" in err


@pytest.mark.parametrize(("dataset", "files"), [
    ("miniimagenet", r"mini-imagenet-cache-\{train,val,test\}\.pkl, or images/ with train\.csv"),
    ("tieredimagenet", r"\{train,val,test\}_images_png\.pkl and \{train,val,test\}_labels\.pkl"),
])
def test_download_command_says_what_to_fetch_without_a_public_url(dataset: str, files: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "root"
    code, out, err = run(["download", "--dataset", dataset, "--root", str(root)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert re.search(f"no stable public URL.*put {files}.* in {re.escape(str(root))}.*renmengye/few-shot-ssl-public",
                     err)
    assert not root.exists()
    code, _, err = run(["download", "--dataset", dataset, "--root", str(root), "--source", str(tmp_path)], capsys)
    assert code == 2 and "nothing needs copying" in err and not root.exists()


def test_offline_hints_name_the_files_of_the_dataset_in_use(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert _offline_hint("omniglot") == _offline_hint("path/to/folders") == (
        "Offline? Pass --source DIR (a folder holding images_background.zip and images_evaluation.zip), "
        "or copy them once with: maml-func download --root DATA_ROOT --source DIR")
    assert "CUB_200_2011.tgz" in _offline_hint("cub") and "--dataset cub" in _offline_hint("cub")

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("download_cub: could not download https://... (no network)")

    monkeypatch.setattr("maml_func.components.load_dataset", offline)
    code, _, err = run(["train", "--preset", "cub-5w1s", "--data-root", str(tmp_path / "data"), "--save-to",
                        str(tmp_path / "run"), "--device", "cpu", "--no-progress"], capsys)
    assert code == 1 and err.rstrip().endswith(_offline_hint("cub")) and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("dataset", "options", "error", "match"), [
    ("omniglot", {"channels": 3}, ValueError, "grayscale"),
    ("omniglot", {"skip_bad_files": True}, ValueError, "skip_bad_files applies to folder trees"),
    ("omniglot", {"image_size": 0}, ValueError, "image_size must be a positive int"),
    ("cub", {"channels": 1}, ValueError, "cub is RGB; channels must be 3 or None, got 1"),
    ("miniimagenet", {"skip_bad_files": True}, ValueError, "skip_bad_files applies to folder trees"),
    ("tieredimagenet", {"source": "nope"}, FileNotFoundError, "not a folder"),
    (None, {"source": "."}, ValueError, "source applies to a named dataset only"),  # None: a folder tree
])
def test_load_dataset_refuses_options_that_do_not_apply(dataset: str | None, options: dict, error: type,
                                                        match: str, tmp_path: Path) -> None:
    options = {k: tmp_path / v if k == "source" else v for k, v in options.items()}  # sources inside tmp_path
    with pytest.raises(error, match=match):
        load_dataset(dataset or tmp_path, root=tmp_path, **options)
    assert files_module.find_first([tmp_path], ["nothing"]) is None


# ---------------------------------------------------------------- end to end


@pytest.mark.usefixtures("mini_lists")
@pytest.mark.parametrize("layout", ["raw", "pickles"])
def test_train_and_eval_the_miniimagenet_preset_end_to_end(layout: str, mini_release: dict[str, Path],
                                                           tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    code, _, err = run(["train", "--preset", "miniimagenet-5w1s", "--source", str(mini_release[layout]),
                        "--data-root", str(tmp_path / "data"), "--image-size", "16", "--hidden", "8",
                        "--iterations", "2", "--meta-batch", "2", "--val-tasks", "2", "--inner-steps", "1",
                        "--eval-inner-steps", "1", "--device", "cpu", "--no-progress", "--save-to", str(run_dir)],
                       capsys)
    assert code == 0, err
    assert "maml on miniimagenet, 5-way 1-shot (15 query)" in err
    saved = load_checkpoint(run_dir / "last.pt")["config"]
    assert make_config(base=saved).source == str(mini_release[layout]), "a named dataset keeps its source"
    assert make_config(base=saved, dataset="cub").source is None, "another dataset drops it"
    code, out, err = run(["eval", "--checkpoint", str(run_dir), "--tasks", "2", "--batch-size", "2"], capsys)
    assert code == 0, err
    assert out.startswith("5-way 1-shot:") and "(2 tasks, 1 steps)" in out


@pytest.mark.usefixtures("mini_lists")
def test_train_resnet12_from_the_command_line(mini_release: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    flags = ["train", "--preset", "miniimagenet-5w1s", "--source", str(mini_release["pickles"]), "--data-root",
             str(tmp_path / "data"), "--image-size", "16", "--iterations", "1", "--meta-batch", "2", "--val-tasks",
             "2", "--inner-steps", "1", "--eval-inner-steps", "1", "--device", "cpu", "--no-progress", "--save-to",
             str(tmp_path / "run")]
    code, _, err = run([*flags, "--model", "resnet13"], capsys)
    assert code == 2 and "model must be one of ['conv4', 'resnet12'], got 'resnet13'" in err
    code, _, err = run([*flags, "--model", "resnet12", "--model-option", "widths=[4, 4, 8, 8]"], capsys)
    assert code == 0, err
    config = load_checkpoint(tmp_path / "run" / "last.pt")["config"]
    assert (config["model"], config["model_options"]) == ("resnet12", {"widths": [4, 4, 8, 8]})
    # The preset's Conv4 option (pool=True) is not carried over to another network.
    assert make_config(preset="miniimagenet-5w1s", model="resnet12").model_options == {}


def test_benchmark_presets_follow_their_papers() -> None:
    from maml_func.presets import PRESETS, PUBLISHED

    for name, k_shot, meta_batch in (("miniimagenet-5w1s", 1, 4), ("miniimagenet-5w5s", 5, 2)):
        c = make_config(preset=name)  # Finn et al. 2017, section 5.2
        assert (c.dataset, c.image_size, c.channels, c.model, c.hidden, c.model_options) == (
            "miniimagenet", 84, 3, "conv4", 32, {"pool": True})
        assert (c.n_way, c.k_shot, c.n_query, c.meta_batch) == (5, k_shot, 15, meta_batch)
        assert (c.inner_steps, c.eval_inner_steps, c.inner_lr, c.meta_lr, c.iterations) == (5, 10, 0.01, 1e-3, 60_000)
    assert PUBLISHED["miniimagenet-5w1s"][0] == "48.70 ± 1.84" and PUBLISHED["miniimagenet-5w5s"][0] == "63.11 ± 0.92"
    assert set(PUBLISHED) == set(PRESETS)
    assert {make_config(preset=p).dataset for p in PRESETS} == set(DATASETS)
    assert make_config(preset="cub-5w1s").augment and not make_config(preset="miniimagenet-5w1s").augment
    assert (make_config(preset="cifarfs-5w1s").image_size, make_config(preset="fc100-5w1s").image_size) == (32, 32)


# ---------------------------------------------------------------- malformed contents inside well-formed files


@pytest.mark.usefixtures("mini_lists")
@pytest.mark.parametrize(("value", "match"), [
    ([], r"class_dict\['n01855672'\] lists 0 images, not 16"),
    (5, r"class_dict\['n01855672'\] is an int \(5\), not a list of row indices into image_data"),
    (["a"] * MINI_PER_CLASS, r"class_dict\['n01855672'\] is a list \(\['a', 'a', 'a', 'a', 'a', 'a', ...\]\), not a"),
    (list(range(10_000, 10_016)), r"class_dict\['n01855672'\] has indices 10000..10015, outside image_data's 0..79"),
], ids=["empty", "int", "strings", "out-of-range"])
def test_miniimagenet_pickle_with_a_malformed_class_dict_names_the_entry(value: object, match: str,
                                                                         mini_release: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for split in ("train", "val", "test"):
        name = f"mini-imagenet-cache-{split}.pkl"
        data = pickle.loads((mini_release["pickles"] / name).read_bytes())
        if split == "val":
            data["class_dict"]["n01855672"] = value
        (bad / name).write_bytes(pickle.dumps(data))
    with pytest.raises(ValueError, match=rf"load_miniimagenet: {re.escape(str(bad))}/mini-imagenet-cache-val\.pkl: "
                                         rf"{match}.*Fetch it again"):
        load_dataset("miniimagenet", root=tmp_path / "root", source=bad)
    assert not list((tmp_path / "root").glob("*.pt"))


@pytest.mark.usefixtures("mini_lists")
def test_miniimagenet_csv_that_is_not_utf8_names_the_file(mini_release: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "csvs").mkdir()
    (tmp_path / "csvs" / "images").symlink_to(mini_release["raw"] / "images")
    for split in ("train", "val", "test"):
        (tmp_path / "csvs" / f"{split}.csv").write_bytes((mini_release["raw"] / f"{split}.csv").read_bytes())
    (tmp_path / "csvs" / "train.csv").write_bytes(b"filename,label\n\xff\xfe,n01532829\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'csvs' / 'train.csv'))} is not UTF-8 text "
                                         r"\(byte 0xff at offset 15\).*meta-learning-lstm"):
        load_dataset("miniimagenet", root=tmp_path / "root", source=tmp_path / "csvs")


@pytest.mark.parametrize(("key", "value", "match"), [
    ("label_general_str", 1, r"label_general_str is an int \(1\), not a list of names"),
    ("label_specific_str", None, r"label_specific_str is a NoneType \(None\), not a list of names"),
    ("label_specific", ["a", "b"], r"label_specific is a list \(\['a', 'b'\]\), not one integer index per image"),
])
def test_tieredimagenet_labels_with_a_malformed_entry_name_it(key: str, value: object, match: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tieredimagenet, "CLASS_COUNTS", {"train": 3, "val": 2, "test": 2})
    monkeypatch.setattr(tieredimagenet, "CATEGORY_COUNTS", {"train": 1, "val": 1, "test": 1})
    write_tiered(tmp_path / "source")
    labels_file = tmp_path / "source" / "train_labels.pkl"
    labels = pickle.loads(labels_file.read_bytes())
    labels[key] = value
    labels_file.write_bytes(pickle.dumps(labels))
    with pytest.raises(ValueError, match=rf"load_tieredimagenet: {re.escape(str(labels_file))}: {match}\. Fetch it"):
        load_dataset("tieredimagenet", root=tmp_path / "root", source=tmp_path / "source")


@pytest.mark.parametrize(("part", "change", "match"), [
    ("meta", {"fine_label_names": 7}, r"cifar-100-python/meta: fine_label_names is an int \(7\), not a list of class"),
    ("train", {"fine_labels": 3}, r"cifar-100-python/train is not a CIFAR-100 batch"),
    ("test", {"coarse_labels": [9] * len(CIFAR_FINE)}, r"cifar-100-python/test has labels outside the 8 fine and 4 "
                                                       "coarse classes"),
])
def test_cifar_files_with_a_malformed_entry_name_it(part: str, change: dict, match: str, cifar_release: Path,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "extracted" / cifar.FOLDER
    folder.mkdir(parents=True)
    for name, data in cifar_members().items():
        if name == f"{cifar.FOLDER}/{part}":
            data = pickle.dumps({**pickle.loads(data, encoding="latin1"), **change}, protocol=2)
        (folder / name.split("/")[1]).write_bytes(data)
    monkeypatch.setattr(cifar, "MD5", {**cifar.MD5, **{p: md5_of(folder / p) for p in ("train", "test", "meta")}})
    with pytest.raises(ValueError, match=rf"load_cifarfs: {match}.*cifar-100-python\.tar\.gz"):
        load_dataset("cifarfs", root=tmp_path / "root", source=folder.parent)
