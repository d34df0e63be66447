"""Named settings of :class:`~maml_func.config.TrainConfig`, applied over its defaults.

The four Omniglot presets follow Finn et al. 2017 (§5.2 and the authors' code):
28×28 images, the 1200/423 character split, every class rotated by a multiple
of 90°, Adam at 1e-3, 60 000 iterations; 5-way: meta-batch 32, one inner SGD
step of 0.4 at training and three at test; 20-way: meta-batch 16, five steps
of 0.1 at training and test. The authors' code draws as many query images per
class as support images (``n_query = k_shot``). They live in one table so that
they can be tuned in one place.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

_OMNIGLOT_PAPER: dict[str, Any] = {
    "dataset": "omniglot",
    "split": "maml",
    "image_size": 28,
    "rotations": True,
    "meta_lr": 1e-3,
    "iterations": 60_000,
}

#: Named settings, applied over the defaults and under config files and flags.
PRESETS: dict[str, dict[str, Any]] = {
    "omniglot-5w1s": {**_OMNIGLOT_PAPER, "n_way": 5, "k_shot": 1, "n_query": 1, "meta_batch": 32,
                      "inner_steps": 1, "eval_inner_steps": 3, "inner_lr": 0.4},
    "omniglot-5w5s": {**_OMNIGLOT_PAPER, "n_way": 5, "k_shot": 5, "n_query": 5, "meta_batch": 32,
                      "inner_steps": 1, "eval_inner_steps": 3, "inner_lr": 0.4},
    "omniglot-20w1s": {**_OMNIGLOT_PAPER, "n_way": 20, "k_shot": 1, "n_query": 1, "meta_batch": 16,
                       "inner_steps": 5, "eval_inner_steps": 5, "inner_lr": 0.1},
    "omniglot-20w5s": {**_OMNIGLOT_PAPER, "n_way": 20, "k_shot": 5, "n_query": 5, "meta_batch": 16,
                       "inner_steps": 5, "eval_inner_steps": 5, "inner_lr": 0.1},
}
