"""Settings per device, made once when a run starts; none of them changes a result, only its speed.

========  =====================================================================
device    setting
========  =====================================================================
CPU       glibc told to keep freed memory (:func:`maml_func.system.tune_malloc`,
          unless ``MAML_FUNC_TUNE_MALLOC=0``); the training loop's checks read
          at once
CUDA      ``cudnn.benchmark``; the training loop's checks kept on the device
          (:func:`defer_host_reads`)
========  =====================================================================

:func:`~maml_func.train.fit` calls :func:`configure_device` once; code that
runs an algorithm by hand may call it too (``benchmarks/`` does).
"""

from __future__ import annotations

import torch

from maml_func import system

__all__ = ["configure_device", "defer_host_reads"]


def defer_host_reads(device: torch.device) -> bool:
    """Whether training should avoid reading device values on the host every step.

    On the CPU a read (``.item()``) costs nothing, so the loop checks each
    step at once. On an accelerator it makes the host wait for the device, so
    kernel launches stop running ahead of the compute; there the loop keeps
    its checks on the device and reads them only when it logs, saves or stops.
    """
    return device.type != "cpu"


def configure_device(device: torch.device) -> None:
    """Process-wide settings that make training on ``device`` fast without changing a result's meaning.

    CPU: glibc keeps freed memory for reuse (:func:`maml_func.system.tune_malloc`;
    a vectorized meta-batch otherwise spends a large share of each iteration
    faulting pages in), unless the environment variable
    ``MAML_FUNC_TUNE_MALLOC`` says ``0`` (:func:`maml_func.system.tuning_wanted`).
    CUDA: ``cudnn.benchmark`` on, since every meta-iteration has the same
    shapes, so the convolution algorithms it times on the first iteration
    serve all the others. TF32 matmuls stay off: they change float32 results
    by about 1e-3 relative, a choice for the user (``benchmarks/gpu_check.py``
    measures both).
    """
    if device.type == "cpu" and system.tuning_wanted():
        system.tune_malloc()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
