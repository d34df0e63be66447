"""``fit(model=..., callbacks=[...])`` from Python: a network object meta-trained by the config's algorithm, the
callbacks seeing every record of ``metrics.jsonl`` and every checkpoint, and loading such a run back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _user_models import small_cnn
from helpers import run
from torch import nn

from maml_func import Callback, fit
from maml_func.checkpoint import load_checkpoint
from maml_func.config import make_config
from maml_func.runs import evaluate_run, load_run


class Recorder(Callback):
    """Keeps what fit shows it."""

    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []
        self.validations: list[dict[str, Any]] = []
        self.checkpoints: list[tuple[str, int]] = []

    def on_log(self, record: dict[str, Any]) -> None:
        self.logs.append(record)

    def on_validation(self, record: dict[str, Any]) -> None:
        self.validations.append(record)

    def on_checkpoint(self, path: Path, iteration: int) -> None:
        self.checkpoints.append((path.name, iteration))


class OnlyLogs(Callback):
    def __init__(self) -> None:
        self.iterations: list[int] = []

    def on_log(self, record: dict[str, Any]) -> None:
        self.iterations.append(record["iteration"])
        record["loss"] = -1.0  # a copy: the run's own record is untouched


def tiny(folder: Path, save_to: Path | None, **changes: Any) -> Any:
    values: dict[str, Any] = dict(dataset=str(folder), data_root=str(folder.parent / "cache"), image_size=16,
                                  n_way=3, k_shot=1, n_query=2, meta_batch=2, iterations=4, val_every=2, val_tasks=4,
                                  save_every=2, log_every=1, device="cpu", seed=1, execution="vmap",
                                  save_to=None if save_to is None else str(save_to))
    values.update(changes)
    return make_config(**values)


def test_fit_with_a_network_object_and_callbacks(folder: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    network = small_cnn(n_way=3, hidden=8)
    recorder, only_logs = Recorder(), OnlyLogs()
    result = fit(tiny(folder, run_dir, dtype="float64"), model=network, callbacks=[recorder, only_logs],
                 progress=False)

    # The callbacks saw every record of metrics.jsonl, in order, and nothing else.
    written = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert recorder.logs == [r for r in written if r["kind"] == "train"]
    assert recorder.validations == [r for r in written if r["kind"] == "val"]
    assert [r["iteration"] for r in recorder.logs] == [1, 2, 3, 4]
    assert [r["iteration"] for r in recorder.validations] == [0, 2, 4]
    assert only_logs.iterations == [1, 2, 3, 4] and all(r["loss"] >= 0 for r in written if r["kind"] == "train")
    # Every checkpoint, as it was written: last.pt at each save, best.pt at each better validation.
    assert [c for c in recorder.checkpoints if c[0] == "last.pt"] == [("last.pt", 2), ("last.pt", 4)]
    best = [i for name, i in recorder.checkpoints if name == "best.pt"]
    assert best[0] == 0 and best[-1] == result.best_iteration == load_checkpoint(run_dir / "best.pt")["iteration"]

    # The network object itself was meta-trained, moved to the run's dtype like a built one.
    assert result.model is network and next(network.parameters()).dtype == torch.float64
    assert result.config.model == "<object torch.nn.modules.container.Sequential>"
    assert result.config.model_options == {}
    assert load_checkpoint(run_dir / "last.pt")["config"]["model"] == result.config.model


def test_a_run_of_a_network_object_loads_back_with_model(folder: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    result = fit(tiny(folder, run_dir, val_every=0), model=small_cnn(n_way=3, hidden=8), progress=False)

    hint = r"the run used a network object given to fit\(model=...\) \(torch.nn.modules.container.Sequential\)"
    with pytest.raises(ValueError, match=f"load_run: {hint}.*pass model="):
        load_run(run_dir)
    with pytest.raises(ValueError, match=f"evaluate_run: {hint}"):
        evaluate_run(run_dir)
    loaded = load_run(run_dir, model=small_cnn(n_way=3, hidden=8))
    assert loaded.iteration == 4
    for group, params in result.meta.items():
        for name, value in params.items():
            assert torch.equal(loaded.meta[group][name], value), (group, name)
    ev = evaluate_run(run_dir, model=small_cnn(n_way=3, hidden=8), num_tasks=4, batch_size=2, steps=1)
    assert ev.num_tasks == 4 and len(ev.accuracy) == 2 and 0 <= ev.final_accuracy <= 1

    # The command line cannot rebuild a Python object either: one line, with what to do.
    code, out, err = run(["eval", "--checkpoint", str(run_dir), "--tasks", "4", "--no-progress"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "evaluate_run: the run used a network object given to fit(model=...)" in err
    assert "--model package.module:factory" in err
    code, out, err = run(["train", "--resume", str(run_dir), "--iterations", "5", "--no-progress"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1  # refused before the run's summary line
    assert err.startswith("maml-func train: error: fit: the run used a network object given to fit(model=...)")

    # Resuming takes the same network again.
    resumed = fit(tiny(folder, run_dir, val_every=0, iterations=5), model=small_cnn(n_way=3, hidden=8),
                  resume=run_dir, progress=False)
    assert resumed.iteration == 5


def test_fit_refuses_what_is_not_a_network_or_a_callback(folder: Path) -> None:
    config = tiny(folder, None)
    with pytest.raises(TypeError, match=r"fit: callbacks\[0\] \(builtin_function_or_method\) has no on_start, "
                                        r"on_log, on_validation, on_checkpoint; subclass maml_func.Callback"):
        fit(config, callbacks=[print])
    with pytest.raises(TypeError, match="fit: callbacks must be a list of Callback objects, got Recorder"):
        fit(config, callbacks=Recorder())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fit: model must be an nn.Module, got function"):
        fit(config, model=small_cnn)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fit: the model gives 5 outputs per image but the tasks are 3-way"):
        fit(config, model=small_cnn(n_way=5), progress=False)
    with pytest.raises(ValueError, match=r"fit: the model fails on a support set of images \[3, 1, 16, 16\] "
                                         r"\(RuntimeError: .*\); build it for 1-channel 16x16 images"):
        fit(config, model=small_cnn(n_way=3, in_channels=3), progress=False)


def test_the_output_check_leaves_the_network_as_it_was(folder: Path) -> None:
    network = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(),
                            nn.Linear(4 * 14 * 14, 3))
    before = {k: v.clone() for k, v in network.state_dict().items()}
    from maml_func.components import check_outputs, load_splits, task_sampler

    config = tiny(folder, None)
    sampler = task_sampler(config, load_splits(config), "train", torch.device("cpu"), "test")
    state = torch.get_rng_state()
    check_outputs(network, sampler, config, torch.float32, "test")
    assert network.training and torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())


def test_on_start_comes_once_and_only_for_a_run_that_passed_every_check(folder: Path, tmp_path: Path) -> None:
    class Starts(Callback):
        def __init__(self) -> None:
            self.configs: list[Any] = []

        def on_start(self, config: Any) -> None:
            self.configs.append(config)

    starts = Starts()
    with pytest.raises(ValueError, match="fewer than k_shot"):  # refused once the data is read
        fit(tiny(folder, tmp_path / "refused", k_shot=5), callbacks=[starts], progress=False)
    assert starts.configs == [] and not (tmp_path / "refused").exists()
    fit(tiny(folder, tmp_path / "run", iterations=1, val_every=0), callbacks=[starts], progress=False)
    assert [c.channels for c in starts.configs] == [1]  # the run's config, channels read from the data
