"""Meta-training: :func:`fit` runs a :class:`~maml_func.config.TrainConfig` end to end.

One run: check everything that can be checked before anything is loaded or
written (the config's paths, the network, the ranks, the checkpoint to resume,
the run directory), load the class splits once onto the device, build the
network (or take the one given as ``model=``) and the algorithm
(:mod:`maml_func.components`), check the network's output size on one support
set, make the :class:`~maml_func.state.TrainState` (or load it from a
checkpoint), then hand the run to the loop (:func:`maml_func.loop.loop`). The
run directory (:class:`~maml_func.rundir.RunDirectory`) receives ``last.pt``,
``best.pt``, ``metrics.jsonl``, ``learning_curve.png`` and ``config.json``;
the callbacks given to :func:`fit` (:class:`~maml_func.callbacks.Callback`)
see each record and checkpoint as it is written.

Under ``torch.distributed`` only rank 0 writes files, and holds the run
directory's lock from the start to the end of :func:`fit`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from maml_func import components
from maml_func.atomic import WriteError, removed_on_failure
from maml_func.callbacks import Callback, check_callbacks
from maml_func.checkpoint import LAST, Checkpoint, check_resume
from maml_func.config import TrainConfig, object_model_name
from maml_func.device import configure_device
from maml_func.distributed import World, agree, init_distributed, rank_seed
from maml_func.execution import ExecutionPolicy, default_cache_dir
from maml_func.loop import Run, Step, loop
from maml_func.rundir import RunDirectory, check_run_directory, claimed, read_history
from maml_func.runs import TrainResult
from maml_func.state import TrainState
from maml_func.step import train_step

__all__ = ["fit"]


@contextlib.contextmanager
def _owned(config: TrainConfig, saved: Checkpoint | None, me: World) -> Iterator[None]:
    """The run directory, checked and claimed by the rank that writes it (see :func:`claimed`) for the block.

    Every rank learns whether rank 0 refused it, so all stop together.
    """
    with contextlib.ExitStack() as stack:
        refusal: ValueError | None = None
        if me.is_main:
            try:
                check_run_directory(config.save_to, saved, "fit")
                run_dir = Path(config.save_to).expanduser() if config.save_to is not None else None
                stack.enter_context(claimed(run_dir, "fit"))
            except ValueError as err:
                refusal = err
        if agree([int(refusal is not None)])[0]:
            raise refusal or ValueError(f"fit: rank 0 refused the run directory {config.save_to!r}; its error says why")
        yield


def fit(
    config: TrainConfig,
    *,
    model: torch.nn.Module | None = None,
    callbacks: Sequence[Callback] = (),
    resume: str | Path | Checkpoint | None = None,
    progress: bool = True,
    step: Step = train_step,
) -> TrainResult:
    """Meta-train as ``config`` says; write checkpoints and metrics to ``config.save_to``.

    Args:
        config: the run (see :class:`~maml_func.config.TrainConfig`, :func:`~maml_func.config.make_config`).
        model: your network, meta-trained instead of the one ``config.model``
            names (the config gives everything else: algorithm, inner_lr, ...).
            It must give ``n_way`` logits per image. What runs is ``model``
            itself, or its copy with normalization layers in exact form where
            it has some (:func:`~maml_func.normalization.exact_model`); that
            network moves to the run's device and dtype like a built one and
            is ``result.model``. The run's config records its
            class, not its code: load the run back with ``load_run(RUN,
            model=...)`` / ``evaluate_run(RUN, model=...)``, and resume it
            with the same ``model=``.
        callbacks: :class:`~maml_func.callbacks.Callback` objects, called at
            each line of metrics, validation and checkpoint with the records of
            ``metrics.jsonl``.
        resume: a run directory or checkpoint (or a :class:`~maml_func.checkpoint.Checkpoint`
            already read) to continue exactly. ``config`` must equal the
            checkpoint's config except for the fields in
            ``maml_func.config.RESUMABLE_FIELDS`` (e.g. a larger ``iterations``).
        progress: show a tqdm bar (loss, accuracy, tasks/s).
        step: makes one meta-update: :func:`~maml_func.step.train_step`, or a
            function that wraps it (to observe, time or change a step), called
            as ``train_step`` is and returning its metrics.

    Returns:
        A :class:`~maml_func.runs.TrainResult` (``stopped="time_limit"`` when ``max_minutes`` ran out).

    Raises:
        ValueError, FileNotFoundError: bad config, data, run directory or
            checkpoint; raised before anything is written.
        RunDirectoryLocked: (a ``ValueError``) another run is writing to
            ``save_to``; nothing of it is touched. The run directory is this
            run's from its first moment to its end.
        NonFiniteLossError, MetaStepOutOfMemory, MetaStepFailed: a
            meta-iteration failed (NaN/inf, out of memory, another error); its
            update is not applied.
        RunWriteError: a checkpoint could not be written (a full disk); the
            previous one is intact. A metrics line or the plot that cannot be
            written is only warned about.
        TrainingInterrupted: on SIGINT/SIGTERM, after saving ``last.pt``.

    A run that stops with an error keeps ``save_to`` if it holds a
    ``last.pt`` to resume from, and otherwise leaves nothing there; the
    error's message says which.

    Example:
        >>> from maml_func.config import make_config
        >>> result = fit(make_config(preset="omniglot-5w1s", iterations=2000, save_to="runs/5w1s"))  # doctest: +SKIP
        >>> result.best_val_accuracy  # doctest: +SKIP
        0.95
        >>> import torchvision  # doctest: +SKIP
        >>> fit(make_config(dataset="path/to/folders", channels=3, image_size=32),  # doctest: +SKIP
        ...     model=torchvision.models.resnet18(num_classes=5))
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"fit: config must be a TrainConfig (see make_config), got {type(config).__name__}")
    callbacks = check_callbacks(callbacks, "fit")
    if model is not None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"fit: model must be an nn.Module, got {type(model).__name__}; pass the network object "
                            "(or leave it out and name one in config.model)")
        # The checkpoint records the class: a Python object cannot be rebuilt from a config.
        config = config.replace(model=object_model_name(model), model_options={})
    if not callable(step):
        raise TypeError(f"fit: step must be a function like maml_func.step.train_step, got {type(step).__name__}")
    config.check_paths()
    components.check_buildable(config, model, "fit")
    me = init_distributed() if config.distributed else World()
    if config.meta_batch % me.size:
        raise ValueError(f"fit: meta_batch={config.meta_batch} does not split evenly over {me.size} ranks; "
                         f"choose a multiple of {me.size} (each rank adapts meta_batch / ranks tasks)")
    if config.val_tasks < me.size:
        raise ValueError(f"fit: val_tasks={config.val_tasks} is fewer than the {me.size} ranks")
    device = components.resolve_device(config.device, me)
    configure_device(device)
    saved = None
    if resume is not None:
        saved = resume if isinstance(resume, Checkpoint) else Checkpoint.read(resume, origin="fit")
        check_resume(config, saved, me)
    with _owned(config, saved, me):
        return _train(config, saved, me, device, progress, model, callbacks, step)


