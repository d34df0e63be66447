"""What a run is made of, and what is done with a finished one.

From a :class:`~maml_func.config.TrainConfig`: the device
(:func:`resolve_device`), the class splits (:func:`load_splits`), the network
(:func:`build_network`: a shipped one, or a factory named by import path) and
the algorithm (:func:`build_algorithm`). From a checkpoint: :func:`load_run`
(the model and meta-parameters, to use in Python) and :func:`evaluate_run`
(the few-shot evaluation protocol on held-out classes).

A run whose network was an object given to ``fit(model=...)`` records only its
class: :func:`load_run` and :func:`evaluate_run` then take the network as
``model=``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maml_func import checks
from maml_func.algorithms import build
from maml_func.atomic import removed_on_failure
from maml_func.config import TrainConfig, is_object_model
from maml_func.core import MetaParams
from maml_func.data import DATASETS, load_dataset
from maml_func.distributed import World
from maml_func.evaluate import EvalResult, evaluate
from maml_func.models import MODELS, build_model
from maml_func.options import import_object
from maml_func.rundir import BEST, LAST
from maml_func.state import Checkpoint, load_meta
from maml_func.tasks import EpisodeSampler

__all__ = ["TrainResult", "build_algorithm", "build_network", "check_buildable", "check_outputs",
           "evaluate_run", "load_run", "load_splits", "resolve_device", "task_sampler"]


@dataclass
class TrainResult:
    """A trained (or loaded) run.

    Attributes:
        config: the run's configuration (``channels`` resolved from the data).
        model: the template network. algorithm: the algorithm object.
        meta: the meta-parameters after the last iteration.
        iteration: iterations completed.
        best_val_accuracy, best_iteration: best validation accuracy and when (``None`` without validation).
        run_dir: the run directory (``None`` when nothing was written).
        history: the records of ``metrics.jsonl``.
        stopped: ``"completed"``, ``"time_limit"``, ``"interrupted"`` or ``"loaded"``.
    """

    config: TrainConfig
    model: nn.Module
    algorithm: Any
    meta: MetaParams
    iteration: int
    best_val_accuracy: float | None = None
    best_iteration: int | None = None
    run_dir: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = "completed"

    @property
    def last_checkpoint(self) -> Path | None:
        return self.run_dir / LAST if self.run_dir is not None else None

    @property
    def best_checkpoint(self) -> Path | None:
        """``best.pt`` when validation wrote one, else ``None``."""
        path = self.run_dir / BEST if self.run_dir is not None else None
        return path if path is not None and path.exists() else None


def resolve_device(name: str, me: World | None = None) -> torch.device:
    """The device named by ``config.device``; under ``torch.distributed``, ``cuda`` means ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and me is not None and me.size > 1:
        device = torch.device("cuda", me.local_rank)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"fit: device {name!r} was asked for but CUDA is not available here; pass device='cpu'")
    return device


def check_buildable(config: TrainConfig, model: nn.Module | None, where: str) -> None:
    """Refuse, before anything is read, a run whose network was an object given to ``fit`` when none is given again.

    Raises:
        ValueError: naming the network's class and the two ways out.
    """
    if model is None and is_object_model(config.model):
        raise ValueError(f"{where}: the run used a network object given to fit(model=...) "
                         f"({config.model[len('<object '):-1]}), which a checkpoint cannot rebuild; pass model= (a "
                         "network of the same architecture) to fit / load_run / evaluate_run, or train with an "
                         "import path (--model package.module:factory, model='package.module:factory' in the "
                         "config) so that the checkpoint records how to build it")


def build_network(config: TrainConfig, *, in_channels: int | None = None,
                  where: str = "build_algorithm") -> nn.Module:
    """The network ``config.model`` names (weights from the global RNG).

    A shipped network (``conv4``, ``resnet12``) is sized by the config
    (``n_way``, channels, ``image_size``, ``hidden``) and takes
    ``model_options`` besides; an import path ``package.module:factory`` is
    called with ``model_options`` only.

    Args:
        config: the run's configuration.
        in_channels: image channels of a shipped network (default: ``config.channels``, else 1).
        where: the caller, for the messages.

    Raises:
        ValueError: the run's network was an object given to ``fit`` (pass it
            as ``model=``), or the factory fails or returns no ``nn.Module``.

    Example:
        >>> build_network(TrainConfig(model="torchvision.models:resnet18",
        ...                           model_options={"num_classes": 5})).fc.out_features
        5
    """
    check_buildable(config, None, where)
    if config.model in MODELS:
        channels = in_channels if in_channels is not None else (config.channels or 1)
        return build_model(config.model, n_way=config.n_way, in_channels=channels, image_size=config.image_size,
                           hidden=config.hidden, **config.model_options)
    factory = import_object(config.model, where, "model")
    call = f"{config.model}({', '.join(f'{k}={v!r}' for k, v in config.model_options.items())})"
    try:
        network = factory(**config.model_options)
    except Exception as err:  # the user's factory: its error, in one line, with what was called
        raise ValueError(f"{where}: the model factory call {call} failed: {type(err).__name__}: "
                         f"{checks.brief(err)}; fix the model options (--model-option KEY=VALUE)") from err
    if not isinstance(network, nn.Module):
        raise ValueError(f"{where}: the model factory call {call} returned a {type(network).__name__}, not an "
                         "nn.Module; name a factory that returns the network")
    return network


