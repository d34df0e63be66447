"""Data: Omniglot (fake archives in tmp_path, and the real ones when ../shared has them) and folder trees."""

from __future__ import annotations

import hashlib
import io
import shutil
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import SHARED_OMNIGLOT, forbid, serve, snapshot
from PIL import Image

from maml_func.data import ImageClasses, download_omniglot, load_dataset, load_folder, load_omniglot, omniglot
from maml_func.data import folder as folder_module
from maml_func.tasks import EpisodeSampler

# A tiny Omniglot: (alphabets, characters) per part, 20 drawings each, like the real one.
FAKE_LAYOUT = {"images_background": (2, 3), "images_evaluation": (1, 2)}


# ---------------------------------------------------------------- fake Omniglot


def drawing(seed: int) -> bytes:
    """A 105x105 1-bit PNG like Omniglot's: white paper, one black square stroke placed by ``seed``."""
    image = Image.new("1", (105, 105), 1)
    corner = 5 + (seed * 7) % 60
    image.paste(0, (corner, corner, corner + 35, corner + 35))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def fake_part(part: str) -> dict[str, bytes]:
    """Member name -> PNG bytes for one part of the fake Omniglot."""
    n_alphabets, n_characters = FAKE_LAYOUT[part]
    members = {}
    for c in range(n_characters):
        alphabet = f"{part[7:].title()}_Alphabet{c % n_alphabets}"
        for d in range(20):
            members[f"{part}/{alphabet}/character{c + 1:02d}/{c:04d}_{d + 1:02d}.png"] = drawing(c * 20 + d)
    return members


