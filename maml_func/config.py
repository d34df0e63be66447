"""The configuration of one meta-training run: :class:`TrainConfig`, presets, config files.

A run is described by one frozen dataclass, validated when it is made, so a bad
value fails before any data is read or any file is written. Values come, from
lowest to highest precedence, from the dataclass defaults, a preset
(:data:`PRESETS`), a TOML or JSON config file, and explicit overrides
(the command line): :func:`make_config` applies them in that order.

The four Omniglot presets follow Finn et al. 2017 (§5.2 and the authors' code):
28×28 images, the 1200/423 character split, every class rotated by a multiple
of 90°, Adam at 1e-3; 5-way: meta-batch 32, one inner SGD step of 0.4 at
training and three at test; 20-way: meta-batch 16, five steps of 0.1 at
training and test. The authors' code draws as many query images per class as
support images (``n_query = k_shot``). They live in one table so that they can
be tuned in one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PRESETS", "TrainConfig", "load_config_file", "make_config"]

_OMNIGLOT_PAPER: dict[str, Any] = {
    "dataset": "omniglot",
    "split": "maml",
    "image_size": 28,
    "rotations": True,
    "meta_lr": 1e-3,
    "iterations": 60_000,
}

#: Named settings, applied over the defaults and under config files and flags.
PRESETS: dict[str, dict[str, Any]] = {
    "omniglot-5w1s": {**_OMNIGLOT_PAPER, "n_way": 5, "k_shot": 1, "n_query": 1, "meta_batch": 32,
                      "inner_steps": 1, "eval_inner_steps": 3, "inner_lr": 0.4},
    "omniglot-5w5s": {**_OMNIGLOT_PAPER, "n_way": 5, "k_shot": 5, "n_query": 5, "meta_batch": 32,
                      "inner_steps": 1, "eval_inner_steps": 3, "inner_lr": 0.4},
    "omniglot-20w1s": {**_OMNIGLOT_PAPER, "n_way": 20, "k_shot": 1, "n_query": 1, "meta_batch": 16,
                       "inner_steps": 5, "eval_inner_steps": 5, "inner_lr": 0.1},
    "omniglot-20w5s": {**_OMNIGLOT_PAPER, "n_way": 20, "k_shot": 5, "n_query": 5, "meta_batch": 16,
                       "inner_steps": 5, "eval_inner_steps": 5, "inner_lr": 0.1},
}

_DTYPES = ("float32", "float64")
_SCHEDULES = ("constant", "cosine")

# Fields a resumed run may change: none of them touches the training trajectory
# (validation draws from its own generator, saving and logging read nothing random).
RESUMABLE_FIELDS = frozenset(
    {"iterations", "max_minutes", "device", "save_to", "val_every", "val_tasks", "save_every", "log_every",
     "data_root", "source", "download", "tasks_per_backward"}
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a meta-training run. Frozen; checked on creation.

    Data:
        dataset: ``"omniglot"``, or the path of an ImageFolder tree (one
            sub-folder of images per class), split by class into train/val/test.
        data_root: where the Omniglot archives and caches live.
        source: an offline copy of Omniglot (a folder, or the folder holding
            ``images_background.zip`` and ``images_evaluation.zip``).
        download: fetch Omniglot into ``data_root`` when it is not there.
        image_size: images are resized to ``image_size × image_size``.
        channels: 1 (grayscale) or 3 (RGB); ``None`` keeps the dataset's own.
        split: class split of Omniglot (``"maml"``: 1200 train / 423 test characters).
        split_seed: seed of the class split of an ImageFolder tree (kept apart
            from ``seed`` so that runs with different seeds share a test set).

    Tasks:
        n_way, k_shot, n_query: classes per task, support and query images per class.
        rotations: rotate each class of a task by a random multiple of 90°.

    Algorithm:
        algorithm: a name of :data:`maml_func.ALGORITHMS` (``"maml"``, ``"fomaml"``, ...).
        algorithm_options: extra keyword arguments for :func:`maml_func.build`.
        first_order: detach the inner gradients (first-order MAML).
        inner_lr: inner SGD step size. inner_steps: inner steps at meta-training.
        eval_inner_steps: inner steps at validation and test.
        hidden: filters per :class:`~maml_func.Conv4` block.
        chunk_size: tasks per ``vmap`` chunk (``None``: the whole meta-batch;
            ``"auto"``: the whole meta-batch on a GPU, ~1 MiB of task inputs
            per chunk on the CPU, the fastest there); bounds the temporaries
            of one chunk.
        tasks_per_backward: ``None``: one backward over the meta-batch. An int
            bounds peak memory by that many tasks' autograd graphs (one backward
            per part, gradients summed; see :func:`maml_func.train.meta_gradient`).
            The same meta-gradient up to rounding, so it may change on resume.

    Optimization:
        meta_batch: tasks per meta-update. meta_lr: Adam step size.
        lr_schedule: ``"constant"``, or ``"cosine"``: the step size follows half
            a cosine from ``meta_lr`` at iteration 0 down to
            ``final_lr_factor * meta_lr`` at ``iterations`` (so a cosine run's
            ``iterations`` cannot change on resume).
        iterations: meta-updates in total (a resumed run continues up to it).
        max_minutes: stop (with a checkpoint to resume from) after this much wall time.
        seed: seeds the model initialization and the training tasks.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        dtype: ``"float32"`` or ``"float64"``.
        distributed: data-parallel over the ranks of ``torch.distributed``
            (launch with ``torchrun``; see :mod:`maml_func.distributed`): each
            rank adapts ``meta_batch / ranks`` tasks of its own stream.

    Output:
        save_to: the run directory (checkpoints, ``metrics.jsonl``,
            ``learning_curve.png``); ``None`` writes nothing.
        val_every: validate every this many iterations (0: only at the end).
        val_tasks: tasks per validation, from the held-out validation classes.
        save_every: write ``last.pt`` every this many iterations (and at the end).
        log_every: write a line of training metrics every this many iterations.

    Example:
        >>> TrainConfig(n_way=5, k_shot=1, inner_lr=0.4).n_way
        5
        >>> TrainConfig(n_way=1)
        Traceback (most recent call last):
        ...
        ValueError: TrainConfig: n_way must be an int >= 2, got 1; a task needs at least two classes
    """

    dataset: str = "omniglot"
    data_root: str = "data"
    source: str | None = None
    download: bool = True
    image_size: int = 28
    channels: int | None = None
    split: str = "maml"
    split_seed: int = 0
    n_way: int = 5
    k_shot: int = 1
    n_query: int = 5
    rotations: bool = False
    algorithm: str = "maml"
    algorithm_options: dict[str, Any] = field(default_factory=dict)
    first_order: bool = False
    inner_lr: float = 0.4
    inner_steps: int = 1
    eval_inner_steps: int = 3
    hidden: int = 64
    chunk_size: int | str | None = "auto"
    tasks_per_backward: int | None = None
    meta_batch: int = 32
    meta_lr: float = 1e-3
    lr_schedule: str = "constant"
    final_lr_factor: float = 0.05
    iterations: int = 2000
    max_minutes: float | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    distributed: bool = False
    save_to: str | None = None
    val_every: int = 500
    val_tasks: int = 200
    save_every: int = 100
    log_every: int = 10

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"TrainConfig: {name} must be {why}, got {getattr(self, name)!r}")

        def positive_int(name: str, minimum: int = 1, hint: str = "") -> None:
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise ValueError(f"TrainConfig: {name} must be an int >= {minimum}, got {value!r}{hint}")

        for name in ("dataset", "data_root", "split", "algorithm", "device", "dtype"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                fail(name, "a non-empty string")
        for name in ("source", "save_to"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                fail(name, "a string (a path) or None")
        if self.source is not None and self.dataset != "omniglot":
            raise ValueError(f"TrainConfig: source applies to dataset='omniglot' only (an offline copy of it), got "
                             f"source={self.source!r} with dataset={self.dataset!r}; drop source")
        for name in ("download", "rotations", "first_order", "distributed"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "true or false")
        positive_int("n_way", 2, "; a task needs at least two classes")
        for name in ("k_shot", "n_query", "meta_batch", "iterations", "hidden", "val_tasks", "save_every",
                     "log_every"):
            positive_int(name)
        positive_int("image_size", 16, "; Conv4 halves the resolution four times")
        for name in ("inner_steps", "eval_inner_steps", "val_every", "seed", "split_seed"):
            positive_int(name, 0)
        if self.channels is not None and self.channels not in (1, 3):
            fail("channels", "1, 3 or None")
        if self.chunk_size not in (None, "auto"):
            positive_int("chunk_size", hint="; or None (one vmap) or 'auto'")
        if self.tasks_per_backward is not None:
            positive_int("tasks_per_backward", hint="; or None (one backward over the meta-batch)")
        if self.lr_schedule not in _SCHEDULES:
            fail("lr_schedule", f"one of {_SCHEDULES}")
        if not _is_number(self.final_lr_factor) or not 0 <= self.final_lr_factor <= 1:
            fail("final_lr_factor", "a number in [0, 1]")
        for name in ("inner_lr", "meta_lr"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ValueError(f"TrainConfig: {name} must be a positive number, got {value!r}; "
                                 "a step size is > 0 (e.g. inner_lr=0.4, meta_lr=0.001)")
        if self.max_minutes is not None and (not _is_number(self.max_minutes) or self.max_minutes <= 0):
            fail("max_minutes", "a positive number of minutes or None")
        if self.dtype not in _DTYPES:
            fail("dtype", f"one of {_DTYPES}")
        if not (self.device in ("auto", "cpu") or self.device.startswith(("cuda", "mps", "xpu"))):
            fail("device", "'auto', 'cpu', 'cuda' or 'cuda:<index>'")
        if not isinstance(self.algorithm_options, Mapping):
            fail("algorithm_options", "a table of keyword arguments for maml_func.build")
        self._check_algorithm()

    def _check_algorithm(self) -> None:
        # Imported here: the config module stays importable without building anything.
        from maml_func.algorithms import ALGORITHMS

        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"TrainConfig: algorithm must be one of {sorted(ALGORITHMS)}, got {self.algorithm!r}")
        reserved = {"inner_lr", "inner_steps", "first_order", "chunk_size"} & set(self.algorithm_options)
        if reserved:
            raise ValueError(f"TrainConfig: algorithm_options {sorted(reserved)} are fields of the config; "
                             "set them directly (e.g. inner_lr=0.4) instead")

    def check_paths(self) -> None:
        """Check that ``dataset`` (unless ``"omniglot"``) and ``source`` exist on this machine.

        Kept out of ``__post_init__`` so that the config of a checkpoint made
        elsewhere can still be loaded (and its model evaluated on other data).

        Raises:
            ValueError: naming the missing path and what to pass instead.
        """
        if self.dataset != "omniglot" and not Path(self.dataset).expanduser().is_dir():
            raise ValueError(f"TrainConfig: dataset {self.dataset!r} is neither 'omniglot' nor an existing "
                             "directory; pass 'omniglot' or the path of an ImageFolder tree (one sub-folder per class)")
        if self.source is not None and not Path(self.source).expanduser().exists():
            raise ValueError(f"TrainConfig: source {self.source!r} does not exist; pass the folder holding "
                             "images_background.zip and images_evaluation.zip (or an extracted copy)")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (what checkpoints and ``metrics.jsonl`` store)."""
        out = dataclasses.asdict(self)
        out["algorithm_options"] = dict(self.algorithm_options)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, origin: str = "TrainConfig.from_dict") -> TrainConfig:
        """Make a config from a dict, rejecting unknown keys with a suggestion.

        Raises:
            ValueError: for a key that is not a field (``origin`` names where it came from).
        """
        _check_keys(values, origin)
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        _check_keys(changes, "TrainConfig.replace")
        return dataclasses.replace(self, **changes)


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _check_keys(values: Mapping[str, Any], origin: str) -> None:
    names = _field_names()
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys are {', '.join(names)}"
            raise ValueError(f"{origin}: unknown key {key!r}{hint}")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or JSON (``.json``) config file into a dict.

    Keys are :class:`TrainConfig` fields (``-`` may stand for ``_``), plus
    ``preset``. Keys are checked, values are checked when the config is made.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: for a file that does not parse, another suffix, or an unknown key.

    Example:
        A ``run.toml`` such as::

            preset = "omniglot-5w1s"
            iterations = 3000
            save_to = "runs/5w1s"
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"load_config_file: config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        elif path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            values = tomllib.loads(text)
        else:
            raise ValueError(f"load_config_file: {str(path)!r} must end in .toml or .json")
    except (json.JSONDecodeError, ValueError) as err:
        if str(err).startswith("load_config_file"):
            raise
        raise ValueError(f"load_config_file: cannot parse {str(path)!r}: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"load_config_file: {str(path)!r} must hold a table of keys, got {type(values).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    _check_keys({k: v for k, v in values.items() if k != "preset"}, f"config file {str(path)!r}")
    return values


def make_config(
    *,
    preset: str | None = None,
    file: str | Path | None = None,
    base: TrainConfig | Mapping[str, Any] | None = None,
    **overrides: Any,
) -> TrainConfig:
    """Merge defaults < ``base`` < preset < config file < ``overrides`` into a :class:`TrainConfig`.

    Args:
        preset: a name of :data:`PRESETS`; a ``preset`` key in the file is used when this is ``None``.
        file: a TOML or JSON config file (see :func:`load_config_file`).
        base: values under everything else (e.g. the config of a checkpoint).
        **overrides: fields that win over everything (e.g. command-line flags).

    Raises:
        ValueError: unknown preset or key, or an invalid value.

    Example:
        >>> make_config(preset="omniglot-20w1s", iterations=100).inner_steps
        5
    """
    values: dict[str, Any] = {}
    if base is not None:
        values.update(base.to_dict() if isinstance(base, TrainConfig) else base)
    from_file = load_config_file(file) if file is not None else {}
    preset = preset if preset is not None else from_file.pop("preset", None)
    from_file.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"make_config: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    values.update(from_file)
    values.update(overrides)
    return TrainConfig.from_dict(values, origin="make_config")
