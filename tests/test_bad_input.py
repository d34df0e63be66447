"""Bad input at the boundary: exit status 2 (1 for a failed download), one line naming the problem and the fix,
and nothing new on disk after a refused run. One test per case that used to break that promise."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import SHARED_OMNIGLOT, noise_folder, run, tiny_flags
from PIL import Image

from maml_func import LOOP, MAML, Conv4, TaskBatch, Way
from maml_func.checkpoint import load_checkpoint, save_checkpoint
from maml_func.config import make_config


def tree(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def assert_refused(code: int, out: str, err: str, *needles: str, status: int = 2, after_start: bool = False) -> None:
    """Exit ``status``, nothing on stdout, one error line holding ``needles``.

    ``after_start``: the run had started (its one-line description printed) when it failed.
    """
    assert code == status, err
    lines = err.splitlines()
    assert out == "" and len(lines) == 1 + after_start and err.endswith("\n"), err
    assert lines[-1].startswith("maml-func ") and ": error: " in lines[-1], err
    if after_start:
        assert lines[0].startswith("maml-func train: maml on "), err
    for needle in needles:
        assert needle in lines[-1], (needle, err)


# 1. an unusable --save-to is refused before the data is loaded
def test_save_to_an_existing_file_is_refused_before_loading(folder: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "taken").write_text("not a folder")
    before = tree(tmp_path)
    code, out, err = run(["train", *tiny_flags(folder, tmp_path), "--save-to", str(tmp_path / "taken")], capsys)
    assert_refused(code, out, err, str(tmp_path / "taken"), "is an existing file", "choose another save_to")
    assert tree(tmp_path) == before  # no data cache either: refused before the load
    code, out, err = run(["train", *tiny_flags(folder, tmp_path), "--save-to", str(tmp_path / "taken" / "run")],
                         capsys)
    assert_refused(code, out, err, "is an existing file")
    assert tree(tmp_path) == before


def test_save_to_an_unwritable_place_is_refused_before_loading(folder: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    # /sys refuses new folders even to root (permission bits alone would not stop root).
    target = Path("/sys/maml-func-run") if os.path.isdir("/sys") and os.geteuid() == 0 else None
    if target is None:
        (tmp_path / "ro").mkdir(mode=0o555)
        target = tmp_path / "ro" / "run"
    before = tree(tmp_path)
    code, out, err = run(["train", *tiny_flags(folder, tmp_path), "--save-to", str(target)], capsys)
    assert_refused(code, out, err, f"cannot create the run directory {str(target)!r}", "is not writable",
                   "choose a save_to")
    assert tree(tmp_path) == before and not target.exists()


# 2. the advice for a bad image is one the command line can follow
def test_a_bad_image_names_the_flag_that_skips_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = noise_folder(tmp_path / "noisy")
    (data / "class00" / "broken.png").write_bytes(b"not a png")
    flags = [*tiny_flags(data, tmp_path), "--iterations", "1", "--val-every", "0", "--save-to", str(tmp_path / "r")]
    before = tree(tmp_path)
    code, out, err = run(["train", *flags], capsys)
    assert_refused(code, out, err, "broken.png is not a readable image", "--skip-bad-files")
    assert tree(tmp_path) == before
    code, _, err = run(["train", *flags, "--skip-bad-files"], capsys)
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("maml-func train: warning: ")]
    assert len(warned) == 1 and "skipped 1 unreadable file" in warned[0]  # one line, no source echo
    assert load_checkpoint(tmp_path / "r" / "last.pt")["config"]["skip_bad_files"] is True


# 3. evaluating on another dataset drops the checkpoint's Omniglot source
def test_eval_on_a_folder_drops_the_source_of_an_omniglot_run(folder: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    assert run(["train", *tiny_flags(folder, tmp_path), "--iterations", "1", "--val-every", "0",
                "--save-to", str(run_dir)], capsys)[0] == 0
    state = load_checkpoint(run_dir / "last.pt")  # as if trained on Omniglot from an offline copy
    state["config"].update(dataset="omniglot", source=str(tmp_path))
    save_checkpoint(state, run_dir / "last.pt")
    code, out, err = run(["eval", "--checkpoint", str(run_dir), "--dataset", str(folder), "--tasks", "4",
                          "--no-progress"], capsys)
    assert code == 0, err
    assert out.startswith("3-way 1-shot:")
    base = {**state["config"], "save_to": None}
    assert make_config(base=base, dataset=str(folder)).source is None
    assert make_config(base=base).source == str(tmp_path)  # same dataset: the source stays
    with pytest.raises(ValueError, match="source applies to a named dataset only"):
        make_config(base=base, dataset=str(folder), source=str(tmp_path))  # said explicitly: still refused
    code, _, err = run(["eval", "--checkpoint", str(run_dir), "--source", "", "--dataset", str(folder),
                        "--tasks", "4", "--no-progress"], capsys)
    assert code == 0, err  # --source "" means none


# 4. nothing of a refused run is left behind
@pytest.mark.parametrize(("flags", "needles"), [
    (["--n-way", "4"], ["validation split", "n_way=4 is larger than the number of classes (3)"]),
    (["--k-shot", "4", "--n-query", "2"], ["meta-training split", "fewer than k_shot + n_query = 6"]),
])
def test_a_task_shape_the_data_cannot_give_leaves_no_cache(flags: list[str], needles: list[str], folder: Path,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = tree(tmp_path)
    code, out, err = run(["train", *tiny_flags(folder, tmp_path), *flags, "--save-to", str(tmp_path / "run")],
                         capsys)
    assert_refused(code, out, err, *needles)
    assert tree(tmp_path) == before  # the cache decoded for the check is gone again, and no run directory


def test_download_from_a_bad_source_leaves_no_new_root(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    before = tree(tmp_path)
    code, out, err = run(["download", "--root", str(tmp_path / "new"), "--source", str(tmp_path / "empty")], capsys)
    assert_refused(code, out, err, "images_background")
    assert tree(tmp_path) == before


def test_no_network_leaves_no_data_root(tmp_path: Path, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from maml_func.data import omniglot

    def offline(part: str, root: Path) -> None:
        (root / f".{part}.partial").write_bytes(b"half")  # what an interrupted fetch leaves
        raise ConnectionError("download_omniglot: could not download (no network)")

    monkeypatch.setattr(omniglot, "_download", offline)
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["train", "--data-root", "fresh", "--device", "cpu", "--save-to", "run", "--no-progress"],
                         capsys)
    assert code == 1 and err.count("\n") == 1 and "Offline? Pass --source" in err  # the error only: not started
    assert tree(tmp_path) == []


# 5. and 6. one line each, and no contradiction
def test_a_damaged_checkpoint_is_one_line(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "run").mkdir()
    for seed in range(20):  # random bytes fail inside torch.load in many ways
        (tmp_path / "run" / "best.pt").write_bytes(random.Random(seed).randbytes(4096))
        code, out, err = run(["eval", "--checkpoint", str(tmp_path / "run")], capsys)
        assert_refused(code, out, err, "is not a readable checkpoint", "use the run's other checkpoint")


def test_a_garbage_cache_without_a_way_to_rebuild_says_so_once(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               recwarn: pytest.WarningsRecorder) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "omniglot_28px.pt").write_bytes(os.urandom(2048))
    before = tree(tmp_path)
    code, out, err = run(["eval", "--data-root", str(tmp_path / "data"), "--no-download", "--device", "cpu"], capsys)
    assert_refused(code, out, err, "omniglot_28px.pt, which is unreadable", "pass download=True")
    assert "rebuilt" not in err and not [w for w in recwarn if "rebuilt" in str(w.message)]
    assert tree(tmp_path) == before  # the user's file is left as it is


def test_a_second_interrupt_is_one_line(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import maml_func.train

    def impatient(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(maml_func.train, "fit", impatient)
    code, out, err = run(["train", *tiny_flags(folder, tmp_path), "--save-to", str(tmp_path / "run")], capsys)
    assert code == 130 and out == ""
    assert err.count("\n") == 1 and err.startswith("maml-func train: error: interrupted")


# 7. small inaccuracies
def test_a_folder_as_config_file_is_named_as_such(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(["train", "--config", str(tmp_path), "--save-to", str(tmp_path / "run")], capsys)
    assert_refused(code, out, err, "is a folder, not a config file", ".toml or .json")
    assert tree(tmp_path) == []


def test_out_of_range_labels_and_wrong_image_sizes_name_the_fix() -> None:
    torch.manual_seed(0)
    maml = MAML(Conv4(n_way=5, hidden=8, image_size=16))
    meta = maml.init()
    labels = torch.tensor([[0, 1, 2, 3, 7]] * 2)
    images = torch.rand(2, 5, 1, 16, 16)
    for way in (Way(), LOOP):
        with pytest.raises(ValueError, match=r"labels must be class indices 0..n_way-1.*run from 0 to 7.*"
                                             r"label each task's classes 0..n_way-1"):
            maml.meta_loss(meta, TaskBatch(images, labels, images, labels.remainder(5)), way=way)
    big = torch.rand(2, 5, 1, 28, 28)
    with pytest.raises(ValueError, match=r"Conv4: expected images \[B, 1, 16, 16\], got \[5, 1, 28, 28\]; "
                                         r"build Conv4\(in_channels=..., image_size=...\)"):
        maml.meta_loss(meta, TaskBatch(big, labels.remainder(5), big, labels.remainder(5)))


def test_the_rgb_of_an_image_folder_is_not_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Guard for the shape check: a colour tree (channels inferred) still trains."""
    for c in range(20):
        (tmp_path / "rgb" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (20 * c, 10 * i, 5)).save(tmp_path / "rgb" / f"c{c}" / f"{i}.png")
    code, _, err = run(["train", *tiny_flags(tmp_path / "rgb", tmp_path), "--iterations", "1", "--val-every", "0",
                        "--save-to", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["channels"] == 3


# 8. round 3: a hostile checkpoint is refused without advice to turn the protection off
class RunsCode:
    def __reduce__(self) -> tuple:
        return print, ("a checkpoint ran code",)


def test_a_hostile_checkpoint_is_refused_without_torchs_advice(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.save({"meta": RunsCode()}, tmp_path / "hostile.pt")
    for argv in (["eval", "--checkpoint", str(tmp_path / "hostile.pt")],
                 ["train", "--resume", str(tmp_path / "hostile.pt")]):
        code, out, err = run(argv, capsys)
        assert_refused(code, out, err, "asks to construct print", "does not load it", "checkpoint written by maml_func")
        assert "weights_only=False" not in err and "will likely succeed" not in err
        assert "a checkpoint ran code" not in out
    (tmp_path / "raw.pt").write_bytes(pickle.dumps({"meta": RunsCode()}))  # not torch's zip: refused by operand
    code, out, err = run(["eval", "--checkpoint", str(tmp_path / "raw.pt")], capsys)
    assert_refused(code, out, err, "torch's safe loader refused it")
    assert "weights_only" not in err


# 9. round 3: a run owns its directory from its first moment to its end
@pytest.mark.slow
def test_a_second_run_into_a_directory_in_use_is_refused_and_touches_nothing(folder: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "maml_func", "train", *tiny_flags(folder, tmp_path),
                              "--iterations", "100000", "--val-every", "0", "--save-every", "100000",
                              "--log-every", "1", "--save-to", str(run_dir)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        metrics = run_dir / "metrics.jsonl"
        while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            time.sleep(0.05)
        assert not (run_dir / "last.pt").exists()  # no checkpoint yet: only the lock stands in the second run's way
        code, out, err = run(["train", *tiny_flags(folder, tmp_path), "--seed", "2", "--save-to", str(run_dir)],
                             capsys)
        assert_refused(code, out, err, f"run directory {str(run_dir)!r} is in use by process {first.pid}",
                       "wait for that run to end, or choose another save_to")
        first.send_signal(signal.SIGINT)
        _, first_err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 130, first_err
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "last.pt", "learning_curve.png",
                                                         "metrics.jsonl"]  # no lock left
    assert json.loads((run_dir / "config.json").read_text())["seed"] == 0  # the first run's files, whole
    logged = [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, load_checkpoint(run_dir / "last.pt")["iteration"] + 1))


def test_fit_refuses_a_locked_directory_and_takes_over_a_stale_lock(folder: Path, tmp_path: Path) -> None:
    from maml_func.rundir import RunDirectoryLocked, claimed
    from maml_func.train import fit

    run_dir = tmp_path / "run"
    config = make_config(dataset=str(folder), data_root=str(tmp_path / "cache"), image_size=16, hidden=8, n_way=3,
                         n_query=2, meta_batch=2, iterations=1, val_every=0, val_tasks=4, device="cpu",
                         save_to=str(run_dir))
    with claimed(run_dir, "test"):  # held by this process, through another open file: still refused
        with pytest.raises(RunDirectoryLocked, match=f"is in use by process {os.getpid()}"):
            fit(config, progress=False)
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    assert list(run_dir.iterdir()) == []  # released: the lock file goes with the lock
    fit(config, progress=False)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with claimed(run_dir, "test"):  # a second resume of a run that is running
        with pytest.raises(RunDirectoryLocked, match="wait for that run to end"):
            fit(config.replace(iterations=2), resume=run_dir, progress=False)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    (run_dir / ".lock").write_text("4194305\n")  # left by a run that was killed: its lock is free
    with pytest.warns(UserWarning, match=r"taking over run directory .* \(process 4194305\) is gone"):
        assert fit(config.replace(iterations=2), resume=run_dir, progress=False).iteration == 2
    assert not (run_dir / ".lock").exists()


# 10. round 3: a full disk ends a run in one line, with the last checkpoint intact, or only warns
def fill_disk_at(monkeypatch: pytest.MonkeyPatch, module: object, name: str, writes_ok: int) -> list[bytes]:
    """Every atomic write of ``name`` through ``module`` after the first ``writes_ok`` fails halfway (ENOSPC).

    Returns the bytes of each write that went through.
    """
    real, written = module.atomic_write, []

    def filling(path: Path, content: bytes, **kwargs: object) -> Path:
        if Path(path).name != name:
            return real(path, content, **kwargs)
        if len(written) < writes_ok:
            written.append(content)
            return real(path, content, **kwargs)

        def half(f: object) -> None:
            f.write(content[:100] if isinstance(content, bytes) else b"\x89PNG")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, half, **kwargs)

    monkeypatch.setattr(module, "atomic_write", filling)
    return written


@pytest.mark.parametrize("writes_ok", [0, 1], ids=["first-checkpoint", "later-checkpoint"])
def test_a_full_disk_stops_the_run_in_one_line_with_the_last_checkpoint_intact(
        writes_ok: int, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import maml_func.checkpoint

    run_dir = tmp_path / "run"
    written = fill_disk_at(monkeypatch, maml_func.checkpoint, "last.pt", writes_ok)
    code, out, err = run(["train", *tiny_flags(folder, tmp_path), "--iterations", "3", "--save-every", "1",
                          "--val-every", "0", "--save-to", str(run_dir)], capsys)
    assert_refused(code, out, err, f"could not write {run_dir / 'last.pt'} (No space left on device; ",
                   status=1, after_start=True)
    assert not list(tmp_path.rglob("*.tmp"))
    if writes_ok == 0:
        assert "no checkpoint had been written, so nothing of this run is left" in err and not run_dir.exists()
        return
    assert f"the last checkpoint, {run_dir / 'last.pt'} (iteration 1), is intact and --resume {run_dir} " in err
    assert (run_dir / "last.pt").read_bytes() == written[0]
    monkeypatch.undo()
    code, _, err = run(["train", "--resume", str(run_dir), "--no-progress"], capsys)
    assert code == 0 and load_checkpoint(run_dir / "last.pt")["iteration"] == 3, err


def test_metrics_and_plot_that_cannot_be_written_warn_once_and_the_run_goes_on(
        folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import maml_func.rundir

    class FullFile(io.FileIO):
        def write(self, data: bytes) -> int:
            super().write(bytes(data)[:10])  # part of the line goes in, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(maml_func.rundir, "open", lambda path, *args, **kwargs: FullFile(path, "a"), raising=False)
    fill_disk_at(monkeypatch, maml_func.rundir, "learning_curve.png", 0)
    run_dir = tmp_path / "run"
    code, out, err = run(["train", *tiny_flags(folder, tmp_path), "--iterations", "3", "--val-every", "1",
                          "--log-every", "1", "--save-to", str(run_dir)], capsys)
    assert code == 0 and out == "", err
    warned = [line for line in err.splitlines() if line.startswith("maml-func train: warning: ")]
    assert len(err.splitlines()) == 4 and len(warned) == 2, err  # the run's line, two warnings, the result
    assert f"could not write {run_dir / 'metrics.jsonl'} (No space left on device" in warned[0]
    assert f"could not write {run_dir / 'learning_curve.png'} (No space left on device" in warned[1]
    assert all("the run goes on" in line for line in warned)
    assert (run_dir / "metrics.jsonl").read_bytes() == b""  # no half line left behind
    assert load_checkpoint(run_dir / "last.pt")["iteration"] == 3 and (run_dir / "best.pt").is_file()
    assert not (run_dir / "learning_curve.png").exists() and not list(run_dir.glob(".*.tmp"))


@pytest.mark.skipif(not SHARED_OMNIGLOT.is_dir(), reason=f"the Omniglot archives are not at {SHARED_OMNIGLOT}")
def test_a_full_disk_during_download_names_the_file_and_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def filling(src: Path, dst: Path, **kwargs: object) -> None:
        Path(dst).write_bytes(Path(src).read_bytes()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", filling)
    root = tmp_path / "data"
    code, out, err = run(["download", "--root", str(root), "--source", str(SHARED_OMNIGLOT)], capsys)
    assert_refused(code, out, err, f"could not write {root / 'images_background.zip'} (No space left on device; "
                   "it needs 8.0 MB", f"nothing new was left in {root}", status=1)
    assert tree(tmp_path) == []


_ON_A_SMALL_DISK = """
import contextlib, io, json, os, subprocess, sys
disk, flags = sys.argv[1], json.loads(sys.argv[2])
if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", disk], capture_output=True).returncode:
    sys.exit(77)
from maml_func.cli import main

def cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        return main(argv), err.getvalue()

run = os.path.join(disk, "run")
first, _ = cli(["train", *flags, "--iterations", "1", "--save-to", run])
before = open(os.path.join(run, "last.pt"), "rb").read()
space = os.statvfs(disk)
with open(os.path.join(disk, "filler"), "wb") as f:  # leave 16 KB: enough for config.json, not for a checkpoint
    f.write(bytes(space.f_bavail * space.f_frsize - 16 * 1024))
code, err = cli(["train", "--resume", run, "--iterations", "3", "--save-every", "1", "--no-progress"])
after = open(os.path.join(run, "last.pt"), "rb").read()
print(json.dumps({"first": first, "code": code, "err": err, "same": after == before, "left": sorted(os.listdir(run))}))
"""


@pytest.mark.slow
def test_a_full_disk_for_real_on_a_small_tmpfs(folder: Path, tmp_path: Path) -> None:
    """The same promise on a real full file system: a 1 MB tmpfs in a private mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) here to mount a small tmpfs; the monkeypatched full-disk tests cover the promise")
    (tmp_path / "disk").mkdir()
    flags = [*tiny_flags(folder, tmp_path), "--val-every", "0"]
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-c", _ON_A_SMALL_DISK,
                           str(tmp_path / "disk"), json.dumps(flags)], capture_output=True, text=True, timeout=120)
    if done.returncode == 77 or done.stderr.startswith("unshare:"):  # no user namespaces, or no mount in them
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()[:200] or 'mount refused'}); the monkeypatched "
                    "full-disk tests cover the promise")
    result = json.loads(done.stdout)
    assert result["first"] == 0 and result["code"] == 1, result
    lines = result["err"].splitlines()
    assert len(lines) == 2 and lines[0].startswith("maml-func train: maml on "), result  # the run's line, the error
    run_dir = tmp_path / "disk" / "run"
    assert lines[1].startswith(f"maml-func train: error: fit: could not write {run_dir / 'last.pt'} (No space left "
                               "on device; it needs 0.1 MB; 0.0 MB free there); the last checkpoint, "
                               f"{run_dir / 'last.pt'} (iteration 1), is intact and --resume {run_dir} "
                               "continues"), result
    assert result["same"] and result["left"] == ["best.pt", "config.json", "last.pt", "learning_curve.png",
                                                 "metrics.jsonl"], result  # no temporary file, no lock


# 11. round 3: a run that stops at iteration 1 leaves nothing, or a run that --resume accepts
def test_a_run_that_stops_at_iteration_1_leaves_nothing(folder: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's own file")
    for run_dir in (tmp_path / "new" / "run", tmp_path / "mine"):
        code, out, err = run(["train", *tiny_flags(folder, tmp_path), "--inner-lr", "1e38", "--iterations", "3",
                              "--save-to", str(run_dir)], capsys)
        assert_refused(code, out, err, "at iteration 1;", "no checkpoint had been written, so nothing of this run "
                       f"is left in {run_dir}", "Lower inner_lr", status=1, after_start=True)
    assert not (tmp_path / "new").exists()  # the folders it made, gone
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]  # what was there before, kept


def test_a_resumed_run_that_stops_at_its_first_iteration_stays_resumable(
        folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from maml_func import step

    run_dir = tmp_path / "run"
    assert run(["train", *tiny_flags(folder, tmp_path), "--iterations", "1", "--save-to", str(run_dir)], capsys)[0] == 0
    before = (run_dir / "last.pt").read_bytes()
    def broken(*args: object, **kwargs: object) -> None:  # a model that cannot run
        raise RuntimeError("boom")

    monkeypatch.setattr(step, "meta_gradient", broken)
    code, out, err = run(["train", "--resume", str(run_dir), "--iterations", "3", "--no-progress"], capsys)
    assert_refused(code, out, err, "meta-iteration 2 failed (RuntimeError: boom)", f"the last checkpoint, "
                   f"{run_dir / 'last.pt'} (iteration 1), is intact and --resume {run_dir} continues from it",
                   status=1, after_start=True)
    assert (run_dir / "last.pt").read_bytes() == before
    monkeypatch.undo()
    assert run(["train", "--resume", str(run_dir), "--iterations", "3", "--no-progress"], capsys)[0] == 0


# 12. round 3: a checkpoint missing an entry is named once, for eval and for --resume
@pytest.mark.parametrize(("entry", "value", "needle"), [
    ("meta", None, "it has no 'meta' entry"),
    ("iteration", "3", "its 'iteration' entry is a str"),
    ("meta", {"model": [1, 2]}, "its 'meta' entry is not a dict of tensor dicts"),
])
def test_a_checkpoint_with_a_missing_or_malformed_entry_is_one_line(entry: str, value: object, needle: str,
                                                                    folder: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    assert run(["train", *tiny_flags(folder, tmp_path), "--iterations", "1", "--val-every", "0", "--save-to",
                str(run_dir)], capsys)[0] == 0
    state = load_checkpoint(run_dir / "last.pt")
    if value is None:
        del state[entry]
    else:
        state[entry] = value
    save_checkpoint(state, run_dir / "last.pt")
    (run_dir / "best.pt").unlink()
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    for argv in (["eval", "--checkpoint", str(run_dir)], ["train", "--resume", str(run_dir), "--iterations", "2"]):
        code, out, err = run(argv, capsys)
        assert_refused(code, out, err, f"{str(run_dir / 'last.pt')!r} is a damaged training checkpoint: {needle}",
                       "use the run's other checkpoint")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_a_config_file_that_is_not_utf8_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "run.toml").write_bytes(b"iterations = 3\n# \xff\n")
    code, out, err = run(["train", "--config", str(tmp_path / "run.toml")], capsys)
    assert_refused(code, out, err, f"cannot parse {str(tmp_path / 'run.toml')!r}: 'utf-8' codec can't decode byte "
                   "0xff in position 17")


# 13. round 3: a refused run prints its error only, never the line that announces a run first
def test_a_refused_run_prints_one_line_not_the_run_summary_first(folder: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    done = tmp_path / "done"
    assert run(["train", *tiny_flags(folder, tmp_path), "--iterations", "1", "--val-every", "0", "--save-to",
                str(done)], capsys)[0] == 0
    before = tree(tmp_path)
    refused = {  # each needs the data, a checkpoint or the machine to be refused
        "another task shape": (["--k-shot", "5"], "fewer than k_shot + n_query"),
        "a release not there": (["--dataset", "miniimagenet"], "holds no miniImageNet release"),
        "a resume that changes the run": (["--resume", str(done), "--seed", "3"], "cannot resume with a changed seed"),
    }
    if not torch.cuda.is_available():
        refused["no CUDA"] = (["--device", "cuda"], "CUDA is not available here")
    for flags, needle in refused.values():
        code, out, err = run(["train", *tiny_flags(folder, tmp_path), *flags, "--iterations", "2",
                              "--save-to", str(tmp_path / "run")], capsys)
        assert_refused(code, out, err, needle)
        assert tree(tmp_path) == before