def _train(config: TrainConfig, saved: Checkpoint | None, me: World, device: torch.device, progress: bool,
           model: torch.nn.Module | None, callbacks: tuple[Callback, ...], step: Step) -> TrainResult:
    """:func:`fit` once its arguments and run directory are settled: load, build, loop."""
    run_dir = Path(config.save_to).expanduser() if config.save_to is not None else None
    with removed_on_failure(config.data_root):  # a refused run leaves no cache or download behind
        splits = components.load_splits(config)
        sampler, val_sampler = (components.task_sampler(config, splits, name, device, "fit")
                                for name in ("train", "val"))
    if config.channels is None:
        config = config.replace(channels=int(splits["train"].images.shape[2]))
    dtype = getattr(torch, config.dtype)
    with components.rng_scope(device):
        torch.manual_seed(config.seed)
        model, algorithm = components.build_algorithm(config, model=model)
        model.to(device=device, dtype=dtype)
        components.check_outputs(model, sampler, config, dtype, "fit")
        meta = algorithm.init()
        # capturable on CUDA: Adam's step counts live on the device, so the finiteness guard never reads them back.
        optimizer = torch.optim.Adam(algorithm.parameters(meta), lr=config.meta_lr,
                                     capturable=device.type == "cuda")
        # Across ranks each would time alone and might choose another way: they run one vmap (chunk_size) instead.
        mode = "vmap" if config.execution == "auto" and me.size > 1 else config.execution
        policy = ExecutionPolicy(mode, chunk_size=config.chunk_size, max_memory_mb=config.max_memory_mb,
                                 cache_dir=default_cache_dir(), tasks_per_backward=config.tasks_per_backward)
        state = TrainState(meta, optimizer,
                           torch.Generator(device=device).manual_seed(rank_seed(config.seed, me.rank)), world=me,
                           execution=policy)
        if saved is not None:
            state.load(saved, config.seed)
        # Resuming from the run directory's own last.pt: it already holds the starting state.
        in_place = saved is not None and run_dir is not None and saved.path.resolve() == (run_dir / LAST).resolve()
        files = RunDirectory(run_dir if me.is_main else None, title=_run_title(config))
        run = Run(config, model, algorithm, sampler, val_sampler, files, me, dtype,
                  state.iteration if in_place else None, callbacks, step)
        run.start()
        try:
            files.open(config.to_dict(), read_history(saved.path.parent, saved.iteration) if saved else [])
            return loop(run, state, progress)
        except WriteError as err:
            raise run.write_failed(err) from None
        finally:
            files.close()


def _run_title(config: TrainConfig) -> str:
    return f"{config.algorithm} · {config.dataset_name} · {config.n_way}-way {config.k_shot}-shot"
