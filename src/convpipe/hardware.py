"""What this machine offers a process: its CPU threads and the device a model runs on.

Shared by training (threads per DDP process), the precision probe and inference, so a
decision about the hardware is taken in one place.
"""

from __future__ import annotations

import os

import torch

__all__ = ["cpu_threads", "inference_device"]

#: torch's default intra-op threads, read at import, before anyone changed it
_DEFAULT_THREADS = torch.get_num_threads()


def cpu_threads(setting: int | str, processes: int) -> int:
    """The intra-op CPU threads one process should use.

    Args:
        setting: ``runtime.threads``: a number, or ``auto``.
        processes: Processes sharing this machine (``train.devices`` for DDP on CPUs).

    Returns:
        ``setting`` itself if it is a number; for ``auto``, torch's default (this machine's
        cores, or ``OMP_NUM_THREADS``) shared out over ``processes``, at least 1, so DDP
        processes on one CPU do not oversubscribe it.
    """
    if setting != "auto":
        return int(setting)
    cores = _DEFAULT_THREADS
    if hasattr(os, "sched_getaffinity"):  # a container may allow fewer CPUs than torch saw
        cores = min(cores, len(os.sched_getaffinity(0)))
    return max(1, cores // max(1, processes))


def inference_device(accelerator: str) -> torch.device:
    """Where evaluate, predict, export and feature maps run a model.

    A GPU when ``accelerator`` (``train.accelerator``) allows one (``auto``, ``gpu``,
    ``cuda``) and one is present, else the CPU.
    """
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
