"""The MAML family of meta-learning algorithms, each over the same functional core.

Every algorithm has the interface of :class:`Algorithm` and is a
:class:`MetaLearner` (:mod:`maml_func.algorithms.base`): the options every
algorithm has, declared once, and the shared ``init``, ``adapt``,
``trajectory``, ``meta_loss`` and ``scores``. An algorithm module states only
what is new, from the pieces of :mod:`maml_func.algorithms.pieces`:
:class:`MAML` its inner loop and query objective (first-order MAML, ANIL,
Meta-SGD and MAML++ are MAML with an option or an inner rule set,
:mod:`maml_func.algorithms.family`); :class:`ProtoMAML` where a task's inner
loop starts; :class:`Reptile` its surrogate, whose gradient is not a query
loss's; :class:`IMAML` its implicit meta-gradient, a linear solve at the inner
solution. :func:`build` makes one by name.

Every algorithm of the MAML family takes ``backprop="adjoint"`` for the exact
second-order meta-gradient with the memory of one inner step
(:mod:`maml_func.algorithms.adjoint`).
"""

from maml_func.algorithms.adjoint import BACKPROPS, adjoint_trajectory
from maml_func.algorithms.base import Algorithm, MetaLearner
from maml_func.algorithms.family import ALGORITHMS, anil, build, fomaml, mamlpp, metasgd, reptile
from maml_func.algorithms.imaml import IMAML, conjugate_gradient
from maml_func.algorithms.maml import MAML, multi_step_weights
from maml_func.algorithms.protomaml import ProtoMAML, prototype_head
from maml_func.algorithms.reptile import Reptile

__all__ = [
    "ALGORITHMS",
    "BACKPROPS",
    "IMAML",
    "MAML",
    "Algorithm",
    "MetaLearner",
    "ProtoMAML",
    "Reptile",
    "adjoint_trajectory",
    "anil",
    "build",
    "conjugate_gradient",
    "fomaml",
    "mamlpp",
    "metasgd",
    "multi_step_weights",
    "prototype_head",
    "reptile",
]
