"""How fast maml_func meta-trains, and why: the vectorized path against a per-task loop, in one run.

Usage::

    python benchmarks/throughput.py                  # the standard workloads (~8 min on 2 CPU cores)
    python benchmarks/throughput.py --quick          # one small workload, under a minute
    python benchmarks/throughput.py --malloc glibc   # glibc as it comes (MAML_FUNC_TUNE_MALLOC=0)
    python benchmarks/throughput.py --workloads 5w-s1-2nd --compile first --memory none
    python benchmarks/throughput.py --device cuda --json runs/throughput.jsonl
    python benchmarks/throughput.py --workloads mini-5w-s5-2nd,r12-5w-s1-2nd,r12-5w-s1-1st --memory rows

What is measured, per workload (by default Omniglot-shaped tasks and the Conv4
of MAML; one meta-iteration = meta-loss, backward, Adam step), side by side and
interleaved round by round in the same process:

- ``policy (default)``: what ``fit`` runs by default: the execution policy
  (``maml_func.execution``) times its candidates on the warm-up iterations,
  then its choice is timed like every other row (the row shows the choice).
- ``loop``: the same maths as a per-task Python loop with
  ``torch.autograd.grad(create_graph=True)``: ``maml_func.reference.loop_meta_loss``,
  written independently of the library's functional core (the way
  per-task-loop libraries such as learn2learn and higher compute MAML), same
  network, same inner step size.
- ``vmap chunk=N``: the vectorized path with an explicit ``chunk_size``
  (``all`` = the whole meta-batch in one ``vmap``).
- ``loop (way=LOOP)``: the library's own per-task loop.
- ``compiled``: ``torch.compile`` of the vectorized meta-loss over the whole
  meta-batch (backward through it); a failure is a row with its reason.
  Compiling takes minutes on a small CPU, so by default only CUDA runs get this
  row, for the first workload (``--compile first|all`` asks for it).

Figures: median ms per meta-iteration with min and max over the repeats,
tasks/s, FLOPs per meta-iteration (``FlopCounterMode``, counted on the loop:
the same arithmetic, and the counter over-counts the weight gradient of the
grouped convolutions that ``vmap`` makes by the number of groups), achieved
FLOP/s and its fraction of a dense fp32 matmul measured in the same run, peak
memory (CUDA: ``max_memory_allocated``; CPU: peak RSS of a fresh subprocess
running the same configuration, and its rise over the set-up), and on the CPU
the minor page faults per iteration (see ``--malloc``). Finally the memory
curve of a second-order S=5 meta-batch against ``chunk_size``, and against
``tasks_per_backward`` (``maml_func.meta_gradient``: one backward per part
of the meta-batch, gradients summed), the option that bounds the peak.

Two more workloads, not in the default, ``--quick`` or ``--smoke`` sets, are
picked with ``--workloads`` (synthetic tasks of their shapes): ``mini-5w-s5-2nd``,
miniImageNet as in the MAML paper (Conv4 with 32 filters and max-pooling,
3x84x84, 5-way 1-shot, 15 queries, T = 4, S = 5, inner lr 0.01), and
``r12-5w-s1-2nd`` / ``r12-5w-s1-1st``, the ResNet-12 of MetaOptNet on the same
tasks with T = 4, S = 1, second and first order. ``--resnet-widths`` scales
the ResNet-12 (default 64,160,320,640) where the full network is too slow for
the machine.

Output: a table, and with ``--json PATH`` one JSON object per line
(``"kind"``: ``"setup"``, ``"row"``, ``"memory"``).

Each row runs its tasks the way it names through ``harness.meta_loss``; the
shared set-up, synthetic tasks and memory probe are ``harness``'s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import harness
import torch
from harness import machine_setup, print_setup, run_json_subprocess, set_allocator, sync, write_json_lines
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from maml_func import MAML, Conv4, TaskBatch, meta_gradient
from maml_func.batching import LOOP, Way, auto_chunk_size
from maml_func.execution import ROUNDS, ExecutionPolicy, ways
from maml_func.models import ResNet12
from maml_func.reference import loop_meta_loss

INNER_LR = 0.4
NCHW = "/nchw"  # the suffix of a way that keeps the tasks' layout (maml_func.batching.Way.channels_last=False)
PER_CALL = ExecutionPolicy("auto")  # its tasks_per_backward_for: one backward per call of a way, as fit runs


@dataclass(frozen=True)
class Workload:
    """One meta-training setting: N-way K-shot tasks of ``channels x image_size²`` images, one network.

    ``model``: ``"conv4"`` (MAML's Omniglot Conv4, 64 filters, stride-2 convs),
    ``"conv4-pool"`` (MAML's miniImageNet Conv4, 32 filters, max-pooling) or
    ``"resnet12"`` (MetaOptNet's, ``widths``).
    """

    n_way: int
    k_shot: int
    n_query: int
    meta_batch: int
    steps: int
    first_order: bool
    image_size: int = 28
    channels: int = 1
    model: str = "conv4"
    inner_lr: float = INNER_LR
    widths: tuple[int, ...] = (64, 160, 320, 640)

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> Workload:
        return cls(**{**spec, "widths": tuple(spec.get("widths", cls.widths))})

    @property
    def prefix(self) -> str:
        return {"conv4": "", "conv4-pool": "mini ", "resnet12": "R12 "}[self.model]

    @property
    def name(self) -> str:
        order = "1st" if self.first_order else "2nd"
        return f"{self.prefix}{self.n_way}w{self.k_shot}s T={self.meta_batch} S={self.steps} {order}"

    @property
    def key(self) -> str:
        """Short name for ``--workloads``, e.g. ``5w-s1-2nd``, ``mini-5w-s5-2nd``, ``r12-5w-s1-1st``."""
        prefix = {"conv4": "", "conv4-pool": "mini-", "resnet12": "r12-"}[self.model]
        tasks = f"-t{self.meta_batch}" if self.model != "conv4" and self.meta_batch != 4 else ""
        return f"{prefix}{self.n_way}w-s{self.steps}-{'1st' if self.first_order else '2nd'}{tasks}"

    def describe(self) -> str:
        """The network and its inputs, for the setup lines."""
        if self.model == "conv4":
            net = "Conv4 (64 filters, stride-2 convs, TaskBatchNorm)"
        elif self.model == "conv4-pool":
            net = "Conv4 (32 filters, max-pooling, TaskBatchNorm)"
        else:
            net = f"ResNet12 (widths {'-'.join(map(str, self.widths))}, TaskBatchNorm, LeakyReLU 0.1)"
        return f"{net}, {self.channels}x{self.image_size}x{self.image_size} inputs, inner lr {self.inner_lr}, float32"

    def build_model(self) -> torch.nn.Module:
        if self.model == "resnet12":
            return ResNet12(n_way=self.n_way, in_channels=self.channels, image_size=self.image_size,
                            widths=self.widths)
        pool = self.model == "conv4-pool"
        return Conv4(n_way=self.n_way, in_channels=self.channels, image_size=self.image_size,
                     hidden=32 if pool else 64, pool=pool)


def standard_workloads(quick: bool, smoke: bool) -> list[Workload]:
    if smoke:
        return [Workload(5, 1, 2, 2, 1, False)]
    if quick:
        return [Workload(5, 1, 15, 8, 1, False)]
    five = [Workload(5, 1, 15, 32, s, fo) for fo in (False, True) for s in (1, 5)]
    # 20-way with the paper's meta-batch of 16; one inner step to fit the time budget.
    return five + [Workload(20, 1, 15, 16, 1, False)]


def extra_workloads(resnet_widths: tuple[int, ...]) -> list[Workload]:
    """miniImageNet-shaped workloads, only on request (``--workloads``): MAML's Conv4, and ResNet-12.

    At the MAML paper's meta-batch (T = 4) and at T = 32 (keys ending ``-t32``).
    """
    rgb = {"image_size": 84, "channels": 3, "inner_lr": 0.01}
    return [Workload(5, 1, 15, t, 5, False, model="conv4-pool", **rgb) for t in (4, 32)] + [
        Workload(5, 1, 15, t, 1, fo, model="resnet12", widths=resnet_widths, **rgb)
        for t in (4, 32) for fo in (False, True)]


# ----------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Method:
    """A way to compute the meta-gradient: ``kind`` in policy / vmap / lib-loop / loop / compiled.

    ``policy``: the library's default, ``fit``'s execution policy (``maml_func.execution``): the candidates
    timed on the first iterations (the warm-up here), then its choice. ``lib-loop``: the library's per-task
    loop (``vectorize=False``). ``loop``: the reference loop of ``maml_func.reference``.
    """

    kind: str
    chunk: int | str | None = "auto"  # vmap: chunk_size ("auto" = the 1 MiB rule of maml_func.batching)
    channels_last: bool = True  # vmap on the CPU: the tasks laid out channels-last (False: "/nchw", as they come)

    @property
    def label(self) -> str:
        return self._label + ("" if self.channels_last else NCHW)

    @property
    def _label(self) -> str:
        if self.kind == "loop":
            return "loop (autograd.grad)"
        if self.kind == "lib-loop":
            return "loop (way=LOOP)"
        if self.kind == "policy":
            return "policy (default)"
        if self.kind == "compiled":
            return "compiled (chunk=all)"
        if self.chunk == "auto":
            return "vmap chunk=auto"
        return f"vmap chunk={'all' if self.chunk is None else self.chunk}"


class Runner:
    """Model, meta-parameters, optimizer and batches for one (workload, method).

    ``backward``: ``"per-call"`` (default) differentiates each call of the per-task function on its own, as
    the execution policy runs its candidates (each task of a loop, each chunk; one ``vmap`` is one call), so
    only one call's graph is alive at a time; ``"whole"``: one backward for the meta-batch (the tables before
    2026-12-07 10:00 UTC). The compiled row is always ``"whole"``.
    """

    def __init__(self, wl: Workload, method: Method, batches: list[TaskBatch], device: torch.device,
                 seed: int = 0, backward: str = "per-call") -> None:
        torch.manual_seed(seed)
        self.wl, self.method, self.batches, self.device = wl, method, batches, device
        self.per_call = backward == "per-call" and method.kind != "compiled"
        self.model = wl.build_model().to(device)
        self.maml = MAML(self.model, inner_lr=wl.inner_lr, inner_steps=wl.steps, first_order=wl.first_order)
        # How this row runs its tasks (harness.meta_loss); the policy's row chooses for itself.
        self.way: dict[str, Any] = {"chunk_size": "auto" if method.kind == "lib-loop" else method.chunk,
                                    "vectorize": method.kind != "lib-loop", "channels_last": method.channels_last}
        # "whole": the policy told so (its tasks_per_backward = the meta-batch: one backward).
        self.policy = (ExecutionPolicy("auto", tasks_per_backward=None if self.per_call else wl.meta_batch)
                       if method.kind == "policy" else None)
        self.meta = self.maml.init()
        self.opt = torch.optim.Adam(self.maml.parameters(self.meta), lr=1e-3)
        self.i = 0
        self.compile_s: float | None = None
        loss_fn: Callable[[TaskBatch], Tensor]
        if method.kind == "loop":
            def loss_fn(b: TaskBatch) -> Tensor:
                return loop_meta_loss(self.model, self.meta["model"], b, inner_lr=wl.inner_lr, steps=wl.steps,
                                      first_order=wl.first_order)
        else:
            def loss_fn(b: TaskBatch) -> Tensor:
                return harness.meta_loss(self.maml, self.meta, b, **self.way)[0]
            if method.kind == "compiled":
                loss_fn = torch.compile(loss_fn)
        self.loss_fn = loss_fn

    def way_name(self) -> str | None:
        """The execution policy's name of this row's way (``loop``, ``chunk=4``, ``vmap/nchw``); ``None``: not one."""
        if self.method.kind == "lib-loop":
            return LOOP.name
        if self.method.kind != "vmap" or self.method.chunk == "auto":
            return None
        chunk = self.method.chunk
        whole = chunk is None or chunk >= self.wl.meta_batch  # the policy calls a chunk of all T tasks "vmap"
        return Way(None if whole else chunk, channels_last=self.method.channels_last).name

    def resolved_chunk(self) -> str:
        """What ``chunk_size`` the vectorized path really used for this batch (the policy: its choice)."""
        if self.policy is not None:
            return str(self.policy.choice)
        if self.method.kind in ("loop", "lib-loop"):
            return "-"
        chunk = self.way["chunk_size"]
        if chunk == "auto":  # resolved per batch by the library's execution policy: the row shows its choice
            chunk = auto_chunk_size(self.batches[0])
        return ("all" if chunk is None else str(chunk)) + ("" if self.method.channels_last else NCHW)

    def step(self) -> None:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.opt.zero_grad(set_to_none=True)
        if self.policy is not None:  # timed by the policy itself while it searches, as in fit
            self.policy.run(batch, self.device, lambda way, per_backward: meta_gradient(
                self.maml, self.meta, batch, 0, way=way, tasks_per_backward=per_backward))
        elif not self.per_call:
            self.loss_fn(batch).backward()
        elif self.method.kind == "loop":  # as learn2learn's examples do: each task's loss differentiated alone
            for task in batch.split(1):
                (self.loss_fn(task) / batch.num_tasks).backward()
        else:  # one backward per call of the way (per task of the loop, per chunk), by the policy's own rule
            way = Way(**self.way)
            if way.chunk_size == "auto":
                way = replace(way, chunk_size=auto_chunk_size(batch))
            per_backward = PER_CALL.tasks_per_backward_for(way, batch.num_tasks)
            harness.meta_gradient(self.maml, self.meta, batch, 0, tasks_per_backward=per_backward, **self.way)
        self.opt.step()

    def search(self) -> dict[str, Any]:
        """The policy's search (real iterations, as the first ones of a run): its choice and what it cost.

        ``search_cost_pct``: the search's extra time over running the choice from the start, as a share of
        a 1000-iteration run at the choice's speed.
        """
        assert self.policy is not None
        while self.policy.searching:
            self.step()
        timings = self.policy.timings
        chosen = timings[self.policy.choice]["seconds"]
        extra = sum(ROUNDS * (t["seconds"] - chosen) for t in timings.values() if "seconds" in t)
        return {"choice": self.policy.choice,
                "search": {k: round(v["seconds"] * 1e3) if "seconds" in v else v["skipped"]
                           for k, v in timings.items()},
                "search_memory_mb": {k: v.get("memory_mb") for k, v in timings.items()},
                "search_cost_pct": 100 * extra / (1000 * chosen)}


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def count_flops(runner: Runner) -> int:
    with FlopCounterMode(display=False) as counter:
        runner.step()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- data
def make_batches(wl: Workload, count: int, device: torch.device, sampler: Any, seed: int) -> list[TaskBatch]:
    """``count`` meta-batches of ``wl``: from the episode sampler, or synthetic of the same shapes."""
    if sampler is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
        return [sampler.sample(wl.meta_batch, gen) for _ in range(count)]
    gen = torch.Generator().manual_seed(seed)
    shape = (wl.channels, wl.image_size, wl.image_size)
    return [harness.random_tasks(wl.meta_batch, wl.n_way, wl.k_shot, wl.n_query, shape, device=device,
                                 generator=gen) for _ in range(count)]


def load_classes(args: argparse.Namespace, device: torch.device) -> tuple[Any, str]:
    """Omniglot's meta-training classes on ``device``, or ``None`` and why not."""
    if args.data == "synthetic":
        return None, "synthetic (--data synthetic)"
    try:
        from maml_func.data import load_dataset
    except ImportError as e:
        return None, f"synthetic (maml_func.data not importable: {e})"
    source = Path(args.data_source).expanduser() if args.data_source else None
    if source is not None and not source.exists():
        source = None
    try:
        data = load_dataset("omniglot", root=args.data_root, source=source)
    except (FileNotFoundError, ValueError, OSError) as e:
        if args.data == "omniglot":
            raise
        return None, f"synthetic (no Omniglot: {str(e).splitlines()[0][:160]})"
    return data["train"].to(device), f"omniglot train split, {len(data['train'])} characters, rotations"


def make_sampler(classes: Any, wl: Workload) -> Any:
    """Omniglot episodes for the Omniglot-shaped workloads; ``None`` (synthetic tasks) for the others."""
    if classes is None or wl.model != "conv4" or wl.channels != 1:
        return None
    from maml_func.tasks import EpisodeSampler
    return EpisodeSampler(classes, wl.n_way, wl.k_shot, wl.n_query, rotations=True)


# ----------------------------------------------------------------------------- memory
def probe_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """In this (fresh) process: peak memory of meta-iterations of one configuration."""
    device = torch.device(spec["device"])
    set_allocator(spec.get("malloc", "tuned"))
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    wl = Workload.from_dict(spec["workload"])
    method = Method(spec["kind"], spec["chunk"], spec.get("channels_last", True))  # kinds vmap, loop, lib-loop
    batches = make_batches(wl, 1, device, None, seed=0)
    runner = Runner(wl, method, batches, device, backward=spec.get("backward", "per-call"))
    split = spec.get("split")

    def iterations() -> None:
        for _ in range(spec.get("iterations", 1)):
            if split:
                # The library's gradient accumulation: one backward per part of `split` tasks, so only that
                # part's autograd graph is alive at a time.
                runner.opt.zero_grad(set_to_none=True)
                harness.meta_gradient(runner.maml, runner.meta, batches[0], 0, tasks_per_backward=split,
                                      **runner.way)
                runner.opt.step()
            else:
                runner.step()

    return harness.peak_memory(device, iterations)


def memory_kind(row: dict[str, Any]) -> tuple[str, int | str | None, bool]:
    """``(kind, chunk, channels_last)`` of the memory probe of a row: the policy's row as the way it chose."""
    label, chunk = row["method"], str(row["chunk"])
    channels_last = not chunk.endswith(NCHW)
    chunk = chunk.removesuffix(NCHW)
    if label == "loop (autograd.grad)":
        return "loop", None, True
    if label == "loop (way=LOOP)" or chunk == "loop":
        return "lib-loop", None, True
    if label.removesuffix(NCHW) == "vmap chunk=auto":
        return "vmap", "auto", channels_last
    if chunk in ("all", "vmap"):
        return "vmap", None, channels_last
    return "vmap", int(chunk.removeprefix("chunk=")), channels_last


def measure_memory(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Peak memory of one configuration: in-process on CUDA, a fresh subprocess on the CPU."""
    if device.type == "cuda":
        return probe_memory(spec)
    return run_json_subprocess([sys.executable, str(Path(__file__).resolve()), "--probe-memory", json.dumps(spec)],
                               timeout=300)


# ----------------------------------------------------------------------------- the run
def time_rows(runners: list[Runner], repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """Warm every row up, then ``repeats`` rounds; each round runs every row once, starting at a rotating row."""
    stats: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}  # way -> why the policy's search skipped it (it would not fit in memory)
    for r in runners:
        entry: dict[str, Any] = {"times": [], "faults": [], "error": None}
        if skipped and r.way_name() in skipped:  # it would not fit: running it could get the process killed
            entry["error"] = f"skipped as in the policy's search: {skipped[r.way_name()]}"
            stats.append(entry)
            continue
        try:
            if getattr(r, "policy", None) is not None:
                entry["search"] = r.search()  # the policy's warm-up is its search
                skipped.update({k: v["skipped"] for k, v in r.policy.timings.items() if "skipped" in v})
            sync(device)
            t0 = time.perf_counter()
            r.step()  # the compiled row compiles here
            sync(device)
            if r.method.kind == "compiled":
                r.compile_s = time.perf_counter() - t0
                r.step()
        except Exception as e:  # noqa: BLE001 - a failing row is reported, never a crash
            entry["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            traceback.print_exc(limit=2, file=sys.stderr)
        stats.append(entry)
    for rep in range(repeats):
        order = list(range(len(runners)))
        order = order[rep % len(order):] + order[:rep % len(order)]
        for i in order:
            if stats[i]["error"]:
                continue
            f0 = minor_faults()
            sync(device)
            t0 = time.perf_counter()
            runners[i].step()
            sync(device)
            stats[i]["times"].append(time.perf_counter() - t0)
            stats[i]["faults"].append(minor_faults() - f0)
    return stats


def fmt_bytes(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'workload':<22} {'method':<22} {'chunk':>5} {'ms/iter':>8} {'[min, max]':>15} {'tasks/s':>8} "
            f"{'vs loop':>7} {'GFLOP':>6} {'GFLOP/s':>8} {'util':>5} {'peak MiB':>8} {'rise MiB':>8} {'faults':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("error"):
            print(f"{r['workload']:<22} {r['method']:<22} {r['chunk']:>5}  FAILED: {r['error']}")
            continue
        mem = r.get("memory") or {}
        print(f"{r['workload']:<22} {r['method']:<22} {r['chunk']:>5} {r['ms_median']:8.0f} "
              f"{'[' + format(r['ms_min'], '.0f') + ', ' + format(r['ms_max'], '.0f') + ']':>15} "
              f"{r['tasks_per_s']:8.1f} {r['speedup_vs_loop']:6.2f}x {r['gflop']:6.1f} {r['gflop_per_s']:8.1f} "
              f"{r['utilization']:5.0%} {fmt_bytes(mem.get('peak_bytes')):>8} {fmt_bytes(mem.get('rise_bytes')):>8} "
              f"{r['faults_median'] if r['faults_median'] is not None else '-':>7}"
              + (f"  (compile {r['compile_s']:.0f} s)" if r.get("compile_s") else "")
              + (f"  ({r['vs_best_candidate']:.2f}x the best candidate, {r['best_candidate']}; search "
                 f"{r['search_cost_pct']:.2f}% of 1000 iterations)" if "vs_best_candidate" in r else ""))


def parse_chunks(text: str) -> list[int | None]:
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part == "all":
            out.append(None)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"--chunks: expected positive ints or 'all', got {part!r}")
    return out


def parse_widths(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--resnet-widths: expected four positive ints, got {text!r}")
    return tuple(int(p) for p in parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="one small workload, 2 repeats: under a minute")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # seconds; for the tests
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per workload (default 3; quick 2)")
    p.add_argument("--chunks", type=parse_chunks, default=None,
                   help="explicit chunk_size rows, comma-separated ints or 'all' (default: all on the CPU, 8 on CUDA; "
                        "quick 4)")
    p.add_argument("--workloads", default=None,
                   help="comma-separated subset of the standard workloads: 5w-s1-2nd, 5w-s5-2nd, 5w-s1-1st, "
                        "5w-s5-1st, 20w-s1-2nd (default: all); or the miniImageNet-shaped ones, never run by "
                        "default: mini-5w-s5-2nd (MAML's Conv4-32), r12-5w-s1-2nd, r12-5w-s1-1st (ResNet-12), at "
                        "T = 4, and the same with -t32 at T = 32")
    p.add_argument("--resnet-widths", type=parse_widths, default=(64, 160, 320, 640),
                   help="ResNet-12 filters per block for the r12 workloads (default 64,160,320,640)")
    p.add_argument("--compile", choices=("none", "first", "all"), default=None,
                   help="torch.compile row for no workload, the first, or all (default: first on CUDA, none on "
                        "the CPU, where compiling takes minutes)")
    p.add_argument("--memory", choices=("none", "policy", "rows", "all"), default=None,
                   help="peak memory of the policy's and the loop's rows only, of every row, or of every row and "
                        "the chunk_size curve (default all; quick rows)")
    p.add_argument("--curve-chunks", type=parse_chunks, default=None,
                   help="chunk_size points of the memory curve (default 1,2,4,8,16,32)")
    p.add_argument("--split-chunks", type=parse_chunks, default=None,
                   help="tasks_per_backward values of the memory curve (default 1,2,4,8,16,32)")
    p.add_argument("--backward", choices=("per-call", "whole"), default="per-call",
                   help="'per-call' (default): every row differentiates each call of its way on its own (each "
                        "task of a loop, each chunk), as the execution policy runs its candidates; 'whole': one "
                        "backward for the meta-batch")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--malloc", choices=("tuned", "glibc"), default="tuned",
                   help="'tuned' (default): glibc keeps freed memory, as maml_func sets it up on the CPU, for "
                        "every row alike; 'glibc': the allocator as it comes (MAML_FUNC_TUNE_MALLOC=0)")
    p.add_argument("--data", choices=("auto", "omniglot", "synthetic"), default="auto",
                   help="episodes from Omniglot (auto: when available) or synthetic tensors of the same shapes")
    p.add_argument("--data-root", default="data/omniglot", help="Omniglot archives / cache folder")
    p.add_argument("--data-source", default=harness.shared_omniglot(),
                   help="offline folder with the two Omniglot zips (default ../shared/data/omniglot if present)")
    p.add_argument("--json", metavar="PATH", help="also write JSON lines to PATH")
    p.add_argument("--probe-memory", metavar="SPEC", help=argparse.SUPPRESS)  # internal: one memory probe
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    if args.probe_memory:
        print(json.dumps(probe_memory(json.loads(args.probe_memory))))
        return []

    small = args.quick or args.smoke
    repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 2 if args.quick else 3)
    device = torch.device(args.device)
    # The contrast worth a row: on the CPU "auto" chunks, so show one whole-batch vmap; on a GPU the reverse.
    chunks = args.chunks if args.chunks is not None else (
        [4] if small else [None] if device.type == "cpu" else [8])
    compile_mode = args.compile if args.compile is not None else ("first" if device.type == "cuda" else "none")
    memory_mode = args.memory if args.memory is not None else ("rows" if args.quick else "all")
    curve_chunks = args.curve_chunks if args.curve_chunks is not None else (
        [1, 2] if args.smoke else [1, 2, 4, 8, 16, 32])
    split_chunks = args.split_chunks if args.split_chunks is not None else (
        [1, 2] if args.smoke else [1, 2, 4, 8, 16, 32])
    if repeats < 1:
        raise SystemExit("throughput.py: --repeats must be at least 1")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("throughput.py: --device cuda but torch.cuda.is_available() is False; use --device cpu")
    tuned = set_allocator(args.malloc)
    if args.threads:
        torch.set_num_threads(args.threads)

    workloads = standard_workloads(args.quick, args.smoke)
    if args.workloads:
        workloads = workloads + extra_workloads(args.resnet_widths)
        wanted = [w.strip() for w in args.workloads.split(",") if w.strip()]
        unknown = sorted(set(wanted) - {w.key for w in workloads})
        if unknown:
            raise SystemExit(f"throughput.py: --workloads {unknown} unknown; choose from {[w.key for w in workloads]}")
        workloads = [w for w in workloads if w.key in wanted]
    if args.smoke:
        classes, data_note = None, "synthetic (--smoke)"
    elif all(w.model != "conv4" for w in workloads):
        classes, data_note = None, "synthetic tasks of the workloads' shapes (miniImageNet-shaped: no episodes to draw)"
    else:
        classes, data_note = load_classes(args, device)
    matmul = harness.matmul_flops_per_s(device)
    setup = {
        **machine_setup(str(device), argv),
        "malloc": ("tuned (maml_func.system.tune_malloc)" if tuned else "glibc as it comes")
                  + "".join(f", {k}={os.environ[k]}" for k in ("LD_PRELOAD", "GLIBC_TUNABLES") if os.environ.get(k)),
        "data": data_note,
        "model": "; ".join(dict.fromkeys(w.describe() for w in workloads)),
        "inner": "SGD; outer Adam 1e-3; one iteration = meta-loss + backward + Adam step",
        "backward": {"per-call": "one per call of each row's way (per task of a loop, per chunk), as the policy runs",
                     "whole": "one for the whole meta-batch"}[args.backward],
        "workloads": [w.name + f" ({w.n_query} queries/class)" for w in workloads],
        "repeats": repeats,
        "matmul_gflop_per_s": matmul / 1e9,
    }
    print_setup("maml_func throughput benchmark", setup, 20)

    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for wi, wl in enumerate(workloads):
        sampler = make_sampler(classes, wl)
        batches = make_batches(wl, 2, device, sampler, seed=wi)
        candidates = [Method("vmap", w.chunk_size, w.channels_last)
                      for w in ways(wl.meta_batch, layouts=device.type == "cpu") if w.vectorize]
        extra = [Method("vmap", c) for c in chunks if Method("vmap", c) not in candidates]
        methods = [Method("policy"), Method("loop"), *candidates, *extra, Method("lib-loop")]
        if compile_mode == "all" or (compile_mode == "first" and wi == 0):
            # One vmap over the whole meta-batch: the smallest graph to compile (chunks would be unrolled).
            methods.append(Method("compiled", None))
        runners = [Runner(wl, m, batches, device, backward=args.backward) for m in methods]
        flops = count_flops(runners[1])
        stats = time_rows(runners, repeats, device)
        loop_median = statistics.median(stats[1]["times"]) if stats[1]["times"] else math.nan
        for r, st in zip(runners, stats):
            row: dict[str, Any] = {"kind": "row", "workload": wl.name, "method": r.method.label,
                                   "chunk": r.resolved_chunk(), "config": asdict(wl)}
            if st["error"] or not st["times"]:
                row["error"] = st["error"] or "no timing"
                rows.append(row)
                continue
            row.update(st.get("search", {}))
            med = statistics.median(st["times"])
            row.update({
                "ms_median": med * 1e3, "ms_min": min(st["times"]) * 1e3, "ms_max": max(st["times"]) * 1e3,
                "tasks_per_s": wl.meta_batch / med, "speedup_vs_loop": loop_median / med,
                "gflop": flops / 1e9, "gflop_per_s": flops / med / 1e9, "utilization": flops / med / matmul,
                "faults_median": int(statistics.median(st["faults"])) if device.type == "cpu" else None,
                "compile_s": r.compile_s, "repeats": len(st["times"]),
            })
            rows.append(row)
        here = [r for r in rows if r["workload"] == wl.name and "ms_median" in r]
        best = min((r for r in here if r["method"] not in ("policy (default)", "loop (autograd.grad)")),
                   key=lambda r: r["ms_median"], default=None)
        for r in here:
            if r["method"] == "policy (default)" and best is not None:
                r["vs_best_candidate"] = r["ms_median"] / best["ms_median"]
                r["best_candidate"] = best["method"]
        del runners, batches
        print(f"[{time.perf_counter() - start:5.0f} s] {wl.name}: "
              + ", ".join(f"{r['method']} {r['ms_median']:.0f} ms" if 'ms_median' in r else f"{r['method']} failed"
                          for r in rows if r["workload"] == wl.name), flush=True)

    if memory_mode != "none":
        for row in rows:
            if row.get("error") or row["method"].startswith("compiled"):
                continue
            if memory_mode == "policy" and row["method"] not in ("policy (default)", "loop (autograd.grad)"):
                continue
            kind, chunk, channels_last = memory_kind(row)
            spec = {"device": str(device), "workload": row["config"], "kind": kind, "chunk": chunk,
                    "channels_last": channels_last,
                    "malloc": args.malloc, "threads": args.threads, "backward": args.backward}
            row["memory"] = measure_memory(spec, device)
        print(f"[{time.perf_counter() - start:5.0f} s] memory of the rows probed", flush=True)

    print()
    print_table(rows)

    curve: list[dict[str, Any]] = []
    if memory_mode == "all":
        base = Workload(5, 1, 15 if not args.smoke else 2, 32 if not args.smoke else 2, 5 if not args.smoke else 1,
                        False)
        print(f"\nMemory curve: {base.name}, peak against chunk_size (one backward: the graph of all T tasks "
              "is kept for it) and against tasks_per_backward (meta_gradient: one backward per part of N tasks, "
              "default chunk_size)")
        print(f"{'mode':<18} {'N':>5} {'peak MiB':>9} {'rise MiB':>9}")
        for mode, points in (("chunk_size", curve_chunks), ("tasks_per_backward", split_chunks)):
            for c in points:
                if c is None or c > base.meta_batch:
                    continue
                spec = {"device": str(device), "workload": asdict(base), "kind": "vmap",
                        "chunk": c if mode == "chunk_size" else "auto",
                        "split": c if mode == "tasks_per_backward" else None, "backward": "whole",
                        "malloc": args.malloc, "threads": args.threads}
                mem = measure_memory(spec, device)
                curve.append({"kind": "memory", "workload": base.name, "mode": mode, "chunk": c, **mem})
                print(f"{mode:<18} {c:>5} {fmt_bytes(mem.get('peak_bytes')):>9} {fmt_bytes(mem.get('rise_bytes')):>9}"
                      + (f"  {mem['error']}" if "error" in mem else ""), flush=True)

    records = [setup, *rows, *curve]
    write_json_lines(args.json, records)
    return records


if __name__ == "__main__":
    main()
