"""The configuration of one meta-training run: :class:`TrainConfig`, config files, :func:`make_config`.

A run is described by one frozen dataclass, validated when it is made, so a bad
value fails before any data is read or any file is written. Each field is
declared once, with :func:`maml_func.fields.option`: its default, its help
text, its group, its check and whether a resumed run may change it. The class
docstring, the command line's flags with their help and defaults
(:mod:`maml_func.parser`), :data:`RESUMABLE_FIELDS` and the defaults of
:func:`make_config` are all read from those declarations; the choices of an
option come from the module that acts on them (the datasets from
:mod:`maml_func.data`, the algorithms from :mod:`maml_func.algorithms`, ...),
so a new option or choice is one edit and nothing can drift apart.

Values come, from lowest to highest precedence, from the dataclass defaults, a
preset (:data:`~maml_func.presets.PRESETS`), a TOML or JSON config file, and
explicit overrides (the command line): :func:`make_config` applies them in
that order.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maml_func import checks
from maml_func.algorithms import ALGORITHMS
from maml_func.algorithms.adjoint import BACKPROPS
from maml_func.batching import check_chunk_size
from maml_func.data import DATASETS, DOWNLOADABLE, SOURCE_FILES
from maml_func.execution import EXECUTIONS
from maml_func.fields import at_least, default, document, nonempty, one_of, option, positive
from maml_func.models import MODELS
from maml_func.normalization import BATCH_NORM_POLICIES
from maml_func.options import IMPORT_FORM, is_import_path, network_factory, parameters, typed_options
from maml_func.presets import PRESETS

__all__ = ["MODEL_FIELDS", "RESUMABLE_FIELDS", "TrainConfig", "is_object_model", "load_config_file", "make_config",
           "object_model_name"]

_WHERE = "TrainConfig"
_DTYPES = ("float32", "float64")
_SCHEDULES = ("constant", "cosine")
_STEP_HINT = "; a step size is > 0 (e.g. inner_lr=0.4, meta_lr=0.001)"
_NO_URL = tuple(d for d in DATASETS if d not in DOWNLOADABLE)


def _chunk_size(where: str, name: str, value: Any) -> Any:
    return check_chunk_size(where, value)


def _device(where: str, name: str, value: Any) -> Any:
    checks.text(where, name, value)
    if not (value in ("auto", "cpu") or value.startswith(("cuda", "mps", "xpu"))):
        checks.fail(where, name, "'auto', 'cpu', 'cuda' or 'cuda:<index>'", value)
    return value


def object_model_name(model: Any) -> str:
    """What a config records as its ``model`` when the network was an object given to ``fit(model=...)``.

    Example:
        >>> import torch
        >>> object_model_name(torch.nn.Linear(2, 2))
        '<object torch.nn.modules.linear.Linear>'
    """
    return f"<object {type(model).__module__}.{type(model).__qualname__}>"


def is_object_model(name: str) -> bool:
    """Whether a config's ``model`` says the network was an object given to ``fit`` (see :func:`object_model_name`)."""
    return name.startswith("<object ") and name.endswith(">")


def _model(where: str, name: str, value: Any) -> Any:
    checks.text(where, name, value)
    if value not in MODELS and not is_import_path(value) and not is_object_model(value):
        checks.fail(where, name, f"one of {sorted(MODELS)}", value,
                    f"; or your own network as an import path {IMPORT_FORM}")
    return value


def _table(where: str, name: str, value: Any) -> Any:
    if not isinstance(value, Mapping):
        owner = "maml_func.build" if name == "algorithm_options" else "the model"
        checks.fail(where, name, f"a table of keyword arguments for {owner}", value)
    return value


