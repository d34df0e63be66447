"""The GPU path in one prepared command: correctness, speed, variants, 60 000-iteration projections, the CLI, NCCL.

Usage::

    python benchmarks/gpu_check.py --device cuda --json runs/gpu_check.jsonl   # on a GPU: at most ~8 minutes
    python benchmarks/gpu_check.py --device cpu --quick                         # the same steps at toy size

A GPU is lent for minutes, so everything it has to show is one command that
already runs on the CPU (a test runs ``--device cpu --quick`` so it cannot rot).
Sections, in order, each printed with its elapsed time:

1. ``correctness``: the vectorized second-order meta-gradient against the
   per-task loop (:mod:`maml_func.reference`) on the device, Conv4 with affine
   batch norm, S = 1 and 5; float64 (must be < 1e-10 relative) and float32.
2. ``speed``: one meta-iteration (meta-loss, backward, Adam step) vectorized
   against the loop, T in {32, 128}, S in {1, 5}, second and first order,
   Omniglot 5-way and 20-way 1-shot shapes; miniImageNet Conv4-32 and ResNet-12
   where the library has them. ms per iteration, the ratio, achieved FLOP/s and
   its share of a dense matmul measured in the same run, peak memory.
3. ``variants``: ``torch.compile`` of the meta-step, TF32 matmuls, bf16
   autocast (with its meta-gradient error against float32), CUDA graphs
   (``mode="reduce-overhead"``), and the episode sampler on the device.
4. ``projection``: wall time of the paper's 60 000 iterations for the four
   Omniglot presets, from measured ms per iteration, validation included.
5. ``cli``: ``maml-func train`` for a few hundred iterations and ``maml-func
   eval`` on it, and a one-rank ``torchrun`` (NCCL on CUDA, gloo on the CPU).

Output: the sections as text, and with ``--json PATH`` one JSON object per line
(``"kind"``: ``"setup"``, ``"correctness"``, ``"speed"``, ``"variant"``,
``"projection"``, ``"cli"``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import torch
from harness import random_tasks, sync
from torch.utils.flop_counter import FlopCounterMode

from maml_func import MAML, EpisodeSampler, TaskBatch, evaluate
from maml_func.data import ImageClasses
from maml_func.models import MODELS, build_model
from maml_func.presets import PRESETS
from maml_func.reference import loop_meta_grad, loop_meta_loss


class Report:
    """Prints sections and rows, keeps the JSON records."""

    def __init__(self, path: str | None) -> None:
        self.records: list[dict[str, Any]] = []
        self.path = path
        self.began = time.monotonic()

    def section(self, title: str) -> None:
        print(f"\n== {title} ({time.monotonic() - self.began:.0f} s) ==", flush=True)

    def add(self, kind: str, line: str, **record: Any) -> None:
        print(line, flush=True)
        self.records.append({"kind": kind, **record})

    def write(self) -> None:
        if self.path:
            Path(self.path).write_text("".join(json.dumps(r) + "\n" for r in self.records))
            print(f"\nwrote {len(self.records)} JSON lines to {self.path}")


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    """Seconds of ``fn()`` after one warm-up call, ``repeats`` times."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def peak_bytes(device: torch.device, fn: Callable[[], Any]) -> int | None:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    diff = torch.cat([(x - y).double().flatten() for x, y in zip(a, b)])
    return (diff.norm() / torch.cat([y.double().flatten() for y in b]).norm()).item()


