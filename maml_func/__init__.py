"""maml_func: Model-Agnostic Meta-Learning in the functional style of ``torch.func``.

A model is an ordinary ``nn.Module`` used as a template; its weights travel as
plain dicts through ``torch.func.functional_call``; the inner loop is a
``torch.func.grad`` update and ``torch.func.vmap`` adapts a whole meta-batch of
tasks in one vectorized pass.
"""

from maml_func._version import __version__
from maml_func.algorithms import (
    ALGORITHMS,
    IMAML,
    MAML,
    Algorithm,
    MetaLearner,
    ProtoMAML,
    Reptile,
    build,
    multi_step_weights,
)
from maml_func.batching import LOOP, VMAP, Way, map_tasks
from maml_func.callbacks import Callback
from maml_func.checkpoint import Checkpoint
from maml_func.config import TrainConfig, make_config
from maml_func.core import MetaParams, Params, accuracy, apply_model, combine, forward, params_and_buffers, partition
from maml_func.data import ImageClasses, load_dataset
from maml_func.diagnosis import UnsupportedModelError
from maml_func.evaluate import EvalResult, evaluate
from maml_func.inner import InnerRule, adapt, adapt_trajectory, lslr, meta_sgd, sgd
from maml_func.models import MLP, Conv4, ResNet12
from maml_func.normalization import BATCH_NORM_POLICIES, TaskBatchNorm, exact_model
from maml_func.runs import TrainResult, evaluate_run, load_run
from maml_func.sinusoid import sample_sinusoid_tasks
from maml_func.state import TrainState
from maml_func.step import meta_gradient, train_step
from maml_func.tasks import EpisodeSampler, TaskBatch
from maml_func.train import fit

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "IMAML",
    "LOOP",
    "MetaLearner",
    "ProtoMAML",
    "VMAP",
    "Way",
    "Callback",
    "BATCH_NORM_POLICIES",
    "Checkpoint",
    "MAML",
    "MLP",
    "Conv4",
    "ResNet12",
    "EpisodeSampler",
    "EvalResult",
    "ImageClasses",
    "InnerRule",
    "MetaParams",
    "Params",
    "Reptile",
    "TaskBatch",
    "TaskBatchNorm",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "UnsupportedModelError",
    "__version__",
    "accuracy",
    "adapt",
    "adapt_trajectory",
    "apply_model",
    "build",
    "combine",
    "evaluate",
    "evaluate_run",
    "exact_model",
    "fit",
    "forward",
    "load_dataset",
    "load_run",
    "lslr",
    "make_config",
    "map_tasks",
    "meta_gradient",
    "meta_sgd",
    "multi_step_weights",
    "params_and_buffers",
    "partition",
    "sample_sinusoid_tasks",
    "sgd",
    "train_step",
]
