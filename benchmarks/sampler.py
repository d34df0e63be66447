"""How long EpisodeSampler.sample takes: median wall time of one meta-batch over many repeats.

Prints its setup first, then the median and the 10th/90th percentiles. The
images are random uint8 of Omniglot's shape by default (1100 meta-training
characters, 20 drawings, 1x28x28; the time does not depend on pixel values);
``--omniglot ROOT`` samples the real MAML train split instead (decoded or
cached in ROOT, from ``--source``).

Usage:
    python benchmarks/sampler.py                       # 5-way 1-shot 15-query, 32 tasks, CPU
    python benchmarks/sampler.py --rotations --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from maml_func.data import ImageClasses, load_dataset
from maml_func.tasks import EpisodeSampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=32, help="tasks per meta-batch (T)")
    parser.add_argument("--n-way", type=int, default=5)
    parser.add_argument("--k-shot", type=int, default=1)
    parser.add_argument("--n-query", type=int, default=15)
    parser.add_argument("--rotations", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--classes", type=int, default=1100, help="classes of the random data set")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--omniglot", metavar="ROOT", help="use the real Omniglot MAML train split cached in ROOT")
    parser.add_argument("--source", help="offline Omniglot folder (with --omniglot)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.omniglot:
        classes = load_dataset("omniglot", root=args.omniglot, source=args.source, image_size=args.image_size)["train"]
    else:
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (args.classes, 20, 1, args.image_size, args.image_size), dtype=torch.uint8,
                               generator=generator)
        classes = ImageClasses(images, torch.full((args.classes,), 20), [f"c{i}" for i in range(args.classes)])
    sampler = EpisodeSampler(classes.to(device), args.n_way, args.k_shot, args.n_query, rotations=args.rotations)
    generator = torch.Generator(device=device).manual_seed(0)

    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(f"{sampler}")
    print(f"sample({args.tasks}): repeats {args.repeats}, warmup {args.warmup}")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        sampler.sample(args.tasks, generator)
    sync()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        sampler.sample(args.tasks, generator)
        sync()
        times.append(time.perf_counter() - start)
    deciles = statistics.quantiles(times, n=10)
    images = args.tasks * args.n_way * (args.k_shot + args.n_query)
    median = statistics.median(times)
    print(f"median {median * 1e3:.3f} ms  (p10 {deciles[0] * 1e3:.3f}, p90 {deciles[-1] * 1e3:.3f}); "
          f"{images} images per batch, {images / median / 1e6:.2f} M images/s")


if __name__ == "__main__":
    main()