def build_algorithm(config: TrainConfig, *, in_channels: int | None = None,
                    model: nn.Module | None = None) -> tuple[nn.Module, Any]:
    """The model and the algorithm that ``config`` describes (weights from the global RNG).

    Args:
        config: the run's configuration.
        in_channels: image channels of a shipped network (default: ``config.channels``, else 1).
        model: the network to meta-train, instead of the one ``config.model``
            names; the config gives everything else (algorithm, inner_lr, ...).

    Raises:
        ValueError: when the network cannot be built (see :func:`build_network`)
            or the algorithm rejects the config's options.
    """
    if model is None:
        model = build_network(config, in_channels=in_channels)
    options: dict[str, Any] = {"inner_lr": config.inner_lr, "inner_steps": config.inner_steps,
                               **config.algorithm_options}
    if config.first_order:
        options["first_order"] = True
    if config.backprop != "unroll":  # only the algorithms with a choice take the option
        options["backprop"] = config.backprop
    if config.batch_norm != "batch":  # the default policy is every algorithm's own default
        options["batch_norm"] = config.batch_norm
    try:
        algorithm = build(config.algorithm, model, **options)
    except TypeError as err:
        raise ValueError(f"build_algorithm: algorithm {config.algorithm!r} does not accept these options "
                         f"({err}); remove them from the config") from None
    # The network the algorithm runs: the model itself, or its copy in exact form (maml_func.normalization).
    return algorithm.model, algorithm


def load_splits(config: TrainConfig) -> dict[str, Any]:
    """The train/val/test classes (on the CPU) of the config's dataset."""
    named = config.dataset in DATASETS
    return load_dataset(
        config.dataset, root=config.data_root, image_size=config.image_size, channels=config.channels,
        split=config.split, seed=config.split_seed,
        # download and source mean something for the named datasets only; a folder tree is read where it is.
        download=config.download and named, source=config.source if named else None,
        skip_bad_files=config.skip_bad_files,
    )


_SPLIT_NAMES = {"train": "meta-training", "val": "validation", "test": "meta-test"}


def task_sampler(config: TrainConfig, splits: dict[str, Any], split: str, device: torch.device,
                 where: str) -> EpisodeSampler:
    """The episode sampler of ``config``'s tasks over one split, on ``device``; errors name the split."""
    classes = splits[split].to(device)
    try:
        # Augmentation is for the meta-training tasks only; validation and test tasks are seen as they are.
        augment = {"augment": True} if config.augment and split == "train" else {}
        return EpisodeSampler(classes, config.n_way, config.k_shot, config.n_query, rotations=config.rotations,
                              **augment)
    except ValueError as err:
        raise ValueError(f"{where}: the {_SPLIT_NAMES[split]} split ({split!r}) of {config.dataset!r} cannot give "
                         f"these tasks: {err}") from None


