"""benchmarks/throughput.py: its loop row is the shared reference, and a tiny run gives well-formed output.

Also the execution policy whose choices the benchmark reports (``maml_func.batching``:
the automatic chunk size, the tasks' memory layout) and the CPU allocator tuning.
Correctness only; no timing is asserted (timings are the benchmark's job).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import rel_err

from maml_func import MAML, Conv4, TaskBatch
from maml_func.batching import auto_chunk_size, tasks_channels_last
from maml_func.reference import loop_meta_loss

pytestmark = pytest.mark.slow  # runs the benchmark scripts
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def benchmarks() -> Iterator[Path]:
    """``benchmarks/`` on ``sys.path`` for this module's tests, as it is for a script run from there."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(SCRIPT.parent))
        yield SCRIPT.parent


@pytest.fixture(scope="module")
def bench(benchmarks: Path) -> ModuleType:
    return importlib.import_module("throughput")


@pytest.fixture(scope="module")
def harness(benchmarks: Path) -> ModuleType:
    return importlib.import_module("harness")


def batch_of(tasks: int, n_way: int, queries: int, size: int = 28, dtype=torch.float64, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(
        torch.rand(tasks, n_way, 1, size, size, generator=g, dtype=dtype),
        torch.arange(n_way).expand(tasks, -1).clone(),
        torch.rand(tasks, n_way * queries, 1, size, size, generator=g, dtype=dtype),
        torch.randint(0, n_way, (tasks, n_way * queries), generator=g),
    )


def test_auto_chunk_size_on_cpu(harness):
    # Omniglot 5-way 1-shot, 15 queries: 80 images of 28x28 float32 per task -> 4 tasks per 1 MiB.
    assert auto_chunk_size(batch_of(32, 5, 15, dtype=torch.float32)) == 4
    # 20-way: 320 images per task, four times the bytes -> 2, never fewer than 2.
    assert auto_chunk_size(batch_of(16, 20, 15, dtype=torch.float32)) == 2
    assert auto_chunk_size(batch_of(4, 5, 15, size=84, dtype=torch.float32)) == 2
    # Everything fits in one chunk: no chunking at all.
    assert auto_chunk_size(batch_of(4, 5, 15, dtype=torch.float32)) is None
    maml, batch = MAML(Conv4()), batch_of(2, 5, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, None or 'auto'"):
        harness.meta_loss(maml, maml.init(), batch, chunk_size="big")
    with pytest.raises(ValueError, match="chunk_size"):
        harness.meta_loss(maml, maml.init(), batch, chunk_size=True)


def test_task_layout_is_channels_last_for_the_grouped_convolution():
    x = torch.rand(4, 6, 3, 5, 5)
    y = tasks_channels_last(x)
    assert torch.equal(x, y)
    # What vmap hands the convolution: tasks folded into the channels, [B, T*C, H, W].
    folded = y.movedim(0, 1).reshape(6, 4 * 3, 5, 5)
    assert folded.data_ptr() == y.data_ptr() and folded.is_contiguous(memory_format=torch.channels_last)
    labels = torch.zeros(4, 6, dtype=torch.int64)
    assert tasks_channels_last(labels) is labels and tasks_channels_last(torch.rand(4, 6, 1)).is_contiguous()


@pytest.mark.parametrize("chunk_size", ["auto", None])
@pytest.mark.parametrize("first_order", [False, True])
def test_loop_baseline_matches_library_chunked_and_whole(bench, harness, first_order, chunk_size):
    """The benchmark's per-task loop (maml_func.reference) and the vmap path (auto chunks, one vmap): same loss,
    same meta-gradient."""
    assert bench.loop_meta_loss is loop_meta_loss
    torch.manual_seed(0)
    model = Conv4(n_way=5, hidden=8).double()
    batch = batch_of(4, 5, 23)  # 120 float64 images per task: "auto" picks chunks of 2 here
    assert auto_chunk_size(batch) == 2
    maml = MAML(model, inner_lr=bench.INNER_LR, inner_steps=2, first_order=first_order)
    meta = maml.init()
    params = list(meta["model"].values())
    loss = harness.meta_loss(maml, meta, batch, chunk_size=chunk_size)[0]
    grads = torch.autograd.grad(loss, params)
    ref_loss = loop_meta_loss(model, meta["model"], batch, inner_lr=bench.INNER_LR, steps=2, first_order=first_order)
    ref_grads = torch.autograd.grad(ref_loss, params)
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert rel_err(list(grads), list(ref_grads)) < 1e-10


def test_failing_row_is_reported_not_raised(bench):
    class Broken:
        method = bench.Method("compiled")
        compile_s = None

        def step(self) -> None:
            raise RuntimeError("backend exploded\nsecond line")

    stats = bench.time_rows([Broken()], repeats=2, device=torch.device("cpu"))
    assert stats[0]["error"] == "RuntimeError: backend exploded"
    assert stats[0]["times"] == []


@pytest.mark.slow
def test_smoke_run_table_and_json(bench, tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    records = bench.main(["--smoke", "--json", str(out)])
    printed = capsys.readouterr().out
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(records)

    setup = lines[0]
    assert setup["kind"] == "setup" and setup["torch"] == torch.__version__
    assert setup["device"] == "cpu" and setup["data"].startswith("synthetic")
    assert setup["matmul_gflop_per_s"] > 0
    for key in ("torch", "threads", "device", "workloads", "malloc"):
        assert key in printed.split("\n\n")[0]

    rows = [r for r in lines if r["kind"] == "row"]
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"policy (default)", "loop (autograd.grad)", "vmap chunk=all", "vmap chunk=all/nchw",
                              "vmap chunk=4", "loop (way=LOOP)"}
    policy = by_method["policy (default)"]
    # T = 2: no chunks; image tasks on the CPU: both layouts
    assert policy["chunk"] == policy["choice"] and set(policy["search"]) == {"vmap", "vmap/nchw", "loop"}
    assert policy["vs_best_candidate"] > 0 and policy["search_cost_pct"] >= 0
    assert policy["best_candidate"] in ("vmap chunk=all", "vmap chunk=all/nchw", "vmap chunk=4", "loop (way=LOOP)")
    assert by_method["loop (autograd.grad)"]["speedup_vs_loop"] == 1.0
    flops = {r["gflop"] for r in rows}
    assert len(flops) == 1 and flops.pop() > 0  # one count of the maths, shared by every row
    for r in rows:
        assert "error" not in r
        assert 0 < r["ms_min"] <= r["ms_median"] <= r["ms_max"]
        assert math.isclose(r["tasks_per_s"], 2 / (r["ms_median"] / 1e3))
        assert math.isclose(r["gflop_per_s"], r["gflop"] / (r["ms_median"] / 1e3))
        assert r["utilization"] > 0 and r["faults_median"] >= 0
        assert r["memory"]["peak_bytes"] > r["memory"]["rise_bytes"] > 0
        assert r["method"] in printed

    curve = [r for r in lines if r["kind"] == "memory"]
    assert [(c["mode"], c["chunk"]) for c in curve] == [("chunk_size", 1), ("chunk_size", 2), ("tasks_per_backward", 1),
                                                        ("tasks_per_backward", 2)]
    assert all(c["peak_bytes"] > 0 and "error" not in c for c in curve)


@pytest.mark.parametrize("setting", [None, "0"])
def test_a_run_on_the_cpu_tunes_malloc_at_its_start_unless_told_not_to(setting):
    """A fresh process: a vectorized meta-loss alone leaves glibc as it is (nothing process-wide from the hot path);
    the device set-up of a run (what fit calls) tunes it; MAML_FUNC_TUNE_MALLOC=0 keeps it as is."""
    code = ("import torch\n"
            "from maml_func import MAML, MLP, sample_sinusoid_tasks\n"
            "from maml_func.device import configure_device\n"
            "from maml_func.system import malloc_tuned\n"
            "maml = MAML(MLP(), loss='mse')\n"
            "maml.meta_loss(maml.init(), sample_sinusoid_tasks(4))\n"
            "before = malloc_tuned()\n"
            "configure_device(torch.device('cpu'))\n"
            "print(before, malloc_tuned())\n")
    env = {k: v for k, v in os.environ.items() if k != "MAML_FUNC_TUNE_MALLOC"}
    if setting is not None:
        env["MAML_FUNC_TUNE_MALLOC"] = setting
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    glibc = platform.libc_ver()[0] == "glibc"
    assert out.stdout.split() == ["False", str(glibc and setting is None)]


def test_memory_benchmark_smoke_run(tmp_path):
    """benchmarks/memory.py: every method and S runs in its fresh process and reports memory, time and ratios."""
    out = tmp_path / "memory.jsonl"
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "memory.py"), "--smoke", "--steps", "2", "--json",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["kind"] == "setup" and lines[0]["torch"] == torch.__version__ and lines[0]["steps"] == [2]
    rows = [r for r in lines if r["kind"] == "row"]
    assert [(r["method"], r["steps"]) for r in rows] == [(m, 2) for m in ("unroll", "adjoint", "imaml")]
    for r in rows:
        assert "error" not in r, r
        assert r["peak_bytes"] > r["rise_bytes"] > 0 and 0 < r["ms_min"] <= r["ms_median"] <= r["ms_max"]
    summary = lines[-1]
    assert summary["kind"] == "summary" and summary["reference_steps"] == summary["largest_steps"] == 2
    assert summary["adjoint_time_vs_unroll"] > 0 and summary["unroll_rise_ratio"] == 1.0


def test_time_to_accuracy_smoke_run(tmp_path):
    """benchmarks/time_to_accuracy.py: each algorithm trains in turn, its curve, iterations and test accuracy land in
    the JSON lines (written as each one ends) and the plot is a PNG."""
    from helpers import make_glyph_folder

    folder = make_glyph_folder(tmp_path / "glyphs", n_classes=40, per_class=10, size=20, seed=2)
    out, png = tmp_path / "tta.jsonl", tmp_path / "tta.png"
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "time_to_accuracy.py"), "--quick", "--algorithms",
                           "maml,mamlpp", "--dataset", str(folder), "--data-root", str(tmp_path / "cache"), "--json",
                           str(out), "--plot", str(png)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["kind"] == "setup" and lines[0]["torch"] == torch.__version__
    rows = lines[1:]
    assert [r["algorithm"] for r in rows] == ["maml", "mamlpp"]
    assert rows[1]["config"]["algorithm"] == "mamlpp" and rows[1]["config"]["inner_steps"] == 5
    for r in rows:
        assert r["iterations"] >= 1 and r["it_per_s"] > 0 and r["curve"], r
        assert [p["iteration"] for p in r["curve"]] == sorted(p["iteration"] for p in r["curve"])
        assert r["curve"][-1]["iteration"] == r["iterations"]  # the time limit validates the last iteration
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["test_ci95"] >= 0 and r["test_steps"] == r["config"][
            "eval_inner_steps"]
        assert f"{r['algorithm']:8} {r['iterations']:6d} iterations" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
