"""Every algorithm of the MAML family on Omniglot 5-way 1-shot, for the same wall time each.

For each algorithm (``--algorithms maml,anil`` for a subset): build a Conv4 from
the same seed, meta-train it with Adam for ``--minutes`` of wall time on tasks
from the MAML split's meta-training characters (rotations by multiples of 90°),
then evaluate it on ``--test-tasks`` meta-test tasks (600: the standard
protocol, mean ± 1.96·std/√n, :func:`maml_func.evaluate.evaluate`). Prints its
configuration first, a progress line every ``--log-seconds``, and a table at the
end. Chance is 20%.

Each algorithm runs with its recipe of ``harness.RECIPES``, the table
``time_to_accuracy.py`` reads too (each paper's Omniglot setting where one
exists; MAML: inner SGD 0.4, 1 step in training, 3 at test; MAML++: 5 steps
with LSLR rates from 0.1, its schedules shortened to the budget), built as
``fit`` builds it (:func:`maml_func.runs.build_algorithm` of the recipe's
config); a learned step size (Meta-SGD, LSLR) is evaluated at its trained step
count. Reptile meta-trains on tasks with more shots than it is tested on
(``harness.TRAIN_SHOTS``: Nichol et al. 2018 train their 1-shot models on
10-shot tasks; Reptile has no query set in its update, so the extra images go
to its inner mini-batches). Unlike ``time_to_accuracy.py`` (``fit``, with
validation curves), this script trains with a plain loop written here, so it
can run Reptile's recipe.

A fixed wall time is not a fixed amount of learning: a second-order 5-step
algorithm does fewer iterations than first-order MAML in the same minutes; the
table reports the iterations each one did.

Usage:
    python benchmarks/algorithms_omniglot.py --quick                 # smoke run, seconds per algorithm
    python benchmarks/algorithms_omniglot.py                         # 3 minutes per algorithm
    python benchmarks/algorithms_omniglot.py --algorithms maml,reptile --minutes 10 --device cuda
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import harness
import torch

from maml_func.data import load_dataset
from maml_func.runs import build_algorithm
from maml_func.tasks import EpisodeSampler


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", default=",".join(harness.RECIPES), help="comma-separated names (default: all)")
    parser.add_argument("--minutes", type=float, default=3.0, help="meta-training wall time per algorithm")
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 s of training, 20 test tasks")
    parser.add_argument("--root", default=str(harness.REPO / "runs" / "data" / "omniglot"),
                        help="where the decoded Omniglot cache goes")
    parser.add_argument("--source", default=harness.shared_omniglot(),
                        help="offline folder with images_background.zip and images_evaluation.zip")
    parser.add_argument("--n-way", type=int, default=5)
    parser.add_argument("--k-shot", type=int, default=1)
    parser.add_argument("--n-query", type=int, default=5, help="query images per class, training and test")
    # 8, not the paper's 32: on 2 CPU cores, 1 minute of MAML gave 79% with 8 tasks
    # per step (311 steps) against 66% with 32 (56 steps).
    parser.add_argument("--meta-batch", type=int, default=8,
                        help="tasks per meta-iteration where the recipe sets none (default 8; MAML++'s recipe: 8)")
    parser.add_argument("--meta-lr", type=float, default=1e-3, help="Adam learning rate (outer loop)")
    parser.add_argument("--hidden", type=int, default=64, help="Conv4 filters")
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--chunk-size", type=lambda t: t if t == "auto" else None if t == "none" else int(t),
                        default="auto", help="tasks per vmap chunk, none or auto (default: auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--log-seconds", type=float, default=30.0, help="progress line interval")
    args = parser.parse_args()
    args.algorithms = harness.recipe_names(args.algorithms, list(harness.RECIPES), "algorithms_omniglot.py")
    if args.quick:
        args.minutes, args.test_tasks, args.log_seconds = 5 / 60, 20, 5.0
    return args


def _run(name: str, args: argparse.Namespace, data: dict[str, Any], device: torch.device) -> dict[str, Any]:
    config = harness.recipe_config(name, under={"meta_batch": args.meta_batch}, n_way=args.n_way,
                                   k_shot=args.k_shot, n_query=args.n_query, meta_lr=args.meta_lr,
                                   hidden=args.hidden, image_size=28, seed=args.seed, device=str(device))
    train_shots = harness.TRAIN_SHOTS.get(name, config.k_shot)
    train = EpisodeSampler(data["train"], config.n_way, train_shots, config.n_query, rotations=True)
    test = EpisodeSampler(data["test"], config.n_way, config.k_shot, config.n_query, rotations=True)
    torch.manual_seed(args.seed)  # the same initial Conv4 for every algorithm
    model, algo = build_algorithm(config, in_channels=1)
    model.to(device)
    meta = algo.init()
    optimizer = torch.optim.Adam(algo.parameters(meta), lr=config.meta_lr)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    print(f"\n== {name} ({type(algo).__name__}): {harness.RECIPES[name] or 'the preset'}")
    print(f"   train tasks {config.n_way}-way {train_shots}-shot {config.n_query}-query, meta-batch "
          f"{config.meta_batch}, test steps {config.eval_inner_steps}")

    budget, iteration, start = args.minutes * 60, 0, time.perf_counter()
    last_log = start
    while time.perf_counter() - start < budget:
        batch = train.sample(config.meta_batch, generator)
        loss, metrics = harness.meta_loss(algo, meta, batch, iteration, chunk_size=args.chunk_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        iteration += 1
        now = time.perf_counter()
        if now - last_log >= args.log_seconds:
            last_log = now
            print(f"   {now - start:6.0f}s  iteration {iteration:5d}  meta-loss {loss.item():.4f}  "
                  f"query acc after adaptation {metrics['accuracy'].mean().item():.3f}", flush=True)
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    result = harness.evaluate(algo, meta, test, chunk_size=args.chunk_size, num_tasks=args.test_tasks,
                              steps=config.eval_inner_steps, seed=args.seed + 1)
    print(f"   {iteration} iterations in {train_s:.0f}s; test: {result.summary()} "
          f"(evaluated in {time.perf_counter() - start:.0f}s)", flush=True)
    return {"name": name, "iterations": iteration, "seconds": train_s, "steps": config.eval_inner_steps,
            "pre": result.accuracy[0], "acc": result.accuracy[-1], "ci": result.ci95[-1]}


def main() -> None:
    args = _parse()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    for key, value in vars(args).items():
        print(f"  {key}: {value}")

    data = load_dataset("omniglot", root=args.root, source=args.source, image_size=28, split="maml", seed=args.seed)
    data = {k: v.to(device) for k, v in data.items()}
    print(f"Omniglot (MAML split): {', '.join(f'{k} {len(v)} characters' for k, v in data.items())}")

    rows = [_run(name, args, data, device) for name in args.algorithms]

    print(f"\nOmniglot {args.n_way}-way {args.k_shot}-shot, {args.minutes * 60:.0f} s of meta-training each, "
          f"{args.test_tasks} test tasks (mean ± 95% CI); chance {100 / args.n_way:.0f}%")
    print("| algorithm | iterations | test steps | before adaptation | after adaptation |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['name']} | {r['iterations']} | {r['steps']} | {100 * r['pre']:.1f}% | "
              f"{100 * r['acc']:.1f} ± {100 * r['ci']:.1f}% |")


if __name__ == "__main__":
    main()