# ----------------------------------------------------------------------------- 1. correctness
def correctness(report: Report, device: torch.device, quick: bool) -> bool:
    hidden, size = (8, 16) if quick else (32, 28)
    ok = True
    for dtype in (torch.float64, torch.float32):
        for steps in (1, 5):
            torch.manual_seed(0)
            model = build_model("conv4", n_way=5, in_channels=1, image_size=size, hidden=hidden).to(device, dtype)
            maml = MAML(model, inner_lr=0.4 if steps == 1 else 0.1, inner_steps=steps)
            meta = maml.init()
            batch = random_tasks(4, 5, 1, 3, (1, size, size), device=device, dtype=dtype)
            got = torch.autograd.grad(maml.meta_loss(meta, batch)[0], list(meta["model"].values()))
            want = loop_meta_grad(model, meta["model"], batch, inner_lr=maml.inner_lr, steps=steps)
            error = rel(list(got), list(want))
            passed = error < 1e-10 if dtype == torch.float64 else error < 1e-3
            ok &= passed
            name = str(dtype).removeprefix("torch.")
            report.add("correctness", f"  {name:8} S={steps}  vmap vs per-task loop: relative error {error:.2e}  "
                       f"{'PASS' if passed else 'FAIL'}", dtype=name, steps=steps, relative_error=error,
                       passed=passed)
    return ok


# ----------------------------------------------------------------------------- 2. speed
def workloads(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [dict(name="omniglot 5w1s", model="conv4", n_way=5, k_shot=1, shape=(1, 28, 28), hidden=8, tasks=4,
                     steps=1, first_order=False, inner_lr=0.4)]
    out = [dict(name=f"omniglot {n}w1s", model="conv4", n_way=n, k_shot=1, shape=(1, 28, 28), hidden=64, tasks=t,
                steps=s, first_order=fo, inner_lr=0.4 if n == 5 else 0.1)
           for n in (5, 20) for t in (32, 128) for s in (1, 5) for fo in (False, True)]
    out.append(dict(name="miniimagenet 5w1s conv4-32", model="conv4", n_way=5, k_shot=1, shape=(3, 84, 84), hidden=32,
                    tasks=4, steps=5, first_order=False, inner_lr=0.01, options={"pool": True}))
    if "resnet12" in MODELS:
        out += [dict(name="miniimagenet 5w1s resnet12", model="resnet12", n_way=5, k_shot=1, shape=(3, 84, 84),
                     hidden=64, tasks=4, steps=1, first_order=fo, inner_lr=0.01) for fo in (False, True)]
    return out


def make_step(w: dict[str, Any], device: torch.device, kind: str, dtype: torch.dtype = torch.float32,
              batch: TaskBatch | None = None) -> tuple[Callable[[], torch.Tensor], MAML, dict[str, Any], TaskBatch]:
    """One meta-iteration of workload ``w``: ``kind`` "vmap" (the library) or "loop" (the per-task reference)."""
    torch.manual_seed(0)
    model = build_model(w["model"], n_way=w["n_way"], in_channels=w["shape"][0], image_size=w["shape"][1],
                        hidden=w["hidden"], **w.get("options", {})).to(device, dtype)
    maml = MAML(model, inner_lr=w["inner_lr"], inner_steps=w["steps"], first_order=w["first_order"])
    meta = maml.init()
    opt = torch.optim.Adam(maml.parameters(meta), lr=1e-3)
    batch = batch if batch is not None else random_tasks(w["tasks"], w["n_way"], w["k_shot"], 15, w["shape"],
                                                         device=device, dtype=dtype)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        if kind == "vmap":
            loss = maml.meta_loss(meta, batch)[0]
        else:
            loss = loop_meta_loss(model, meta["model"], batch, inner_lr=w["inner_lr"], steps=w["steps"],
                                  first_order=w["first_order"])
        loss.backward()
        opt.step()
        return loss

    return step, maml, meta, batch


def flops_per_iteration(w: dict[str, Any], device: torch.device) -> int:
    """Counted on one task of the loop (the same arithmetic as every other task), times T."""
    one = {**w, "tasks": 1}
    step, *_ = make_step(one, device, "loop")
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() * w["tasks"]


def speed(report: Report, device: torch.device, quick: bool, matmul: float) -> dict[str, float]:
    repeats = 2 if quick else 3
    ms_by_name: dict[str, float] = {}
    print(f"  {'workload':28} {'T':>4} {'S':>2} {'order':>5} {'vmap ms':>8} {'loop ms':>8} {'ratio':>6} "
          f"{'TFLOP/s':>8} {'util':>5} {'peak MiB':>9}")
    for w in workloads(quick):
        order = "1st" if w["first_order"] else "2nd"
        row: dict[str, Any] = {"workload": w["name"], "tasks": w["tasks"], "steps": w["steps"], "order": order}
        try:
            vmap_step, *_ = make_step(w, device, "vmap")
            loop_step, *_ = make_step(w, device, "loop")
            vmap_ms = 1e3 * statistics.median(timed(vmap_step, device, repeats))
            loop_ms = 1e3 * statistics.median(timed(loop_step, device, 1 if w["tasks"] >= 128 else repeats))
            flops = flops_per_iteration(w, device)
            peak = peak_bytes(device, vmap_step)
        except Exception as err:  # noqa: BLE001 - a failing row is reported, the check goes on
            report.add("speed", f"  {w['name']:28} {w['tasks']:4} {w['steps']:2} {order:>5}  FAILED: "
                       f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}",
                       **row, error=f"{type(err).__name__}: {err}"[:300])
            continue
        achieved = flops / (vmap_ms / 1e3)
        row.update(vmap_ms=vmap_ms, loop_ms=loop_ms, ratio=loop_ms / vmap_ms, gflop=flops / 1e9,
                   flop_per_s=achieved, utilization=achieved / matmul, peak_bytes=peak)
        ms_by_name[f"{w['name']} T={w['tasks']} S={w['steps']} {order}"] = vmap_ms
        report.add("speed", f"  {w['name']:28} {w['tasks']:4} {w['steps']:2} {order:>5} {vmap_ms:8.1f} "
                   f"{loop_ms:8.1f} {loop_ms / vmap_ms:5.1f}x {achieved / 1e12:8.3f} {achieved / matmul:5.1%} "
                   f"{'n/a' if peak is None else format(peak / 2**20, '.0f'):>9}", **row)
    return ms_by_name


