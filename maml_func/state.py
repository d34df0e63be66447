"""The complete state of a meta-training run, and its checkpoint.

Exact resume means: the state is complete. :class:`TrainState` holds every
thing the trajectory depends on (the meta-parameters, the optimizer's state,
the generator that draws training tasks, the iteration, the best validation
so far) and :meth:`TrainState.to_checkpoint` / :meth:`TrainState.load` are the
only code that writes or reads it, together with the global torch RNG. Nothing
else feeds the trajectory: validation draws its tasks from its own generator,
re-seeded at every validation, and wall time only decides *when* a run stops.
So a run interrupted at any iteration and resumed reaches the same
meta-parameters, bit for bit on the CPU, as one that never stopped.

Under ``torch.distributed`` the checkpoint holds every rank's generator state
(gathered by a collective), so a distributed run resumes exactly too, with the
same number of ranks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from maml_func.checkpoint import load_checkpoint
from maml_func.core import MetaParams
from maml_func.distributed import World, gather_objects, rank_seed
from maml_func.execution import ExecutionPolicy
from maml_func.rundir import checkpoint_path

__all__ = ["CHECKPOINT_FORMAT", "Checkpoint", "TrainState", "check_resume"]

CHECKPOINT_FORMAT = "maml_func.checkpoint/1"

# Every entry fit writes into a training checkpoint, and its type: checked once, when a checkpoint is read.
_ENTRIES: dict[str, type | tuple[type, ...]] = {
    "config": dict, "iteration": int, "meta": dict, "optimizer": dict, "cpu_rng": Tensor, "train_generator": Tensor,
    "train_generator_device": str, "best_val_accuracy": (float, int, type(None)), "best_iteration": (int, type(None)),
}


@dataclass(frozen=True)
class Checkpoint:
    """A training checkpoint read from disk once: its path and its contents.

    Attributes:
        path: the ``.pt`` file.
        state: the dict :meth:`TrainState.to_checkpoint` wrote.
    """

    path: Path
    state: dict[str, Any]

    @classmethod
    def read(cls, path: str | Path, *, prefer_best: bool = False, origin: str = "Checkpoint.read") -> Checkpoint:
        """Read the checkpoint ``path`` names (a file, or a run directory's ``last.pt`` / ``best.pt``).

        Raises:
            FileNotFoundError: nothing at ``path``.
            ValueError: not a readable maml_func training checkpoint (``origin`` names the caller).
        """
        file = checkpoint_path(path, prefer_best=prefer_best)
        state = load_checkpoint(file)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{origin}: {str(file)!r} is not a maml_func training checkpoint")
        problem = _damage(state)
        if problem is not None:
            raise ValueError(f"{origin}: {str(file)!r} is a damaged training checkpoint: {problem}; use the run's "
                             "other checkpoint (last.pt / best.pt) or start again")
        return cls(file, state)

    @property
    def config(self) -> dict[str, Any]:
        """The config of the run that wrote it, as a dict."""
        return dict(self.state.get("config", {}))

    @property
    def iteration(self) -> int:
        return int(self.state["iteration"])


def _damage(state: dict[str, Any]) -> str | None:
    """What is missing or of the wrong type in a training checkpoint's entries, or ``None``."""
    for name, kind in _ENTRIES.items():
        if name not in state:
            return f"it has no {name!r} entry"
        if not isinstance(state[name], kind) or isinstance(state[name], bool):
            return f"its {name!r} entry is a {type(state[name]).__name__}"
    groups = state["meta"].values()
    if not all(isinstance(g, dict) and all(isinstance(v, Tensor) for v in g.values()) for g in groups):
        return "its 'meta' entry is not a dict of tensor dicts"
    return None


def copy_meta(meta: MetaParams) -> dict[str, dict[str, Tensor]]:
    """Detached copies of every meta-parameter (what a checkpoint stores)."""
    return {group: {k: v.detach().clone() for k, v in params.items()} for group, params in meta.items()}


def load_meta(meta: MetaParams, saved: dict[str, dict[str, Tensor]], origin: str) -> None:
    """Copy saved meta-parameters into ``meta`` in place, checking names and shapes."""
    for group, params in meta.items():
        saved_group = saved.get(group, {})
        if saved_group.keys() != params.keys():
            raise ValueError(f"{origin}: the checkpoint's {group!r} parameters {sorted(saved_group)[:4]}... do not "
                             f"match the model's {sorted(params)[:4]}...; was it written by another model or version?")
        with torch.no_grad():
            for k, p in params.items():
                if saved_group[k].shape != p.shape:
                    raise ValueError(f"{origin}: parameter {group}.{k} has shape {tuple(saved_group[k].shape)} in the "
                                     f"checkpoint but {tuple(p.shape)} in the model (n_way, hidden, image_size?)")
                p.copy_(saved_group[k])


def check_resume(config: Any, checkpoint: Checkpoint, world: World) -> None:
    """Refuse to resume ``checkpoint`` with a config or world that would change the trajectory.

    Only the fields of :data:`maml_func.config.RESUMABLE_FIELDS` may differ.
    """
    from maml_func.config import RESUMABLE_FIELDS

    saved, iteration = checkpoint.config, checkpoint.iteration
    changed = []
    for name, value in config.to_dict().items():
        if name in RESUMABLE_FIELDS or name not in saved:
            continue
        if name == "channels" and (value is None or saved[name] is None):
            continue
        if saved[name] != value:
            changed.append(f"{name}={value!r} (checkpoint: {saved[name]!r})")
    if changed:
        raise ValueError(f"fit: cannot resume with a changed {', '.join(changed)}: a resumed run continues the same "
                         f"trajectory; only {', '.join(sorted(RESUMABLE_FIELDS))} may change")
    if config.lr_schedule != "constant" and saved.get("iterations") != config.iterations:
        raise ValueError(f"fit: cannot resume a {config.lr_schedule} lr_schedule with iterations={config.iterations} "
                         f"(checkpoint: {saved.get('iterations')!r}): the schedule is laid over the iterations; "
                         "keep them, or use lr_schedule='constant'")
    if config.iterations < iteration:
        raise ValueError(f"fit: iterations={config.iterations} but the checkpoint is already at iteration "
                         f"{iteration}; pass iterations >= {iteration}")
    ranks = checkpoint.state.get("world_size", 1)
    if ranks != world.size:
        raise ValueError(f"fit: {str(checkpoint.path)!r} was written by a run on {ranks} rank(s), this one has "
                         f"{world.size}; resume with the same number of ranks (each rank's task stream is in the "
                         "checkpoint)")


@dataclass
class TrainState:
    """Everything a meta-training trajectory depends on, beyond the config.

    Attributes:
        meta: the meta-parameters (leaves with ``requires_grad``).
        optimizer: the outer optimizer over ``algorithm.parameters(meta)``.
        generator: draws this rank's training tasks.
        iteration: meta-updates applied so far.
        best_val_accuracy, best_iteration: best validation so far (``None`` before any).
        world: this process's rank among the ranks.
        execution: how the tasks of each meta-iteration run, and its search
            (:class:`~maml_func.execution.ExecutionPolicy`); ``None``: as the
            algorithm is set up.
    """

    meta: MetaParams
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    iteration: int = 0
    best_val_accuracy: float | None = None
    best_iteration: int | None = None
    world: World = field(default_factory=World)
    execution: ExecutionPolicy | None = None

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def to_checkpoint(self, config: Any) -> dict[str, Any]:
        """The checkpoint of this moment; a collective under ``torch.distributed`` (call it on every rank)."""
        from maml_func import __version__

        me, device = self.world, self.device
        generators = gather_objects(self.generator.get_state()) if me.size > 1 else [self.generator.get_state()]
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "config": config.to_dict(),
            "iteration": self.iteration,
            "meta": copy_meta(self.meta),
            "optimizer": self.optimizer.state_dict(),
            "train_generator": generators[0],
            "train_generators": generators,
            "world_size": me.size,
            "train_generator_device": device.type,
            "cpu_rng": torch.get_rng_state(),
            "best_val_accuracy": self.best_val_accuracy,
            "best_iteration": self.best_iteration,
            "execution": None if self.execution is None else self.execution.state_dict(),
        }
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        return state

    def load(self, checkpoint: Checkpoint, seed: int) -> None:
        """Continue from ``checkpoint``: meta-parameters, optimizer, iteration, best, and every RNG.

        ``seed`` (the config's) re-seeds the task stream when the checkpoint's
        generator ran on another device type, whose state cannot move here.
        """
        state, me, device = checkpoint.state, self.world, self.device
        load_meta(self.meta, state["meta"], "fit")
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = state["iteration"]
        self.best_val_accuracy, self.best_iteration = state["best_val_accuracy"], state["best_iteration"]
        if self.execution is not None and isinstance(state.get("execution"), dict):
            self.execution.load_state_dict(state["execution"])
        torch.set_rng_state(state["cpu_rng"])
        if state["train_generator_device"] == device.type:
            self.generator.set_state(state["train_generators"][me.rank] if "train_generators" in state
                                     else state["train_generator"])
            if device.type == "cuda" and "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"], device)
        else:
            warnings.warn(f"fit: the checkpoint's task generator ran on {state['train_generator_device']!r}, this run "
                          f"on {device.type!r}; its state cannot move across device types, so the tasks from "
                          f"iteration {self.iteration} on are drawn from a new seed (the resumed run is not bitwise "
                          "the same)", stacklevel=3)
            self.generator.manual_seed(rank_seed(seed + 7_919 * self.iteration, me.rank))
