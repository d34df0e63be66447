"""maml_func: Model-Agnostic Meta-Learning in the functional style of ``torch.func``.

A model is an ordinary ``nn.Module`` used as a template; its weights travel as
plain dicts through ``torch.func.functional_call``; the inner loop is a
``torch.func.grad`` update and ``torch.func.vmap`` adapts a whole meta-batch of
tasks in one vectorized pass.
"""

from maml_func.algorithms import ALGORITHMS, MAML, build
from maml_func.core import MetaParams, Params, accuracy, combine, forward, params_and_buffers, partition
from maml_func.inner import InnerRule, adapt, adapt_trajectory, sgd
from maml_func.models import MLP, Conv4, TaskBatchNorm
from maml_func.sinusoid import sample_sinusoid_tasks
from maml_func.tasks import TaskBatch

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "MAML",
    "MLP",
    "Conv4",
    "InnerRule",
    "MetaParams",
    "Params",
    "TaskBatch",
    "TaskBatchNorm",
    "__version__",
    "accuracy",
    "adapt",
    "adapt_trajectory",
    "build",
    "combine",
    "forward",
    "params_and_buffers",
    "partition",
    "sample_sinusoid_tasks",
    "sgd",
]