# ----------------------------------------------------------------------------- 3. variants
def variants(report: Report, device: torch.device, quick: bool) -> None:
    w = workloads(quick)[0]
    repeats = 2 if quick else 5
    base_step, maml, meta, batch = make_step(w, device, "vmap")
    base = 1e3 * statistics.median(timed(base_step, device, repeats))
    report.add("variant", f"  {'eager float32 (reference)':34} {base:8.1f} ms", variant="eager", ms=base)

    def grads(dtype_context: Any) -> list[torch.Tensor]:
        with dtype_context:
            loss = maml.meta_loss(meta, batch)[0]
        return list(torch.autograd.grad(loss, list(meta["model"].values())))

    reference = grads(torch.autocast(device.type, enabled=False))
    bf16 = grads(torch.autocast(device.type, dtype=torch.bfloat16))
    bf16_step = lambda: grads(torch.autocast(device.type, dtype=torch.bfloat16))  # noqa: E731
    ms = 1e3 * statistics.median(timed(bf16_step, device, repeats))
    report.add("variant", f"  {'bf16 autocast (meta-grad only)':34} {ms:8.1f} ms  meta-gradient error vs float32 "
               f"{rel(bf16, reference):.2e}", variant="bf16_autocast", ms=ms, relative_error=rel(bf16, reference))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        tf32 = grads(torch.autocast(device.type, enabled=False))
        ms = 1e3 * statistics.median(timed(base_step, device, repeats))
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        report.add("variant", f"  {'TF32 matmuls and convolutions':34} {ms:8.1f} ms  meta-gradient error vs float32 "
                   f"{rel(tf32, reference):.2e}", variant="tf32", ms=ms, relative_error=rel(tf32, reference))
    else:
        report.add("variant", "  TF32: n/a on the CPU", variant="tf32", skipped="cpu")
    modes = [] if (quick and device.type == "cpu") else (["default", "reduce-overhead"] if device.type == "cuda"
                                                          else ["default"])
    for mode in modes:
        try:
            compiled = torch.compile(lambda: maml.meta_loss(meta, batch)[0], mode=mode)
            t0 = time.perf_counter()
            compiled().backward()
            sync(device)
            compile_s = time.perf_counter() - t0
            ms = 1e3 * statistics.median(timed(lambda: compiled().backward(), device, repeats))
            label = f"torch.compile mode={mode}" + (" (CUDA graphs)" if mode == "reduce-overhead" else "")
            report.add("variant", f"  {label:34} {ms:8.1f} ms  (compiled in {compile_s:.0f} s)",
                       variant=f"compile-{mode}",
                       ms=ms, compile_s=compile_s)
        except Exception as err:  # noqa: BLE001 - reported, not raised
            report.add("variant", f"  torch.compile mode={mode}: FAILED {type(err).__name__}: "
                       f"{str(err).splitlines()[0][:120] if str(err) else ''}", variant=f"compile-{mode}",
                       error=f"{type(err).__name__}: {err}"[:300])
    if not modes:
        report.add("variant", "  torch.compile: skipped (--quick on the CPU: compiling takes minutes)",
                   variant="compile", skipped="quick-cpu")
    classes = ImageClasses(torch.randint(0, 256, (100, 20, 1, 28, 28), dtype=torch.uint8),
                           torch.full((100,), 20), [f"c{i}" for i in range(100)]).to(device)
    sampler = EpisodeSampler(classes, 5, 1, 15, rotations=True)
    gen = torch.Generator(device=device).manual_seed(0)
    ms = 1e3 * statistics.median(timed(lambda: sampler.sample(32, gen), device, 20))
    report.add("variant", f"  {'EpisodeSampler.sample(32), on device':34} {ms:8.2f} ms", variant="sampler", ms=ms)


