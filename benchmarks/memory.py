"""Peak memory and time per meta-iteration against inner steps: unrolled MAML, the adjoint, and iMAML.

Usage::

    python benchmarks/memory.py                      # S = 1, 5, 10, 20; T = 32; the three methods
    python benchmarks/memory.py --quick              # S = 1, 5; T = 4: under a minute
    python benchmarks/memory.py --json runs/memory.jsonl --plot runs/memory.png
    python benchmarks/memory.py --methods unroll,adjoint --steps 40 --meta-batch 32
    python benchmarks/memory.py --device cuda

Workload: Omniglot 5-way 1-shot shapes (synthetic 1x28x28 images,
``harness.random_tasks``, 15 queries per class, as in ``benchmarks/throughput.py``), Conv4 with 64 filters,
float32, meta-batch T, second order. One meta-iteration is
``maml_func.meta_gradient`` (one backward over the meta-batch) and an Adam step.

Methods:

- ``unroll``: ``MAML(model, inner_steps=S)``, autograd through the recorded inner loop;
- ``adjoint``: ``MAML(model, inner_steps=S, backprop="adjoint")``, the same
  meta-gradient by the adjoint recursion (``maml_func.algorithms.adjoint``);
- ``imaml``: ``IMAML(model, inner_steps=S, lam=..., cg_steps=...)``, the
  implicit meta-gradient by conjugate gradient.

Each configuration runs in a fresh subprocess (``--probe``): one meta-iteration
whose peak memory is measured (CPU: the peak RSS since a reset of the
high-water mark, ``/proc/self/clear_refs``, and its rise over the set-up;
CUDA: ``max_memory_allocated`` and its rise over what was allocated before),
then ``--repeats`` timed ones. Output: the setup, a table, the acceptance
ratios (rise at the largest S over the rise at S = 5, time of the adjoint
over unroll at S = 5), JSON lines with ``--json`` (``"kind"``: ``setup``,
``row``, ``summary``) and a PNG of memory against S with ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import harness
import torch
from harness import machine_setup, print_setup, run_json_subprocess, set_allocator, sync, write_json_lines

from maml_func import MAML, Conv4
from maml_func.algorithms import IMAML

METHODS = ("unroll", "adjoint", "imaml")
MAML_LR, IMAML_LR, LAM, CG_STEPS = 0.4, 0.1, 2.0, 5


def build(method: str, model: torch.nn.Module, steps: int, checkpoint_every: int | None = None) -> Any:
    """The algorithm of a row (``checkpoint_every``: the adjoint's, ``None`` for its default)."""
    if method == "imaml":
        return IMAML(model, inner_lr=IMAML_LR, inner_steps=steps, lam=LAM, cg_steps=CG_STEPS)
    options = {} if method == "unroll" or checkpoint_every is None else {"checkpoint_every": checkpoint_every}
    return MAML(model, inner_lr=MAML_LR, inner_steps=steps, backprop=method, **options)


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """In this (fresh) process: peak memory of one meta-iteration of one configuration, then its time."""
    device = torch.device(spec["device"])
    set_allocator("tuned")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    batch = harness.random_tasks(spec["meta_batch"], 5, 1, spec["n_query"], (1, 28, 28), device=device)
    algo = build(spec["method"], Conv4(n_way=5, hidden=spec["hidden"]).to(device), spec["steps"],
                 spec.get("checkpoint_every"))
    meta = algo.init()
    opt = torch.optim.Adam(algo.parameters(meta), lr=1e-3)

    def iteration() -> None:
        opt.zero_grad(set_to_none=True)
        harness.meta_gradient(algo, meta, batch, 0, chunk_size="auto")
        opt.step()

    memory = harness.peak_memory(device, iteration)
    times = []
    for _ in range(spec["repeats"]):
        sync(device)
        t0 = time.perf_counter()
        iteration()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {**memory, "ms_median": statistics.median(times) * 1e3, "ms_min": min(times) * 1e3,
            "ms_max": max(times) * 1e3}


def run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`probe` in a fresh subprocess; a failure (out of memory, a crash) is a row with its reason."""
    return run_json_subprocess([sys.executable, str(Path(__file__).resolve()), "--probe", json.dumps(spec)],
                               timeout=spec["timeout"])


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'method':<8} {'S':>3} {'peak MiB':>9} {'rise MiB':>9} {'ms/iter':>8} {'[min, max]':>15}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<8} {r['steps']:>3}  FAILED: {r['error']}")
            continue
        span = f"[{r['ms_min']:.0f}, {r['ms_max']:.0f}]"
        print(f"{r['method']:<8} {r['steps']:>3} {mib(r['peak_bytes']):>9} {mib(r['rise_bytes']):>9} "
              f"{r['ms_median']:8.0f} {span:>15}")


def summarize(rows: list[dict[str, Any]], steps: list[int]) -> dict[str, Any]:
    """The acceptance figures: each method's rise at the largest S over its rise at S = 5 (or the second S),
    and the adjoint's and iMAML's time over unroll's there."""
    ok = {(r["method"], r["steps"]): r for r in rows if "error" not in r}
    ref = 5 if 5 in steps else steps[min(1, len(steps) - 1)]
    top = max(steps)
    summary: dict[str, Any] = {"kind": "summary", "reference_steps": ref, "largest_steps": top}
    for m in METHODS:
        if (m, ref) in ok and (m, top) in ok:
            summary[f"{m}_rise_ratio"] = ok[(m, top)]["rise_bytes"] / max(ok[(m, ref)]["rise_bytes"], 1)
        if m != "unroll" and (m, ref) in ok and ("unroll", ref) in ok:
            summary[f"{m}_time_vs_unroll"] = ok[(m, ref)]["ms_median"] / ok[("unroll", ref)]["ms_median"]
    return summary


def plot(rows: list[dict[str, Any]], setup: dict[str, Any], path: Path) -> None:
    """Peak-memory rise and time per meta-iteration against S, one line per method (Figure + Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    memory_ax, time_ax = fig.subplots(1, 2)
    for m in METHODS:
        mine = [r for r in rows if r["method"] == m and "error" not in r]
        if not mine:
            continue
        s = [r["steps"] for r in mine]
        memory_ax.plot(s, [r["rise_bytes"] / 2**20 for r in mine], marker="o", label=m)
        time_ax.plot(s, [r["ms_median"] for r in mine], marker="o", label=m)
    memory_ax.set(xlabel="inner steps S", ylabel="peak memory rise (MiB)", title="memory of one meta-iteration")
    time_ax.set(xlabel="inner steps S", ylabel="ms per meta-iteration", title="time")
    for ax in (memory_ax, time_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Conv4 5-way 1-shot, T = {setup['meta_batch']}, second order, {setup['device']} "
                 f"({setup['date']})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 0, got {text!r}")
    return values


def parse_methods(text: str) -> list[str]:
    values = [t.strip() for t in text.split(",") if t.strip()]
    unknown = sorted(set(values) - set(METHODS))
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(METHODS)}, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="S = 1, 5 and T = 4, one timed repeat: under a minute")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # seconds; for the tests
    p.add_argument("--steps", type=parse_ints, default=None, help="inner steps S (default 1,5,10,20; quick 1,5)")
    p.add_argument("--methods", type=parse_methods, default=list(METHODS), help="unroll,adjoint,imaml (default all)")
    p.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-batch T (default 32; quick 4)")
    p.add_argument("--hidden", type=int, default=None, help="Conv4 filters (default 64)")
    p.add_argument("--repeats", type=int, default=None, help="timed meta-iterations per configuration (default 2)")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="the adjoint's checkpoint_every (default: the library's)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration before it counts as failed")
    p.add_argument("--json", metavar="PATH", help="also write JSON lines to PATH")
    p.add_argument("--plot", metavar="PATH", help="also write a PNG of memory and time against S to PATH")
    p.add_argument("--probe", metavar="SPEC", help=argparse.SUPPRESS)  # internal: one configuration
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return []
    small = args.quick or args.smoke
    steps = args.steps or ([1, 2] if args.smoke else [1, 5] if args.quick else [1, 5, 10, 20])
    meta_batch = args.meta_batch or (2 if args.smoke else 4 if args.quick else 32)
    hidden = args.hidden or (8 if args.smoke else 64)
    repeats = args.repeats if args.repeats is not None else (1 if small else 2)
    n_query = 2 if args.smoke else 15
    if meta_batch < 1 or hidden < 1 or repeats < 1:
        raise SystemExit("memory.py: --meta-batch, --hidden and --repeats must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("memory.py: --device cuda but torch.cuda.is_available() is False; use --device cpu")
    setup = {
        **machine_setup(args.device, argv),
        "threads": args.threads or torch.get_num_threads(),
        "model": f"Conv4 ({hidden} filters), 1x28x28 synthetic images, float32, chunk_size='auto'",
        "workload": f"5-way 1-shot, {n_query} queries/class, second order",
        "meta_batch": meta_batch,
        "steps": steps,
        "methods": args.methods,
        "inner": f"MAML: SGD lr {MAML_LR}; iMAML: SGD lr {IMAML_LR}, lam {LAM}, {CG_STEPS} CG steps; outer Adam 1e-3",
        "memory": "max_memory_allocated" if args.device.startswith("cuda") else
                  "peak RSS of a fresh subprocess, first meta-iteration",
        "repeats": repeats,
    }
    print_setup("maml_func memory benchmark", setup, 12)

    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for s in steps:  # the methods of one S side by side, so that a slow minute of the machine hits them alike
        for m in args.methods:
            spec = {"method": m, "steps": s, "meta_batch": meta_batch, "hidden": hidden, "n_query": n_query,
                    "device": args.device, "threads": args.threads, "repeats": repeats, "timeout": args.timeout,
                    "checkpoint_every": args.checkpoint_every}
            row = {"kind": "row", "method": m, "steps": s, "meta_batch": meta_batch, **run_probe(spec)}
            rows.append(row)
            what = row.get("error") or f"rise {mib(row['rise_bytes'])} MiB, {row['ms_median']:.0f} ms"
            print(f"[{time.perf_counter() - start:5.0f} s] {m} S={s}: {what}", flush=True)
    print()
    print_table(rows)
    summary = summarize(rows, steps)
    print()
    for k, v in summary.items():
        if k != "kind":
            print(f"  {k:<24} {v:.2f}" if isinstance(v, float) else f"  {k:<24} {v}")

    records = [setup, *rows, summary]
    write_json_lines(args.json, records)
    if args.plot:
        plot(rows, setup, Path(args.plot))
        print(f"wrote the plot to {args.plot}")
    return records


if __name__ == "__main__":
    main()
