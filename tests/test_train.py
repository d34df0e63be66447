"""Meta-training: configs and presets, exact resume, SIGINT, non-finite losses, crash-safe checkpoints,
and learning a user's ImageFolder tree of synthetic glyphs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import SHARED_OMNIGLOT, assert_same_meta, make_glyph_folder, tiny

from maml_func import step as step_module
from maml_func.atomic import remove_stale_temporaries
from maml_func.checkpoint import load_checkpoint, save_checkpoint
from maml_func.config import TrainConfig, load_config_file, make_config
from maml_func.execution import ExecutionPolicy
from maml_func.loop import MetaStepFailed, TrainingInterrupted
from maml_func.presets import PRESETS
from maml_func.runs import evaluate_run, load_run
from maml_func.step import MetaStepOutOfMemory, NonFiniteLossError, meta_gradient, meta_lr_at, train_step
from maml_func.train import fit


@pytest.fixture(scope="module")
def reference(glyphs: Path, tmp_path_factory: pytest.TempPathFactory):
    """The uninterrupted 6-iteration run every resume test must reproduce bit for bit."""
    run = tmp_path_factory.mktemp("reference") / "run"
    return fit(tiny(glyphs, run), progress=False)


# ------------------------------------------------------------------ configs
def test_presets_follow_the_maml_paper() -> None:
    for name, (n_way, k_shot) in {"omniglot-5w1s": (5, 1), "omniglot-5w5s": (5, 5), "omniglot-20w1s": (20, 1),
                                  "omniglot-20w5s": (20, 5)}.items():
        config = make_config(preset=name)
        assert (config.n_way, config.k_shot, config.n_query) == (n_way, k_shot, k_shot)
        assert config.rotations and config.split == "maml" and config.image_size == 28
        assert config.meta_lr == 1e-3 and config.dataset == "omniglot"
        if n_way == 5:
            assert (config.inner_lr, config.inner_steps, config.eval_inner_steps, config.meta_batch) == (0.4, 1, 3, 32)
        else:
            assert (config.inner_lr, config.inner_steps, config.eval_inner_steps, config.meta_batch) == (0.1, 5, 5, 16)
    assert sorted(PRESETS) == ["cifarfs-5w1s", "cub-5w1s", "fc100-5w1s", "miniimagenet-5w1s", "miniimagenet-5w5s",
                               "omniglot-20w1s", "omniglot-20w5s", "omniglot-5w1s", "omniglot-5w5s",
                               "tieredimagenet-5w1s"]


def test_config_precedence_defaults_preset_file_flags(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "omniglot-20w1s"\ninner-lr = 0.2\nmeta_batch = 8\n[algorithm_options]\n')
    config = make_config(file=toml, meta_batch=4)
    assert (config.n_way, config.inner_steps) == (20, 5)  # from the preset named in the file
    assert config.inner_lr == 0.2  # the file beats the preset
    assert config.meta_batch == 4  # a flag beats the file
    # An explicit preset (a flag) replaces the file's preset; the file's own values still beat any preset.
    config = make_config(preset="omniglot-5w1s", file=toml)
    assert (config.n_way, config.inner_steps, config.inner_lr) == (5, 1, 0.2)
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"n_way": 7, "k_shot": 2}))
    assert (make_config(file=js).n_way, make_config(file=js).k_shot, make_config(file=js).inner_lr) == (7, 2, 0.4)
    assert load_config_file(js) == {"n_way": 7, "k_shot": 2}


def test_config_rejects_unknown_keys_with_a_suggestion(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("n_wya = 5\n")
    with pytest.raises(ValueError, match="unknown key 'n_wya'; did you mean 'n_way'"):
        make_config(file=bad)
    with pytest.raises(ValueError, match="unknown preset 'omniglot-1w1s'"):
        make_config(preset="omniglot-1w1s")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_config(file=tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_way": 1}, "n_way must be an int >= 2, got 1"),
        ({"inner_lr": -0.1}, "inner_lr must be a positive number, got -0.1"),
        ({"meta_lr": 0.0}, "meta_lr must be a positive number, got 0.0"),
        ({"k_shot": 0}, "k_shot must be an int >= 1, got 0"),
        ({"image_size": 8}, "image_size must be an int >= 16"),
        ({"dtype": "float16"}, "dtype must be one of"),
        ({"algorithm": "protonet"}, "algorithm must be one of"),
        ({"algorithm_options": {"inner_lr": 1.0}}, "are fields of the config"),
        ({"rotations": "yes"}, "rotations must be true or false"),
        ({"dataset": "/no/such/folder", "source": "/tmp"}, "source applies to a named dataset only"),
    ],
)
def test_config_errors_name_field_value_and_fix(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**changes)


def test_check_paths_names_missing_dataset_and_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a named dataset .* nor an existing directory"):
        TrainConfig(dataset=str(tmp_path / "nope")).check_paths()
    with pytest.raises(ValueError, match="source .* does not exist"):
        TrainConfig(source=str(tmp_path / "nope")).check_paths()
    TrainConfig(dataset=str(tmp_path)).check_paths()


# -------------------------------------------------------- run and resume
@pytest.mark.slow
def test_run_directory_holds_checkpoints_metrics_and_curve(reference) -> None:
    run_dir = reference.run_dir
    assert reference.iteration == 6 and reference.stopped == "completed"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["iteration"] for r in records if r["kind"] == "val"] == [0, 3, 6]
    val = [r for r in records if r["kind"] == "val"]
    assert all(len(r["accuracy_per_step"]) == 3 and 0 <= r["accuracy"] <= 1 for r in val)
    assert reference.best_val_accuracy == max(r["accuracy"] for r in val)
    assert (run_dir / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run_dir / "config.json").read_text()) == reference.config.to_dict()
    last, best = load_checkpoint(run_dir / "last.pt"), load_checkpoint(run_dir / "best.pt")
    assert last["iteration"] == 6 and best["iteration"] == reference.best_iteration
    assert last["config"]["channels"] == 1  # resolved from the data
    assert_same_meta(last["meta"], {g: {k: v.detach() for k, v in p.items()} for g, p in reference.meta.items()})
    assert not list(run_dir.glob(".*.tmp"))
    loaded = load_run(run_dir / "last.pt")
    assert_same_meta(loaded.meta, last["meta"])


@pytest.mark.slow
def test_resume_after_a_stop_is_bitwise_exact(glyphs: Path, tmp_path: Path, reference) -> None:
    first = fit(tiny(glyphs, tmp_path / "run", iterations=4), progress=False)
    assert first.iteration == 4
    resumed = fit(tiny(glyphs, tmp_path / "run", iterations=6), resume=tmp_path / "run", progress=False)
    assert resumed.iteration == 6
    assert_same_meta(resumed.meta, reference.meta)
    ours = [r for r in resumed.history if r["kind"] == "train"]
    theirs = [r for r in reference.history if r["kind"] == "train"]
    assert [r["loss"] for r in ours] == [r["loss"] for r in theirs]
    opt_a = load_checkpoint(tmp_path / "run" / "last.pt")["optimizer"]["state"]
    opt_b = load_checkpoint(reference.run_dir / "last.pt")["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_b)


def interrupting_at(iteration: int):
    """A step for ``fit(step=...)``: SIGINT arrives in the middle of the train_step of ``iteration`` (0-based)."""
    def interrupting(state, batch, algorithm, **kwargs):
        if state.iteration == iteration:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(state, batch, algorithm, **kwargs)

    return interrupting


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_resume_is_bitwise_exact(glyphs: Path, tmp_path: Path, reference) -> None:
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as stop:  # the signal arrives in the middle of the third iteration
        fit(tiny(glyphs, tmp_path / "run"), progress=False, step=interrupting_at(2))
    assert signal.getsignal(signal.SIGINT) is handler  # our handler is gone again
    assert stop.value.iteration == 3 and stop.value.signal == signal.SIGINT  # the iteration is finished first
    assert stop.value.checkpoint == tmp_path / "run" / "last.pt"
    assert load_checkpoint(stop.value.checkpoint)["iteration"] == 3
    resumed = fit(tiny(glyphs, tmp_path / "run"), resume=tmp_path / "run", progress=False)
    assert_same_meta(resumed.meta, reference.meta)


def test_resume_refuses_changes_that_alter_the_trajectory(glyphs: Path, tmp_path: Path) -> None:
    fit(tiny(glyphs, tmp_path / "run", iterations=2), progress=False)
    with pytest.raises(ValueError, match=r"cannot resume with a changed inner_lr=0.1 \(checkpoint: 0.4\)"):
        fit(tiny(glyphs, tmp_path / "run", inner_lr=0.1), resume=tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        fit(tiny(glyphs, tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match="already at iteration 2"):
        fit(tiny(glyphs, tmp_path / "run", iterations=1), resume=tmp_path / "run", progress=False)


@pytest.mark.slow
def test_cosine_schedule_values_logs_and_exact_resume(glyphs: Path, tmp_path: Path) -> None:
    config = tiny(glyphs, tmp_path / "whole", lr_schedule="cosine", meta_lr=0.01, final_lr_factor=0.1)
    assert meta_lr_at(config, 0) == pytest.approx(0.01)
    assert meta_lr_at(config, 3) == pytest.approx(0.01 * (0.1 + 0.9 * 0.5))  # half way: the mean of both ends
    assert meta_lr_at(config, 6) == pytest.approx(0.001)
    assert all(meta_lr_at(config, i) > meta_lr_at(config, i + 1) for i in range(6))
    assert meta_lr_at(config.replace(lr_schedule="constant"), 5) == 0.01
    whole = fit(config, progress=False)
    logged = [r["meta_lr"] for r in whole.history if r["kind"] == "train"]
    assert logged == pytest.approx([meta_lr_at(config, i) for i in range(6)])

    part = config.replace(save_to=str(tmp_path / "part"))
    with pytest.raises(TrainingInterrupted):
        fit(part, progress=False, step=interrupting_at(2))
    with pytest.raises(ValueError, match="cannot resume a cosine lr_schedule with iterations=8"):
        fit(part.replace(iterations=8), resume=tmp_path / "part", progress=False)
    assert_same_meta(fit(part, resume=tmp_path / "part", progress=False).meta, whole.meta)


def test_tasks_per_backward_splits_every_meta_batch_and_may_change_on_resume(
        glyphs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from maml_func.algorithms.maml import MAML

    sizes: list[int] = []
    meta_loss = MAML.meta_loss

    def recording(self, meta, batch, iteration=0, **options):
        sizes.append(batch.num_tasks)
        return meta_loss(self, meta, batch, iteration, **options)

    monkeypatch.setattr(MAML, "meta_loss", recording)
    config = tiny(glyphs, tmp_path / "run", iterations=2, val_every=0, dtype="float64")
    split = fit(config.replace(tasks_per_backward=3), progress=False)
    assert sizes == [3, 1, 3, 1]  # meta_batch 4 in parts of 3 and 1, two iterations
    sizes.clear()
    whole = fit(config.replace(save_to=None), progress=False)
    assert sizes == [4, 4]
    for name, value in whole.meta["model"].items():
        if not (name.startswith("features.") and name.endswith(".0.bias")):  # conv biases before batch norm:
            # their meta-gradient is 0 up to rounding, which Adam scales up to full steps
            assert torch.allclose(split.meta["model"][name], value, rtol=1e-9, atol=1e-12), name
    resumed = fit(config.replace(iterations=3, tasks_per_backward=2), resume=tmp_path / "run", progress=False)
    assert resumed.iteration == 3 and sizes[-2:] == [2, 2]
    with pytest.raises(ValueError, match="tasks_per_backward must be an int >= 1, got 0; or None"):
        TrainConfig(tasks_per_backward=0)


def test_config_rejects_bad_schedules_and_chunk_sizes() -> None:
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        TrainConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="final_lr_factor must be a number in"):
        TrainConfig(final_lr_factor=1.5)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, None or 'auto', got 0"):
        TrainConfig(chunk_size=0)
    assert TrainConfig().chunk_size == "auto" and TrainConfig(chunk_size=None).chunk_size is None


def test_non_finite_loss_stops_without_saving_the_bad_state(glyphs: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def diverging(algorithm, meta, batch, iteration, **kwargs):
        loss, metrics = meta_gradient(algorithm, meta, batch, iteration, **kwargs)
        return (loss * float("nan") if iteration == 4 else loss), metrics

    monkeypatch.setattr(step_module, "meta_gradient", diverging)
    with pytest.raises(NonFiniteLossError, match="meta-loss is nan at iteration 5") as err:
        fit(tiny(glyphs, tmp_path / "run"), progress=False)
    assert err.value.iteration == 5 and err.value.checkpoint == tmp_path / "run" / "last.pt"
    assert "is intact and --resume" in str(err.value) and "Lower inner_lr" in str(err.value)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["iteration"] == 4
    assert all(torch.isfinite(p).all() for p in last["meta"]["model"].values())


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't "
                                                "allocate memory: you tried to allocate 8 bytes. Error code 12"),
                                   MemoryError()], ids=["torch-cpu", "python"])
def test_out_of_memory_stops_with_the_checkpoint_and_the_fix(glyphs: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, error) -> None:
    def exhausted(algorithm, meta, batch, iteration, **kwargs):
        if iteration == 4:
            raise error
        return meta_gradient(algorithm, meta, batch, iteration, **kwargs)

    monkeypatch.setattr(step_module, "meta_gradient", exhausted)
    with pytest.raises(MetaStepOutOfMemory, match="meta-iteration 5 did not fit in memory") as err:
        fit(tiny(glyphs, tmp_path / "run"), progress=False)
    assert err.value.iteration == 5 and err.value.checkpoint == tmp_path / "run" / "last.pt"
    assert "backprop='adjoint'" in str(err.value)
    assert f"--resume {tmp_path / 'run'} continues from it" in str(err.value)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 4

    def broken(*args, **kwargs):  # any other RuntimeError is not mistaken for one
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(step_module, "meta_gradient", broken)
    with pytest.raises(MetaStepFailed, match=r"meta-iteration 1 failed \(RuntimeError: shape mismatch\); no "
                                             "checkpoint had been written, so nothing of this run is left"):
        fit(tiny(glyphs, tmp_path / "other"), progress=False)
    assert not (tmp_path / "other").exists()


def test_a_huge_inner_step_is_caught_as_non_finite(glyphs: Path, tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match="at iteration 1;.*no checkpoint had been written"):
        fit(tiny(glyphs, tmp_path / "run", inner_lr=1e38, val_every=0), progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_time_limit_stops_with_a_checkpoint(glyphs: Path, tmp_path: Path) -> None:
    result = fit(tiny(glyphs, tmp_path / "run", max_minutes=1e-9, val_every=0), progress=False)
    assert result.stopped == "time_limit" and result.iteration == 1
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 1
    # The time limit is the run's end: its last iteration is validated, and best.pt can be it.
    assert [r["iteration"] for r in result.history if r["kind"] == "val"] == [1]
    assert result.best_iteration == 1 and load_checkpoint(tmp_path / "run" / "best.pt")["iteration"] == 1


def test_fit_without_save_to_writes_nothing(glyphs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = fit(tiny(glyphs, None, iterations=2, data_root=str(glyphs.parent / "cache")), progress=False)
    assert result.run_dir is None and result.iteration == 2 and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------- checkpoints
def test_checkpoints_load_weights_only(tmp_path: Path) -> None:
    path = save_checkpoint({"w": torch.arange(3.0), "config": {"n_way": 5}, "it": 7, "none": None}, tmp_path / "c.pt")
    state = load_checkpoint(path)
    assert torch.equal(state["w"], torch.arange(3.0)) and state["it"] == 7 and state["none"] is None
    torch.save({"evil": Path("x")}, tmp_path / "evil.pt")  # a pickled class: never unpickled by us
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "torn.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "torn.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


_SLOW_SAVE = textwrap.dedent("""
    import os, sys, time, torch
    from maml_func.checkpoint import save_checkpoint
    path = sys.argv[1]
    save_checkpoint({"w": torch.zeros(100_000), "generation": 1}, path)

    class Slow:  # the temporary file of the write: stalls after its first 2000 bytes
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *exc): self.f.close()
        def write(self, b):
            self.f.write(b[:2000]); self.f.flush()
            print("WRITING", flush=True); time.sleep(600)
        def flush(self): self.f.flush()
        def fileno(self): return self.f.fileno()

    real_fdopen = os.fdopen
    os.fdopen = lambda fd, mode: Slow(real_fdopen(fd, mode))
    save_checkpoint({"w": torch.ones(100_000), "generation": 2}, path)