# ----------------------------------------------------------------------------- 4. projection
def projection(report: Report, device: torch.device, quick: bool) -> None:
    """ms per meta-iteration of each Omniglot preset (its own meta-batch, steps and queries), plus validation."""
    for name in [p for p in PRESETS if p.startswith("omniglot")][: 1 if quick else None]:
        p = PRESETS[name]
        w = dict(name=name, model="conv4", n_way=p["n_way"], k_shot=p["k_shot"], shape=(1, 28, 28),
                 hidden=8 if quick else 64, tasks=4 if quick else p["meta_batch"], steps=p["inner_steps"],
                 first_order=False, inner_lr=p["inner_lr"])
        batch = random_tasks(w["tasks"], w["n_way"], w["k_shot"], p["n_query"], w["shape"], device=device)
        step, maml, meta, _ = make_step(w, device, "vmap", batch=batch)
        ms = 1e3 * statistics.median(timed(step, device, 2 if quick else 5))
        val_tasks = 8 if quick else 200
        classes = ImageClasses(torch.rand(60, 20, 1, 28, 28).mul(255).to(torch.uint8), torch.full((60,), 20),
                               [f"c{i}" for i in range(60)]).to(device)
        sampler = EpisodeSampler(classes, p["n_way"], p["k_shot"], p["n_query"])
        val = timed(lambda: evaluate(maml, meta, sampler, num_tasks=val_tasks, steps=p["eval_inner_steps"],
                                     batch_size=min(w["tasks"], val_tasks)), device, 1)[0]
        iterations, validations = p["iterations"], p["iterations"] // 500 + 1
        total_s = iterations * ms / 1e3 + validations * val
        report.add("projection", f"  {name:16} {ms:8.1f} ms/iteration, validation {val:6.2f} s x {validations}: "
                   f"{iterations} iterations in {total_s / 60:6.1f} min", preset=name, ms_per_iteration=ms,
                   validation_s=val, iterations=iterations, projected_minutes=total_s / 60, toy=quick)


