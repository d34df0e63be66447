"""The ``maml-func`` command line: exit statuses, one-line errors that write nothing, train → eval, SIGINT."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import SHARED_OMNIGLOT, SUMMARY, run, tiny_flags

import maml_func
from maml_func.checkpoint import load_checkpoint
from maml_func.config import TrainConfig
from maml_func.fields import describe_default


# ---------------------------------------------------------------- basics
@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["download"], ["demo"]])
def test_version_and_help_everywhere(command: list[str], capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run([*command, "--version"], capsys)
    assert code == 0 and out.strip() == f"maml-func {maml_func.__version__}"
    code, out, _ = run([*command, "--help"], capsys)
    assert code == 0 and out.startswith("usage: maml-func")


def test_python_dash_m_and_no_command(capsys: pytest.CaptureFixture) -> None:
    done = subprocess.run([sys.executable, "-m", "maml_func", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"maml-func {maml_func.__version__}"
    code, _, err = run([], capsys)
    assert code == 2 and "usage: maml-func" in err


def test_train_help_lists_every_config_field(capsys: pytest.CaptureFixture) -> None:
    _, out, _ = run(["train", "--help"], capsys)
    for flag in ("--preset", "--config", "--resume", "--n-way", "--k-shot", "--n-query", "--meta-batch",
                 "--inner-steps", "--inner-lr", "--meta-lr", "--iterations", "--first-order", "--seed", "--device",
                 "--save-to", "--dataset", "--data-root", "--source", "--rotations", "--max-minutes",
                 "--chunk-size", "--tasks-per-backward"):
        assert flag in out, flag
    # Every field of the config, each with its own default: generated from the fields, so none can be missing.
    entries: dict[str, str] = {}  # "--flag" -> its help text, lines joined
    for line in out.split("\n\n", 2)[-1].splitlines():
        if line.startswith("  -"):
            flag, *words = line.split()
            entries[flag] = " ".join(words)
        elif entries and line.startswith(" " * 4):
            entries[flag] += " " + " ".join(line.split())
    fields = dataclasses.fields(TrainConfig)
    assert len(fields) >= 37
    for f in fields:
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        flag = next((k for k in entries if k.rstrip(",") == flag), flag)
        assert flag in entries, f"{flag} (field {f.name}) has no help entry"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert f"(default: {describe_default(default)})" in entries[flag], (f.name, entries[flag])
    assert describe_default(True) == "on" and describe_default(None) == "none" and describe_default(0.001) == "0.001"


# ------------------------------------------------------------ bad input
BAD_TRAIN = {
    "negative step size": (["--inner-lr", "-0.1"], "inner_lr must be a positive number, got -0.1"),
    "zero meta step size": (["--meta-lr", "0"], "meta_lr must be a positive number"),
    "n_way < 2": (["--n-way", "1"], "n_way must be an int >= 2, got 1"),
    "not a number": (["--n-way", "five"], "argument --n-way: invalid int value: 'five'"),
    "unknown dataset": (["--dataset", "imagenet"], "dataset 'imagenet' is neither a named dataset (omniglot, "
                        "miniimagenet, tieredimagenet, cifarfs, fc100, cub) nor an existing"),
    "missing path": (["--dataset", "/no/such/tree"], "dataset '/no/such/tree' is neither"),
    "unknown preset": (["--preset", "omniglot-1w1s"], "argument --preset: invalid choice: 'omniglot-1w1s'"),
    "unknown flag": (["--n-ways", "5"], "unrecognized arguments: --n-ways 5"),
    "unknown config key": (["--config", "bad.toml"], "unknown key 'n_wya'; did you mean 'n_way'?"),
    "missing config": (["--config", "missing.json"], "does not exist"),
    "missing source": (["--source", "/no/such/zips"], "source '/no/such/zips' does not exist"),
    "missing resume": (["--resume", "runs/none"], "no checkpoint at"),
    "unknown algorithm": (["--algorithm", "protonet"], "algorithm must be one of"),
    "bad algorithm option": (["--algorithm-option", "inner_lr=1"], "are fields of the config"),
    "zero tasks per backward": (["--tasks-per-backward", "0"], "tasks_per_backward must be an int >= 1, got 0"),
    "model option not a bool": (["--model-option", "pool=False!"], "pool='False!' is not valid: pool of Conv4 takes "
                                                                   "true or false"),
    "model option set by a flag": (["--model-option", "hidden=32"], "set them with --hidden instead"),
    "unknown model module": (["--model", "nosuch.nets:cnn"], "no module named 'nosuch.nets' can be imported"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN))
def test_bad_train_input_exits_2_with_one_line_and_writes_nothing(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.toml").write_text("n_wya = 5\n")
    before = sorted(tmp_path.rglob("*"))
    flags, message = BAD_TRAIN[case]
    code, out, err = run(["train", *flags, "--save-to", "run"], capsys)
    assert code == 2
    assert out == "" and err.count("\n") == 1 and err.startswith("maml-func train: error: ")
    assert message in err
    assert sorted(tmp_path.rglob("*")) == before  # no run directory, no cache, no download


@pytest.mark.parametrize(("flags", "message"), [
    (["--checkpoint", "missing.pt"], "no checkpoint at"),
    (["--tasks", "0", "--dataset", "DATA"], "num_tasks must be an int >= 1, got 0"),
    (["--classes", "holdout"], "invalid choice: 'holdout'"),
    (["--n-way", "1"], "n_way must be an int >= 2"),
])
def test_bad_eval_input_exits_2(flags: list[str], message: str, folder: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["eval", *[str(folder) if f == "DATA" else f for f in flags]], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------- the work
def test_train_then_eval(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    code, _, err = run(["train", *tiny_flags(folder, tmp_path), "--iterations", "4", "--val-every", "2",
                        "--tasks-per-backward", "2", "--save-to", str(run_dir)], capsys)
    assert code == 0, err
    assert f"Evaluate with: maml-func eval --checkpoint {run_dir}" in err
    assert {p.name for p in run_dir.iterdir()} >= {"last.pt", "best.pt", "metrics.jsonl", "learning_curve.png"}
    assert load_checkpoint(run_dir / "last.pt")["iteration"] == 4
    assert load_checkpoint(run_dir / "last.pt")["config"]["tasks_per_backward"] == 2

    code, out, err = run(["eval", "--checkpoint", str(run_dir), "--tasks", "8", "--batch-size", "3", "--steps", "2"],
                         capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert SUMMARY.match(lines[0]) and lines[0].startswith("3-way 1-shot:") and "(8 tasks, 2 steps)" in lines[0]
    assert lines[1].startswith("accuracy after each inner step  0:")

    code, out, _ = run(["eval", "--checkpoint", str(run_dir / "last.pt"), "--tasks", "6", "--json",
                        "--classes", "val"], capsys)
    result = json.loads(out)
    assert code == 0 and result["num_tasks"] == 6
    assert result["steps"] == 3 and len(result["accuracy"]) == 4  # the config's eval_inner_steps
    assert result["classes"] == "val" and SUMMARY.match(result["summary"])


def test_each_command_reads_its_checkpoint_once(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import maml_func.checkpoint

    run_dir = tmp_path / "run"
    assert run(["train", *tiny_flags(folder, tmp_path), "--iterations", "2", "--val-every", "0",
                "--save-to", str(run_dir)], capsys)[0] == 0
    reads: list[Path] = []

    def counting(path, **kwargs):
        reads.append(Path(path))
        return load_checkpoint(path, **kwargs)

    monkeypatch.setattr(maml_func.checkpoint, "load_checkpoint", counting)
    code, _, err = run(["train", "--resume", str(run_dir), "--iterations", "3", "--no-progress"], capsys)
    assert code == 0, err
    assert reads == [run_dir / "last.pt"]
    reads.clear()
    code, _, err = run(["eval", "--checkpoint", str(run_dir), "--tasks", "4", "--no-progress"], capsys)
    assert code == 0, err
    assert reads == [run_dir / "best.pt"]


def test_eval_without_checkpoint_is_the_untrained_baseline(folder: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(["eval", *tiny_flags(folder, tmp_path), "--tasks", "10", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["checkpoint"] is None and result["n_way"] == 3 and len(result["accuracy"]) == 4


def test_non_finite_loss_exits_1_and_names_the_iteration(folder: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["train", *tiny_flags(folder, tmp_path), "--inner-lr", "1e38", "--val-every", "0",
                        "--save-to", str(tmp_path / "run")], capsys)
    assert code == 1 and "at iteration 1;" in err and "Lower inner_lr" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_offline_omniglot_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise ConnectionError("download_omniglot: could not download https://... (Name or service not known)")

    monkeypatch.setattr("maml_func.components.load_dataset", offline)
    monkeypatch.setattr("maml_func.data.download_omniglot", offline)
    code, _, err = run(["train", "--preset", "omniglot-5w1s", "--data-root", str(tmp_path / "data"),
                        "--save-to", str(tmp_path / "run"), "--device", "cpu"], capsys)
    assert code == 1 and "--source" in err and "maml-func download" in err
    assert not (tmp_path / "run").exists()
    code, _, err = run(["download", "--root", str(tmp_path / "data")], capsys)
    assert code == 1 and "--source" in err
    code, _, err = run(["download", "--root", str(tmp_path / "data"), "--source", str(tmp_path / "none")], capsys)
    assert code == 2 and "does not exist" in err


@pytest.mark.skipif(not SHARED_OMNIGLOT.is_dir(), reason=f"the Omniglot archives are not at {SHARED_OMNIGLOT}")
def test_download_copies_from_an_offline_source(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(["download", "--root", str(tmp_path / "omniglot"), "--source", str(SHARED_OMNIGLOT)], capsys)
    assert code == 0, err
    assert "Omniglot is ready at" in out
    assert {p.name for p in (tmp_path / "omniglot").glob("*.zip")} == {"images_background.zip",
                                                                      "images_evaluation.zip"}


def test_demo_runs(capsys: pytest.CaptureFixture) -> None:
    threads = torch.get_num_threads()
    code, out, _ = run(["demo", "--iterations", "20"], capsys)
    assert code == 0 and "query MSE after 0 / 1 / 10 inner steps" in out and "after 20 meta-updates" in out
    assert torch.get_num_threads() == threads


@pytest.mark.slow
def test_sigint_exits_130_with_a_checkpoint_and_resume_finishes(folder: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "maml_func", "train", *tiny_flags(folder, tmp_path), "--iterations", "100000",
               "--val-every", "0", "--save-every", "100000", "--log-every", "1", "--save-to", str(run_dir)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        metrics = run_dir / "metrics.jsonl"
        while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    found = re.search(r"interrupted after iteration (\d+); checkpoint saved to (\S+)\. Resume with: "
                      r"maml-func train --resume (\S+)", err)
    assert found, err
    iteration = int(found.group(1))
    assert iteration >= 2 and Path(found.group(2)) == run_dir / "last.pt" and Path(found.group(3)) == run_dir
    assert load_checkpoint(run_dir / "last.pt")["iteration"] == iteration

    code, _, err = run(["train", "--resume", str(run_dir), "--iterations", str(iteration + 2), "--no-progress"],
                       capsys)
    assert code == 0, err
    assert load_checkpoint(run_dir / "last.pt")["iteration"] == iteration + 2
