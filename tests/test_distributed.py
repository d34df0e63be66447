"""Data-parallel meta-training on torch.distributed: 2 gloo processes on loopback, bounded in time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _dist_worker import equivalence_run
from helpers import REPO, assert_same_meta, tiny

from maml_func import Conv4
from maml_func.distributed import World, gather_tasks, rank_seed, shard_sizes, world
from maml_func.train import fit

WORKER = Path(__file__).with_name("_dist_worker.py")
LAUNCH_TIMEOUT = 240  # seconds; a healthy 2-rank run here takes a few


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(mode: str, out: Path, *args: str, size: int = 2, timeout_s: float = 30) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORKER_TIMEOUT": str(timeout_s),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), mode, str(out), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = LAUNCH_TIMEOUT) -> list[tuple[int, str]]:
    """Wait for every rank (killing all of them past ``timeout``); ``(returncode, stderr)`` per rank."""
    deadline = time.monotonic() + timeout
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"rank {procs.index(p)} still running after {timeout} s") from None
        results.append((p.returncode, err))
    return results


def run_ranks(mode: str, out: Path, *args: str) -> None:
    results = finish(start_ranks(mode, out, *args))
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{err[-3000:]}"


# ------------------------------------------------------------------ pieces
def test_single_process_world_and_shards() -> None:
    assert world() == World(0, 1, 0) and world().is_main
    assert rank_seed(7, 0) == 7 and len({rank_seed(7, r) for r in range(8)}) == 8
    assert shard_sizes(10, 4) == [3, 3, 2, 2] and sum(shard_sizes(600, 7)) == 600
    values = {"accuracy": torch.rand(5, 3)}
    assert gather_tasks(values) is values  # no process group: nothing to gather


# ------------------------------------------------------------- equivalence
@pytest.mark.slow
def test_two_ranks_take_the_same_steps_as_one_process_on_the_full_meta_batch(tmp_path: Path) -> None:
    run_ranks("equivalence", tmp_path)
    single = equivalence_run(0, 1)
    for rank in range(2):
        shared = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert shared.keys() == single.keys()
        for name, value in single.items():
            err = ((shared[name] - value).abs().max() / value.abs().max()).item()
            assert err <= 1e-10, f"rank {rank}: {name} differs from the single process by {err:.1e} (relative)"
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a), "the ranks' parameters must be identical after all_reduce"
    # Not vacuous: the steps moved every weight away from its initialization (conv biases before batch norm
    # have a zero meta-gradient and stay where they are).
    torch.manual_seed(0)
    initial = dict(Conv4(n_way=3, hidden=8, image_size=16).double().named_parameters())
    weights = [name for name in single if name.endswith("weight")]
    assert len(weights) >= 5
    assert all((single[name] - initial[name]).abs().max() > 1e-4 for name in weights)


# --------------------------------------------------------------------- fit
@pytest.mark.slow
def test_fit_on_two_ranks_agrees_writes_once_and_resumes_exactly(glyphs: Path, tmp_path: Path) -> None:
    whole = tiny(glyphs, tmp_path / "whole", distributed=True, iterations=6, val_tasks=6)
    (tmp_path / "a").mkdir()
    run_ranks("fit", tmp_path / "a", json.dumps(whole.to_dict()))
    r0, r1 = (torch.load(tmp_path / "a" / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["iteration"] == r1["iteration"] == 6
    assert all(torch.equal(r0["meta"][k], r1["meta"][k]) for k in r0["meta"]), "ranks diverged"
    assert r0["best"] == r1["best"] and r0["best"] > 0  # sharded validation, gathered on every rank
    val = [r for r in r0["history"] if r["kind"] == "val"]
    assert val and all(r["tasks"] == 6 for r in val)
    # Only rank 0 wrote, and its checkpoint carries both ranks' task streams.
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == sorted(
        ["best.pt", "config.json", "last.pt", "learning_curve.png", "metrics.jsonl"])
    state = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["train_generators"]) == 2
    assert not torch.equal(state["train_generators"][0], state["train_generators"][1])
    lines = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(r0["history"])  # one writer: no duplicated records

    # Stopped after 3 iterations, then resumed to 6: the same parameters, bit for bit.
    part = whole.replace(save_to=str(tmp_path / "part"), iterations=3)
    (tmp_path / "b").mkdir()
    run_ranks("fit", tmp_path / "b", json.dumps(part.to_dict()))
    (tmp_path / "c").mkdir()
    run_ranks("fit", tmp_path / "c", json.dumps(part.replace(iterations=6).to_dict()), str(tmp_path / "part"))
    resumed = torch.load(tmp_path / "c" / "rank0.pt", weights_only=True)
    assert_same_meta({"model": resumed["meta"]}, {"model": r0["meta"]})

    # A single process cannot resume a 2-rank checkpoint (its task streams would be lost).
    with pytest.raises(ValueError, match=r"changed distributed=False \(checkpoint: True\)"):
        fit(part.replace(iterations=6, distributed=False), resume=tmp_path / "part", progress=False)


@pytest.mark.slow
def test_cli_under_torchrun_trains_and_every_rank_exits_cleanly(glyphs: Path, tmp_path: Path) -> None:
    """The README's launch line, on loopback: both ranks exit 0 and only rank 0 wrote the run directory."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                           "-m", "maml_func", "train", "--distributed", "--dataset", str(glyphs), "--image-size", "16",
                           "--n-way", "3", "--meta-batch", "4", "--iterations", "4", "--device", "cpu",
                           "--save-to", str(tmp_path / "run"), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    assert proc.stderr.count("best validation accuracy") == 1, proc.stderr[-3000:]  # rank 0 alone reports
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(
        ["best.pt", "config.json", "last.pt", "learning_curve.png", "metrics.jsonl"])
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["iteration"] == 4


@pytest.mark.slow
def test_distributed_without_torchrun_is_a_clear_usage_error(glyphs: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "maml_func", "train", "--distributed", "--dataset", str(glyphs),
                           "--image-size", "16", "--iterations", "2", "--device", "cpu",
                           "--save-to", str(tmp_path / "run")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "torchrun" in proc.stderr and "RANK" in proc.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- failures
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["crash", "hang"])
def test_a_failing_rank_makes_the_others_exit_with_a_clear_error(glyphs: Path, tmp_path: Path, mode: str) -> None:
    config = tiny(glyphs, tmp_path / "run", distributed=True, iterations=6, val_every=0, save_every=1)
    began = time.monotonic()
    procs = start_ranks(mode, tmp_path, json.dumps(config.to_dict()), timeout_s=8)
    try:
        code0, err0 = finish(procs[:1], timeout=120)[0]
    finally:
        procs[1].kill()
        procs[1].communicate()
    took = time.monotonic() - began
    assert code0 != 0
    assert "DistributedError" in err0 and "another rank probably crashed or stopped answering" in err0, err0[-2000:]
    assert took < 90, f"rank 0 needed {took:.0f} s to give up"
    # The last good checkpoint (iteration 2, before the failing third iteration) is intact.
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["iteration"] == 2
