"""``convpipe tune --workers N``: N worker processes on one node, each pinned to its own device.

Every worker is an ordinary ``convpipe tune`` process against the study's storage, exactly as
if started by hand (the campaign's budget logic in :mod:`convpipe.tuning.worker` already keeps
several workers to exactly ``tune.n_trials``); the launcher only pins each one:

* on a node with GPUs, worker ``i`` sees one GPU (``CUDA_VISIBLE_DEVICES``, round robin when
  there are more workers than GPUs) and an equal share of the CPU cores for its data loading;
* on a CPU-only node, worker ``i`` gets an equal share of the cores (its CPU affinity and
  ``OMP_NUM_THREADS``), so ``runtime.threads: auto`` trains on that share and the workers do
  not oversubscribe the machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from convpipe.config.schema import Params
from convpipe.errors import ConvpipeError

log = logging.getLogger("convpipe")

#: Seconds the workers get to stop on an interrupt of their own (Ctrl-C reaches the whole
#: process group) before the launcher passes it on, and then to close their runs and stop.
GRACE_SECONDS, STOP_SECONDS = 2.0, 30.0


@dataclass(frozen=True)
class Slot:
    """What one worker may use.

    Attributes:
        cpus: the CPU cores it is pinned to.
        gpu: the GPU it sees (an entry of the node's ``CUDA_VISIBLE_DEVICES``, or an index),
            or None on a CPU-only node.
        n_trials: ``--n-trials`` for this worker, or None to continue the campaign.
    """

    cpus: tuple[int, ...]
    gpu: str | None
    n_trials: int | None

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The worker's environment: ``base`` plus its GPU and thread count."""
        env = dict(base, OMP_NUM_THREADS=str(len(self.cpus)))
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        return env

    def describe(self) -> str:
        """``GPU 3, CPUs 0-7`` or ``CPUs 0-7``, for the launch log line."""
        cpus = (
            f"CPUs {self.cpus[0]}-{self.cpus[-1]}" if len(self.cpus) > 1 else f"CPU {self.cpus[0]}"
        )
        return f"GPU {self.gpu}, {cpus}" if self.gpu is not None else cpus


def split_trials(n_trials: int | None, workers: int) -> list[int | None]:
    """Each worker's ``--n-trials``: ``n_trials`` shared out exactly (None: the campaign)."""
    if n_trials is None:
        return [None] * workers
    return [n_trials // workers + (i < n_trials % workers) for i in range(workers)]


def plan_slots(
    workers: int, cpus: Sequence[int], gpus: Sequence[str], n_trials: int | None
) -> list[Slot]:
    """Pin ``workers`` workers: one GPU each (round robin), the cores split evenly.

    Args:
        workers: how many worker processes (>= 1).
        cpus: the cores this process may use (its affinity).
        gpus: the GPUs it sees (empty on a CPU-only node).
        n_trials: ``--n-trials``, shared out over the workers; None continues the campaign.

    Returns:
        One :class:`Slot` per worker that has trials to run. With more workers than cores,
        workers share cores (each still gets one).
    """
    ordered = sorted(cpus)
    slots = []
    for i, share in enumerate(split_trials(n_trials, workers)):
        if share == 0:
            continue
        if workers >= len(ordered):  # a core each, round robin
            mine: tuple[int, ...] = (ordered[i % len(ordered)],)
        else:
            mine = tuple(ordered[i * len(ordered) // workers : (i + 1) * len(ordered) // workers])
        gpu = gpus[i % len(gpus)] if gpus else None
        slots.append(Slot(mine, gpu, share))
    return slots


def visible_gpus(params: Params) -> list[str]:
    """The GPUs trials may use: none unless ``train.accelerator`` allows CUDA and one is here."""
    if params.train.accelerator not in ("auto", "gpu", "cuda"):
        return []
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def check_workers(params: Params, workers: int) -> None:
    """Refuse a worker count the trials cannot be pinned with.

    Raises:
        ConvpipeError: ``workers < 1``, or multi-device trials (each worker gets one device).
    """
    if workers < 1:
        raise ConvpipeError(f"--workers must be 1 or more, got {workers}", "on the command line")
    devices = params.train.devices
    if workers > 1 and (devices == "auto" or int(devices) > 1 or params.train.num_nodes > 1):
        raise ConvpipeError(
            f"--workers {workers} gives each trial one device, but train.devices is {devices} "
            f"and train.num_nodes {params.train.num_nodes}",
            "in params.yaml",
            "set train.devices: 1 and train.num_nodes: 1 for parallel trials, or drop --workers",
        )


def _worker_argv(params_file: str, slot: Slot, debug: bool) -> list[str]:
    argv = [sys.executable, "-m", "convpipe.cli", "--params", params_file]
    if debug:
        argv.append("--debug")
    argv.append("tune")
    if slot.n_trials is not None:
        argv += ["--n-trials", str(slot.n_trials)]
    return argv


def _pin(proc: subprocess.Popen[bytes], cpus: tuple[int, ...]) -> None:
    # set at once: the new process is still starting the interpreter, before any thread
    if hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):  # already gone: its exit status tells why
            os.sched_setaffinity(proc.pid, cpus)


def _wait_all(procs: Sequence[subprocess.Popen[bytes]], seconds: float) -> None:
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=seconds)


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Interrupt the workers that still run and wait for them (then kill the stragglers)."""
    _wait_all(procs, GRACE_SECONDS)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    _wait_all(procs, STOP_SECONDS)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def launch_workers(params: Params, params_file: str, slots: Sequence[Slot], debug: bool) -> None:
    """Start one ``convpipe tune`` per slot, pinned, and wait for all of them.

    A worker that fails leaves the others running (its trial is failed and the budget reopens,
    as with workers started by hand); an interrupt is passed on to every worker.

    Raises:
        ConvpipeError: naming the workers that exited non-zero.
    """
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for index, slot in enumerate(slots):
            proc = subprocess.Popen(  # stdout: the summary line, which this process prints once
                _worker_argv(params_file, slot, debug),
                env=slot.env(os.environ),
                stdout=subprocess.DEVNULL,
            )
            _pin(proc, slot.cpus)
            procs.append(proc)
            log.info("worker %d (pid %d): %s", index, proc.pid, slot.describe())
        codes = [proc.wait() for proc in procs]
    except KeyboardInterrupt:
        _stop(procs)
        raise
    failed = [f"worker {i} (exit {code})" for i, code in enumerate(codes) if code != 0]
    if failed:
        raise ConvpipeError(
            f"{len(failed)} of {len(slots)} tuning workers failed: {', '.join(failed)}",
            f"in study '{params.tune.study_name}'",
            "see their messages above; rerun `convpipe tune` to continue the campaign",
        )