""")


@pytest.mark.slow
def test_sigkill_during_a_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        partial = list(tmp_path.glob(".last.pt.*.tmp"))
        assert len(partial) == 1 and partial[0].stat().st_size > 1000  # killed mid-write, for real
    finally:
        proc.kill()
        proc.wait()
    state = load_checkpoint(path)
    assert state["generation"] == 1 and torch.equal(state["w"], torch.zeros(100_000))
    assert remove_stale_temporaries(path) == partial and not partial[0].exists()


@pytest.mark.slow
def test_sigkill_at_random_points_of_training_leaves_a_loadable_checkpoint(glyphs: Path, tmp_path: Path) -> None:
    rng = random.Random(0)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "maml_func", "train", "--dataset", str(glyphs), "--data-root",
               str(tmp_path / "cache"), "--image-size", "16", "--hidden", "8", "--n-way", "3", "--n-query", "2",
               "--meta-batch", "2", "--iterations", "100000", "--save-every", "1", "--val-every", "0",
               "--device", "cpu", "--save-to", str(run), "--no-progress"]
    iterations = []
    for attempt in range(3):
        proc = subprocess.Popen(command + (["--resume", str(run)] if attempt else []), stderr=subprocess.DEVNULL)
        start = time.time()  # the clock of st_mtime
        try:
            while time.time() - start < 60:
                state_time = (run / "last.pt").stat().st_mtime if (run / "last.pt").exists() else None
                if state_time is not None and state_time > start:  # this process is writing checkpoints
                    break
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.3))  # while checkpoints are being written every iteration
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        state = load_checkpoint(run / "last.pt")
        assert state["iteration"] >= 1 and all(torch.isfinite(p).all() for p in state["meta"]["model"].values())
        iterations.append(state["iteration"])
    assert iterations == sorted(iterations) and iterations[-1] > iterations[0]  # each resumed run went on


# ------------------------------------------------------ learning for real
@pytest.mark.slow
def test_fit_learns_a_user_image_folder_far_above_chance(tmp_path: Path) -> None:
    """The acceptance test on a user's folder: synthetic glyphs, a few hundred iterations, 5-way 1-shot."""
    folder = make_glyph_folder(tmp_path / "glyphs", n_classes=40, per_class=10, size=20, seed=1)
    config = make_config(dataset=str(folder), data_root=str(tmp_path / "cache"), image_size=16, hidden=16,
                         n_way=5, k_shot=1, n_query=3, meta_batch=8, iterations=300, val_every=100,
                         val_tasks=50, eval_inner_steps=3, device="cpu", save_to=str(tmp_path / "run"))
    untrained = evaluate_run(None, config=config, num_tasks=200)
    result = fit(config, progress=False)
    trained = evaluate_run(result.run_dir, num_tasks=200)
    assert trained.n_way == 5 and trained.k_shot == 1 and trained.num_tasks == 200
    print(f"untrained {untrained.summary()}; trained {trained.summary()}")
    assert trained.final_accuracy > 0.6, trained.summary()  # chance is 0.2
    assert trained.final_accuracy > untrained.final_accuracy + 0.05, (trained.summary(), untrained.summary())


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_OMNIGLOT.is_dir(), reason=f"the Omniglot archives are not at {SHARED_OMNIGLOT}")
def test_tiny_omniglot_run_from_the_shared_archives(tmp_path: Path) -> None:
    config = make_config(preset="omniglot-5w1s", source=str(SHARED_OMNIGLOT), data_root=str(tmp_path / "data"),
                         download=False, hidden=8, meta_batch=4, iterations=3, val_every=0, val_tasks=5,
                         device="cpu", save_to=str(tmp_path / "run"))
    result = fit(config, progress=False)
    assert result.iteration == 3 and result.best_iteration == 3
    evaluation = evaluate_run(tmp_path / "run", num_tasks=10, batch_size=5)
    assert (evaluation.n_way, evaluation.k_shot, evaluation.steps, evaluation.num_tasks) == (5, 1, 3, 10)
    assert 0 <= evaluation.final_accuracy <= 1


