"""``maml-func train --tensorboard DIR`` and :class:`maml_func.tensorboard.TensorBoard`: the event file holds the
scalars of ``metrics.jsonl``, at the same steps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import noise_folder, run, tiny_flags
from tensorboard.backend.event_processing import event_accumulator

from maml_func.callbacks import check_callbacks
from maml_func.tensorboard import TensorBoard, scalars


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return noise_folder(tmp_path_factory.mktemp("data") / "noise")


def read_events(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the event files in ``log_dir``: ``{tag: {step: value}}`` (one value per tag and step)."""
    accumulator = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    events: dict[str, dict[int, float]] = {}
    for tag in accumulator.Tags()["scalars"]:
        steps = [e.step for e in accumulator.Scalars(tag)]
        assert len(steps) == len(set(steps)), f"{tag}: a step written twice: {steps}"
        events[tag] = {e.step: e.value for e in accumulator.Scalars(tag)}
    return events


def expected_scalars(records: list[dict]) -> dict[str, dict[int, float]]:
    """The scalars the records should give, built here from the records' fields, independently of the callback."""
    expected: dict[str, dict[int, float]] = {}
    for r in records:
        if r["kind"] == "train":
            fields = {k: r[k] for k in ("loss", "accuracy", "grad_norm", "tasks_per_s", "meta_lr", "elapsed_s")}
        elif r["kind"] == "val":
            fields = {k: r[k] for k in ("accuracy", "ci95", "loss", "tasks", "steps", "elapsed_s", "train_s")}
            fields.update({f"accuracy_step_{i}": a for i, a in enumerate(r["accuracy_per_step"])})
        else:
            continue
        for name, value in fields.items():
            expected.setdefault(f"{r['kind']}/{name}", {})[r["iteration"]] = value
    return expected


def test_train_with_tensorboard_writes_the_metrics_jsonl_scalars(folder: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    run_dir, board = tmp_path / "run", tmp_path / "tb"
    code, _, err = run(["train", *tiny_flags(folder, tmp_path), "--iterations", "3", "--log-every", "1",
                        "--val-every", "2", "--save-to", str(run_dir), "--tensorboard", str(board)], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = expected_scalars(records)
    # The run logged what the test expects: training at 1, 2, 3; validation at 0, 2 and the end (3), 3 steps + 1.
    assert sorted(expected["train/loss"]) == [1, 2, 3]
    assert sorted(expected["val/accuracy"]) == [0, 2, 3]
    assert sorted(k for k in expected if k.startswith("val/accuracy_step_")) == [f"val/accuracy_step_{i}"
                                                                               for i in range(4)]
    events = read_events(board)
    assert sorted(events) == sorted(expected)
    for tag, by_step in expected.items():
        assert sorted(events[tag]) == sorted(by_step), tag
        for step, value in by_step.items():
            assert events[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-30), (tag, step)
    assert "train/meta_lr" in events and "val/ci95" in events and "train/tasks_per_s" in events


def test_the_callback_alone(tmp_path: Path) -> None:
    board = TensorBoard(tmp_path / "tb")
    assert check_callbacks([board], "test") == (board,)
    assert not (tmp_path / "tb").exists()  # nothing written before the run starts
    board.on_start(None)
    board.on_log({"kind": "train", "iteration": 10, "loss": 1.25, "accuracy": 0.4, "grad_norm": 3.0,
                  "tasks_per_s": 123.4567, "meta_lr": 1e-3, "elapsed_s": 2.5})
    board.on_log({"kind": "execution", "iteration": 10, "choice": "chunk=4", "cached": False,
                  "timings": {"loop": [0.1]}})  # nothing numeric: nothing written
    board.on_validation({"kind": "val", "iteration": 20, "accuracy": 0.6, "ci95": 0.05, "loss": 0.9,
                         "accuracy_per_step": [0.2, 0.5, 0.6], "tasks": 4, "steps": 2, "elapsed_s": 5.0,
                         "train_s": 4.0})
    # Flushed at once, before close: a run that dies leaves its scalars.
    events = read_events(tmp_path / "tb")
    assert events == {
        "train/loss": {10: 1.25}, "train/accuracy": {10: pytest.approx(0.4)}, "train/grad_norm": {10: 3.0},
        "train/tasks_per_s": {10: pytest.approx(123.4567)}, "train/meta_lr": {10: pytest.approx(1e-3)},
        "train/elapsed_s": {10: 2.5},
        "val/accuracy": {20: pytest.approx(0.6)}, "val/ci95": {20: pytest.approx(0.05)},
        "val/loss": {20: pytest.approx(0.9)}, "val/accuracy_step_0": {20: pytest.approx(0.2)},
        "val/accuracy_step_1": {20: 0.5}, "val/accuracy_step_2": {20: pytest.approx(0.6)},
        "val/tasks": {20: 4.0}, "val/steps": {20: 2.0}, "val/elapsed_s": {20: 5.0}, "val/train_s": {20: 4.0}}
    board.on_checkpoint(tmp_path / "last.pt", 20)
    board.close()
    board.close()  # twice is harmless
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1


def test_scalars_of_a_record() -> None:
    record = {"kind": "val", "iteration": 7, "accuracy": 0.5, "flag": True, "name": "x", "nested": {"a": 1},
              "accuracy_per_step": [0.25, 0.5], "widths": [1, 2], "empty": []}
    assert list(scalars(record)) == [("val/accuracy", 0.5), ("val/accuracy_step_0", 0.25),
                                     ("val/accuracy_step_1", 0.5), ("val/widths_0", 1.0), ("val/widths_1", 2.0)]


def test_missing_tensorboard_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           capsys: pytest.CaptureFixture, folder: Path) -> None:
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith(("tensorboard.",
                                                                              "torch.utils.tensorboard"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now fails as if not installed
    with pytest.raises(ImportError, match=r"pip install maml-func\[tensorboard\]"):
        TensorBoard(tmp_path / "tb")
    code, _, err = run(["train", *tiny_flags(folder, tmp_path), "--iterations", "1", "--save-to",
                        str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")], capsys)
    assert code == 2 and err.count("\n") == 1 and "pip install maml-func[tensorboard]" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()
