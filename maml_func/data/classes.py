"""A labelled image set held as one tensor: :class:`ImageClasses`.

Few-shot benchmarks are small (Omniglot at 28×28 is 25 MB as uint8), so a whole
split lives in one padded ``uint8`` tensor, indexed by class then by image; the
episode sampler (:class:`~maml_func.tasks.EpisodeSampler`) gathers tasks from it
on whatever device it sits on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["ImageClasses"]


class ImageClasses(NamedTuple):
    """Images grouped by class, padded to the largest class.

    Attributes:
        images: ``[n_classes, max_per_class, C, H, W]`` uint8; slot ``j`` of class
            ``i`` holds an image only for ``j < counts[i]``, the rest is zero padding.
        counts: ``[n_classes]`` int64, images per class (classes may differ).
        names: ``n_classes`` class names, e.g. ``"Greek/character03"``.

    ``len()`` is the number of classes (not the tuple's three fields).

    Example:
        >>> import torch
        >>> c = ImageClasses(torch.zeros(3, 4, 1, 8, 8, dtype=torch.uint8), torch.tensor([4, 4, 2]), ["a", "b", "c"])
        >>> len(c), c.subset([2, 0]).names
        (3, ['c', 'a'])
    """

    images: Tensor
    counts: Tensor
    names: list[str]

    def __len__(self) -> int:  # type: ignore[override]
        return len(self.names)

    def subset(self, indices: Sequence[int] | Tensor) -> ImageClasses:
        """The classes at ``indices`` (ints, an int tensor, or a boolean mask), in that order."""
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise ValueError(f"ImageClasses.subset: a boolean mask must have shape ({len(self)},), "
                                 f"got {tuple(idx.shape)}")
            idx = idx.nonzero().flatten()
        idx = idx.to(dtype=torch.int64, device="cpu").flatten()
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise IndexError(f"ImageClasses.subset: indices must lie in [0, {len(self)}), "
                             f"got min {int(idx.min())}, max {int(idx.max())}")
        rows = idx.tolist()
        return ImageClasses(
            self.images[idx.to(self.images.device)],
            self.counts[idx.to(self.counts.device)],
            [self.names[i] for i in rows],
        )

    def to(self, device: torch.device | str) -> ImageClasses:
        """Move ``images`` and ``counts`` to ``device``."""
        return ImageClasses(self.images.to(device), self.counts.to(device), list(self.names))
