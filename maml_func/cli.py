"""The ``maml-func`` command line: ``train``, ``eval``, ``download``, ``demo``.

A thin layer: the flags (:mod:`maml_func.parser`) become a
:class:`~maml_func.config.TrainConfig` (defaults < ``--preset`` < ``--config
FILE`` < flags) and the work is done by :func:`maml_func.train.fit`,
:func:`maml_func.runs.evaluate_run` and :func:`maml_func.data.download_dataset`.

Exit status: 0 done; 1 the run failed (non-finite loss, out of memory, no
network, a full disk: the message says what is kept); 2 bad flags, config or
paths, a run directory in use, or data that cannot be downloaded (one line on
stderr, nothing written); 128 + signal number after SIGINT/SIGTERM (130 for
Ctrl-C), with a checkpoint to resume from.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from maml_func import system, train
from maml_func.algorithms import MAML
from maml_func.atomic import WriteError, removed_on_failure
from maml_func.callbacks import Callback
from maml_func.checkpoint import Checkpoint
from maml_func.components import check_buildable
from maml_func.config import TrainConfig, make_config
from maml_func.data import SOURCE_FILES, download_dataset
from maml_func.distributed import DistributedError, init_distributed, shutdown_distributed
from maml_func.loop import MetaStepFailed, RunWriteError, TrainingInterrupted
from maml_func.models import MLP
from maml_func.parser import EXIT_USAGE, build_parser, overrides, subparsers
from maml_func.rundir import check_run_directory
from maml_func.runs import evaluate_run
from maml_func.sinusoid import sample_sinusoid_tasks
from maml_func.step import MetaStepOutOfMemory, NonFiniteLossError
from maml_func.tensorboard import TensorBoard

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 128 + 2


def _fail(prog: str, message: str, status: int = EXIT_USAGE) -> int:
    one_line = " ".join(message.split())  # the promise is one line, whatever a library's error text holds
    print(f"{prog}: error: {one_line}", file=sys.stderr)
    return status


def _default_run_dir(config: TrainConfig) -> str:
    name = f"{config.dataset_name}-{config.n_way}w{config.k_shot}s-{config.algorithm}-seed{config.seed}"
    return str(Path("runs") / name)


def _offline_hint(dataset: str) -> str:
    """What to do without internet, naming the files of ``dataset`` (a named data set, else Omniglot's)."""
    name = dataset if dataset in SOURCE_FILES else "omniglot"
    return (f"Offline? Pass --source DIR (a folder holding {SOURCE_FILES[name]}), or copy them once with: maml-func "
            f"download{'' if name == 'omniglot' else ' --dataset ' + name} --root DATA_ROOT --source DIR")


def _config(args: argparse.Namespace, base: dict[str, Any] | None, flags: dict[str, Any]) -> TrainConfig:
    """The command's config: ``base`` (a checkpoint's), then ``--preset``, ``--config`` and the flags over it."""
    return make_config(preset=getattr(args, "preset", None), file=getattr(args, "config", None), base=base, **flags)


def _train_command(args: argparse.Namespace) -> int:
    prog = "maml-func train"
    flags = overrides(args)
    resume = None
    try:
        if getattr(args, "resume", None) is not None:
            resume = Checkpoint.read(args.resume, origin="fit")  # read once: the config here, the state in fit
            flags.setdefault("save_to", str(resume.path.parent))
        config = _config(args, resume.config if resume is not None else None, flags)
        if config.save_to is None:
            config = config.replace(save_to=_default_run_dir(config))
        config.check_paths()
        check_buildable(config, None, "fit")
        check_run_directory(config.save_to, resume, "fit")
        board = [TensorBoard(args.tensorboard)] if getattr(args, "tensorboard", None) is not None else []
    except (ValueError, FileNotFoundError, TypeError, ImportError) as err:
        return _fail(prog, str(err))

    main = True
    if config.distributed:
        timeout = args.dist_timeout
        if not timeout > 0:
            return _fail(prog, f"--dist-timeout must be > 0 seconds, got {timeout}")
        try:
            main = init_distributed(timeout=timeout).is_main
        except DistributedError as err:
            return _fail(prog, str(err))
    if args.tune_malloc:
        system.tune_malloc()
    else:  # also for the library's own automatic tuning, here and in any process this one starts
        os.environ[system.ENV] = "0"
    if not config.distributed:
        return _fit_and_report(prog, config, resume, getattr(args, "progress", True), main, board)
    try:
        code = _fit_and_report(prog, config, resume, getattr(args, "progress", True), main, board)
    except BaseException:
        shutdown_distributed(synchronize=False)
        raise
    _exit_rank(prog, code)


def _exit_rank(prog: str, code: int) -> NoReturn:
    """End a distributed rank: leave the process group in step with the others, then exit at once.

    Everything is written and closed by now. ``os._exit`` skips the
    interpreter's teardown, where torch's C++ communication threads can abort
    a finished process ("terminate called without an active exception"),
    which ``torchrun`` would report as a failed run.
    """
    try:
        shutdown_distributed(synchronize=code == 0)
    except DistributedError as err:
        code = _fail(prog, str(err), EXIT_FAILED)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _fit_and_report(prog: str, config: TrainConfig, resume: Checkpoint | None, progress: bool, main: bool,
                    board: list[TensorBoard]) -> int:
    class Summary(Callback):  # once everything that can be checked is: a refused run prints its error only
        def on_start(self, started: TrainConfig) -> None:
            print(f"{prog}: {_describe(started)}", file=sys.stderr)

    try:
        result = train.fit(config, callbacks=[Summary(), *board], resume=resume, progress=progress)
    except TrainingInterrupted as stop:
        where = stop.checkpoint.parent if stop.checkpoint is not None else config.save_to
        print(f"{prog}: interrupted after iteration {stop.iteration}; checkpoint saved to {stop.checkpoint}. "
              f"Resume with: maml-func train --resume {shlex.quote(str(where))}", file=sys.stderr)
        return 128 + stop.signal
    except (NonFiniteLossError, MetaStepOutOfMemory, MetaStepFailed, RunWriteError, DistributedError) as err:
        return _fail(prog, str(err), EXIT_FAILED)
    except ConnectionError as err:
        return _fail(prog, f"{err}. {_offline_hint(config.dataset)}", EXIT_FAILED)
    except WriteError as err:  # while downloading the data: nothing of the run was written yet
        return _fail(prog, f"{err}; nothing of this run was left: free some space there and run it again",
                     EXIT_FAILED)
    except (ValueError, FileNotFoundError) as err:
        return _fail(prog, str(err))
    finally:
        for callback in board:
            callback.close()

    best = (f"best validation accuracy {100 * result.best_val_accuracy:.1f}% at iteration {result.best_iteration}"
            if result.best_val_accuracy is not None else "no validation")
    stopped = " (time limit reached; --resume to continue)" if result.stopped == "time_limit" else ""
    if main:
        print(f"{prog}: {result.iteration} iterations{stopped}, {best}; run directory {result.run_dir}. "
              f"Evaluate with: maml-func eval --checkpoint {shlex.quote(str(result.run_dir))}", file=sys.stderr)
    return EXIT_OK


def _describe(config: TrainConfig) -> str:
    return (f"{config.algorithm} on {config.dataset}, {config.n_way}-way {config.k_shot}-shot ({config.n_query} "
            f"query), meta-batch {config.meta_batch}, inner {config.inner_steps}x{config.inner_lr} "
            f"(eval {config.eval_inner_steps}), Adam {config.meta_lr}, {config.iterations} iterations, "
            f"seed {config.seed}, model {config.model}, run directory {config.save_to}")


def _eval_command(args: argparse.Namespace) -> int:
    prog = "maml-func eval"
    flags = overrides(args)
    checkpoint = None
    try:
        base: dict[str, Any] = {}
        if getattr(args, "checkpoint", None) is not None:
            checkpoint = Checkpoint.read(args.checkpoint, prefer_best=True, origin="evaluate_run")
            base = checkpoint.config
            base.pop("save_to", None)
        config = _config(args, base, flags)
        config.check_paths()
        result = evaluate_run(checkpoint, config=config, classes=args.classes, num_tasks=args.tasks,
                              steps=getattr(args, "steps", None), batch_size=args.batch_size, seed=args.eval_seed,
                              progress=args.progress)
    except ConnectionError as err:
        return _fail(prog, f"{err}. {_offline_hint(config.dataset)}", EXIT_FAILED)
    except (ValueError, FileNotFoundError, TypeError) as err:
        return _fail(prog, str(err))
    if args.json:
        print(json.dumps({**result.to_dict(), "checkpoint": str(checkpoint.path) if checkpoint else None,
                          "classes": args.classes}, indent=2))
    else:
        per_step = "  ".join(f"{s}:{100 * a:.1f}%" for s, a in enumerate(result.accuracy))
        print(result.summary())
        print(f"accuracy after each inner step  {per_step}")
    return EXIT_OK


def _download_command(args: argparse.Namespace) -> int:
    prog = "maml-func download"
    if args.source is not None and not Path(args.source).expanduser().exists():
        return _fail(prog, f"--source {args.source!r} does not exist; pass the folder holding "
                           f"{SOURCE_FILES[args.dataset]}")
    try:
        with removed_on_failure(args.root):  # a failed download or copy leaves no empty or partial root
            path = download_dataset(args.dataset, args.root, source=args.source)
    except ConnectionError as err:
        return _fail(prog, f"{err}. {_offline_hint(args.dataset)}", EXIT_FAILED)
    except WriteError as err:
        return _fail(prog, f"{err}; nothing new was left in {args.root}: free some space there and run it again",
                     EXIT_FAILED)
    except (ValueError, FileNotFoundError) as err:
        return _fail(prog, str(err))
    then = "" if args.dataset == "omniglot" else (f"; train with: maml-func train --dataset {args.dataset} "
                                                  f"--data-root {shlex.quote(str(path))}")
    print(f"{'Omniglot' if args.dataset == 'omniglot' else args.dataset} is ready at {path}{then}")
    return EXIT_OK


def _demo_command(args: argparse.Namespace) -> int:
    if args.iterations < 1:
        return _fail("maml-func demo", f"--iterations must be >= 1, got {args.iterations}")
    threads = torch.get_num_threads()
    # A tiny MLP: extra threads only add overhead (restored after, for callers of main() in-process).
    torch.set_num_threads(1)
    try:
        before, after = _sinusoid_demo(args.iterations, args.seed)
    finally:
        torch.set_num_threads(threads)
    print(f"sinusoid regression, 10-shot, 100 held-out tasks; query MSE after 0 / 1 / 10 inner steps:\n"
          f"  untrained:  {before[0]:.3f} / {before[1]:.3f} / {before[10]:.3f}\n"
          f"  after {args.iterations} meta-updates:  {after[0]:.3f} / {after[1]:.3f} / {after[10]:.3f}")
    return EXIT_OK


def _sinusoid_demo(iterations: int, seed: int) -> tuple[list[float], list[float]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        maml = MAML(MLP(), inner_lr=0.01, inner_steps=1, loss="mse")  # the paper's sinusoid setting
    meta = maml.init()
    # Adam at 1e-2 rather than the paper's 1e-3 (70 000 iterations): a demo has seconds, not hours.
    opt = torch.optim.Adam(maml.parameters(meta), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    test = sample_sinusoid_tasks(100, k_shot=10, n_query=10, generator=torch.Generator().manual_seed(10**6))

    def query_mse() -> list[float]:
        with torch.no_grad():
            return maml.scores(meta, test, steps=10)["loss"].mean(0).tolist()

    before = query_mse()
    for _ in range(iterations):
        loss, _ = maml.meta_loss(meta, sample_sinusoid_tasks(25, k_shot=10, n_query=10, generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, query_mse()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``maml-func`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    ``train --distributed`` is the exception: once the process group is
    joined, the rank leaves it and exits the process with the status itself.

    Example:
        >>> main(["--version"])  # doctest: +SKIP
        maml-func 0.1.0
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Reported by the subcommand's parser, so that the message names it and its --help.
        (subparsers(parser).get(args.command) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    command = {"train": _train_command, "eval": _eval_command, "download": _download_command,
               "demo": _demo_command}[args.command]
    prog = f"maml-func {args.command}"

    def one_line(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        print(f"{prog}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    try:
        with warnings.catch_warnings():  # a warning is one line too, without Python's source-line echo
            warnings.showwarning = one_line
            return command(args)
    except KeyboardInterrupt:  # a second Ctrl-C (the first one stops training after its iteration), or one before
        return _fail(prog, "interrupted; stopped at once (checkpoints are written atomically, "
                     "so the last one saved stays valid)", EXIT_INTERRUPTED)
