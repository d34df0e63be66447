"""Validation accuracy against wall time for the MAML family on Omniglot 5-way 1-shot, the same budget each.

Each algorithm is meta-trained with :func:`maml_func.fit` (the library's own
training loop, as ``maml-func train`` runs it) for ``--minutes`` of wall time,
one after another (never two at once: on a small CPU a second process makes
every figure meaningless), validating every ``--val-every`` iterations on the
same held-out tasks; then its best checkpoint is evaluated on ``--test-tasks``
meta-test tasks (the standard protocol). Wall time on the x-axis is training
time, validation excluded (``train_s`` of the validation records).

The recipes are ``harness.RECIPES``, the table ``algorithms_omniglot.py``
reads too: each paper's Omniglot setting over the ``omniglot-5w1s`` preset
with 5 queries per class. MAML++ runs as its paper has it (meta-batch 8, 5
inner steps, LSLR rates from 0.1, the multi-step loss annealed, first-order
derivatives for the first iterations; the two schedules shortened to the
budget), so it is shown at its best. Reptile is left out: its recipe trains on
more shots than it tests on (``harness.TRAIN_SHOTS``), which ``fit`` does not
do; ``algorithms_omniglot.py`` runs it.

Usage::

    python benchmarks/time_to_accuracy.py --minutes 4 --json runs/tta.jsonl --plot runs/tta.png
    python benchmarks/time_to_accuracy.py --quick          # seconds per algorithm, a smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import harness
import torch

from maml_func import ALGORITHMS, evaluate_run, fit

#: The algorithms this script can run: the shared recipes that fit trains as they are.
NAMES = [n for n in harness.RECIPES if n in ALGORITHMS and n not in harness.TRAIN_SHOTS]


def run_one(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    small = {"hidden": 8, "meta_batch": 4} if args.quick else {}
    data = {"source": args.source} if args.dataset == "omniglot" else {"dataset": args.dataset}
    config = harness.recipe_config(name, under=small, iterations=10**6, max_minutes=args.minutes,
                                   val_every=args.val_every, val_tasks=args.val_tasks, device=args.device,
                                   seed=args.seed, data_root=args.data_root, save_to=str(work / name), **data)
    began = time.monotonic()
    result = fit(config, progress=False)
    wall = time.monotonic() - began
    curve = [(r["train_s"], r["iteration"], r["accuracy"]) for r in result.history if r["kind"] == "val"]
    test = evaluate_run(result.run_dir, num_tasks=args.test_tasks)
    return {"kind": "algorithm", "algorithm": name, "config": config.to_dict(), "iterations": result.iteration,
            # The time limit validates the last iteration, so the curve's last point is the run's end.
            "wall_s": wall, "it_per_s": curve[-1][1] / curve[-1][0] if curve and curve[-1][0] > 0 else None,
            "curve": [{"train_s": t, "iteration": i, "accuracy": a} for t, i, a in curve],
            "test_accuracy": test.final_accuracy, "test_ci95": test.final_ci95, "test_steps": test.steps}


def plot(records: list[dict[str, Any]], path: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in records:
        ax.plot([p["train_s"] / 60 for p in r["curve"]], [100 * p["accuracy"] for p in r["curve"]], "o-", ms=3,
                label=f"{r['algorithm']}: test {100 * r['test_accuracy']:.1f}% ± {100 * r['test_ci95']:.1f} "
                      f"({r['iterations']} it)")
    ax.set(xlabel="training wall time (minutes, validation excluded)", ylabel="validation accuracy (%)",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithms", default=",".join(NAMES), help=f"comma-separated names (default: {','.join(NAMES)})")
    p.add_argument("--minutes", type=float, default=5.0, help="training wall time per algorithm (default 5)")
    p.add_argument("--val-every", type=int, default=100, help="validate every N iterations (default 100)")
    p.add_argument("--val-tasks", type=int, default=200, help="tasks per validation (default 200)")
    p.add_argument("--test-tasks", type=int, default=600, help="meta-test tasks at the end (default 600)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny network, seconds per algorithm")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", default=harness.shared_omniglot(),
                   help="offline Omniglot (default ../shared/data/omniglot when present)")
    p.add_argument("--data-root", default=str(harness.REPO / "data"))
    p.add_argument("--dataset", default="omniglot",
                   help="omniglot (default), or an ImageFolder tree in its place (the tests use a synthetic one)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PATH", help="PNG of validation accuracy against training time")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.val_every, args.val_tasks, args.test_tasks = min(args.minutes, 0.1), 10, 20, 20
    names = harness.recipe_names(args.algorithms, NAMES, "time_to_accuracy.py")
    setup = {"kind": "setup", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "command": " ".join(["time_to_accuracy.py", *(argv if argv is not None else sys.argv[1:])]),
             "torch": torch.__version__, "threads": torch.get_num_threads(), "minutes": args.minutes}
    print(json.dumps(setup))
    records = [setup]
    out = open(args.json, "w") if args.json else None  # a line per algorithm as it ends: a crash keeps the rest
    work = Path(tempfile.mkdtemp(prefix="tta-"))
    try:
        if out:
            out.write(json.dumps(setup) + "\n")
        for name in names:
            record = run_one(name, args, work)
            records.append(record)
            if out:
                out.write(json.dumps(record) + "\n")
                out.flush()
            best = max((q["accuracy"] for q in record["curve"]), default=float("nan"))
            print(f"{name:8} {record['iterations']:6d} iterations ({record['it_per_s'] or 0:.2f} it/s)  best "
                  f"validation {100 * best:.1f}%  test {100 * record['test_accuracy']:.1f}% ± "
                  f"{100 * record['test_ci95']:.1f} ({record['test_steps']} steps)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if out:
            out.close()
    if args.plot:
        plot(records[1:], args.plot, f"Omniglot 5-way 1-shot, {args.minutes:g} min each, {setup['date']}")
    return records


if __name__ == "__main__":
    main()