@contextlib.contextmanager
def rng_scope(device: torch.device) -> Iterator[None]:
    """The global RNGs as the run sets them, restored for the caller afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def check_outputs(model: nn.Module, sampler: EpisodeSampler, config: TrainConfig, dtype: torch.dtype,
                  where: str) -> None:
    """Refuse a network that does not give ``n_way`` logits per image, from one forward of a support set.

    Run in eval mode without gradients, on a task drawn from a generator of
    its own: the network's buffers, its mode and every random state are left
    as they were.

    Raises:
        ValueError: naming the shapes and the fix (e.g. ``num_classes=5`` for a torchvision model).
    """
    x = sampler.sample(1, torch.Generator(device=sampler.device).manual_seed(0)).x_support[0].to(dtype=dtype)
    shape = f"[{x.shape[0]}, {config.n_way}]"
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:  # the user's network: its error, in one line, with the input it was given
        raise ValueError(f"{where}: the model fails on a support set of images {list(x.shape)} "
                         f"({type(err).__name__}: {checks.brief(err)}); build it for {x.shape[1]}-channel "
                         f"{x.shape[2]}x{x.shape[3]} images, or set channels / image_size to what it takes") from err
    finally:
        model.train(training)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{where}: the model returns a {type(out).__name__}, not a tensor of logits {shape}; wrap "
                         "it in a module whose forward returns the logits")
    if out.dim() != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(f"{where}: the model gives outputs of shape {list(out.shape)} for {x.shape[0]} images; "
                         f"expected logits {shape}")
    if out.shape[1] != config.n_way:
        raise ValueError(f"{where}: the model gives {out.shape[1]} outputs per image but the tasks are "
                         f"{config.n_way}-way; build it with {config.n_way} outputs (e.g. --model-option "
                         f"num_classes={config.n_way} for a torchvision model), or set n_way to {out.shape[1]}")


def _read(checkpoint: str | Path | Checkpoint, origin: str) -> Checkpoint:
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    return Checkpoint.read(checkpoint, prefer_best=True, origin=origin)


def load_run(checkpoint: str | Path | Checkpoint, *, device: str | torch.device | None = "cpu",
             model: nn.Module | None = None) -> TrainResult:
    """Load a checkpoint (or a run directory's ``best.pt``, else ``last.pt``) for evaluation.

    Args:
        checkpoint: a ``.pt`` file, a run directory, or a :class:`~maml_func.state.Checkpoint` already read.
        device: where the meta-parameters go.
        model: the network, for a run trained with ``fit(model=...)`` (the
            checkpoint holds its weights, not its code); default: the one the
            config names. Moved to ``device`` and the run's dtype.

    Returns:
        A :class:`TrainResult` with ``config``, ``model``, ``algorithm`` and ``meta``.

    Example:
        >>> run = load_run("runs/5w1s")  # doctest: +SKIP
        >>> run.algorithm.adapt(run.meta, x_support, y_support)  # doctest: +SKIP
    """
    saved = _read(checkpoint, "load_run")
    config = TrainConfig.from_dict(saved.config, origin=f"load_run({str(saved.path)!r})")
    check_buildable(config, model, "load_run")
    model, algorithm = build_algorithm(config, model=model)
    device = torch.device(device) if device is not None else torch.device("cpu")
    model.to(device=device, dtype=getattr(torch, config.dtype))
    meta = algorithm.init()
    load_meta(meta, saved.state["meta"], "load_run")
    return TrainResult(config, model, algorithm, meta, saved.iteration, saved.state.get("best_val_accuracy"),
                       saved.state.get("best_iteration"), saved.path.parent, stopped="loaded")


def evaluate_run(
    checkpoint: str | Path | Checkpoint | None = None,
    *,
    config: TrainConfig | None = None,
    classes: str = "test",
    num_tasks: int = 600,
    steps: int | None = None,
    batch_size: int = 50,
    seed: int = 0,
    progress: bool = False,
    model: nn.Module | None = None,
) -> EvalResult:
    """The evaluation protocol on a checkpoint's (or a config's) data: tasks from held-out classes.

    Args:
        checkpoint: a checkpoint or run directory (its ``best.pt``, else ``last.pt``),
            or a :class:`~maml_func.state.Checkpoint` already read; ``None``
            evaluates a fresh initialization from ``config`` (seeded by
            ``config.seed``), the untrained baseline.
        config: the data, task shape and inner loop to evaluate with; defaults to
            the checkpoint's. ``n_way``, ``hidden`` and ``image_size`` must match the checkpoint.
        classes: ``"test"`` (meta-test classes), ``"val"`` or ``"train"``.
        num_tasks, steps, batch_size, seed, progress: as in :func:`maml_func.evaluate.evaluate`;
            ``steps`` defaults to ``config.eval_inner_steps``.
        model: the network, for a run trained with ``fit(model=...)`` (the
            checkpoint holds its weights, not its code); default: the one the
            config names. Moved to the config's device and dtype.

    Returns:
        An :class:`~maml_func.evaluate.EvalResult`.

    Example:
        >>> print(evaluate_run("runs/5w1s").summary())  # doctest: +SKIP
        5-way 1-shot: 97.2% ± 0.5 (600 tasks, 3 steps)
    """
    if checkpoint is None and config is None:
        raise ValueError("evaluate_run: pass a checkpoint, a config (for an untrained baseline), or both")
    checks.choice("evaluate_run", "classes", classes, ("train", "val", "test"), expect="'train', 'val' or 'test'")
    # Checked here too, not only in evaluate(): a bad value must fail before the data is read and cached.
    for name, value, minimum in (("num_tasks", num_tasks, 1), ("batch_size", batch_size, 1), ("seed", seed, 0),
                                 ("steps", 0 if steps is None else steps, 0)):
        checks.integer("evaluate_run", name, value, minimum=minimum)
    saved = _read(checkpoint, "evaluate_run") if checkpoint is not None else None
    if config is None:
        assert saved is not None
        config = TrainConfig.from_dict(saved.config, origin=f"evaluate_run({str(saved.path)!r})")
    config.check_paths()
    check_buildable(config, model, "evaluate_run")  # before any data is read
    device, dtype = resolve_device(config.device), getattr(torch, config.dtype)
    with removed_on_failure(config.data_root):  # a refused evaluation leaves no cache or download behind
        splits = load_splits(config)
        sampler = task_sampler(config, splits, classes, device, "evaluate_run")
    with rng_scope(device):
        torch.manual_seed(config.seed)
        model, algorithm = build_algorithm(config, in_channels=int(splits[classes].images.shape[2]), model=model)
        model.to(device=device, dtype=dtype)
        check_outputs(model, sampler, config, dtype, "evaluate_run")
        meta = algorithm.init()
    if saved is not None:
        load_meta(meta, saved.state["meta"], "evaluate_run")
    return evaluate(algorithm, meta, sampler, num_tasks=num_tasks,
                    steps=config.eval_inner_steps if steps is None else steps, batch_size=batch_size, seed=seed,
                    progress=progress)