# ----------------------------------------------------------------------------- 5. cli
def toy_tree(root: Path, classes: int = 24, per_class: int = 6) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True)
        pattern = torch.rand(16, 16, generator=g)
        for i in range(per_class):
            pixels = (255 * (0.7 * pattern + 0.3 * torch.rand(16, 16, generator=g))).to(torch.uint8)
            Image.fromarray(pixels.numpy(), mode="L").save(root / f"c{c:02d}" / f"{i}.png")
    return root


def cli(report: Report, device: torch.device, quick: bool, source: str | None) -> None:
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        if quick or source is None:
            data = ["--dataset", str(toy_tree(work / "tree")), "--image-size", "16", "--hidden", "8", "--n-way", "3",
                    "--meta-batch", "4", "--val-tasks", "8"]
            iterations = "4" if quick else "300"
        else:
            data = ["--preset", "omniglot-5w1s", "--source", source, "--val-tasks", "200"]
            iterations = "300"
        common = [*data, "--device", device.type, "--data-root", str(work / "data"), "--no-progress",
                  "--val-every", "100"]
        runs = {
            "train": [sys.executable, "-m", "maml_func", "train", *common, "--iterations", iterations,
                      "--save-to", str(work / "run")],
            "eval": [sys.executable, "-m", "maml_func", "eval", "--checkpoint", str(work / "run"), "--tasks",
                     "20" if quick else "600", "--no-progress"],
            "torchrun (1 rank, " + ("nccl" if device.type == "cuda" else "gloo") + ")":
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                 "-m", "maml_func", "train", "--distributed", *common, "--iterations", "4" if quick else "100",
                 "--save-to", str(work / "ddp")],
        }
        for name, command in runs.items():
            t0 = time.monotonic()
            done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=harness.REPO)
            took = time.monotonic() - t0
            last = (done.stdout.strip().splitlines() or done.stderr.strip().splitlines() or [""])[
                0 if name == "eval" else -1]
            report.add("cli", f"  {name:24} exit {done.returncode}  {took:5.1f} s  {last[:150]}", step=name,
                       returncode=done.returncode, seconds=took, output=last,
                       stderr_tail=done.stderr[-800:] if done.returncode else "")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- main
def setup(report: Report, device: torch.device, args: argparse.Namespace, matmul: float) -> None:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
                            "quick": args.quick, "command": " ".join(sys.argv)}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))))
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = "unknown"
    info["matmul_tflop_per_s"] = matmul / 1e12
    report.add("setup", "\n".join(f"  {k:20} {v}" for k, v in info.items()), **info)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes: the same steps in about a minute on a CPU")
    p.add_argument("--source", default=harness.shared_omniglot(),
                   help="offline Omniglot for the CLI section (default ../shared/data/omniglot when present; "
                        "without one a synthetic folder tree is used)")
    p.add_argument("--sections", default="correctness,speed,variants,projection,cli",
                   help="comma-separated subset of the sections")
    p.add_argument("--json", metavar="PATH", help="also write JSON lines to PATH")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: --device cuda but CUDA is not available here; pass --device cpu")
    report = Report(args.json)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    matmul = harness.matmul_flops_per_s(device, 1024 if args.quick else None)
    report.section("setup")
    setup(report, device, args, matmul)
    ok = True
    if "correctness" in wanted:
        report.section("1. correctness: vectorized vs per-task loop, second order")
        ok = correctness(report, device, args.quick)
    if "speed" in wanted:
        report.section("2. speed: one meta-iteration, vectorized vs loop")
        speed(report, device, args.quick, matmul)
    if "variants" in wanted:
        report.section("3. variants")
        variants(report, device, args.quick)
    if "projection" in wanted:
        report.section("4. projection: the paper's 60 000 iterations" + (" (toy sizes)" if args.quick else ""))
        projection(report, device, args.quick)
    if "cli" in wanted:
        report.section("5. maml-func train / eval, torchrun")
        cli(report, device, args.quick, args.source)
    report.section("done")
    report.write()
    return 0 if ok and all(r.get("returncode", 0) == 0 for r in report.records) else 1


if __name__ == "__main__":
    sys.exit(main())