@document
@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a meta-training run. Frozen; checked on creation.

    The fields, by group (generated from their declarations below):

    {fields}

    Example:
        >>> TrainConfig(n_way=5, k_shot=1, inner_lr=0.4).n_way
        5
        >>> TrainConfig(n_way=1)
        Traceback (most recent call last):
        ...
        ValueError: TrainConfig: n_way must be an int >= 2, got 1; a task needs at least two classes
    """

    dataset: str = option("omniglot", f"a named benchmark ({', '.join(DATASETS)}: each with its standard split), "
                          "or the path of an ImageFolder tree (one sub-folder of images per class), split by class "
                          "into train/val/test", group="Data", check=nonempty(), metavar="NAME|PATH")
    data_root: str = option("data", "where the named datasets' archives and decoded caches live", group="Data",
                            check=nonempty(), resumable=True, metavar="DIR")
    source: str | None = option(None, "an offline copy of a named dataset: a folder holding its release files (for "
                                "Omniglot images_background.zip and images_evaluation.zip or their extracted "
                                "trees; see maml_func.data for the others)", group="Data",
                                check=nonempty(none_ok=True), resumable=True, metavar="DIR")
    download: bool = option(True, f"download a named dataset into data_root when it is not there "
                            f"({', '.join(DOWNLOADABLE)}; {' and '.join(_NO_URL)} have no public URL)", group="Data",
                            check=checks.flag, resumable=True)
    image_size: int = option(28, "resize images to image_size x image_size pixels", group="Data",
                             check=at_least(16, "; Conv4 halves the resolution four times"), metavar="PX")
    channels: int | None = option(None, "1 (grayscale) or 3 (RGB); none keeps the dataset's own", group="Data",
                                  check=one_of((1, 3, None), "1, 3 or None"), metavar="1|3")
    split: str = option("maml", "class split of Omniglot: maml (1200 train / 423 test characters) or lake",
                        group="Data", check=nonempty(), metavar="NAME")
    split_seed: int = option(0, "seed of the class split of an ImageFolder tree (apart from seed, so that runs "
                             "with different seeds share a test set)", group="Data", check=at_least(0), metavar="N")
    skip_bad_files: bool = option(False, "ImageFolder trees: skip files that are not readable images (and empty "
                                  "class folders) with a warning, instead of stopping", group="Data",
                                  check=checks.flag)
    n_way: int = option(5, "classes per task", group="Tasks", check=at_least(2, "; a task needs at least two classes"),
                        metavar="N")
    k_shot: int = option(1, "support images per class", group="Tasks", check=at_least(1), metavar="K")
    n_query: int = option(5, "query images per class", group="Tasks", check=at_least(1), metavar="Q")
    rotations: bool = option(False, "rotate each class of a task by a random multiple of 90 degrees",
                             group="Tasks", check=checks.flag)
    augment: bool = option(False, "augment the meta-training tasks' images on the device: random crop with "
                           "padding and horizontal flip, per task and image", group="Tasks", check=checks.flag)
    model: str = option("conv4", "the network: conv4 (the MAML paper's), resnet12 (MetaOptNet's), or your own as "
                        "an import path package.module:factory (an nn.Module class, or a function annotated to "
                        "return one), called with the model options only and recorded in the checkpoint so that "
                        "eval rebuilds it (e.g. torchvision.models:resnet18 with --model-option num_classes=5); "
                        "its output size must be n_way", group="Model",
                        check=_model, metavar="NAME|MODULE:FACTORY")
    model_options: dict[str, Any] = option(help="keyword arguments for the model, each read as the type of the "
                                           "parameter it sets (on the command line: --model-option KEY=VALUE, "
                                           "repeatable), e.g. pool=true for Conv4's max-pooling blocks; conv4 and "
                                           "resnet12 take n_way, channels, image_size and hidden from their own "
                                           "flags", group="Model", check=_table, factory=dict,
                                           metavar="KEY=VALUE", flag="--model-option")
    hidden: int = option(64, "filters per Conv4 block", group="Model", check=at_least(1), metavar="C")
    algorithm: str = option("maml", f"a name of maml_func.ALGORITHMS: {', '.join(ALGORITHMS)}", group="Algorithm",
                            check=one_of(tuple(ALGORITHMS), f"one of {sorted(ALGORITHMS)}"), metavar="NAME")
    algorithm_options: dict[str, Any] = option(help="extra keyword arguments for maml_func.build, each read as "
                                               "the type of the parameter it sets (on the command line: "
                                               "--algorithm-option KEY=VALUE, repeatable), e.g. lam=1.0; "
                                               "the inner loop's own flags set inner_lr, inner_steps, first_order, "
                                               "backprop and batch_norm",
                                               group="Algorithm", check=_table, factory=dict, metavar="KEY=VALUE",
                                               flag="--algorithm-option")
    first_order: bool = option(False, "first-order MAML: detach the inner gradients", group="Algorithm",
                               check=checks.flag)
    backprop: str = option("unroll", "how the second-order meta-gradient is taken: unroll (autograd through the "
                           "inner loop) or adjoint (only the inner loop's parameters kept, each step recomputed in "
                           "the meta-backward: the memory of one inner step, whatever inner_steps)",
                           group="Algorithm", check=one_of(BACKPROPS), metavar="|".join(BACKPROPS))
    batch_norm: str = option("batch", "how BatchNorm layers normalize: batch (batch statistics at meta-train and "
                             "meta-test, the MAML convention), running (running statistics accumulated from the "
                             "meta-batch during meta-training, used in eval mode), per_step (MAML++: running "
                             "statistics per inner step)", group="Algorithm",
                             check=one_of(BATCH_NORM_POLICIES, " or ".join(map(repr, BATCH_NORM_POLICIES))),
                             metavar="POLICY")
    inner_lr: float = option(0.4, "inner SGD step size", group="Algorithm", check=positive(_STEP_HINT),
                             metavar="LR")
    inner_steps: int = option(1, "inner steps at meta-training", group="Algorithm", check=at_least(0), metavar="S")
    eval_inner_steps: int = option(3, "inner steps at validation and test", group="Algorithm", check=at_least(0),
                                   metavar="S")
    chunk_size: int | str | None = option("auto", "tasks per vmap chunk, bounds a chunk's temporaries; none: the "
                                          "whole meta-batch; auto: the whole meta-batch on a GPU, ~1 MiB of task "
                                          "inputs per chunk on the CPU (the fastest there)", group="Algorithm",
                                          check=_chunk_size, metavar="T|none|auto")
    tasks_per_backward: int | None = option(None, "one backward per this many tasks, gradients summed: peak "
                                            "memory grows with it, not with the meta-batch; the same "
                                            "meta-gradient up to rounding (none: with execution auto one backward "
                                            "per call of the chosen way, per task of the loop or per chunk; "
                                            "otherwise one backward)",
                                            group="Algorithm", resumable=True, metavar="N|none",
                                            check=at_least(1, "; or None (one backward over the meta-batch)",
                                                       none_ok=True))
    execution: str = option("auto", "how the tasks of a meta-batch run: auto (time one vmap, chunks of 2/4/8 and the "
                            "loop, on the CPU in both memory layouts, on the first iterations, keep the fastest), "
                            "vmap (chunk_size applies) or loop",
                            group="Algorithm", check=one_of(EXECUTIONS), resumable=True,
                            metavar="|".join(EXECUTIONS))
    max_memory_mb: float | None = option(None, "with execution auto: never choose a way whose memory rises by "
                                         "more than this many MiB (the loop stays allowed; none: no limit)",
                                         group="Algorithm", resumable=True, metavar="MB|none",
                                         check=positive(none_ok=True, expect="a positive number of MiB or None"))
    meta_batch: int = option(32, "tasks per meta-update", group="Optimization", check=at_least(1), metavar="T")
    meta_lr: float = option(1e-3, "Adam step size", group="Optimization", check=positive(_STEP_HINT),
                            metavar="LR")
    lr_schedule: str = option("constant", "constant, or cosine: half a cosine from meta_lr at iteration 0 down to "
                              "final_lr_factor * meta_lr at the last iteration (its iterations cannot change on "
                              "resume)", group="Optimization", check=one_of(_SCHEDULES), metavar="|".join(_SCHEDULES))
    final_lr_factor: float = option(0.05, "where the cosine schedule ends, as a fraction of meta_lr",
                                    group="Optimization", metavar="F",
                                    check=lambda w, n, v: checks.number(w, n, v, minimum=0, maximum=1))
    iterations: int = option(2000, "meta-updates in total (a resumed run continues up to it)",
                             group="Optimization", check=at_least(1), resumable=True, metavar="N")
    max_minutes: float | None = option(None, "stop after this many minutes of wall time, validating the last "
                                       "iteration and saving a checkpoint to resume from", group="Optimization",
                                       resumable=True, metavar="MIN",
                                       check=positive(none_ok=True, expect="a positive number of minutes or None"))
    seed: int = option(0, "seeds the model initialization and the training tasks", group="Optimization",
                       check=at_least(0), metavar="N")
    device: str = option("auto", "auto (CUDA when available), cpu, cuda, cuda:1, ...", group="Optimization",
                         check=_device, resumable=True, metavar="DEV")
    dtype: str = option("float32", " or ".join(_DTYPES), group="Optimization", check=one_of(_DTYPES),
                        metavar="T")
    distributed: bool = option(False, "data-parallel over the ranks of torch.distributed, launched with torchrun "
                               "(each rank adapts meta_batch / ranks tasks of its own stream)",
                               group="Optimization", check=checks.flag)
    save_to: str | None = option(None, "the run directory (checkpoints, metrics.jsonl, learning_curve.png); none "
                                 "writes nothing, maml-func train then picks "
                                 "runs/<dataset>-<N>w<K>s-<algorithm>-seed<seed>", group="Output",
                                 check=nonempty(none_ok=True), resumable=True, metavar="DIR")
    val_every: int = option(500, "validate every this many iterations (0: only at the end)", group="Output",
                            check=at_least(0), resumable=True, metavar="N")
    val_tasks: int = option(200, "tasks per validation, from the held-out validation classes", group="Output",
                            check=at_least(1), resumable=True, metavar="N")
    save_every: int = option(100, "write last.pt every this many iterations (and at the end)", group="Output",
                             check=at_least(1), resumable=True, metavar="N")
    log_every: int = option(10, "write a line of training metrics every this many iterations", group="Output",
                            check=at_least(1), resumable=True, metavar="N")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is not None:
                check(_WHERE, f.name, getattr(self, f.name))
        if self.skip_bad_files and self.dataset in DATASETS:
            raise ValueError(f"TrainConfig: skip_bad_files applies to ImageFolder trees; {self.dataset}'s files are "
                             "checked by checksum or layout instead; drop skip_bad_files")
        if self.source is not None and self.dataset not in DATASETS:
            raise ValueError(f"TrainConfig: source applies to a named dataset only ({', '.join(DATASETS)}: an "
                             f"offline copy of its files), got source={self.source!r} with dataset={self.dataset!r}; "
                             "drop source")
        # Typed once, here, wherever they came from (flags, a file, Python): "False" for a bool is False.
        object.__setattr__(self, "model_options", _typed_model_options(self.model, self.model_options))
        object.__setattr__(self, "algorithm_options", typed_options(
            _WHERE, "algorithm_options", f"algorithm {self.algorithm!r}", ALGORITHMS[self.algorithm],
            self.algorithm_options, skip=1, reserved={k: k for k in ALGORITHM_FIELDS}, closed_by_return=True))

    def check_paths(self) -> None:
        """Check that ``dataset`` (unless a named dataset) and ``source`` exist on this machine.

        Kept out of ``__post_init__`` so that the config of a checkpoint made
        elsewhere can still be loaded (and its model evaluated on other data).

        Raises:
            ValueError: naming the missing path and what to pass instead.
        """
        if self.dataset not in DATASETS and not Path(self.dataset).expanduser().is_dir():
            raise ValueError(f"TrainConfig: dataset {self.dataset!r} is neither a named dataset "
                             f"({', '.join(DATASETS)}) nor an existing directory; pass one of them or the path of an "
                             "ImageFolder tree (one sub-folder per class)")
        if self.source is not None and not Path(self.source).expanduser().exists():
            held = SOURCE_FILES.get(self.dataset, "the dataset's release files (see maml_func.data)")
            if self.dataset == "omniglot":
                held += " (or an extracted copy)"
            raise ValueError(f"TrainConfig: source {self.source!r} does not exist; pass the folder holding {held}")

    @property
    def dataset_name(self) -> str:
        """The dataset's short name, for titles and run directory names: a named one, else the tree's folder name."""
        return self.dataset if self.dataset in DATASETS else Path(self.dataset).name or "dataset"

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


#: A shipped network's keyword arguments that the config's own fields set (argument -> field); the rest of its
#: arguments come from ``model_options`` (see :func:`maml_func.components.build_network`).
MODEL_FIELDS = {"n_way": "n_way", "in_channels": "channels", "image_size": "image_size", "hidden": "hidden"}
#: The algorithm options that the config's own fields set (``build_algorithm`` passes them; ``algorithm_options``
#: may not).
ALGORITHM_FIELDS = ("inner_lr", "inner_steps", "first_order", "backprop", "batch_norm")


def _typed_model_options(model: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` typed by the signature of ``model``'s class or factory (see :mod:`maml_func.options`)."""
    if is_object_model(model):  # the network was an object given to fit: nothing here builds it
        return dict(options)
    if model in MODELS:
        network = MODELS[model]
        accepted, _ = parameters(network)
        reserved = {key: name for key, name in MODEL_FIELDS.items() if key in accepted}
        return typed_options(_WHERE, "model_options", network.__name__, network, options, reserved=reserved)
    return typed_options(_WHERE, "model_options", model, network_factory(model, _WHERE), options)


