"""Data-parallel meta-training on ``torch.distributed`` (gloo on CPUs, NCCL on GPUs).

The meta-batch of ``T`` tasks is split across ``W`` ranks: each rank draws its
``T / W`` tasks from its own generator (seeded by :func:`rank_seed`), computes
the meta-gradient of its share with the vectorized path, and the gradients are
averaged with one ``all_reduce``, so every rank takes the same optimizer step
from the same meta-parameters. Because every share is a mean over the same
number of tasks, the average of the shares' gradients *is* the gradient of the
mean over all ``T`` tasks: ``W`` ranks on ``T / W`` tasks each compute the same
update as one process on all ``T`` (``tests/test_distributed.py`` checks this
in float64).

Launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``)::

    torchrun --nproc-per-node 2 -m maml_func train --distributed --preset omniglot-5w1s
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr HOST --master-port 29500 \\
        -m maml_func train --distributed --preset omniglot-5w1s

:func:`maml_func.fit` does the rest when ``config.distributed`` is set: it
calls :func:`init_distributed` unless a process group already exists, and only
rank 0 writes checkpoints, metrics and progress bars. Every collective runs
under the process group's timeout: when a rank crashes or hangs, the others
raise :class:`DistributedError` instead of waiting forever.

Example (the pieces, without :func:`~maml_func.fit`)::

    world = init_distributed(timeout=timedelta(minutes=2))
    generator = torch.Generator().manual_seed(rank_seed(0, world.rank))
    for it in range(iterations):
        batch = sampler.sample(T // world.size, generator)
        loss, _ = maml.meta_loss(meta, batch)
        optimizer.zero_grad(); loss.backward()
        average_gradients(maml.parameters(meta))
        optimizer.step()
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistributedError",
    "World",
    "agree",
    "all_reduce_mean",
    "average_gradients",
    "gather_objects",
    "gather_tasks",
    "init_distributed",
    "rank_seed",
    "shard_sizes",
    "shutdown_distributed",
    "world",
]

#: The process-group timeout when none is given: how long a collective waits for a silent rank.
DEFAULT_TIMEOUT = timedelta(minutes=5)
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective failed: another rank crashed, hung past the timeout, or the network broke."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (``rank 0 of 1`` without a process group)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints progress."""
        return self.rank == 0


