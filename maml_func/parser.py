"""The ``maml-func`` command line's parser: its sub-commands and their flags.

``train`` and ``eval`` take one flag per :class:`~maml_func.config.TrainConfig`
field, generated from the field's declaration (:func:`maml_func.fields.option`):
its flag, help, placeholder and default are the field's own, so the command
line cannot drift from the config. A flag's text is only parsed here (a
number, ``none``, ``KEY=VALUE``); whether the value is allowed is the config's
check, the same one a config file or Python meets. :func:`overrides` turns the
parsed flags into the overrides of :func:`~maml_func.config.make_config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Sequence
from typing import Any, NoReturn

from maml_func._version import __version__
from maml_func.components import SPLITS
from maml_func.config import TrainConfig
from maml_func.data import DATASETS, DOWNLOADABLE
from maml_func.evaluate import BATCH_SIZE, NUM_TASKS
from maml_func.fields import default, describe_default, flag_of
from maml_func.presets import PRESETS

__all__ = ["EXIT_USAGE", "build_parser", "overrides", "subparsers"]

#: The exit status of a usage error (argparse's own).
EXIT_USAGE = 2
_VERSION = f"maml-func {__version__}"


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


def _int_or_text(text: str) -> int | str:
    """An integer, else the text itself (``auto``): the field's check says which texts it takes."""
    return int(text) if re.fullmatch(r"\s*[+-]?\d+\s*", text) else text


# How a field's annotation is read from the command line (bools are --flag/--no-flag, dicts KEY=VALUE pairs).
_PARSERS: dict[str, Any] = {"str": str, "int": int, "float": float, "int | None": _or_none(int),
                            "float | None": _or_none(float), "int | str | None": _or_none(_int_or_text)}


def _path_or_none(text: str) -> str | None:
    return text or None


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`~maml_func.config.TrainConfig` field, its help and default from the field itself."""
    group = parser.add_argument_group("run configuration (flags override --config, which overrides --preset)")
    group.add_argument("--preset", choices=list(PRESETS), metavar="NAME",
                       help=f"start from a named setting: {', '.join(PRESETS)}")
    group.add_argument("--config", metavar="FILE", help="a TOML or JSON file of config keys (e.g. n_way = 5)")
    for f in dataclasses.fields(TrainConfig):
        text = f"{f.metadata['help']} (default: {describe_default(default(f))})".replace("%", "%%")
        flag = flag_of(f)
        if f.type == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=text)
        elif f.type.startswith("dict"):
            group.add_argument(flag, dest=f.name, type=_key_value, action="append",
                               metavar=f.metadata["metavar"], help=text)
        else:
            parse = _path_or_none if f.type == "str | None" else _PARSERS[f.type]
            group.add_argument(flag, dest=f.name, type=parse, metavar=f.metadata["metavar"], help=text)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields that ``args`` sets, for :func:`~maml_func.config.make_config`."""
    fields = TrainConfig.__dataclass_fields__
    # KEY=VALUE flags (--algorithm-option, --model-option) arrive as lists of pairs.
    return {k: dict(v) if fields[k].type.startswith("dict") else v for k, v in vars(args).items() if k in fields}


def _command(commands: Any, name: str, summary: str, description: str, examples: Sequence[str] = (),
             **options: Any) -> argparse.ArgumentParser:
    """A subcommand with its one-line ``summary``, ``--help`` text, examples and ``--version``."""
    epilog = "examples:\n" + "".join(f"  {e}\n" for e in examples) if examples else None
    command = commands.add_parser(name, help=summary, description=description, epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter, **options)
    command.add_argument("--version", action="version", version=_VERSION)
    return command


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``maml-func`` and its sub-commands ``train``, ``eval``, ``download`` and ``demo``."""
    parser = _Parser(prog="maml-func", description="Model-Agnostic Meta-Learning with torch.func: meta-train, "
                     "evaluate, fetch the data sets.")
    parser.add_argument("--version", action="version", version=_VERSION)
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
        f"The standard few-shot protocol: tasks from held-out classes ({NUM_TASKS} by default), mean query accuracy "
        "with a 95% confidence interval after each inner step. Defaults to the checkpoint's config and its meta-test "
        "classes (a network named by import path is rebuilt from it; one given to fit(model=...) is evaluated from "
        "Python: evaluate_run(RUN, model=...)); without --checkpoint, evaluates a freshly initialized model (the "
        "baseline).",
        ["maml-func eval --checkpoint runs/5w1s",
         "maml-func eval --checkpoint runs/5w1s/best.pt --tasks 600 --steps 3 --json",
         "maml-func eval --preset omniglot-5w1s           # untrained baseline"], argument_default=argparse.SUPPRESS)
    ev.add_argument("--checkpoint", metavar="PATH", help="a checkpoint, or a run directory (its best.pt, else last.pt)")
    ev.add_argument("--classes", choices=tuple(SPLITS), default="test",
                    help="which classes to draw tasks from (default: test, the meta-test classes)")
    ev.add_argument("--tasks", type=int, default=NUM_TASKS, metavar="N",
                    help=f"tasks to average over (default: {NUM_TASKS})")
    ev.add_argument("--steps", type=int, metavar="S", help="inner steps (default: the config's eval_inner_steps)")
    ev.add_argument("--batch-size", type=int, default=BATCH_SIZE, metavar="T",
                    help=f"tasks evaluated together (default: {BATCH_SIZE})")
    ev.add_argument("--eval-seed", type=int, default=0, metavar="N", help="seed of the evaluation tasks (default: 0)")
    ev.add_argument("--json", action="store_true", default=False, help="print the result as JSON")
    ev.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="show a progress bar (default: on)")
    _add_config_flags(ev)

    dl = _command(commands, "download", "fetch and verify a data set's archives (or copy them from a folder)",
                  "Download the official archives of a named data set, check their md5 sums and put them under "
                  f"--root; with --source, copy them from a folder instead. Downloadable: {', '.join(DOWNLOADABLE)} "
                  f"({' and '.join(d for d in DATASETS if d not in DOWNLOADABLE)} have no stable public URL: the "
                  "error names the files to fetch).",
                  ["maml-func download --root data", "maml-func download --dataset cifarfs --root data/cifar"])
    dataset = default(TrainConfig.__dataclass_fields__["dataset"])
    dl.add_argument("--dataset", choices=DATASETS, default=dataset, metavar="NAME",
                    help=f"which data set: {', '.join(DATASETS)} (default: {dataset})")
    dl.add_argument("--root", required=True, metavar="DIR",
                    help="where to put the files (pass the same as --data-root)")
    dl.add_argument("--source", metavar="DIR", help="an offline copy: a folder holding the release files")

    demo = _command(commands, "demo", "meta-learn the sinusoid family of the MAML paper (seconds on a CPU)",
                    "Meta-train the MAML paper's sinusoid regression MLP and print the query error of held-out "
                    "tasks before and after adaptation.")
    demo.add_argument("--iterations", type=int, default=600, metavar="N", help="meta-updates (default: 600)")
    demo.add_argument("--seed", type=int, default=0, metavar="N", help="seed (default: 0)")
    return parser


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-commands' parsers of ``parser``, by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}
