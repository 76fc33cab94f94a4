"""Where a SLURM training job's wall time goes: the share spent outside training steps, with and without the
end-of-trial evaluation.

    python bench/bench_job.py [--epochs 2] [--eval-n 64]      # runs a 2-trial dropout sweep on SLURM, then reports
    python bench/bench_job.py --sweep-dir RESULTS/SWEEP        # reports on a finished SLURM sweep

The reference is each job's wall time, from submitit's first log line in the job to its last; the training
steps are the sum of the run's `train/step_time_s` (batches and optimisation steps). The rest is split into:
start-up (job start to the run's start: interpreter, imports, opening the data, building the model), the
held-out probe and logging inside epochs, validation and the end of each epoch (checkpoints, metrics,
TensorBoard images), the evaluation at the end of the trial, and shut-down (the run's end to the job's end).
A requeued trial is measured on its last job only.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from submitit.core.utils import JobPaths

from galaxygen.results import ResultsStore

SUBMITIT_TIME = re.compile(r"^submitit \w+ \((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\)")


def job_span(store: ResultsStore, trial_id: str) -> tuple[float, float] | None:
    """(start, end) epoch seconds of the trial's last job, from submitit's log lines in its stdout."""
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


def breakdown(store: ResultsStore, trial_id: str) -> dict[str, float] | None:
    """Seconds of one trial's job by part, or None when the trial has no finished job to measure."""
    span, trial = job_span(store, trial_id), store.read_trial(trial_id)
    if span is None or not trial or trial.get("status") != "completed":
        return None
    m = store.metrics(trial_id)
    train = m[m.split == "train"].pivot_table(index="epoch", columns="metric", values="value")
    epochs = m[m.split.isin(["train", "val"])]
    evaluated = m[m.split == "eval"]
    last_epoch_end = float(epochs.wall_time.max())
    parts = {
        "job": span[1] - span[0],
        "training steps": float(train.step_time_s.sum()),
        "start-up": float(trial["start_time"]) - span[0],
        "probe and logging": float((train.epoch_time_s - train.step_time_s).sum()),
        "evaluation": float(evaluated.wall_time.max()) - last_epoch_end if len(evaluated) else 0.0,
        "shut-down": span[1] - float(trial["end_time"]),
    }
    parts["validation, checkpoints, epoch ends"] = (parts["job"] - parts["start-up"] - parts["shut-down"]
                                                   - parts["evaluation"] - float(train.epoch_time_s.sum()))
    return parts


def report(sweep_dir: Path) -> int:
    store = ResultsStore.from_dir(sweep_dir)
    rows = {t: b for t in store.trials().trial_id if (b := breakdown(store, t)) is not None}
    if not rows:
        print(f"error: {sweep_dir} has no completed SLURM trial to measure", file=sys.stderr)
        return 2
    print(f"{sweep_dir}: {len(rows)} SLURM training jobs")
    print(f"  {'trial':12s} {'job s':>7s} {'steps s':>8s} {'outside steps':>14s} {'without eval':>13s}")
    for trial_id, p in rows.items():
        outside = 1 - p["training steps"] / p["job"]
        no_eval = 1 - p["training steps"] / (p["job"] - p["evaluation"])
        print(f"  {trial_id:12s} {p['job']:7.1f} {p['training steps']:8.1f} {outside:14.1%} {no_eval:13.1%}")
    names = [k for k in next(iter(rows.values())) if k not in ("job", "training steps")]
    print("where the time outside the steps goes (seconds per job, mean over jobs):")
    for name in names:
        print(f"  {name:38s} {sum(p[name] for p in rows.values()) / len(rows):7.1f}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep-dir", help="a finished SLURM sweep (RESULTS/SWEEP); default: run a new 2-trial sweep")
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial of the new sweep (default 2)")
    p.add_argument("--eval-n", type=int, default=64, help="end-of-trial evaluation images of the new sweep (default 64)")
    args = p.parse_args()
    if args.sweep_dir:
        return report(Path(args.sweep_dir))
    with tempfile.TemporaryDirectory() as results:
        cmd = [sys.executable, "-m", "sweeps.launch", "dropout", "--backend", "slurm", "--grid", "dropout=0,0.3",
               "--epochs", str(args.epochs), "--eval-n", str(args.eval_n), "--results", results]
        print("running:", " ".join(cmd[1:]), flush=True)
        start = time.perf_counter()
        status = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
        print(f"sweep finished in {time.perf_counter() - start:.0f} s (exit {status})")
        return report(Path(results) / "dropout")


if __name__ == "__main__":
    sys.exit(main())
