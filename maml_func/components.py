"""The components of a run, made from its :class:`~maml_func.config.TrainConfig`.

The device (:func:`resolve_device`), the class splits (:func:`load_splits`)
and a split's task sampler (:func:`task_sampler`), the network
(:func:`build_network`: a shipped one, or a factory named by import path) and
the algorithm (:func:`build_algorithm`), and the checks that they fit together
before anything is trained (:func:`check_buildable`, :func:`check_outputs`).
:func:`maml_func.train.fit`, :func:`maml_func.runs.load_run` and
:func:`maml_func.runs.evaluate_run` make their runs from these.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from maml_func import checks
from maml_func.algorithms import build
from maml_func.algorithms.base import Algorithm
from maml_func.config import ALGORITHM_FIELDS, MODEL_FIELDS, TrainConfig, is_object_model
from maml_func.data import DATASETS, load_dataset
from maml_func.distributed import World
from maml_func.fields import default
from maml_func.models import MODELS, build_model
from maml_func.options import import_object
from maml_func.tasks import EpisodeSampler

__all__ = ["SPLITS", "build_algorithm", "build_network", "check_buildable", "check_outputs", "load_splits",
           "resolve_device", "rng_scope", "task_sampler"]

#: The class splits of a dataset, each with what its tasks are for.
SPLITS = {"train": "meta-training", "val": "validation", "test": "meta-test"}


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
        sized = {argument: getattr(config, name) for argument, name in MODEL_FIELDS.items()}
        sized["in_channels"] = in_channels if in_channels is not None else (config.channels or 1)
        return build_model(config.model, **sized, **config.model_options)
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
                    model: nn.Module | None = None) -> tuple[nn.Module, Algorithm]:
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
    # The options the config's own fields set; one at the field's default is also the algorithms' default, and is
    # left out (not every algorithm takes first_order or backprop). inner_lr and inner_steps: every algorithm's.
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    options: dict[str, Any] = {name: getattr(config, name) for name in ALGORITHM_FIELDS
                               if name in ("inner_lr", "inner_steps") or getattr(config, name) != default(fields[name])}
    options.update(config.algorithm_options)
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
        raise ValueError(f"{where}: the {SPLITS[split]} split ({split!r}) of {config.dataset!r} cannot give "
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
