"""What every algorithm of the family is (:class:`Algorithm`), and what they share (:class:`MetaLearner`).

:class:`Algorithm` is the interface as a type (in the manner of optax's
``GradientTransformation`` protocol): what training, evaluation and the CLI
rely on, and nothing else. :class:`MetaLearner` is the one implementation of
what the algorithms share: the options every one of them has (declared here
once, with their checks and docs), the meta-parameters, the inner loop's
``trajectory`` and ``adapt``, and the batching of the per-task function over a
meta-batch (``meta_loss``, ``scores``), run the :class:`~maml_func.batching.Way`
the caller gives. An algorithm subclasses it and states only what is new: its
own options, :meth:`MetaLearner._path` (the inner loop of one task) and
:meth:`MetaLearner.task_metrics` (one task's meta-objective), from the pieces
of :mod:`maml_func.algorithms.pieces`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

from torch import Tensor, nn

from maml_func import checks
from maml_func.algorithms.pieces import LOSSES, Metrics, init_meta, meta_buffers, meta_parameters, resolve_rule, score
from maml_func.batching import TaskFn, Way, map_tasks, stack_metrics
from maml_func.core import MetaParams, Params
from maml_func.inner import InnerRule
from maml_func.normalization import BATCH_NORM_POLICIES, at_step, exact_model, running_statistics, stack_per_step
from maml_func.tasks import TaskBatch

__all__ = ["Algorithm", "MetaLearner"]


@runtime_checkable
class Algorithm(Protocol):
    """The interface of every meta-learning algorithm (:class:`~maml_func.MAML`, :class:`~maml_func.Reptile`, ...).

    Meta-parameters are ``{"model": Params, "rule": Params, "buffers": Params}``;
    one task is ``x_support [S, ...]``, ``y_support [S]``; a meta-batch is a
    :class:`~maml_func.tasks.TaskBatch` of T tasks, run the
    :class:`~maml_func.batching.Way` given (``None``: ``Way()``).

    Example:
        >>> from maml_func import MLP, build
        >>> isinstance(build("reptile", MLP(), loss="mse"), Algorithm)
        True
    """

    @property
    def model(self) -> nn.Module:
        """The template network; never mutated."""

    @property
    def inner_steps(self) -> int:
        """Inner updates at meta-training time (the default of ``steps`` below)."""

    @property
    def loss(self) -> str:
        """The per-task objective, one of :data:`~maml_func.algorithms.pieces.LOSSES`."""

    def init(self) -> MetaParams:
        """Fresh meta-parameters, every learned leaf with ``requires_grad``."""

    def parameters(self, meta: MetaParams) -> list[Tensor]:
        """Every meta-learned tensor of ``meta``, for an optimizer."""

    def meta_loss(self, meta: MetaParams, batch: TaskBatch, iteration: int = 0, *,
                  way: Way | None = None) -> tuple[Tensor, Metrics]:
        """``(loss [], per-task metrics [T])``; ``loss.backward()`` gives the meta-gradient."""

    def scores(self, meta: MetaParams, batch: TaskBatch, steps: int | None = None, *,
               way: Way | None = None) -> Metrics:
        """Query metrics after each of 0..``steps`` inner updates, ``[T, steps + 1]`` (what the evaluation protocol
        of :func:`maml_func.evaluate.evaluate` averages)."""

    #: ``adapt(meta, x_support, y_support, steps=None) -> Params``: params adapted to one task's support set
    #: (written once, by :class:`MetaLearner`).
    adapt: Callable[..., Params]
    #: ``trajectory(meta, x_support, y_support, steps=None) -> list[Params]``: params after each of
    #: 0..``steps`` inner updates on one task's support set.
    trajectory: Callable[..., list[Params]]


@dataclass(frozen=True, eq=False)
class MetaLearner:
    """The options every algorithm of the family has, and what they share; subclassed by each algorithm.

    Args:
        model: the template network (e.g. :class:`~maml_func.Conv4`); never
            mutated. Its normalization layers run in their exact form
            (:func:`~maml_func.normalization.exact_model`, visible as
            ``algorithm.model``).
        inner_lr: inner step size. Without ``rule``, the step size of
            :func:`~maml_func.sgd` (default: the algorithm's
            ``default_inner_lr``); with a ``rule``, read from it
            (``rule.lr``), so leave it out or give the same value.
        inner_steps: inner updates at meta-training time (evaluation may use more).
        rule: the inner update (:class:`~maml_func.inner.InnerRule`); defaults
            to ``sgd(inner_lr)``.
        loss: ``"cross_entropy"`` (classification, reports accuracy) or ``"mse"``.
        batch_norm: how BatchNorm layers normalize, one of
            :data:`~maml_func.normalization.BATCH_NORM_POLICIES`: ``"batch"``
            (default; batch statistics at meta-train and meta-test),
            ``"running"`` (running statistics accumulated from the meta-batch,
            used in eval mode) or ``"per_step"`` (MAML++: a set of running
            statistics per inner step); :mod:`maml_func.normalization` gives
            the rules. An algorithm may allow fewer.

    How the tasks of a meta-batch run (one ``vmap``, chunks, a loop) is not an
    option of the algorithm: ``meta_loss`` and ``scores`` take the
    :class:`~maml_func.batching.Way` (``way=``), which the execution policy
    (:mod:`maml_func.execution`) picks by timing.
    """

    model: nn.Module
    inner_lr: float | None = None
    inner_steps: int = 1
    rule: InnerRule | None = None
    loss: str = "cross_entropy"
    batch_norm: str = "batch"
    _rule: InnerRule = field(init=False, repr=False)
    #: The buffers kept once per inner step (``batch_norm="per_step"``); none otherwise. Found once, at construction.
    _stepped: list[str] = field(init=False, repr=False)

    #: The step size of ``sgd`` when neither ``inner_lr`` nor ``rule`` is given.
    default_inner_lr: ClassVar[float] = 0.4
    #: ``None``: the inner rule's parameters are meta-learned; else why this algorithm cannot learn them.
    fixed_rule_reason: ClassVar[str | None] = None
    #: The per-task metric whose mean over tasks ``meta_loss`` returns.
    objective: ClassVar[str] = "loss"

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"{name}: model must be an nn.Module, got {type(self.model).__name__}")
        checks.integer(name, "inner_steps", self.inner_steps, minimum=0)
        checks.choice(name, "loss", self.loss, LOSSES)
        checks.choice(name, "batch_norm", self.batch_norm, BATCH_NORM_POLICIES)
        object.__setattr__(self, "model", exact_model(self.model, self.batch_norm))
        self._check()
        rule, inner_lr = resolve_rule(name, self.rule, self.inner_lr, self.default_inner_lr)
        if self.fixed_rule_reason is not None:
            learned = rule.init(dict(self.model.named_parameters()), self.inner_steps)
            if learned:
                raise ValueError(f"{name}: the inner rule has meta-learned parameters ({sorted(learned)[:3]}...), "
                                 f"which {self.fixed_rule_reason}; use sgd(lr), or MAML with this rule")
        object.__setattr__(self, "_rule", rule)
        object.__setattr__(self, "inner_lr", inner_lr)
        object.__setattr__(self, "_stepped", running_statistics(self.model) if self.batch_norm == "per_step" else [])

    def _check(self) -> None:
        """The algorithm's own checks, run after the shared ones (``self.model`` is the exact form by then)."""

    # ----------------------------------------------------------------- set-up
    def init(self) -> MetaParams:
        """Fresh meta-parameters: the model's initialization, the rule's own, the model's buffers.

        Returns:
            ``{"model": Params, "rule": Params, "buffers": Params}``, the
            learned leaves with ``requires_grad``; the buffers are state, not
            learned (per inner step with ``batch_norm="per_step"``).
        """
        meta = init_meta(self.model, self._rule.init(self._adapted(dict(self.model.named_parameters())),
                                                     self.inner_steps))
        if self._stepped:
            meta["buffers"] = stack_per_step(meta["buffers"], self._stepped, max(self.inner_steps, 1))
        return meta

    def parameters(self, meta: MetaParams) -> list[Tensor]:
        """Every meta-learned tensor, for an optimizer: ``Adam(algorithm.parameters(meta))``."""
        return meta_parameters(meta)

    def _adapted(self, params: Params) -> Params:
        """The parameters the inner loop changes (all, unless the algorithm says otherwise)."""
        return params

    def _steps(self, steps: int | None) -> int:
        return self.inner_steps if steps is None else checks.integer(type(self).__name__, "steps", steps, minimum=0)

    # -------------------------------------------------------------- one task
    def _path(self, meta: MetaParams, x_support: Tensor, y_support: Tensor, steps: int,
              iteration: int = 0) -> tuple[list[Params], Params]:
        """Full params after 0..``steps`` inner updates on one task, and the buffers after its support forwards."""
        raise NotImplementedError

    def task_metrics(self, meta: MetaParams, x_support: Tensor, y_support: Tensor, x_query: Tensor,
                     y_query: Tensor, iteration: int = 0) -> Metrics:
        """One task's metrics, ``{"loss": [], ...}``: what ``meta_loss`` averages (its :attr:`objective`).

        Shapes: ``x_support [S, ...]``, ``y_support [S]``, ``x_query [Q, ...]``,
        ``y_query [Q]``. ``iteration`` (the meta-training step) drives an
        algorithm's schedules.
        """
        raise NotImplementedError

    def trajectory(
        self, meta: MetaParams, x_support: Tensor, y_support: Tensor, steps: int | None = None
    ) -> list[Params]:
        """Full params after 0..``steps`` inner updates on one task's support set (``steps + 1`` dicts).

        ``x_support: [S, *input_shape]``, ``y_support: [S]``; ``steps`` defaults to ``inner_steps``.
        """
        return self._path(meta, x_support, y_support, self._steps(steps))[0]

    def adapt(self, meta: MetaParams, x_support: Tensor, y_support: Tensor, steps: int | None = None) -> Params:
        """Adapted full params for one task (``steps`` defaults to ``inner_steps``)."""
        return self.trajectory(meta, x_support, y_support, steps)[-1]

    # -------------------------------------------------------------- T tasks
    def _randomness(self) -> str:
        """``vmap``'s randomness for ``meta_loss``: random layers draw per task."""
        return "different"

    def _map(self, fn: TaskFn, meta: MetaParams, batch: TaskBatch, way: Way | None, randomness: str = "different"
             ) -> Metrics:
        return map_tasks(fn, meta, batch, way=way, caller=type(self).__name__, model=self.model,
                         randomness=randomness)

    def meta_loss(self, meta: MetaParams, batch: TaskBatch, iteration: int = 0, *,
                  way: Way | None = None) -> tuple[Tensor, Metrics]:
        """The meta-objective of a meta-batch: the mean over tasks of :meth:`task_metrics`' :attr:`objective`.

        Args:
            meta: meta-parameters from :meth:`init`.
            batch: T tasks.
            iteration: the meta-training step, for algorithms with schedules.
            way: how the tasks run (:class:`~maml_func.batching.Way`); the
                same result any way, up to rounding. ``None``: ``Way()``.

        Returns:
            ``(loss [], metrics)`` with per-task ``metrics["loss"]`` /
            ``["accuracy"]`` of shape ``[T]``. ``loss.backward()`` leaves
            meta-gradients in the ``.grad`` of ``meta``'s tensors.
        """

        def fn(meta: MetaParams, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Metrics:
            return self.task_metrics(meta, xs, ys, xq, yq, iteration)

        metrics = self._map(fn, meta, batch, way, self._randomness())
        return metrics[self.objective].mean(), metrics

    def scores(self, meta: MetaParams, batch: TaskBatch, steps: int | None = None, *,
               way: Way | None = None) -> Metrics:
        """Query loss and accuracy after each of 0..``steps`` inner updates, per task.

        Every point of the path is scored with the meta-buffers (in eval mode
        the running statistics; the support forwards of the path leave them
        alone); with ``batch_norm="per_step"``, the point after ``j`` steps
        with the statistics of the step that made it.

        Returns:
            ``{"loss": [T, steps+1], "accuracy": [T, steps+1]}`` (no accuracy
            for ``loss="mse"``). Wrap in ``torch.no_grad()`` when no
            meta-gradient is wanted (the inner ``grad`` still works there).
        """
        steps = self._steps(steps)

        def fn(meta: MetaParams, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Metrics:
            path, _ = self._path(meta, xs, ys, steps)
            buffers = meta_buffers(meta, self.model)
            return stack_metrics([score(self.model, p, at_step(buffers, self._stepped, max(j - 1, 0)), xq, yq,
                                        self.loss)[0] for j, p in enumerate(path)])

        return self._map(fn, meta, batch, way)
