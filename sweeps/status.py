"""`python -m sweeps.status RESULTS/SWEEP [--watch]`: where is my sweep?

One table from the results folder alone (no driver needed, e.g. on a login node after the driver died):
each trial's state, the epoch it reached, its latest and best held-out loss, its SLURM job and, while the
job waits, SLURM's reason (a failed trial's error, a stopped trial's reason); then a summary line with an
ETA from the epoch times so far.

States: pending, running, completed, failed, stopped as recorded; `lost` for a trial recorded as pending or
running whose SLURM job is gone from squeue or whose local launcher is gone; `running?` when that cannot be
checked from here (no squeue on this machine, or no launcher lock file to test).

The scheduler is not asked while a driver runs: job states come from the squeue snapshot its pollers share
(RESULTS/SWEEP/slurm_logs/squeue.json). Only without a fresh snapshot (the driver died) does status run one
squeue call for the sweep's open jobs, at most once per the driver's squeue interval (30 s by default), so
--watch adds no scheduler load. Never sacct.

Exit status: 0, or 2 for a folder that is not a sweep, 130 when --watch is interrupted.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from galaxygen.results import ResultsStore
from sweeps.slurm_job import ACTIVE_STATES, SqueueSnapshot, ask_squeue, live_snapshot
from sweeps.slurm_options import SlurmOptions

FINAL = ("completed", "failed", "stopped")


@dataclass
class TrialStatus:
    """One row of the status table."""

    trial_id: str
    state: str
    epoch: int
    epochs: int | None
    latest: float
    best: float
    job_id: str | None = None
    reason: str = ""
    label: str = ""


class SlurmView:
    """SLURM's view of the sweep's jobs: the driver's shared squeue snapshot (slurm_logs/squeue.json) while a
    live driver keeps it fresh, which costs the scheduler nothing; else (the driver died, or the sweep ended
    with trials still open) one `squeue` call of its own for the sweep's open jobs, at most once per the
    driver's squeue interval however often --watch refreshes. Never sacct."""

    def __init__(self, store: ResultsStore):
        self.store = store
        self.asked_at = -math.inf  # monotonic time of this view's last own squeue call
        self.own: dict[str, tuple[str, str]] | None = None
        self.own_ids: set[str] = set()
        self.source = ""  # where the last answer came from, for the summary

    def jobs(self, job_ids: list[str]) -> dict[str, tuple[str, str] | None] | None:
        """Per job id: (state, reason), or None when SLURM no longer lists it; an id left out is not known yet
        (submitted after the driver's snapshot). None altogether when squeue cannot be asked from here."""
        if not job_ids:
            return {}
        snap = live_snapshot(self.store)
        if snap is not None:
            self.source = f"the driver's squeue snapshot, {max(0.0, time.time() - snap['time']):.0f} s old"
            if not snap.get("ok"):
                return None
            asked, jobs, reasons = set(snap.get("asked", ())), snap.get("jobs", {}), snap.get("reasons", {})
            return {j: ((jobs[j], reasons.get(j, "")) if j in jobs else None) for j in job_ids if j in asked}
        stale = SqueueSnapshot(self.store, 0).read() or {}
        interval = float(stale.get("max_age_s") or SlurmOptions.squeue_s)
        if time.monotonic() - self.asked_at >= interval or not set(job_ids) <= self.own_ids:
            self.own, self.own_ids, self.asked_at = ask_squeue(job_ids), set(job_ids), time.monotonic()
        self.source = "squeue (no driver is polling the sweep)"
        if self.own is None:
            return None
        return {j: self.own.get(j) for j in job_ids}


