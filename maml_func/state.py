"""The complete state of a meta-training run: :class:`TrainState`.

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
from typing import Any

import torch

from maml_func._version import __version__
from maml_func.checkpoint import CHECKPOINT_FORMAT, Checkpoint, copy_meta, load_meta
from maml_func.config import TrainConfig
from maml_func.core import MetaParams
from maml_func.distributed import World, gather_objects, rank_seed
from maml_func.execution import ExecutionPolicy

__all__ = ["TrainState"]


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

    def to_checkpoint(self, config: TrainConfig) -> dict[str, Any]:
        """The checkpoint of this moment; a collective under ``torch.distributed`` (call it on every rank)."""
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
