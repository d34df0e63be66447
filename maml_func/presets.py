"""Named settings of :class:`~maml_func.config.TrainConfig`, applied over its defaults, and the figures they target.

The four Omniglot presets follow Finn et al. 2017 (§5.2 and the authors' code):
28×28 images, the 1200/423 character split, every class rotated by a multiple
of 90°, Adam at 1e-3, 60 000 iterations; 5-way: meta-batch 32, one inner SGD
step of 0.4 at training and three at test; 20-way: meta-batch 16, five steps
of 0.1 at training and test. The authors' code draws as many query images per
class as support images (``n_query = k_shot``).

The two miniImageNet presets are the paper's second benchmark (§5.2): 84×84
RGB images, the Conv4 with 32 filters and 2×2 max-pooling, five inner steps of
0.01 at training and ten at test, 15 query images per class, meta-batch 4
(1-shot) or 2 (5-shot), Adam at 1e-3, 60 000 iterations. The other benchmarks
take the setting of a paper that reports MAML on them:

* ``tieredimagenet-5w1s``: Liu et al. 2019 (TPN) re-ran MAML on
  tieredImageNet with the miniImageNet protocol above.
* ``cifarfs-5w1s``: Bertinetto et al. 2019 (R2-D2) ran MAML with the
  authors' Conv4-32 protocol on CIFAR-FS's 32×32 images.
* ``fc100-5w1s``: Sun et al. 2019 (MTL) report MAML with a Conv4 on
  FC100; the same protocol at 32×32.
* ``cub-5w1s``: Chen et al. 2019 ("A Closer Look", Conv-4 backbone) trained MAML on
  CUB with their Conv4 (64 filters, max-pooling, 84×84), four tasks per
  meta-batch, five inner steps of 0.01 at training and test, 16 query images,
  60 000 episodes, Adam at 1e-3 and data augmentation (theirs also jitters
  colours and crops at random scales; ``augment`` here crops with padding and
  flips).

:data:`PUBLISHED` holds the figure each preset targets (5-way accuracy of
MAML, mean ± 95% interval over the paper's test tasks) and where it is
published. They live in one table so that they can be tuned in one place.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "PUBLISHED"]

_OMNIGLOT_PAPER: dict[str, Any] = {
    "dataset": "omniglot",
    "split": "maml",
    "image_size": 28,
    "rotations": True,
    "meta_lr": 1e-3,
    "iterations": 60_000,
}

# Finn et al. 2017's miniImageNet protocol: Conv4-32 with max-pooling on 84x84 RGB, 5 steps of 0.01 (10 at test).
_MINIIMAGENET_PAPER: dict[str, Any] = {
    "dataset": "miniimagenet",
    "image_size": 84,
    "channels": 3,
    "model": "conv4",
    "hidden": 32,
    "model_options": {"pool": True},
    "n_way": 5,
    "n_query": 15,
    "inner_steps": 5,
    "eval_inner_steps": 10,
    "inner_lr": 0.01,
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
    "miniimagenet-5w1s": {**_MINIIMAGENET_PAPER, "k_shot": 1, "meta_batch": 4},
    "miniimagenet-5w5s": {**_MINIIMAGENET_PAPER, "k_shot": 5, "meta_batch": 2},
    "tieredimagenet-5w1s": {**_MINIIMAGENET_PAPER, "dataset": "tieredimagenet", "k_shot": 1, "meta_batch": 4},
    "cifarfs-5w1s": {**_MINIIMAGENET_PAPER, "dataset": "cifarfs", "image_size": 32, "k_shot": 1, "meta_batch": 4},
    "fc100-5w1s": {**_MINIIMAGENET_PAPER, "dataset": "fc100", "image_size": 32, "k_shot": 1, "meta_batch": 4},
    "cub-5w1s": {**_MINIIMAGENET_PAPER, "dataset": "cub", "hidden": 64, "k_shot": 1, "n_query": 16, "meta_batch": 4,
                 "eval_inner_steps": 5, "augment": True},
}

#: The published 5-way accuracy (%) of MAML each preset targets, and where it is published.
PUBLISHED: dict[str, tuple[str, str]] = {
    "omniglot-5w1s": ("98.7 ± 0.4", "Finn et al. 2017, Table 1"),
    "omniglot-5w5s": ("99.9 ± 0.1", "Finn et al. 2017, Table 1"),
    "omniglot-20w1s": ("95.8 ± 0.3", "Finn et al. 2017, Table 1"),
    "omniglot-20w5s": ("98.9 ± 0.2", "Finn et al. 2017, Table 1"),
    "miniimagenet-5w1s": ("48.70 ± 1.84", "Finn et al. 2017, Table 2"),
    "miniimagenet-5w5s": ("63.11 ± 0.92", "Finn et al. 2017, Table 2"),
    "tieredimagenet-5w1s": ("51.67 ± 1.81", "Liu et al. 2019 (TPN), Tables 2 and 8"),
    "cifarfs-5w1s": ("58.9 ± 1.9", "Bertinetto et al. 2019 (R2-D2)"),
    "fc100-5w1s": ("38.1 ± 1.7", "Sun et al. 2019 (MTL)"),
    "cub-5w1s": ("54.73 ± 0.97", "Chen et al. 2019 (A Closer Look), Conv-4"),
}