def launcher_alive(store: ResultsStore) -> bool | None:
    """True while a launcher holds the sweep's lock; False when its lock file is left unlocked (the launcher
    was killed); None when this cannot be told (no lock file, or a file system without locks)."""
    try:
        fd = os.open(store.lock_path(), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None  # no locks on this file system
    finally:
        os.close(fd)
    return False


def job_id_of(store: ResultsStore, trial_id: str, row: dict) -> str | None:
    """The trial's current SLURM job: its job record (the poller's), else the id on its row."""
    try:
        record = json.loads(store.job_record(trial_id).read_text())
        if record.get("job_id"):
            return str(record["job_id"])
    except (OSError, ValueError, AttributeError):
        pass
    value = row.get("job_id")
    return None if value is None or (isinstance(value, float) and math.isnan(value)) or value == "" else str(value)


def held_out_losses(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per trial: the epoch reached, the latest and the best held-out (val) loss."""
    epochs = metrics[~metrics["metric"].str.endswith("_step") & (metrics["split"] != "eval")]
    val = epochs[(epochs["split"] == "val") & (epochs["metric"] == "loss")].sort_values("epoch")
    out = pd.DataFrame({"epoch": epochs.groupby("trial_id")["epoch"].max()})
    out["latest"] = val.groupby("trial_id")["value"].last()
    out["best"] = val.groupby("trial_id")["value"].min()
    return out


def collect(store: ResultsStore, slurm: SlurmView | None = None) -> tuple[list[TrialStatus], pd.DataFrame]:
    """The status of every trial of the sweep (those named by sweep.json but not started are pending)."""
    trials = store.trials()
    metrics = store.metrics()
    meta = read_meta(store)
    losses = held_out_losses(metrics)
    rows = {str(r["trial_id"]): r for r in trials.to_dict("records")}
    ids = list(rows) + [t for t in meta.get("trials", []) if isinstance(t, str) and t not in rows]
    varies = [k for k in meta.get("varies", []) if k in trials.columns]
    base_epochs = (meta.get("base") or {}).get("epochs")
    statuses = []
    for trial_id in ids:
        row = rows.get(trial_id, {})
        reached = losses["epoch"].get(trial_id, 0)
        epochs = row.get("epochs", base_epochs)
        statuses.append(TrialStatus(
            trial_id=trial_id, state=str(row.get("status") or "pending"),
            epoch=int(reached) if not pd.isna(reached) else 0,
            epochs=int(epochs) if epochs is not None and not pd.isna(epochs) else None,
            latest=float(losses["latest"].get(trial_id, math.nan)), best=float(losses["best"].get(trial_id, math.nan)),
            job_id=job_id_of(store, trial_id, row) if row else None, reason=ended_why(row),
            label=" ".join(f"{k}={row.get(k)}" for k in varies) if row else ""))
    check_liveness(store, statuses, slurm or SlurmView(store))
    return statuses, metrics


def ended_why(row: dict) -> str:
    """A failed trial's error (its first line: "no space left on device writing PATH", "TrainingDiverged: ...")
    or a stopped trial's reason; empty otherwise."""
    text = row.get("error") if row.get("status") == "failed" else row.get("stop_reason") \
        if row.get("status") == "stopped" else None
    if not isinstance(text, str):
        return ""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def check_liveness(store: ResultsStore, statuses: list[TrialStatus], slurm: SlurmView) -> None:
    """Mark pending/running trials whose job or launcher is gone as `lost` (or `running?` when unknowable),
    and give pending SLURM jobs SLURM's reason (see SlurmView for where job states come from)."""
    open_trials = [s for s in statuses if s.state not in FINAL]
    jobs = slurm.jobs(sorted({s.job_id for s in open_trials if s.job_id}))
    launcher = launcher_alive(store) if any(not s.job_id for s in open_trials) else None
    for s in open_trials:
        if s.job_id:
            if jobs is None:
                s.state = f"{s.state}?"
            elif s.job_id not in jobs:
                continue  # submitted after the driver's last squeue: as recorded
            elif jobs[s.job_id] is not None and jobs[s.job_id][0] in ACTIVE_STATES:
                slurm_state, reason = jobs[s.job_id]
                if slurm_state == "PENDING":
                    s.state, s.reason = "pending", reason
                elif s.state == "pending":
                    s.state = "running"  # the job started; its first epoch is not written yet
            else:
                row = store.read_trial(s.trial_id) or {}
                if row.get("status") in FINAL:  # it ended after the table was read
                    s.state, s.reason = row["status"], ended_why(row)
                elif jobs[s.job_id] is None:
                    s.state, s.reason = "lost", f"job {s.job_id} is gone from squeue"
                else:
                    s.state, s.reason = "lost", f"job {s.job_id} ended ({jobs[s.job_id][0]}) without recording it"
        elif launcher is False and s.state == "running":
            s.state = "lost"
            s.reason = "its launcher is gone"
        elif launcher is None and s.state == "running":
            s.state = "running?"


def read_meta(store: ResultsStore) -> dict:
    try:
        meta = json.loads(store.meta_path().read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def epoch_seconds(metrics: pd.DataFrame) -> float | None:
    """The mean time of one epoch so far (the trainer's own epoch_time_s), or None before the first epoch."""
    times = metrics[(metrics["split"] == "train") & (metrics["metric"] == "epoch_time_s")]["value"]
    return float(times.mean()) if len(times) else None


def summary_line(statuses: list[TrialStatus], metrics: pd.DataFrame) -> str:
    count = {k: sum(s.state.rstrip("?") == k for s in statuses) for k in ("completed", "running", "pending",
                                                                         "failed", "stopped", "lost")}
    parts = [f"{count['completed']}/{len(statuses)} done", f"{count['running']} running", f"{count['pending']} queued",
             f"{count['failed']} failed"]
    parts += [f"{count[k]} {k}" for k in ("stopped", "lost") if count[k]]
    per_epoch = epoch_seconds(metrics)
    remaining = sum(max(0, (s.epochs or s.epoch) - s.epoch) for s in statuses if s.state.rstrip("?") in
                    ("running", "pending"))
    if remaining == 0 and count["lost"]:
        eta = "nothing is running: run the sweep's launch command again to finish the lost trials"
    elif remaining == 0:
        eta = "nothing left to run" if count["running"] + count["pending"] == 0 else "ETA unknown"
    elif per_epoch is None:
        eta = f"{remaining} epochs left, ETA unknown (no epoch finished yet)"
    else:
        parallel = max(1, count["running"])
        eta = f"{remaining} epochs left, ETA ~{format_duration(remaining * per_epoch / parallel)} " \
              f"({per_epoch:.0f} s/epoch, {parallel} at a time)"
    return ", ".join(parts) + "; " + eta


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def table(statuses: list[TrialStatus]) -> str:
    def num(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:.4g}"

    header = ("trial", "config", "state", "epoch", "val_loss", "best", "job", "reason")
    rows = [header] + [(s.trial_id, s.label or "-", s.state, f"{s.epoch}/{s.epochs if s.epochs else '?'}",
                        num(s.latest), num(s.best), s.job_id or "-", s.reason or "") for s in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def render(store: ResultsStore, slurm: SlurmView | None = None) -> tuple[str, bool]:
    """The table and summary, and whether nothing is left running or queued (every trial finished or lost)."""
    slurm = slurm or SlurmView(store)
    slurm.source = ""
    statuses, metrics = collect(store, slurm)
    if not statuses:
        return f"{store.dir}: no trials recorded yet", False
    done = all(s.state in (*FINAL, "lost") for s in statuses)
    source = f"\nSLURM job states from {slurm.source}" if slurm.source else ""
    return f"{table(statuses)}\n{summary_line(statuses, metrics)}{source}", done


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value >= 0.5 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected at least 0.5 seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweeps.status", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="the sweep folder RESULTS/SWEEP")
    p.add_argument("--watch", action="store_true", help="refresh until no trial is running or queued (Ctrl-C stops)")
    p.add_argument("--interval", type=positive_seconds, default=5.0, help="seconds between refreshes (default 5)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    store = ResultsStore.from_dir(args.sweep)
    if not store.dir.is_dir() or not store.is_sweep():
        print(f"error: {args.sweep} is not a sweep folder (no trials/ or sweep.json): expected RESULTS/SWEEP "
              "written by python -m sweeps.launch", file=sys.stderr)
        return 2
    slurm = SlurmView(store)
    try:
        while True:
            text, done = render(store, slurm)
            if args.watch and sys.stdout.isatty():
                print("\033[H\033[J", end="")
            print(text if not args.watch else f"[{time.strftime('%H:%M:%S')}] {store.dir}\n{text}", flush=True)
            if not args.watch or done:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