#: Fields a resumed run may change: none of them touches the training trajectory
#: (validation draws from its own generator, saving and logging read nothing random).
RESUMABLE_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resumable"])


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
    if path.is_dir():
        raise ValueError(f"load_config_file: {str(path)!r} is a folder, not a config file; pass the path of a "
                         ".toml or .json file")
    if not path.is_file():
        raise FileNotFoundError(f"load_config_file: config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")  # a decode error is a ValueError too: named with the file below
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
            Changing ``dataset`` drops a ``source`` that came only from
            ``base`` (it is an offline copy of the dataset it replaces);
            changing ``model`` drops ``model_options`` of ``base`` or the
            preset (they are the other network's).

    Raises:
        ValueError: unknown preset or key, or an invalid value.

    Example:
        >>> make_config(preset="omniglot-20w1s", iterations=100).inner_steps
        5
    """
    values = {f.name: default(f) for f in dataclasses.fields(TrainConfig)}
    if base is not None:
        values.update(base.to_dict() if isinstance(base, TrainConfig) else base)
    inherited = values["dataset"]
    from_file = load_config_file(file) if file is not None else {}
    preset = preset if preset is not None else from_file.pop("preset", None)
    from_file.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"make_config: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    model = values["model"]
    values.update(from_file)
    values.update(overrides)
    if values["dataset"] != inherited and "source" not in {**from_file, **overrides}:
        # An offline copy inherited from ``base`` (a checkpoint's config) means nothing for the dataset that
        # replaces it: the dataset changed, so its source goes with it.
        values["source"] = None
    if values["model"] != model and "model_options" not in {**from_file, **overrides}:
        values["model_options"] = {}  # e.g. the miniImageNet preset's pool=True, which ResNet12 does not take
    return TrainConfig.from_dict(values, origin="make_config")
