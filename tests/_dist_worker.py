"""One rank of a gloo process group, started by tests/test_distributed.py (2 processes on loopback).

Usage: python tests/_dist_worker.py MODE OUT_DIR [CONFIG_JSON [RESUME]]; the environment
carries RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and WORKER_TIMEOUT (seconds).

Modes:
    equivalence  a few float64 SGD meta-steps on fixed tasks, this rank's
                 share of each meta-batch; writes OUT_DIR/rank<r>.pt
    fit          maml_func.fit of CONFIG_JSON; writes OUT_DIR/rank<r>.pt
    crash        like fit, but rank 1 raises in its third meta-gradient
    hang         like fit, but rank 1 stops answering in its third meta-gradient
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from maml_func import MAML, Conv4, TaskBatch
from maml_func.step import meta_gradient

TASKS, STEPS = 8, 3


def fixed_batch(step: int) -> TaskBatch:
    """The meta-batch of ``step``: 8 random 3-way 1-shot tasks (2 queries per class), float64, same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    y_s = torch.arange(3).repeat(TASKS, 1)
    y_q = torch.arange(3).repeat_interleave(2).repeat(TASKS, 1)
    return TaskBatch(torch.randn(TASKS, 3, 1, 16, 16, generator=g, dtype=torch.float64), y_s,
                     torch.randn(TASKS, 6, 1, 16, 16, generator=g, dtype=torch.float64), y_q)


def equivalence_run(rank: int, size: int) -> dict[str, torch.Tensor]:
    """STEPS SGD meta-steps; each of ``size`` ranks takes its share of every meta-batch (size=1: all of it)."""
    from maml_func.distributed import average_gradients

    torch.manual_seed(0)
    maml = MAML(Conv4(n_way=3, hidden=8, image_size=16).double(), inner_lr=0.4, inner_steps=2)
    meta = maml.init()
    params = maml.parameters(meta)
    # Plain SGD: Adam divides by sqrt(v), which blows the rounding noise of a gradient that is zero in exact
    # arithmetic (a conv bias before batch norm) up to full-size steps and would hide or fake differences.
    optimizer = torch.optim.SGD(params, lr=0.1)
    share = TASKS // size
    for step in range(STEPS):
        batch = TaskBatch(*(t[rank * share:(rank + 1) * share] for t in fixed_batch(step)))
        meta_gradient(maml, meta, batch, step)
        average_gradients(params)
        optimizer.step()
    return {name: t.detach().clone() for name, t in meta["model"].items()}


def main() -> None:
    from maml_func.config import TrainConfig
    from maml_func.distributed import init_distributed
    from maml_func.train import fit

    mode, out = sys.argv[1], Path(sys.argv[2])
    me = init_distributed("gloo", timeout=float(os.environ["WORKER_TIMEOUT"]))
    if mode == "equivalence":
        torch.save(equivalence_run(me.rank, me.size), out / f"rank{me.rank}.pt")
        return
    config = TrainConfig.from_dict(json.loads(sys.argv[3]))

    from maml_func.step import train_step

    def failing(state, batch, algorithm, **kwargs):
        if me.rank == 1 and state.iteration == 2:
            if mode == "crash":
                raise RuntimeError("rank 1 fails on purpose")
            time.sleep(600)  # alive but silent: only the process group's timeout can end the wait
        return train_step(state, batch, algorithm, **kwargs)

    resume = sys.argv[4] if len(sys.argv) > 4 else None
    result = fit(config, resume=resume, progress=False, step=failing if mode in ("crash", "hang") else train_step)
    torch.save({"meta": result.meta["model"], "best": result.best_val_accuracy, "iteration": result.iteration,
                "history": [r for r in result.history]}, out / f"rank{me.rank}.pt")


if __name__ == "__main__":
    from maml_func.distributed import shutdown_distributed

    main()
    # As `maml-func train --distributed` ends a rank: leave the group in step, then skip the interpreter's
    # teardown, where gloo's threads can abort a finished process.
    shutdown_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
