"""A user's model against the library's own, same run: what "any nn.Module" costs.

Two questions, each timed round-robin (one meta-gradient of every method per
round, the median over rounds, so drifts of a shared machine hit all alike):

1. A user's Conv4 written with ``nn.BatchNorm2d`` (which every algorithm turns
   into ``TaskBatchNorm`` with :func:`maml_func.exact_model`) against the
   built-in :class:`maml_func.Conv4`: Omniglot 5-way 1-shot, 15 queries, T = 32,
   second order, one inner step. Target: at most 1.1x.
2. torchvision ``resnet18`` at 84x84 RGB, 5-way 1-shot, 5 queries, T = 4,
   second order: one ``vmap`` against the per-task loop (``vectorize=False``).

Random images of the right shapes (speed does not depend on their values).

    python benchmarks/user_models.py            # both, 5 rounds
    python benchmarks/user_models.py --quick    # 2 rounds, T = 8 for the first
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import harness
import torch
import torchvision
from torch import nn

from maml_func import MAML, Conv4, TaskBatch


def users_conv4(n_way: int = 5, hidden: int = 64) -> nn.Module:
    """MAML's Conv4 as a user writes it: stride-2 convolutions, ``nn.BatchNorm2d``, ReLU, a linear head."""
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, hidden, 3, stride=2, padding=1), nn.BatchNorm2d(hidden), nn.ReLU()]
        channels = hidden
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden * 2 * 2, n_way))


def meta_gradient_step(algorithm: MAML, batch: TaskBatch, **way: Any) -> Callable[[], None]:
    """One meta-gradient of ``batch``; ``way``: how the tasks run (``chunk_size``, ``vectorize``; default "auto")."""
    meta = algorithm.init()
    params = algorithm.parameters(meta)

    def step() -> None:
        loss, _ = harness.meta_loss(algorithm, meta, batch, **way)
        torch.autograd.grad(loss, params)

    return step


def race(methods: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds of each method over ``rounds`` round-robin rounds (after one warm-up call each)."""
    for step in methods.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, step in methods.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, T = 8 for the Conv4 pair")
    parser.add_argument("--skip-resnet18", action="store_true", help="only the Conv4 pair")
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}; "
          f"median of {rounds} rounds, seconds per meta-gradient")
    torch.manual_seed(0)
    omniglot = harness.random_tasks(8 if args.quick else 32, 5, 1, 15, (1, 28, 28))
    conv = race({"built-in Conv4 (TaskBatchNorm)": meta_gradient_step(MAML(Conv4(), inner_lr=0.4), omniglot),
                 "user's Conv4 (nn.BatchNorm2d)": meta_gradient_step(MAML(users_conv4(), inner_lr=0.4), omniglot)},
                rounds)
    figures = dict(conv)
    figures["user / built-in"] = conv["user's Conv4 (nn.BatchNorm2d)"] / conv["built-in Conv4 (TaskBatchNorm)"]
    if not args.skip_resnet18:
        mini = harness.random_tasks(4, 5, 1, 5, (3, 84, 84))
        resnet18 = MAML(torchvision.models.resnet18(num_classes=5), inner_lr=0.01)
        r18 = race({"resnet18 84x84 vmap": meta_gradient_step(resnet18, mini, chunk_size=None),
                    "resnet18 84x84 loop": meta_gradient_step(resnet18, mini, vectorize=False)}, rounds)
        figures.update(r18)
        figures["resnet18 loop / vmap"] = r18["resnet18 84x84 loop"] / r18["resnet18 84x84 vmap"]
    for name, value in figures.items():
        print(f"{name:34s} {value:8.3f}{'x' if '/' in name else ' s'}")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