def world() -> World:
    """The current :class:`World`; a single process when no process group is initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def init_distributed(backend: str | None = None, *, timeout: timedelta | float | None = None) -> World:
    """Join the process group that ``torchrun`` describes in the environment.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available
            (each rank then uses ``cuda:LOCAL_RANK``), else gloo.
        timeout: how long any collective waits for the other ranks before
            failing (a ``timedelta`` or seconds; default 5 minutes).

    Returns:
        This process's :class:`World`. Does nothing but return it when a
        process group already exists. Call :func:`shutdown_distributed` when
        done (``maml-func train`` does): a process that exits with gloo's
        threads still running can abort.

    Raises:
        DistributedError: when the ``torchrun`` variables are missing or the
            rendezvous fails (naming what to do).
    """
    if dist.is_available() and dist.is_initialized():
        return world()
    if not dist.is_available():
        raise DistributedError("init_distributed: this PyTorch build has no torch.distributed")
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise DistributedError(f"init_distributed: {', '.join(missing)} not set; launch with torchrun, e.g. "
                               "`torchrun --nproc-per-node 2 -m maml_func train --distributed ...`")
    if timeout is None:
        timeout = DEFAULT_TIMEOUT
    elif not isinstance(timeout, timedelta):
        if not timeout > 0:
            raise DistributedError(f"init_distributed: timeout must be > 0 seconds, got {timeout!r}")
        timeout = timedelta(seconds=float(timeout))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend, timeout=timeout)
    except (RuntimeError, ValueError) as err:
        raise DistributedError(f"init_distributed: could not join the process group at "
                               f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
                               f"(rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}): {err}") from err
    return world()


def shutdown_distributed(*, synchronize: bool = True) -> None:
    """Leave the process group: wait for every rank, then destroy the group. No-op without one.

    The barrier keeps a rank from tearing down its connections while another
    is still inside a collective; destroying the group (and collecting what
    still refers to it) stops gloo's threads while Python is fully alive. A
    process that leaves them to interpreter shutdown can abort with
    "terminate called without an active exception" after its work is done.

    Args:
        synchronize: wait for the other ranks first. Pass ``False`` on an
            error path, where they may be gone (the barrier would only wait
            out the timeout).

    Raises:
        DistributedError: when the barrier fails; the group is destroyed anyway.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if synchronize:
            with _collective("waiting for the other ranks to finish"):
                dist.barrier()
    finally:
        dist.destroy_process_group()
        gc.collect()


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s task generator: ``seed`` itself on rank 0, disjoint streams elsewhere."""
    return seed + 1_000_003 * rank


def shard_sizes(total: int, size: int) -> list[int]:
    """``total`` items split over ``size`` ranks as evenly as possible (the first ranks get one more)."""
    return [total // size + (r < total % size) for r in range(size)]


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn any failure of a collective into a :class:`DistributedError` that names the likely cause."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, ValueError) as err:  # DistBackendError is a RuntimeError
        me = world()
        raise DistributedError(
            f"rank {me.rank} of {me.size}: {what} failed; another rank probably crashed or stopped answering "
            f"(a collective waits at most the process group's timeout). Look at the other ranks' output for "
            f"the first error. Cause: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err


def all_reduce_mean(tensors: Sequence[Tensor], *, what: str = "all_reduce") -> None:
    """Replace each tensor by its mean over ranks, in place, with one ``all_reduce`` of a flat buffer.

    The tensors must have the same shapes, dtype and device on every rank.
    """
    if not tensors or world().size == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    with _collective(what):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world().size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def average_gradients(params: Sequence[Tensor]) -> None:
    """Average ``.grad`` over ranks (the meta-gradient of the whole meta-batch). No-op on one process.

    Parameters with ``.grad = None`` take no part; which ones those are is
    structural (same model, same algorithm), hence the same on every rank.
    """
    grads = [p.grad for p in params if p.grad is not None]
    all_reduce_mean(grads, what="averaging the meta-gradients")


def gather_tasks(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-task tensors (first axis = this rank's tasks) concatenated over ranks, in rank order.

    Every rank receives the whole; shares may differ in size by one task.
    """
    me = world()
    if me.size == 1 or not values:
        return values
    keys = sorted(values)
    home = values[keys[0]].device
    device = _comm_device()
    local = [values[k].detach().to(device) for k in keys]
    with _collective("gathering per-task metrics"):
        counts = torch.zeros(me.size, dtype=torch.long, device=device)
        counts[me.rank] = local[0].shape[0]
        dist.all_reduce(counts)
        most = int(counts.max())
        out: dict[str, Tensor] = {}
        for key, t in zip(keys, local):
            padded = t.new_zeros((most, *t.shape[1:]))
            padded[: t.shape[0]] = t
            parts = [torch.empty_like(padded) for _ in range(me.size)]
            dist.all_gather(parts, padded)
            out[key] = torch.cat([p[: int(n)] for p, n in zip(parts, counts)]).to(home)
    return out


def _comm_device() -> torch.device:
    """Where the backend takes its tensors: the rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(flags: Sequence[int]) -> list[int]:
    """The element-wise maximum of small integer flags over ranks (e.g. "stop now"), so all ranks act alike."""
    me = world()
    if me.size == 1:
        return list(flags)
    t = torch.tensor(list(flags), dtype=torch.long, device=_comm_device())
    with _collective("agreeing on when to stop"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    me = world()
    if me.size == 1:
        return [obj]
    out: list[object] = [None] * me.size
    with _collective("gathering the ranks' generator states"):
        dist.all_gather_object(out, obj)
    return out