# ------------------------------------------------------------- train_step
def _state_and_batch(dtype: torch.dtype = torch.float64):
    from maml_func import MAML, Conv4, TaskBatch
    from maml_func.state import TrainState

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        algorithm = MAML(Conv4(n_way=3, hidden=8, image_size=16).to(dtype), inner_lr=0.4)
    meta = algorithm.init()
    state = TrainState(meta, torch.optim.Adam(algorithm.parameters(meta), lr=1.0), torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    batch = TaskBatch(torch.rand(4, 3, 1, 16, 16, generator=g, dtype=dtype), torch.arange(3).repeat(4, 1),
                      torch.rand(4, 6, 1, 16, 16, generator=g, dtype=dtype),
                      torch.arange(3).repeat_interleave(2).repeat(4, 1))
    return algorithm, state, batch


def test_train_step_is_meta_gradient_then_one_optimizer_step_at_the_given_lr() -> None:
    algorithm, state, batch = _state_and_batch()
    twin_algorithm, twin, _ = _state_and_batch()
    metrics = train_step(state, batch, algorithm, lr=0.01)
    assert state.iteration == 1 and state.optimizer.param_groups[0]["lr"] == 0.01
    # The same update by hand: the meta-gradient, then Adam at 0.01.
    loss, per_task = meta_gradient(twin_algorithm, twin.meta, batch, 0)
    for group in twin.optimizer.param_groups:
        group["lr"] = 0.01
    twin.optimizer.step()
    assert_same_meta(state.meta, twin.meta)
    assert metrics["loss"] == loss.item() and metrics["query_loss"] == per_task["loss"].mean().item()
    assert metrics["accuracy"] == per_task["accuracy"].mean().item() and metrics["grad_norm"] > 0


def test_train_step_takes_tasks_per_backward_from_its_policy_and_refuses_another() -> None:
    algorithm, state, batch = _state_and_batch()
    state.execution = ExecutionPolicy("loop", tasks_per_backward=2)
    with pytest.raises(ValueError, match="tasks_per_backward=3 but the state's execution policy has 2"):
        train_step(state, batch, algorithm, lr=0.01, tasks_per_backward=3)
    assert state.iteration == 0
    train_step(state, batch, algorithm, lr=0.01, tasks_per_backward=2)
    assert state.iteration == 1


def test_train_step_refuses_a_non_finite_update_and_leaves_the_state_as_it_was() -> None:
    algorithm, state, batch = _state_and_batch()
    train_step(state, batch, algorithm, lr=0.01)
    before = {k: v.detach().clone() for k, v in state.meta["model"].items()}
    moments = {i: s["exp_avg"].clone() for i, s in state.optimizer.state_dict()["state"].items()}
    poisoned = batch._replace(x_query=batch.x_query.clone().index_fill_(1, torch.tensor([0]), float("nan")))
    with pytest.raises(NonFiniteLossError, match="meta-loss is nan at iteration 2; the update was not applied") as err:
        train_step(state, poisoned, algorithm, lr=0.01)
    assert err.value.iteration == 2 and err.value.quantity == "meta-loss" and err.value.checkpoint is None
    assert state.iteration == 1
    assert all(torch.equal(before[k], v) for k, v in state.meta["model"].items())
    assert all(torch.equal(moments[i], s["exp_avg"]) for i, s in state.optimizer.state_dict()["state"].items())


def test_fit_makes_each_meta_update_with_the_step_it_is_given(glyphs: Path) -> None:
    calls: list[int] = []

    def counting(state, batch, algorithm, **kwargs):
        calls.append(state.iteration)
        return train_step(state, batch, algorithm, **kwargs)

    result = fit(tiny(glyphs, None, iterations=3, val_every=0, val_tasks=3), progress=False, step=counting)
    assert calls == [0, 1, 2] and result.iteration == 3
    assert step_module.meta_gradient is meta_gradient  # nothing of the library is patched
    with pytest.raises(TypeError, match="fit: step must be a function like maml_func.step.train_step, got int"):
        fit(tiny(glyphs, None), progress=False, step=1)


def test_the_device_guard_applies_finite_steps_exactly_and_nothing_after_a_bad_one() -> None:
    from maml_func.step import FiniteGuard

    algorithm, guarded, batch = _state_and_batch()
    _, direct, _ = _state_and_batch()
    guard = FiniteGuard("cpu")
    for _ in range(2):  # finite steps: the same update as the host-checked step, bit for bit
        train_step(guarded, batch, algorithm, lr=0.01, guard=guard)
        train_step(direct, batch, algorithm, lr=0.01)
    assert_same_meta(guarded.meta, direct.meta)
    guard.check()
    good = {k: v.detach().clone() for k, v in guarded.meta["model"].items()}
    moments = {i: s["exp_avg"].clone() for i, s in guarded.optimizer.state_dict()["state"].items()}
    poisoned = batch._replace(x_query=batch.x_query.clone().index_fill_(1, torch.tensor([0]), float("nan")))
    train_step(guarded, poisoned, algorithm, lr=0.01, guard=guard)  # no exception yet: nothing was read back
    train_step(guarded, batch, algorithm, lr=0.01, guard=guard)  # finite, but after a bad step: not applied
    assert guarded.iteration == 4 and not bool(guard.ok) and int(guard.first_bad) == 3
    assert all(torch.equal(good[k], v) for k, v in guarded.meta["model"].items())
    assert all(torch.equal(moments[i], s["exp_avg"]) for i, s in guarded.optimizer.state_dict()["state"].items())
    with pytest.raises(NonFiniteLossError, match="meta-loss is nan at iteration 3; the update was not applied"):
        guard.check()


def test_fit_with_checks_kept_on_the_device_stops_at_the_first_bad_iteration(
        glyphs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerator path of the loop, run on the CPU: the NaN of iteration 5 is seen at the next save (6)."""
    from maml_func import device as devices

    def diverging(algorithm, meta, batch, iteration, **kwargs):
        loss, metrics = meta_gradient(algorithm, meta, batch, iteration, **kwargs)
        return (loss * float("nan") if iteration == 4 else loss), metrics

    monkeypatch.setattr(devices, "defer_host_reads", lambda device: True)
    monkeypatch.setattr(step_module, "meta_gradient", diverging)
    with pytest.raises(NonFiniteLossError, match=r"meta-loss is nan at iteration 5; stopped without applying "
                                                 r"that update \(the last checkpoint.*iteration 4\), is intact"):
        fit(tiny(glyphs, tmp_path / "run", log_every=3), progress=False)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["iteration"] == 4 and all(torch.isfinite(p).all() for p in last["meta"]["model"].values())
    logged = [r["iteration"] for r in json.loads("[" + ",".join(
        (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) + "]") if r["kind"] == "train"]
    assert logged == [3]  # nothing was logged after the bad step


@pytest.mark.slow
def test_deferred_checks_give_the_same_run_as_checks_at_once(glyphs: Path, tmp_path: Path, reference,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from maml_func import device as devices

    monkeypatch.setattr(devices, "defer_host_reads", lambda device: True)
    deferred = fit(tiny(glyphs, tmp_path / "run"), progress=False)
    assert_same_meta(deferred.meta, reference.meta)
    timeless = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in deferred.history]
    assert timeless == [{k: v for k, v in r.items() if not k.endswith("_s")} for r in reference.history]
