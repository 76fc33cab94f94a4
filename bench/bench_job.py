"""Where a SLURM training job's wall time goes: the share spent outside training steps, for the job as run and in
the steady state of its epochs, and the job length from which its fixed costs fall under 5%.

    python bench/bench_job.py [--epochs 5] [--eval-n 64] [--slurm-eval-job yes|no] [--set K=V] [--results DIR]
        # runs a 2-trial dropout sweep on SLURM, then reports
    python bench/bench_job.py --sweep-dir RESULTS/SWEEP       # reports on a finished SLURM sweep

By default the end-of-trial evaluation runs as its own CPU job after the training job (`--slurm-eval-job yes`,
what a sweep does on GPU nodes), so the training job measured here is what holds a GPU allocation; with
`--slurm-eval-job no` the evaluation runs inside the training job and is reported as a part of it.

The reference is each training job's wall time, from submitit's first log line in the job to its last (the
interpreter's own start before that line is not seen). The training steps are the sum of the run's
`train/step_time_s` (batches and optimisation steps). Everything else is outside the steps, split using the wall
times the run stamps on its rows: start-up (job start to the run's start: interpreter, imports, data, model,
optimiser), set-up (records and TensorBoard writer, to the first epoch), the held-out probe and logging inside
epochs, validation (the whole val split), epoch ends (TensorBoard images, checkpoints, records, the quick
estimate when on), the end of training (the last epoch's end, the best checkpoint's latent prior, TensorBoard's
close), the evaluation when it ran in the job (it then also holds the end of training before it), and shut-down.

The steady state is an epoch as every epoch after the first repeats it: from one epoch's validation to the next
(epoch end, training, validation), median over epochs and jobs. What is left of a job beyond its epochs' steady
state is its fixed cost F (start-up, set-up, end of training, shut-down); it is under 5% of a job that lasts 20 F
or more, and the whole job is under 5% outside the steps from the epoch count where F plus the steady overhead
falls under 5% (never when the steady state alone is at or above 5%); F plus N steady epochs also projects the
share of jobs of other lengths (PROJECTED). A requeued trial is measured on its last
job only.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
from submitit.core.utils import JobPaths

from galaxygen.results import ResultsStore

SUBMITIT_TIME = re.compile(r"^submitit \w+ \((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\)")
TARGET = 0.05
STEADY_PARTS = ("probe and logging", "validation", "epoch end")
PROJECTED = (2, 5, 20, 100)  # job lengths in epochs whose share outside the steps is projected


def job_span(store: ResultsStore, trial_id: str) -> tuple[float, float] | None:
    """(start, end) epoch seconds of the trial's last training job, from submitit's log lines in its stdout."""
    record = store.job_record(trial_id)
    if not record.exists():
        return None
    job = json.loads(record.read_text())
    stdout = JobPaths(job["folder"], job_id=str(job["job_id"]), task_id=0).stdout
    if not stdout.exists():
        return None
    stamps = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
              for line in stdout.read_text(errors="replace").splitlines() if (m := SUBMITIT_TIME.match(line))]
    return (min(stamps), max(stamps)) if len(stamps) >= 2 else None


@dataclass
class Job:
    """One training job's time: its wall time, its training steps, its parts outside them, its steady epochs."""

    trial_id: str
    seconds: float
    steps: float
    parts: dict[str, float]
    steady: list[dict[str, float]]  # per epoch after the first: period, steps and the STEADY_PARTS, in seconds

    @property
    def outside(self) -> float:
        return 1 - self.steps / self.seconds


def epoch_times(m: pd.DataFrame, start: float) -> pd.DataFrame:
    """Per epoch trained in the job that started at `start`: the wall times at which its training and its validation
    ended (the stamps of their epoch rows), its epoch time and its steps' time."""
    train = m[(m.split == "train") & (m.metric.isin(["epoch_time_s", "step_time_s"]))]
    out = train.pivot_table(index="epoch", columns="metric", values="value")
    out["train_end"] = train.groupby("epoch").wall_time.max()
    out["val_end"] = m[(m.split == "val") & (m.metric == "loss")].groupby("epoch").wall_time.max()
    out["train_start"] = out.train_end - out.epoch_time_s
    return out[out.train_start >= start].sort_index()


def measure(store: ResultsStore, trial_id: str) -> Job | None:
    """One trial's last training job, or None when the trial has no finished job to measure."""
    span, trial = job_span(store, trial_id), store.read_trial(trial_id)
    if span is None or not trial or trial.get("status") != "completed":
        return None
    m = store.metrics(trial_id)
    e = epoch_times(m, span[0])
    if e.empty or e.val_end.isna().any():
        return None
    run_start, run_end, last_val = float(trial["start_time"]), float(trial["end_time"]), float(e.val_end.iloc[-1])
    evaluated = m[m.split == "eval"].wall_time
    in_job = evaluated[(evaluated >= span[0]) & (evaluated <= span[1])]  # an evaluation job's rows come after
    evaluation = float(in_job.max()) - last_val if len(in_job) else 0.0
    parts = {
        "start-up": run_start - span[0],
        "set-up": float(e.train_start.iloc[0]) - run_start,
        "probe and logging": float((e.epoch_time_s - e.step_time_s).sum()),
        "validation": float((e.val_end - e.train_end).sum()),
        "epoch end": float((e.train_start.shift(-1) - e.val_end).sum()),
        "end of training": run_end - last_val - evaluation,
        "evaluation (in the job)": evaluation,
        "shut-down": span[1] - run_end,
    }
    steady = [{"period": float(e.val_end.iloc[i] - e.val_end.iloc[i - 1]), "steps": float(e.step_time_s.iloc[i]),
               "probe and logging": float(e.epoch_time_s.iloc[i] - e.step_time_s.iloc[i]),
               "validation": float(e.val_end.iloc[i] - e.train_end.iloc[i]),
               "epoch end": float(e.train_start.iloc[i] - e.val_end.iloc[i - 1])} for i in range(1, len(e))]
    return Job(trial_id, span[1] - span[0], float(e.step_time_s.sum()), parts, steady)


