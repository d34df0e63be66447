"""Meta-training speed of W torch.distributed ranks against one process, on the same workload.

Runs ``maml-func train`` twice on Omniglot 5-way 1-shot (the paper's preset,
meta-batch 32, second order): once as one process using every core, once
under ``torchrun --nproc-per-node W`` (gloo on the CPU, one thread per rank,
or NCCL with one GPU per rank), and prints both throughputs (tasks/s, from
``metrics.jsonl``, the first logging window left out as warm-up) and their
ratio, measured in the same run.

    python benchmarks/distributed.py                         # 2 gloo ranks vs 1 process, CPU
    python benchmarks/distributed.py --ranks 4 --device cuda  # 4 GPUs vs 1

On a machine with fewer cores than ranks x threads the ranks compete for the
cores: expect little or no gain on a 2-core CPU (the point there is
correctness); the gain comes from more devices.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness


def tasks_per_s(run_dir: Path) -> float:
    """Median training throughput over the logging windows after the first."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tasks_per_s"] for r in records if r["kind"] == "train"][1:]
    if not rates:
        raise SystemExit(f"{run_dir}: too few iterations to measure; raise --iterations")
    return statistics.median(rates)


def train(command: list[str], env: dict[str, str]) -> float:
    began = time.monotonic()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}\n{proc.stderr[-3000:]}")
    return time.monotonic() - began


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="processes of the distributed run (default: 2)")
    p.add_argument("--iterations", type=int, default=200, help="meta-iterations per run (default: 200)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    p.add_argument("--source", default=str(harness.SHARED_OMNIGLOT),
                   help="offline Omniglot (default: ../shared/data/omniglot)")
    p.add_argument("--data-root", default=str(harness.REPO / "data"), help="Omniglot cache (default: data/)")
    args = p.parse_args()
    if args.ranks < 2:
        p.error("--ranks must be >= 2")

    cores = os.cpu_count() or 1
    common = ["--preset", "omniglot-5w1s", "--iterations", str(args.iterations), "--val-every", "0",
              "--val-tasks", str(32 * args.ranks), "--log-every", "20", "--save-every", str(args.iterations),
              "--device", args.device, "--source", args.source, "--data-root", args.data_root, "--no-progress"]
    with tempfile.TemporaryDirectory() as tmp:
        single, multi = Path(tmp, "single"), Path(tmp, "multi")
        env = {**os.environ, "OMP_NUM_THREADS": str(cores)}
        t1 = train([sys.executable, "-m", "maml_func", "train", *common, "--save-to", str(single)], env)
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // args.ranks))}
        tw = train([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}",
                    "-m", "maml_func", "train", "--distributed", *common, "--save-to", str(multi)], env)
        one, many = tasks_per_s(single), tasks_per_s(multi)
    threads = max(1, cores // args.ranks)
    print(f"Omniglot 5-way 1-shot, meta-batch 32, second order, {args.iterations} iterations on {args.device} "
          f"({cores} cores)")
    print(f"  1 process ({cores} threads)            : {one:8.1f} tasks/s   (whole command {t1:.0f} s)")
    print(f"  {args.ranks} ranks ({threads} thread(s) each)     : {many:8.1f} tasks/s   (whole command {tw:.0f} s)")
    print(f"  speed-up, {args.ranks} ranks / 1 process : {many / one:8.2f}x")


if __name__ == "__main__":
    main()
