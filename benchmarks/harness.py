"""What the benchmark scripts share: set-up records, synthetic tasks, memory probes, how tasks run, the recipes.

A script run as ``python benchmarks/NAME.py`` has ``benchmarks/`` on its
``sys.path``, so ``import harness`` finds this module; it is not part of the
installed library.

- **Set-up and output**: :func:`machine_setup`, :func:`print_setup`,
  :func:`write_json_lines`, :func:`set_allocator`, :func:`sync`,
  :func:`matmul_flops_per_s`, :func:`shared_omniglot`.
- **Tasks**: :func:`random_tasks`, synthetic meta-batches of given shapes.
- **Memory**: :func:`peak_memory` (the library's own measure, the one its
  execution policy uses) and :func:`run_json_subprocess` for a fresh process.
- **How the tasks of a meta-batch run** (``chunk_size``, ``vectorize``, ``channels_last``):
  :func:`meta_loss`, :func:`meta_gradient` and :func:`evaluate`. Every
  benchmark that chooses the way passes it through these three, and only they
  know how the library takes it (a :class:`~maml_func.batching.Way`).
- **Recipes**: :data:`RECIPES`, the one table of per-algorithm Omniglot
  5-way 1-shot settings that ``algorithms_omniglot.py`` and
  ``time_to_accuracy.py`` both read (:func:`recipe_config`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from maml_func import TaskBatch
from maml_func import evaluate as _evaluate
from maml_func import meta_gradient as _meta_gradient
from maml_func.batching import Way
from maml_func.config import TrainConfig, make_config
from maml_func.evaluate import EvalResult
from maml_func.execution import PeakMemory, resident_bytes
from maml_func.system import ENV as TUNE_MALLOC_ENV
from maml_func.system import tune_malloc

REPO = Path(__file__).resolve().parents[1]
SHARED_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"


def shared_omniglot() -> str | None:
    """The offline Omniglot folder next to the repository (``../shared/data/omniglot``) when there is one."""
    return str(SHARED_OMNIGLOT) if SHARED_OMNIGLOT.exists() else None


# ----------------------------------------------------------------------------- set-up and output
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_setup(device: str, argv: list[str] | None) -> dict[str, Any]:
    """The part of a benchmark's ``setup`` record that says when, how and on what it ran."""
    return {
        "kind": "setup",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def print_setup(title: str, setup: dict[str, Any], width: int) -> None:
    print(title)
    for k, v in setup.items():
        if k != "kind":
            print(f"  {k:<{width}} {v}")
    print(flush=True)


def write_json_lines(path_text: str | None, records: list[dict[str, Any]]) -> None:
    """Write ``records`` as JSON lines to ``path_text`` (nothing when ``None``) and say so."""
    if not path_text:
        return
    path = Path(path_text)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for rec in records:
            f.write(json.dumps(rec, default=str) + "\n")
    print(f"\nwrote {len(records)} JSON lines to {path}")


def set_allocator(mode: str) -> bool:
    """Before anything runs: ``"tuned"`` applies what maml_func does on the CPU to the whole process (every
    row alike, the loop included); ``"glibc"`` turns the library's automatic tuning off. Returns whether tuned."""
    if mode == "glibc":
        os.environ[TUNE_MALLOC_ENV] = "0"
        return False
    return tune_malloc()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_s(device: torch.device, n: int | None = None, repeats: int = 5) -> float:
    """Dense fp32 matmul throughput on ``device`` (``n x n``; default 2048 on the CPU, 8192 on CUDA): the
    yardstick for utilization."""
    n = n if n is not None else 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


# ----------------------------------------------------------------------------- tasks
def random_tasks(tasks: int, n_way: int, k_shot: int, n_query: int, shape: tuple[int, ...], *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                 generator: torch.Generator | None = None) -> TaskBatch:
    """A meta-batch of ``tasks`` random-image tasks of ``shape`` (``C, H, W``): speed does not depend on the pixels.

    Support ``[T, N*K, C, H, W]`` with labels ``0..N-1`` repeated ``K`` times,
    query ``[T, N*Q, C, H, W]`` likewise; ``generator`` (a CPU one) carries on
    a stream across calls, else one is seeded with ``seed``.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(seed)

    def labels(per_class: int) -> Tensor:
        return torch.arange(n_way).repeat_interleave(per_class).expand(tasks, -1).clone()

    return TaskBatch(torch.rand(tasks, n_way * k_shot, *shape, generator=g, dtype=dtype), labels(k_shot),
                     torch.rand(tasks, n_way * n_query, *shape, generator=g, dtype=dtype), labels(n_query)).to(device)


# ----------------------------------------------------------------------------- memory
def peak_memory(device: torch.device, fn: Callable[[], Any]) -> dict[str, Any]:
    """Peak memory of ``fn()``: CUDA's peak allocation, or on the CPU the peak resident set (Linux).

    ``base_bytes``: what was in use before (allocated on CUDA, resident on the
    CPU); ``rise_bytes``: the peak over it. On the CPU the high-water mark is
    reset first (``/proc/self/clear_refs``) so importing torch does not count;
    where it cannot be, ``peak_since_start`` says the peak may be an earlier one.
    """
    sync(device)
    memory = PeakMemory(device, resident_bytes("VmRSS"))
    base = memory.start()
    fn()
    sync(device)
    rise = memory.rise(base)
    if device.type == "cuda":
        return {"peak_bytes": base + rise, "rise_bytes": rise, "base_bytes": base}
    exact = rise is not None
    peak = base + rise if exact else resident_bytes("VmHWM")
    return {"peak_bytes": peak, "rise_bytes": peak - base, "base_bytes": base, "peak_since_start": not exact}


def run_json_subprocess(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run ``cmd`` and parse the JSON object of its last output line; a failure is ``{"error": reason}``."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    except (subprocess.SubprocessError, json.JSONDecodeError, IndexError) as e:
        stderr = (getattr(e, "stderr", "") or "").strip()
        return {"error": f"{type(e).__name__}: {stderr.splitlines()[-1][:200] if stderr else e}"}


# ----------------------------------------------------------------------------- how the tasks run
# chunk_size: tasks per vmap call ("auto": the library's rule for the device, None: the whole meta-batch);
# vectorize=False: a Python loop over the tasks; channels_last=False: image tasks as they come on the CPU.
# The same meta-gradient up to rounding every way.
def meta_loss(algorithm: Any, meta: dict[str, Any], batch: TaskBatch, iteration: int = 0, *,
              chunk_size: int | str | None = "auto", vectorize: bool = True,
              channels_last: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """``algorithm.meta_loss(meta, batch, iteration)`` with the tasks run this way."""
    return algorithm.meta_loss(meta, batch, iteration, way=Way(chunk_size, vectorize, channels_last))


def meta_gradient(algorithm: Any, meta: dict[str, Any], batch: TaskBatch, iteration: int = 0, *,
                  chunk_size: int | str | None = "auto", vectorize: bool = True, channels_last: bool = True,
                  tasks_per_backward: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`maml_func.meta_gradient` (fills ``.grad``) with the tasks run this way."""
    return _meta_gradient(algorithm, meta, batch, iteration, tasks_per_backward=tasks_per_backward,
                          way=Way(chunk_size, vectorize, channels_last))


def evaluate(algorithm: Any, meta: dict[str, Any], sampler: Any, *, chunk_size: int | str | None = "auto",
             vectorize: bool = True, channels_last: bool = True, **options: Any) -> EvalResult:
    """:func:`maml_func.evaluate` (``options``: ``num_tasks``, ``steps``, ...) with the tasks run this way."""
    return _evaluate(algorithm, meta, sampler, way=Way(chunk_size, vectorize, channels_last), **options)


# ----------------------------------------------------------------------------- recipes
#: The MAML family on Omniglot 5-way 1-shot: per algorithm, TrainConfig overrides over RECIPE_BASE, each
#: following its paper's Omniglot setting where there is one. Read by algorithms_omniglot.py (its own loop)
#: and time_to_accuracy.py (fit), so the two cannot drift apart.
RECIPE_BASE: dict[str, Any] = {"preset": "omniglot-5w1s", "n_query": 5}  # 5 queries per class: steadier gradients
RECIPES: dict[str, dict[str, Any]] = {
    "maml": {},  # the preset: inner SGD 0.4, 1 step in training, 3 at test
    "fomaml": {"algorithm": "maml", "first_order": True},
    "anil": {"algorithm": "anil"},
    "metasgd": {"algorithm": "metasgd", "eval_inner_steps": 1},  # a learned step size: tested at its trained count
    # MAML++'s Omniglot setting: meta-batch 8, 5 steps, LSLR from 0.1; its two annealing schedules (over tens of
    # thousands of iterations in the paper) shortened to fit a few-minute budget: first order for the first 50
    # iterations, the multi-step loss annealed to the last step's over the first 100.
    "mamlpp": {"algorithm": "mamlpp", "meta_batch": 8, "inner_lr": 0.1, "inner_steps": 5, "eval_inner_steps": 5,
               "algorithm_options": {"multi_step_iterations": 100, "first_order_iterations": 50}},
    "imaml": {"algorithm": "imaml", "inner_lr": 0.1, "inner_steps": 5, "eval_inner_steps": 5},
    # Reptile has no query set in its update, so it meta-trains on tasks with more shots than it is tested on
    # (Nichol et al. 2018 train their 1-shot models on 10-shot tasks); the extra images go to its inner
    # mini-batches. See TRAIN_SHOTS.
    "reptile": {"algorithm": "reptile", "inner_lr": 0.1, "inner_steps": 5, "eval_inner_steps": 10,
                "algorithm_options": {"inner_batch_size": 10}},
}
#: Shots per class of the meta-training tasks where a recipe trains on more than it is tested on. ``fit``
#: trains on tasks of the config's k_shot, so time_to_accuracy.py leaves these algorithms out.
TRAIN_SHOTS: dict[str, int] = {"reptile": 5}


def recipe_config(name: str, under: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """The :class:`~maml_func.config.TrainConfig` of recipe ``name``.

    ``under``: a script's settings that the recipe's own win over (a smaller
    network for a smoke run, a meta-batch where the recipe sets none);
    ``overrides``: settings that win over the recipe (the time budget, the data).
    """
    if name not in RECIPES:
        raise ValueError(f"harness.recipe_config: no recipe {name!r}; choose from {sorted(RECIPES)}")
    return make_config(**{**RECIPE_BASE, **(under or {}), "algorithm": name, **RECIPES[name], **overrides})


def recipe_names(names: str, allowed: list[str], script: str) -> list[str]:
    """``--algorithms`` (comma-separated) as a list, each one of ``allowed``; a clear exit otherwise."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in allowed]
    if unknown or not wanted:
        elsewhere = [n for n in unknown if n in TRAIN_SHOTS]
        why = (f" ({', '.join(elsewhere)}: trained on more shots than tested on, which fit does not do; "
               "algorithms_omniglot.py runs it)" if elsewhere else "")
        raise SystemExit(f"{script}: --algorithms {unknown or names!r}: choose from {allowed}{why}")
    return wanted