def report(sweep_dir: Path) -> int:
    store = ResultsStore.from_dir(sweep_dir)
    jobs = [j for t in store.trials().trial_id if (j := measure(store, t)) is not None]
    if not jobs:
        print(f"error: {sweep_dir} has no completed SLURM trial to measure", file=sys.stderr)
        return 2
    in_job = any(j.parts["evaluation (in the job)"] for j in jobs)
    epochs = max(len(j.steady) + 1 for j in jobs)
    print(f"{sweep_dir}: {len(jobs)} SLURM training jobs of {epochs} epochs; end-of-trial evaluation "
          f"{'inside the training job' if in_job else 'not in the training job (its own job, or none)'}")
    print(f"  {'trial':12s} {'job s':>7s} {'steps s':>8s} {'outside steps':>14s}")
    for j in jobs:
        print(f"  {j.trial_id:12s} {j.seconds:7.1f} {j.steps:8.1f} {j.outside:14.1%}")
    print(f"the job as run: {statistics.median(j.outside for j in jobs):.1%} outside training steps (median over jobs)")
    print("where the time outside the steps goes (seconds per job, mean over jobs):")
    for name in jobs[0].parts:
        print(f"  {name:40s} {statistics.mean(j.parts[name] for j in jobs):7.1f}")
    steady = [s for j in jobs for s in j.steady]
    if not steady:
        print("steady state: needs 2 epochs or more")
        return 0
    period, steps = statistics.median(s["period"] for s in steady), statistics.median(s["steps"] for s in steady)
    share = statistics.median(1 - s["steps"] / s["period"] for s in steady)
    print(f"steady state (epochs 2-{epochs}, median of {len(steady)}): an epoch takes {period:.2f} s, {steps:.2f} s of "
          f"it training steps: {share:.1%} outside training steps")
    for name in STEADY_PARTS:
        value = statistics.median(s[name] for s in steady)
        print(f"  {name:40s} {value:7.2f} s {value / period:6.1%}")
    fixed = statistics.median(j.seconds - j.parts["evaluation (in the job)"] - (len(j.steady) + 1) * period
                              for j in jobs)
    print(f"fixed cost per training job (beyond its epochs' steady state): {fixed:.1f} s; under {TARGET:.0%} of a job "
          f"of {fixed / TARGET / 60:.1f} min or longer")
    overhead = share * period  # the median epoch's time outside its steps
    lengths = ", ".join(f"{n} epochs {(fixed + n * overhead) / (fixed + n * period):.1%}" for n in PROJECTED)
    print(f"outside training steps by job length (fixed cost + steady epochs): {lengths}")
    if TARGET * period > overhead:
        n = max(1, math.ceil((1 - TARGET) * fixed / (TARGET * period - overhead)))
        print(f"the whole job is under {TARGET:.0%} outside training steps from {n} epochs "
              f"({(fixed + n * period) / 60:.1f} min) of this size")
    else:
        print(f"the whole job stays above {TARGET:.0%} outside training steps at any length: the steady state alone "
              f"is {share:.1%}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep-dir", help="a finished SLURM sweep (RESULTS/SWEEP); default: run a new 2-trial sweep")
    p.add_argument("--epochs", type=int, default=5, help="epochs per trial of the new sweep (default 5)")
    p.add_argument("--eval-n", type=int, default=64, help="end-of-trial evaluation images of the new sweep (default 64)")
    p.add_argument("--slurm-eval-job", choices=("yes", "no"), default="yes",
                   help="the evaluation as its own CPU job (default yes, as on GPU nodes) or inside the training job")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a base config value of the new sweep, repeatable (e.g. recon_loss=bce)")
    p.add_argument("--results", help="results folder of the new sweep, kept (default: a temporary folder)")
    args = p.parse_args()
    if args.sweep_dir:
        return report(Path(args.sweep_dir))
    with tempfile.TemporaryDirectory() as scratch:
        results = args.results or scratch
        cmd = [sys.executable, "-m", "sweeps.launch", "dropout", "--backend", "slurm", "--grid", "dropout=0,0.3",
               "--epochs", str(args.epochs), "--eval-n", str(args.eval_n), "--slurm-eval-job", args.slurm_eval_job,
               "--no-figures", "--results", results, *(f"--set={item}" for item in args.set)]
        print("running:", " ".join(cmd[1:]), flush=True)
        start = time.perf_counter()
        status = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
        print(f"sweep finished in {time.perf_counter() - start:.0f} s (exit {status})")
        return report(Path(results) / "dropout")


if __name__ == "__main__":
    sys.exit(main())
