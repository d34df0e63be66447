"""The ``maml-func`` command line: ``train``, ``eval``, ``download``, ``demo``.

A thin layer: flags become a :class:`~maml_func.config.TrainConfig` (defaults <
``--preset`` < ``--config FILE`` < flags) and the work is done by
:func:`maml_func.train.fit`, :func:`maml_func.train.evaluate_run` and
:func:`maml_func.data.download_dataset`.

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

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 128 + 2


def _version() -> str:
    from maml_func import __version__

    return f"maml-func {__version__}"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _key_value(text: str) -> tuple[str, str]:
    """A ``--model-option`` / ``--algorithm-option`` pair; the config reads the value as its parameter's type."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.replace("-", "_"), value


def _or_none(parse: Any) -> Any:
    """A flag value parser that also takes ``none`` (or an empty string) for ``None``."""
    def parse_or_none(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null", "") else parse(text)
    parse_or_none.__name__ = f"{parse.__name__}_or_none"  # argparse names it in "invalid ... value"
    return parse_or_none


def _chunk_size(text: str) -> int | str | None:
    return "auto" if text.lower() == "auto" else _or_none(int)(text)


# How a field's annotation is read from the command line (bools are --flag/--no-flag, dicts KEY=VALUE pairs).
_PARSERS: dict[str, Any] = {"str": str, "int": int, "float": float, "int | None": _or_none(int),
                            "float | None": _or_none(float), "int | str | None": _chunk_size}


def _path_or_none(text: str) -> str | None:
    return text or None


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`~maml_func.config.TrainConfig` field, its help and default from the field itself."""
    import dataclasses

    from maml_func.config import PRESETS, TrainConfig, describe_default

    group = parser.add_argument_group("run configuration (flags override --config, which overrides --preset)")
    group.add_argument("--preset", choices=list(PRESETS), metavar="NAME",
                       help=f"start from a named setting: {', '.join(PRESETS)}")
    group.add_argument("--config", metavar="FILE", help="a TOML or JSON file of config keys (e.g. n_way = 5)")
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        text = f"{f.metadata['help']} (default: {describe_default(default)})".replace("%", "%%")
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        if f.type == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=text)
        elif f.type.startswith("dict"):
            group.add_argument(flag, dest=f.name, type=_key_value, action="append",
                               metavar=f.metadata["metavar"], help=text)
        else:
            parse = _path_or_none if f.type == "str | None" else _PARSERS[f.type]
            group.add_argument(flag, dest=f.name, type=parse, metavar=f.metadata["metavar"], help=text)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from maml_func.config import TrainConfig

    fields = TrainConfig.__dataclass_fields__
    # KEY=VALUE flags (--algorithm-option, --model-option) arrive as lists of pairs.
    return {k: dict(v) if fields[k].type.startswith("dict") else v for k, v in vars(args).items() if k in fields}


def _command(commands: Any, name: str, summary: str, description: str, examples: Sequence[str] = (),
             **options: Any) -> argparse.ArgumentParser:
    """A subcommand with its one-line ``summary``, ``--help`` text, examples and ``--version``."""
    epilog = "examples:\n" + "".join(f"  {e}\n" for e in examples) if examples else None
    command = commands.add_parser(name, help=summary, description=description, epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter, **options)
    command.add_argument("--version", action="version", version=_version())
    return command


def _build_parser() -> _Parser:
    parser = _Parser(prog="maml-func", description="Model-Agnostic Meta-Learning with torch.func: meta-train, "
                     "evaluate, fetch the data sets.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    train = _command(
        commands, "train", "meta-train on Omniglot or an ImageFolder tree",
        "Meta-train a Conv4 (or ResNet-12, or your own network named by import path) with MAML (or another "
        "algorithm) and write last.pt, best.pt, metrics.jsonl and learning_curve.png to the run directory. "
        "--model-option and --algorithm-option values are read as the type of the parameter they set (pool=false "
        "is False).",
        ["maml-func train --preset omniglot-5w1s --iterations 3000 --save-to runs/5w1s",
         "maml-func train --dataset path/to/folders --n-way 5 --k-shot 1 --image-size 32",
         "maml-func train --dataset path/to/folders --channels 3 --model torchvision.models:resnet18 "
         "--model-option num_classes=5",
         "maml-func train --resume runs/5w1s --iterations 6000"], argument_default=argparse.SUPPRESS)
    _add_config_flags(train)
    train.add_argument("--resume", metavar="RUN_OR_CKPT",
                       help="continue a run exactly from its last.pt (a run directory or a checkpoint file)")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, help="show a progress bar (default: on)")
    train.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                       help="with --distributed: how long a rank waits for the others before failing (default: 300)")
    train.add_argument("--tune-malloc", action=argparse.BooleanOptionalAction, default=True,
                       help="make glibc keep freed memory: faster on the CPU, same maths (default: on; off is "
                            "the same as MAML_FUNC_TUNE_MALLOC=0)")
    train.add_argument("--tensorboard", metavar="DIR", help="also write the metrics.jsonl scalars as TensorBoard "
                       "events to DIR (needs: pip install maml-func[tensorboard])")

    ev = _command(
        commands, "eval", "evaluate a checkpoint (or an untrained model) on held-out classes",
        "The standard few-shot protocol: tasks from held-out classes (600 by default), mean query accuracy with a "
        "95% confidence interval after each inner step. Defaults to the checkpoint's config and its meta-test "
        "classes (a network named by import path is rebuilt from it; one given to fit(model=...) is evaluated from "
        "Python: evaluate_run(RUN, model=...)); without --checkpoint, evaluates a freshly initialized model (the "
        "baseline).",
        ["maml-func eval --checkpoint runs/5w1s",
         "maml-func eval --checkpoint runs/5w1s/best.pt --tasks 600 --steps 3 --json",
         "maml-func eval --preset omniglot-5w1s           # untrained baseline"], argument_default=argparse.SUPPRESS)
    ev.add_argument("--checkpoint", metavar="PATH", help="a checkpoint, or a run directory (its best.pt, else last.pt)")
    ev.add_argument("--classes", choices=("test", "val", "train"), default="test",
                    help="which classes to draw tasks from (default: test, the meta-test classes)")
    ev.add_argument("--tasks", type=int, default=600, metavar="N", help="tasks to average over (default: 600)")
    ev.add_argument("--steps", type=int, metavar="S", help="inner steps (default: the config's eval_inner_steps)")
    ev.add_argument("--batch-size", type=int, default=50, metavar="T", help="tasks evaluated together (default: 50)")
    ev.add_argument("--eval-seed", type=int, default=0, metavar="N", help="seed of the evaluation tasks (default: 0)")
    ev.add_argument("--json", action="store_true", default=False, help="print the result as JSON")
    ev.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="show a progress bar (default: on)")
    _add_config_flags(ev)

    from maml_func.data import DATASETS, DOWNLOADABLE

    dl = _command(commands, "download", "fetch and verify a data set's archives (or copy them from a folder)",
                  "Download the official archives of a named data set, check their md5 sums and put them under "
                  f"--root; with --source, copy them from a folder instead. Downloadable: {', '.join(DOWNLOADABLE)} "
                  "(miniimagenet and tieredimagenet have no stable public URL: the error names the files to fetch).",
                  ["maml-func download --root data", "maml-func download --dataset cifarfs --root data/cifar"])
    dl.add_argument("--dataset", choices=DATASETS, default="omniglot", metavar="NAME",
                    help=f"which data set: {', '.join(DATASETS)} (default: omniglot)")
    dl.add_argument("--root", required=True, metavar="DIR",
                    help="where to put the files (pass the same as --data-root)")
    dl.add_argument("--source", metavar="DIR", help="an offline copy: a folder holding the release files")

    demo = _command(commands, "demo", "meta-learn the sinusoid family of the MAML paper (seconds on a CPU)",
                    "Meta-train the MAML paper's sinusoid regression MLP and print the query error of held-out "
                    "tasks before and after adaptation.")
    demo.add_argument("--iterations", type=int, default=600, metavar="N", help="meta-updates (default: 600)")
    demo.add_argument("--seed", type=int, default=0, metavar="N", help="seed (default: 0)")
    return parser


def _fail(prog: str, message: str, status: int = EXIT_USAGE) -> int:
    one_line = " ".join(message.split())  # the promise is one line, whatever a library's error text holds
    print(f"{prog}: error: {one_line}", file=sys.stderr)
    return status


def _default_run_dir(config: Any) -> str:
    name = config.dataset if config.dataset == "omniglot" else Path(config.dataset).name or "dataset"
    return str(Path("runs") / f"{name}-{config.n_way}w{config.k_shot}s-{config.algorithm}-seed{config.seed}")


def _offline_hint(dataset: str) -> str:
    """What to do without internet, naming the files of ``dataset`` (a named data set, else Omniglot's)."""
    from maml_func.data import SOURCE_FILES

    name = dataset if dataset in SOURCE_FILES else "omniglot"
    return (f"Offline? Pass --source DIR (a folder holding {SOURCE_FILES[name]}), or copy them once with: maml-func "
            f"download{'' if name == 'omniglot' else ' --dataset ' + name} --root DATA_ROOT --source DIR")


def _train(args: argparse.Namespace) -> int:
    from maml_func.config import make_config
    from maml_func.runs import check_buildable
    from maml_func.state import Checkpoint
    from maml_func.tensorboard import TensorBoard
    from maml_func.train import check_run_directory

    prog = "maml-func train"
    overrides = _overrides(args)
    resume = None
    try:
        if getattr(args, "resume", None) is not None:
            resume = Checkpoint.read(args.resume, origin="fit")  # read once: the config here, the state in fit
            overrides.setdefault("save_to", str(resume.path.parent))
        config = make_config(preset=getattr(args, "preset", None), file=getattr(args, "config", None),
                             base=resume.config if resume is not None else None, **overrides)
        if config.save_to is None:
            config = config.replace(save_to=_default_run_dir(config))
        config.check_paths()
        check_buildable(config, None, "fit")
        check_run_directory(config, resume)
        board = [TensorBoard(args.tensorboard)] if getattr(args, "tensorboard", None) is not None else []
    except (ValueError, FileNotFoundError, TypeError, ImportError) as err:
        return _fail(prog, str(err))

    main = True
    if config.distributed:
        from maml_func.distributed import DistributedError, init_distributed

        timeout = getattr(args, "dist_timeout", 300.0)
        if not timeout > 0:
            return _fail(prog, f"--dist-timeout must be > 0 seconds, got {timeout}")
        try:
            main = init_distributed(timeout=timeout).is_main
        except DistributedError as err:
            return _fail(prog, str(err))
    from maml_func import system

    if getattr(args, "tune_malloc", True):
        system.tune_malloc()
    else:  # also for the library's own automatic tuning, here and in any process this one starts
        os.environ[system.ENV] = "0"
    if not config.distributed:
        return _fit_and_report(prog, config, resume, getattr(args, "progress", True), main, board)
    from maml_func.distributed import shutdown_distributed

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
    from maml_func.distributed import DistributedError, shutdown_distributed

    try:
        shutdown_distributed(synchronize=code == 0)
    except DistributedError as err:
        code = _fail(prog, str(err), EXIT_FAILED)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _fit_and_report(prog: str, config: Any, resume: Any, progress: bool, main: bool, board: list[Any]) -> int:
    from maml_func.atomic import WriteError
    from maml_func.callbacks import Callback
    from maml_func.distributed import DistributedError
    from maml_func.train import (MetaStepFailed, MetaStepOutOfMemory, NonFiniteLossError, RunWriteError,
                                 TrainingInterrupted, fit)

    class Summary(Callback):  # once everything that can be checked is: a refused run prints its error only
        def on_start(self, started: Any) -> None:
            print(f"{prog}: {_describe(started)}", file=sys.stderr)

    try:
        result = fit(config, callbacks=[Summary(), *board], resume=resume, progress=progress)
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


def _describe(config: Any) -> str:
    return (f"{config.algorithm} on {config.dataset}, {config.n_way}-way {config.k_shot}-shot ({config.n_query} "
            f"query), meta-batch {config.meta_batch}, inner {config.inner_steps}x{config.inner_lr} "
            f"(eval {config.eval_inner_steps}), Adam {config.meta_lr}, {config.iterations} iterations, "
            f"seed {config.seed}, model {config.model}, run directory {config.save_to}")


def _eval(args: argparse.Namespace) -> int:
    from maml_func.config import make_config
    from maml_func.state import Checkpoint
    from maml_func.train import evaluate_run

    prog = "maml-func eval"
    overrides = _overrides(args)
    checkpoint = None
    try:
        base: dict[str, Any] = {}
        if getattr(args, "checkpoint", None) is not None:
            checkpoint = Checkpoint.read(args.checkpoint, prefer_best=True, origin="evaluate_run")
            base = checkpoint.config
            base.pop("save_to", None)
        config = make_config(preset=getattr(args, "preset", None), file=getattr(args, "config", None), base=base,
                             **overrides)
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


def _download(args: argparse.Namespace) -> int:
    from maml_func.atomic import WriteError, removed_on_failure
    from maml_func.data import SOURCE_FILES, download_dataset

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


def _demo(args: argparse.Namespace) -> int:
    import torch

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
    import torch

    from maml_func import MAML, MLP, sample_sinusoid_tasks

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
            return maml.evaluate(meta, test, steps=10)["loss"].mean(0).tolist()

    before = query_mse()
    for _ in range(iterations):
        loss, _ = maml.meta_loss(meta, sample_sinusoid_tasks(25, k_shot=10, n_query=10, generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, query_mse()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``maml-func`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    ``train --distributed`` is the exception: once the process group is
    joined, the rank leaves it and exits the process with the status itself.

    Example:
        >>> main(["--version"])  # doctest: +SKIP
        maml-func 0.1.0
    """
    parser = _build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Reported by the subcommand's parser, so that the message names it and its --help.
        (_subparsers(parser).get(args.command) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    command = {"train": _train, "eval": _eval, "download": _download, "demo": _demo}[args.command]
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