def write_fake_omniglot(folder: Path, *, as_zip: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for part in FAKE_LAYOUT:
        members = fake_part(part)
        if as_zip:
            with zipfile.ZipFile(folder / f"{part}.zip", "w") as archive:
                for name, data in members.items():
                    archive.writestr(name, data)
        else:
            for name, data in members.items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def fake_omniglot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake offline source in tmp_path; the loader expects the fake layout instead of the real counts."""
    monkeypatch.setattr(omniglot, "_LAYOUT", FAKE_LAYOUT)
    return write_fake_omniglot(tmp_path / "source")


def forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid(monkeypatch, (omniglot, "_decode"), (folder_module, "_decode"))


def test_fake_omniglot_from_zip_source(fake_omniglot: Path, tmp_path: Path) -> None:
    before = snapshot(fake_omniglot)
    classes = load_omniglot(tmp_path / "root", source=fake_omniglot)
    assert classes.images.shape == (5, 20, 1, 28, 28) and classes.images.dtype == torch.uint8
    assert classes.counts.tolist() == [20] * 5
    # Background first, sorted names, then evaluation.
    assert classes.names == ["Background_Alphabet0/character01", "Background_Alphabet0/character03",
                             "Background_Alphabet1/character02", "Evaluation_Alphabet0/character01",
                             "Evaluation_Alphabet0/character02"]
    # Inverted: the paper is 0, the 35-pixel black square (a third of the side) is bright.
    first = classes.images[0, 0, 0].float()
    assert first.max() == 255 and 0.08 < float((first > 128).float().mean()) < 0.14
    assert float(first[0, 0]) == 0.0 and float(first[-1, -1]) == 0.0
    assert snapshot(fake_omniglot) == before, "the source must not be modified"
    assert (tmp_path / "root" / "omniglot_28px.pt").is_file()


def test_fake_omniglot_tree_source_equals_zip_source(fake_omniglot: Path, tmp_path: Path) -> None:
    tree = write_fake_omniglot(tmp_path / "tree", as_zip=False)
    from_zip = load_omniglot(tmp_path / "a", source=fake_omniglot, image_size=14)
    from_tree = load_omniglot(tmp_path / "b", source=tree, image_size=14)
    assert torch.equal(from_zip.images, from_tree.images) and from_zip.names == from_tree.names
    assert from_tree.images.shape == (5, 20, 1, 14, 14)


def test_second_load_reads_the_cache(fake_omniglot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    first = load_omniglot(root, source=fake_omniglot)
    forbid_decoding(monkeypatch)
    shutil.rmtree(fake_omniglot)  # the cache alone is enough now
    again = load_omniglot(root)
    assert torch.equal(first.images, again.images) and first.names == again.names
    assert torch.equal(first.counts, again.counts)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_content"])
def test_damaged_cache_is_rebuilt_with_a_warning(
    fake_omniglot: Path, tmp_path: Path, damage: str
) -> None:
    root = tmp_path / "root"
    good = load_omniglot(root, source=fake_omniglot)
    cache = root / "omniglot_28px.pt"
    data = cache.read_bytes()
    if damage == "truncate":
        cache.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        cache.write_bytes(b"not a torch file at all")
    else:
        torch.save({"format": 1, "images": torch.zeros(2, 3), "counts": torch.zeros(2), "names": [], "meta": {}},
                   cache)
    with pytest.warns(UserWarning, match="rebuilt"):
        rebuilt = load_omniglot(root, source=fake_omniglot)
    assert torch.equal(rebuilt.images, good.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(load_omniglot(root).images, good.images)  # the rewritten cache is whole again
    assert [p.name for p in root.iterdir()] == ["omniglot_28px.pt"], "no temporary file left behind"


def test_missing_or_empty_root_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"download=True.*source="):
        load_omniglot(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="images_background.zip"):
        load_omniglot(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_omniglot(tmp_path / "root", source=tmp_path / "no_source")
    with pytest.raises(FileNotFoundError, match="neither images_background.zip"):
        load_omniglot(tmp_path / "root", source=tmp_path / "empty")


def test_incomplete_archive_fails_its_layout_check(fake_omniglot: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(fake_omniglot, bad)
    with zipfile.ZipFile(bad / "images_evaluation.zip", "w") as archive:
        for name, data in list(fake_part("images_evaluation").items())[:-1]:  # one drawing short
            archive.writestr(name, data)
    with pytest.raises(ValueError, match=r"layout of the official images_evaluation.*without 20 drawings"):
        load_omniglot(tmp_path / "root", source=bad)
    (bad / "images_background.zip").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="not a readable zip"):
        load_omniglot(tmp_path / "root", source=bad)


def test_archive_with_wrong_checksum_raises_and_is_left_alone(fake_omniglot: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(fake_omniglot, root)  # not the official archives, and not recorded as a trusted copy
    before = snapshot(root)
    with pytest.raises(ValueError, match=r"has md5 [0-9a-f]{32}, not the official.*left untouched.*source="):
        load_omniglot(root)
    with pytest.raises(ValueError, match="not the official"):
        load_omniglot(root, download=True)
    with pytest.raises(ValueError, match="not the official"):
        download_omniglot(root)
    assert snapshot(root) == before, "nothing the user owns may change"


def test_download_from_source_copies_and_trusts_the_copies(fake_omniglot: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert download_omniglot(root, source=fake_omniglot) == root
    for part in FAKE_LAYOUT:
        assert (root / f"{part}.zip").read_bytes() == (fake_omniglot / f"{part}.zip").read_bytes()
    assert download_omniglot(root, source=fake_omniglot) == root  # idempotent
    classes = load_omniglot(root)  # no source: the recorded md5 vouches for the copies
    assert len(classes) == 5
    # A different file under an archive's name is never overwritten.
    (root / "images_background.zip").unlink()
    (root / "images_background.zip").write_bytes(b"mine")
    with pytest.raises(ValueError, match="already exists and differs"):
        download_omniglot(root, source=fake_omniglot)
    assert (root / "images_background.zip").read_bytes() == b"mine"


def test_download_checks_md5_and_leaves_nothing_on_mismatch(
    fake_omniglot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.setattr(omniglot, "URL", serve(fake_omniglot, request))
    md5 = {part: hashlib.md5((fake_omniglot / f"{part}.zip").read_bytes()).hexdigest() for part in FAKE_LAYOUT}
    monkeypatch.setattr(omniglot, "MD5", {**md5, "images_evaluation": "0" * 32})
    root = tmp_path / "root"
    with pytest.raises(ValueError, match="does not match its md5.*discarded"):
        download_omniglot(root)
    assert sorted(p.name for p in root.iterdir()) == ["images_background.zip"], "the bad download was kept"
    monkeypatch.setattr(omniglot, "MD5", md5)
    classes = load_omniglot(root, download=True)
    assert len(classes) == 5 and (root / "images_evaluation.zip").is_file()


def test_download_offline_raises_connection_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(omniglot, "URL", (tmp_path / "unreachable").as_uri() + "/")
    with pytest.raises(ConnectionError, match=r"could not download.*source="):
        download_omniglot(tmp_path / "root")
    assert list((tmp_path / "root").iterdir()) == []


def synthetic_omniglot() -> ImageClasses:
    """1623 one-pixel 'characters' named like the real ones (background first), for the split rules."""
    names = [f"B{i // 40:02d}/character{i % 40:02d}" for i in range(964)]
    names += [f"E{i // 40:02d}/character{i % 40:02d}" for i in range(659)]
    return ImageClasses(torch.zeros(1623, 20, 1, 1, 1, dtype=torch.uint8), torch.full((1623,), 20), names)


def test_maml_and_lake_splits() -> None:
    classes = synthetic_omniglot()
    maml = omniglot.omniglot_splits(classes, "maml", seed=0)
    assert {k: len(v) for k, v in maml.items()} == {"train": 1100, "val": 100, "test": 423}
    sets = {k: set(v.names) for k, v in maml.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert len(set.union(*sets.values())) == 1623
    assert sets["test"] & {n for n in classes.names if n.startswith("B")}, "the MAML split mixes both parts"
    assert omniglot.omniglot_splits(classes, "maml", seed=0)["test"].names == maml["test"].names
    assert omniglot.omniglot_splits(classes, "maml", seed=1)["test"].names != maml["test"].names
    # Storage order does not matter, only names and the seed.
    reversed_classes = classes.subset(list(range(1622, -1, -1)))
    assert set(omniglot.omniglot_splits(reversed_classes, "maml", seed=0)["test"].names) == sets["test"]

    lake = omniglot.omniglot_splits(classes, "lake", seed=0)
    assert {k: len(v) for k, v in lake.items()} == {"train": 864, "val": 100, "test": 659}
    assert all(n.startswith("B") for n in lake["train"].names + lake["val"].names)
    assert lake["test"].names == classes.names[964:]
    assert omniglot.omniglot_splits(classes, "background", seed=0)["val"].names == lake["val"].names
    with pytest.raises(ValueError, match="split must be one of"):
        omniglot.omniglot_splits(classes, "random")
    with pytest.raises(ValueError, match="expected the 1623 characters"):
        omniglot.omniglot_splits(classes.subset([0, 1, 2]))


# load_dataset's refusals of options that do not apply (Omniglot's among them): tests/test_datasets.py.


# ---------------------------------------------------------------- folder trees


def save_image(path: Path, color: tuple[int, int, int] | int, mode: str = "RGB", size: tuple[int, int] = (12, 9)
               ) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def write_tree(root: Path, per_class: dict[str, int], mode: str = "RGB") -> Path:
    for c, (name, n) in enumerate(sorted(per_class.items())):
        for j in range(n):
            color = (10 * c, 5 * j, 200) if mode == "RGB" else 10 * c + j
            save_image(root / name / f"img{j:02d}.png", color, mode)
    return root


def test_folder_rgb_with_uneven_classes(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "tree", {"cat": 3, "dog": 5, "eel": 1})
    (tmp_path / "tree" / "README.txt").write_text("files directly under the root are not classes")
    (tmp_path / "tree" / "dog" / ".DS_Store").write_bytes(b"\0\1")
    classes = load_folder(tree, image_size=8)
    assert classes.names == ["cat", "dog", "eel"] and classes.counts.tolist() == [3, 5, 1]
    assert classes.images.shape == (3, 5, 3, 8, 8)
    assert classes.images[1, 4, :, 0, 0].tolist() == [10, 20, 200]  # dog, img04: solid (10, 5*4, 200)
    assert classes.images[0, 3:].eq(0).all(), "slots past the count are zero padding"
    gray = load_folder(tree, image_size=8, channels=1)
    assert gray.images.shape == (3, 5, 1, 8, 8)


def test_folder_grayscale_is_inferred_and_nested_layout(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    write_tree(tree / "Greek", {"alpha": 2, "beta": 2}, mode="L")
    write_tree(tree / "Latin", {"a": 3}, mode="L")
    classes = load_folder(tree, image_size=6)
    assert classes.names == ["Greek/alpha", "Greek/beta", "Latin/a"]
    assert classes.images.shape == (3, 3, 1, 6, 6) and classes.counts.tolist() == [2, 2, 3]
    assert classes.images[2, 1, 0, 0, 0] == 1  # Latin/a, img01: gray value 10*0 + 1
    assert load_folder(tree, image_size=6, channels=3).images.shape == (3, 3, 3, 6, 6)


def test_folder_bad_layouts(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no class folders.*<path>/<class>/<image>"):
        load_folder(tmp_path / "empty")
    tree = write_tree(tmp_path / "tree", {"a": 2, "b": 2})
    (tree / "c").mkdir()
    with pytest.raises(ValueError, match=r"hold no images.*tree/c"):
        load_folder(tree)
    with pytest.warns(UserWarning, match="hold no images"):
        assert load_folder(tree, skip_bad_files=True).names == ["a", "b"]
    save_image(tree / "c" / "x.png", (1, 2, 3))
    save_image(tree / "c" / "sub" / "y.png", (1, 2, 3))
    with pytest.raises(ValueError, match="both files and folders"):
        load_folder(tree)
    (tree / "c" / "x.png").unlink()
    save_image(tree / "c" / "sub" / "deeper" / "z.png", (1, 2, 3))
    with pytest.raises(ValueError, match="nested at most one level"):
        load_folder(tree)
    with pytest.raises(ValueError, match="channels must be 1, 3 or None"):
        load_folder(tree, channels=2)


@pytest.mark.parametrize("bad_name, content", [("broken.png", b"\x89PNG\r\n\x1a\n garbage"),
                                               ("notes.txt", b"not an image")])
def test_folder_unreadable_file_is_named_or_skipped(tmp_path: Path, bad_name: str, content: bytes) -> None:
    tree = write_tree(tmp_path / "tree", {"a": 3, "b": 2})
    (tree / "b" / bad_name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"{bad_name} is not a readable image.*skip_bad_files=True"):
        load_folder(tree)
    with pytest.warns(UserWarning, match=rf"skipped 1 unreadable file.*{bad_name}"):
        classes = load_folder(tree, skip_bad_files=True)
    assert classes.counts.tolist() == [3, 2]


def test_folder_truncated_image_is_named(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "tree", {"a": 2, "b": 2})
    big = tree / "a" / "photo.jpg"
    Image.effect_noise((64, 64), 50).convert("RGB").save(big, quality=90)
    big.write_bytes(big.read_bytes()[:300])
    with pytest.raises(ValueError, match="photo.jpg is not a readable image"):
        load_folder(tree)


def test_folder_class_left_empty_by_skipping_is_dropped(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "tree", {"a": 2, "b": 2})
    (tree / "z").mkdir()
    (tree / "z" / "junk.png").write_bytes(b"junk")
    with pytest.warns(UserWarning) as record:
        classes = load_folder(tree, skip_bad_files=True)
    assert classes.names == ["a", "b"] and classes.images.shape[0] == 2
    assert any("dropped 1 class" in str(w.message) for w in record)


def test_folder_cache_is_used_and_follows_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = write_tree(tmp_path / "tree", {"a": 2, "b": 3})
    cache = tmp_path / "cache"
    first = load_folder(tree, image_size=8, cache_dir=cache)
    assert len(list(cache.glob("folder_tree_8px_*.pt"))) == 1
    with monkeypatch.context() as m:
        forbid_decoding(m)
        assert torch.equal(load_folder(tree, image_size=8, cache_dir=cache).images, first.images)
    save_image(tree / "a" / "img99.png", (0, 0, 0))
    assert load_folder(tree, image_size=8, cache_dir=cache).counts.tolist() == [3, 3]


def test_unwritable_cache_folder_warns_and_still_loads(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "tree", {"a": 2, "b": 3})
    blocked = tmp_path / "a_file"
    blocked.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="could not write the cache"):
        classes = load_folder(tree, image_size=8, cache_dir=blocked)
    assert classes.counts.tolist() == [2, 3] and blocked.read_text().startswith("a file")


def test_load_dataset_folder_random_split(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "tree", {f"class{i}": 2 + i % 3 for i in range(10)})
    data = load_dataset(tree, root=tmp_path / "cache", image_size=8, seed=3)
    assert {k: len(v) for k, v in data.items()} == {"train": 6, "val": 2, "test": 2}
    assert len(set().union(*(v.names for v in data.values()))) == 10
    assert load_dataset(str(tree), root=tmp_path / "cache", image_size=8, seed=3)["test"].names == data["test"].names
    other = [load_dataset(tree, root=tmp_path / "cache", image_size=8, seed=s)["test"].names for s in range(4, 8)]
    assert any(names != data["test"].names for names in other)
    sampler = EpisodeSampler(data["train"], n_way=3, k_shot=1, n_query=1)
    assert sampler.sample(2, torch.Generator()).x_support.shape == (2, 3, 3, 8, 8)


def test_load_dataset_folder_presplit_and_bad_arguments(tmp_path: Path) -> None:
    tree = tmp_path / "mini"
    for part, names in (("train", ["a", "b", "c"]), ("val", ["d"]), ("test", ["e", "f"])):
        write_tree(tree / part, {n: 2 for n in names})
    data = load_dataset(tree, root=tmp_path / "cache", image_size=8)
    assert {k: v.names for k, v in data.items()} == {"train": ["a", "b", "c"], "val": ["d"], "test": ["e", "f"]}
    shutil.rmtree(tree / "val")
    with pytest.raises(ValueError, match="exactly train/, val/ and test/"):
        load_dataset(tree, root=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"download applies to a named dataset only \(omniglot, miniimagenet"):
        load_dataset(tree, root=tmp_path / "cache", download=True)
    with pytest.raises(FileNotFoundError,
                       match=r"neither a named dataset \(omniglot, miniimagenet, .*\) nor an existing folder"):
        load_dataset("omniglott", root=tmp_path / "cache")
    few = write_tree(tmp_path / "few", {"a": 2, "b": 2})
    with pytest.raises(ValueError, match="at least 3"):
        load_dataset(few, root=tmp_path / "cache")


# ---------------------------------------------------------------- the real Omniglot archives


@pytest.fixture(scope="session")
def real_omniglot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ImageClasses, float]:
    """Decode the real archives once per session, cache in a temp root (../shared is read-only)."""
    if not (SHARED_OMNIGLOT / "images_background.zip").is_file():
        pytest.skip(f"the real Omniglot archives are not at {SHARED_OMNIGLOT}")
    root = tmp_path_factory.mktemp("omniglot")
    start = time.perf_counter()
    classes = load_omniglot(root, source=SHARED_OMNIGLOT)
    return root, classes, time.perf_counter() - start


@pytest.mark.slow
def test_real_omniglot_counts(real_omniglot: tuple[Path, ImageClasses, float]) -> None:
    _, classes, _ = real_omniglot
    assert classes.images.shape == (1623, 20, 1, 28, 28) and classes.counts.eq(20).all()
    assert len(set(classes.names)) == 1623
    background, evaluation = classes.names[:964], classes.names[964:]
    assert len({n.split("/")[0] for n in background}) == 30
    assert len({n.split("/")[0] for n in evaluation}) == 20
    assert not {n.split("/")[0] for n in background} & {n.split("/")[0] for n in evaluation}
    # Strokes bright on a dark background: most pixels are near 0, strokes reach 255.
    sample = classes.images[::50].float()
    assert sample.max() == 255 and float(sample.mean()) < 60 and float(sample[..., 0, 0].max()) == 0


@pytest.mark.slow
def test_real_omniglot_cache_and_splits(
    real_omniglot: tuple[Path, ImageClasses, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, classes, _ = real_omniglot
    forbid_decoding(monkeypatch)
    start = time.perf_counter()
    maml = load_dataset("omniglot", root=root)
    cached_load = time.perf_counter() - start
    assert {k: len(v) for k, v in maml.items()} == {"train": 1100, "val": 100, "test": 423}
    lake = load_dataset("omniglot", root=root, split="lake")
    assert {k: len(v) for k, v in lake.items()} == {"train": 864, "val": 100, "test": 659}
    assert len({n.split("/")[0] for n in lake["test"].names}) == 20
    assert cached_load < 10, f"a cached load took {cached_load:.1f} s"
    batch = EpisodeSampler(maml["train"], 5, 1, 15, rotations=True).sample(4, torch.Generator().manual_seed(0))
    assert batch.x_support.shape == (4, 5, 1, 28, 28) and batch.x_query.shape == (4, 75, 1, 28, 28)


def test_real_omniglot_download_from_shared_source(tmp_path: Path) -> None:
    if not (SHARED_OMNIGLOT / "images_background.zip").is_file():
        pytest.skip(f"the real Omniglot archives are not at {SHARED_OMNIGLOT}")
    root = download_omniglot(tmp_path / "root", source=SHARED_OMNIGLOT)
    assert sorted(p.name for p in root.iterdir()) == ["images_background.zip", "images_evaluation.zip",
                                                      "omniglot_trusted.json"]
    omniglot._check_md5(root / "images_background.zip", root, "test")  # accepted through the record
