"""Tuning campaign wall time with median pruning vs without, at equal trials and sampler seed.

Each case runs the real ``convpipe tune`` (the shipped ``tune:`` section, only ``tune.pruner``
and ``tune.n_trials`` changed) in its own throwaway project on the embedded digits data, after
``dvc repro augment`` (not timed). The study and the MLflow runs are then read back from the
project's ``optuna.db`` and ``mlflow.db``. One line per case, then the ratio line. Epochs
trained is the cost measure other jobs on the machine cannot skew; wall and CPU time are what a
user waits and pays for.

Goal: pruning (median) at least 2x faster than no pruning at an equal or better best value.

Usage: python benchmarks/bench_tuning.py [--trials 12] [--repeats 1] [--tolerance 0.02]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Checkout

STUDY = "bench"
GOAL_SPEEDUP = 2.0


@dataclass
class Timing:
    """One ``convpipe tune`` run: wall and child CPU seconds, mean 1-minute load meanwhile."""

    seconds: float
    cpu: float
    load: float


@dataclass
class CaseResult:
    """What one campaign cost (the fastest of its repeats) and found."""

    pruner: str
    timing: Timing
    repeats: int
    states: dict[str, int]
    epochs: int
    best_value: float | None
    best_trial: int | None
    best_acc: float | None

    def line(self, monitor: str) -> str:
        """One printable line: time, trial states, epochs, best value and its val/acc."""
        states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(self.states.items()))
        if self.best_value is None:
            best = "no complete trial"
        else:
            acc = f"{self.best_acc:.4f}" if self.best_acc is not None else "n/a"
            best = f"best {monitor} {self.best_value:.5f} (trial {self.best_trial}, val/acc {acc})"
        fastest = f", fastest of {self.repeats}" if self.repeats > 1 else ""
        return (
            f"pruner={self.pruner:<6} {self.timing.seconds:6.1f} s wall, "
            f"{self.timing.cpu:6.1f} s CPU [{states}; {self.epochs} epochs trained]  {best}  "
            f"(mean load {self.timing.load:.1f}{fastest})"
        )


def prepare_case(pruner: str, trials: int, workdir: Path) -> Checkout:
    """A fresh project under ``workdir`` with its data augmented and ``tune:`` set for the case."""
    project = Checkout.of_this_one(workdir / pruner)
    project.run("dvc", "repro", "augment")
    project.set_params(**{"tune.pruner": pruner, "tune.n_trials": trials, "tune.study_name": STUDY})
    return project


def time_campaign(project: Checkout) -> Timing:
    """Run a whole campaign from scratch (no study, no MLflow store yet); time it."""
    for name in ("optuna.db", "mlflow.db"):
        (project.root / name).unlink(missing_ok=True)
    for name in ("mlruns", "reports/tuning"):
        shutil.rmtree(project.root / name, ignore_errors=True)
    cpu_before = _children_cpu()
    with sample_load() as loads:
        start = time.perf_counter()
        project.run("convpipe", "tune")
        seconds = time.perf_counter() - start
    return Timing(seconds, _children_cpu() - cpu_before, statistics.fmean(loads))


@contextlib.contextmanager
def sample_load(every: float = 2.0) -> Iterator[list[float]]:
    """Collect the 1-minute load average every ``every`` seconds while the block runs.

    Other work on the machine inflates wall time and CPU time alike (OpenMP threads spin while
    they wait for a core), so the load shows which figures to distrust.
    """
    loads = [os.getloadavg()[0]]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every):
            loads.append(os.getloadavg()[0])

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield loads
    finally:
        stop.set()
        thread.join()


def _children_cpu() -> float:
    """User + system CPU seconds of every finished child process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def summarise(pruner: str, timings: list[Timing], project: Checkout) -> CaseResult:
    """The fastest timing, then trial states, epochs and best trial of the project's study."""
    fastest = min(timings, key=lambda t: t.seconds)
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{project.root / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for trial in trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    epochs = sum(len(t.intermediate_values) for t in trials)
    if not any(t.state == TrialState.COMPLETE for t in trials):
        return CaseResult(pruner, fastest, len(timings), states, epochs, None, None, None)
    best = study.best_trial
    acc = best_trial_acc(project, best)
    return CaseResult(pruner, fastest, len(timings), states, epochs, best.value, best.number, acc)


def best_trial_acc(project: Checkout, trial: FrozenTrial) -> float | None:
    """val/acc of ``trial``'s MLflow child run at the step where its val/loss was lowest."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return None
    with sqlite3.connect(project.root / "mlflow.db") as db:
        rows = db.execute(
            "SELECT step, key, value FROM metrics WHERE run_uuid = ? "
            "AND key IN ('val/loss', 'val/acc')",
            (run_id,),
        ).fetchall()
    loss = {step: value for step, key, value in rows if key == "val/loss"}
    acc = {step: value for step, key, value in rows if key == "val/acc"}
    if not loss:
        return max(acc.values()) if acc else None
    return acc.get(min(loss, key=loss.__getitem__))


def verdict(pruned: CaseResult, plain: CaseResult, tolerance: float) -> str:
    """The ratio line: speed-up, best values, and whether the goal is met."""
    speedup = plain.timing.seconds / pruned.timing.seconds
    cpu = plain.timing.cpu / pruned.timing.cpu
    epochs = plain.epochs / max(1, pruned.epochs)
    if pruned.best_value is None or plain.best_value is None:
        return f"speed-up {speedup:.2f}x; best values not comparable (a case has no complete trial)"
    # val/loss is minimised: "equal" allows a relative margin, "better" is lower.
    not_worse = pruned.best_value <= plain.best_value * (1 + tolerance)
    met = speedup >= GOAL_SPEEDUP and not_worse
    return (
        f"speed-up median vs none {speedup:.2f}x wall, {cpu:.2f}x CPU, {epochs:.2f}x fewer epochs "
        f"(goal >= {GOAL_SPEEDUP:.0f}x); best value "
        f"{pruned.best_value:.5f} vs {plain.best_value:.5f} "
        f"({'equal or better' if not_worse else 'worse'}, within {tolerance:.0%}): "
        f"goal {'MET' if met else 'NOT MET'}"
    )


def run_all(trials: int, repeats: int) -> dict[str, CaseResult]:
    """Both cases, ``repeats`` times each in alternating order; print each case's line."""
    pruners = ["median", "none"]
    timings: dict[str, list[Timing]] = {p: [] for p in pruners}
    results = {}
    with tempfile.TemporaryDirectory(prefix="convpipe-bench-tune-") as tmp:
        projects = {p: prepare_case(p, trials, Path(tmp)) for p in pruners}
        for repeat in range(repeats):
            for pruner in pruners if repeat % 2 == 0 else pruners[::-1]:
                timings[pruner].append(time_campaign(projects[pruner]))
        for pruner in pruners:  # the study of the last repeat (trials are seeded: all alike)
            results[pruner] = summarise(pruner, timings[pruner], projects[pruner])
            print(results[pruner].line("val/loss"), flush=True)
    return results


def main() -> None:
    """Run both campaigns and print one line per case plus the ratio line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=12, help="trials per campaign")
    parser.add_argument(
        "--repeats", type=int, default=1, help="campaigns per case; the fastest is reported"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.02,
        help="relative margin within which the pruned best value counts as equal",
    )
    args = parser.parse_args()
    print(
        f"tuning bench: {args.trials} trials per campaign, digits data, shipped tune: section; "
        f"goal: pruning >= {GOAL_SPEEDUP:.0f}x faster at equal or better best value",
        flush=True,
    )
    results = run_all(args.trials, max(1, args.repeats))
    print(verdict(results["median"], results["none"], args.tolerance), flush=True)
    cores = os.cpu_count() or 1
    busiest = max(r.timing.load for r in results.values())
    if busiest > cores + 0.5:
        print(
            f"warning: mean load reached {busiest:.1f} on {cores} cores: other jobs shared the "
            "CPU, so wall/CPU ratios are unreliable (use --repeats or a quiet machine); "
            "the epochs ratio is not affected",
            flush=True,
        )


if __name__ == "__main__":
    main()
