"""The SLURM backend: every Ray Tune trial is one submitit job; the trial in Ray only polls the results folder.

A trial's job trains with `galaxygen.train.run` on `nodes x tasks_per_node` SLURM tasks (one per GPU, DDP
from the SLURM task environment) and writes its metrics to RESULTS/SWEEP/metrics/<trial_id>/. The Tune
trial (`SlurmTrial`, a fraction of a CPU, no GPU) reports each new epoch part to Tune, so ASHA and other
schedulers work across jobs, and cancels the job when Tune stops the trial. Job state comes from
submitit's result files and one `squeue` per poll interval for the whole sweep (`SqueueSnapshot`), never
`sacct`.

Files under RESULTS/SWEEP/:

    code/<hash>/                    the code snapshot the jobs import (editing the repo does not touch them)
    slurm_logs/<trial_id>/job.json  the trial's current job: id, submitit folder, driver
    slurm_logs/<trial_id>/heartbeat touched by the poller; a job whose heartbeat stops cancels itself
    slurm_logs/<trial_id>/cancel-<jobid>  asks that job to record the trial as stopped (and why) and exit
    slurm_logs/<trial_id>/<time>/   submitit's folder: sbatch script, pickles, <jobid>_<task>_log.{out,err}
    slurm_logs/squeue.json          the sweep's latest squeue snapshot, shared by its pollers and sweeps.status

The driver's life cycle:
  * Tune stops a trial (ASHA, a stop criterion): `SlurmTrial.cleanup` cancels its job; the trial is recorded
    stopped with reason "early", which is final: a later driver reports it from the store.
  * An interactive driver (a login node, a terminal) that gets Ctrl-C or SIGTERM, or exits, cancels its jobs;
    their trials are recorded stopped with reason "cancelled", and the same command later resumes them.
  * A driver that is itself a SLURM job (`slurm/sweep.sh`) detaches instead: at its time-limit warning,
    preemption or scancel it exits at once (status 143) and leaves its trial jobs running (their watchdogs
    wait `heartbeat_s` for a poller); sweep.sh requeues it, and the restarted driver adopts the jobs through
    job.json.
  * Killed outright (SIGKILL, host lost): each job cancels itself after `heartbeat_s` without a poller.
  * `python -m sweeps.launch NAME --cancel` cancels every job of the sweep (`sweeps.slurm_job.cancel_sweep`).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ray import tune

from galaxygen.config import TrainConfig
from galaxygen.results import (
    ResultsStore,
    atomic_write_json,
    epoch_report,
    full_disk,
    write_error_in,
    writing,
)
from sweeps.slurm_job import (
    ACTIVE_STATES,
    CANCELLED,
    EARLY,
    HEARTBEAT,
    Driver,
    SlurmJobRef,
    SqueueSnapshot,
    TrialJob,
    cancel_jobs,
    eval_argv,
    is_final,
    job_records,
    mark_stopped,
    run_evaluate,
    scancel,
    snapshot_code,
    submit,
)
from sweeps.slurm_options import SlurmOptions

log = logging.getLogger("sweeps.slurm")

class SlurmTrialError(RuntimeError):
    """A trial's SLURM job failed; the message holds the job's remote traceback."""


# -- the poller ------------------------------------------------------------------------------------------


class TrialPoller:
    """One trial on SLURM, without Ray: submits (or adopts) its job and yields one report per finished epoch.

    A trial whose row is final (completed, failed, stopped early) is not run again: its epochs are replayed
    from the store, so a restarted driver's scheduler sees what the first one saw.
    """

    def __init__(self, config: TrainConfig, results: str | os.PathLike, sweep: str, options: SlurmOptions,
                 driver: Driver, trial_id: str | None = None):
        self.config = config.resolved()
        self.trial_id = trial_id or self.config.signature()
        self.store = ResultsStore(results, sweep)
        self.options, self.driver = options, driver
        self.dir = self.store.slurm_dir(self.trial_id)
        self.heartbeat = self.dir / HEARTBEAT
        self.squeue = SqueueSnapshot(self.store, options.squeue_s)
        self.job: SlurmJobRef | None = None
        self.eval_job: SlurmJobRef | None = None  # the end-of-run evaluation, when it is a job of its own
        self.final: dict | None = None  # the trial's row when it needs no more work
        self.last_epoch = 0
        self.last_report: dict | None = None
        self.finished = False
        self.last_snapshot: dict[str, float] = {}  # per job id: the squeue snapshot last looked at
        self.missing: dict[str, int] = {}  # per job id: snapshots in a row that did not list it
        self.state: dict[str, str] = {}  # per job id: its last state seen in squeue
        self.first_report: float | None = None

    # state shared with other drivers through job.json
    def registry(self) -> dict:
        try:
            return json.loads(self.store.job_record(self.trial_id).read_text())
        except (OSError, ValueError):
            return {}

    def write_registry(self, **changes) -> None:
        record = {**self.registry(), **changes}
        if self.job is not None:
            record.update(dataclasses.asdict(self.job))
        if self.eval_job is not None:
            record["eval_job"] = dataclasses.asdict(self.eval_job)
        record.update(trial_id=self.trial_id, driver=self.driver.tag, batch_job=self.driver.batch_job)
        atomic_write_json(record, self.store.job_record(self.trial_id))

    def touch_heartbeat(self) -> None:
        """Tell the job's watchdog that a driver still polls this trial."""
        with writing(self.heartbeat):
            self.heartbeat.parent.mkdir(parents=True, exist_ok=True)
            self.heartbeat.write_text(f"{time.time():.3f} {self.driver.tag}\n")

    def start(self) -> None:
        """Adopt the trial's job from an earlier driver, replay a final trial from the store, or submit a job."""
        self.touch_heartbeat()
        row = self.store.read_trial(self.trial_id)
        old = self.registry()
        if old.get("job_id") and not old.get("finished"):
            job = SlurmJobRef(old["job_id"], old["folder"], old.get("tasks", 1), old.get("submitted", 0.0))
            if job.outcome() is not None or self.squeue.alive(job.job_id):
                log.info("trial %s adopts its SLURM job %s", self.trial_id, job.job_id)
                self.job = job
                self.eval_job = SlurmJobRef(**old["eval_job"]) if old.get("eval_job") else None
                self.write_registry(finished=False, adopted=time.time())
                return
        if is_final(row, self.config):
            log.info("trial %s is already %s; reporting it from the results store", self.trial_id, row["status"])
            self.final = row
            return
        self.store.write_trial(self.trial_id, status="pending", error=None, stop_reason=None,
                               config_hash=self.config.signature(), **self.config.to_dict())
        separate_eval = bool(self.options.separate_eval and self.config.eval_n)
        function = TrialJob(self.config.to_dict(), str(self.store.root), self.store.sweep, self.trial_id,
                            control=str(self.dir), heartbeat_timeout_s=self.options.heartbeat_s,
                            evaluate=not separate_eval)
        for old_marker in self.dir.glob("cancel-*"):  # requests to earlier jobs (job ids can be reused)
            old_marker.unlink(missing_ok=True)
        folder = self.dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        name = f"{self.store.sweep}-{self.trial_id}"
        self.job = submit(function, folder, self.options, self.driver, name)
        self.eval_job = None
        if separate_eval:  # starts when training succeeds; SLURM drops it if training fails or is cancelled
            argv = eval_argv(self.store, self.trial_id, self.config.eval_n, self.config.seed, self.options.eval_cpus)
            shape = self.options.cpu_job(self.options.eval_cpus, f"--dependency=afterok:{self.job.job_id}",
                                         "--kill-on-invalid-dep=yes")
            best = str(self.store.checkpoint(self.trial_id, "best"))  # it also completes the checkpoint
            self.eval_job = submit(functools.partial(run_evaluate, argv, complete=best), folder, shape, self.driver,
                                   f"{name}-eval")
        self.write_registry(finished=False, first_report=None)
        log.info("trial %s: submitted SLURM job %s%s (logs in %s)", self.trial_id, self.job.job_id,
                 f" and its evaluation job {self.eval_job.job_id}" if self.eval_job else "", folder)

    def epochs_on_disk(self) -> list[int]:
        return self.store.epochs(self.trial_id)

    def read_epoch(self, epoch: int) -> dict:
        return epoch_report(self.store.read_epoch(self.trial_id, epoch), epoch)

    def check_job(self, job: SlurmJobRef | None = None) -> tuple[str, Any] | None:
        """The outcome of the training job (or `job`) once known: ("completed", value), ("failed", traceback) or
        ("stopped", row) when it was cancelled from outside (the heartbeat, --cancel); a job that left squeue
        without a result or a stop record is reported failed (after a second snapshot agrees)."""
        job = job or self.job
        outcome = job.outcome()
        if outcome is not None:
            return outcome
        snap = self.squeue.current()
        if snap["time"] == self.last_snapshot.get(job.job_id):
            return None
        self.last_snapshot[job.job_id] = snap["time"]
        state = self.squeue.state(job.job_id)
        if state in ACTIVE_STATES or state == "UNKNOWN":
            self.state[job.job_id], self.missing[job.job_id] = state, 0
            return None
        self.missing[job.job_id] = self.missing.get(job.job_id, 0) + 1
        if self.missing[job.job_id] < 2:
            return None
        outcome = job.outcome()
        row = self.store.read_trial(self.trial_id) or {}
        if outcome is not None:
            return outcome
        if job is self.job and row.get("status") == "stopped":
            return "stopped", row
        detail = (f"SLURM job {job.job_id} ended without a result (state {state or 'gone from squeue'}, last "
                  f"seen {self.state.get(job.job_id)}: cancelled, out of memory, node failure or time limit?). "
                  f"Last lines of {job.log_path(0, 'err')}:\n{job.log_tail()}")
        # on a full disk the job cannot get its own WriteError out (no result file, its log cut off): name the disk
        if (full := full_disk(self.store.run_dir(self.trial_id), job.folder)) is not None:
            detail += f"\nIts results or log folder is full:\nWriteError: {full}"  # what fail() reads back
        return "failed", detail

    def next_report(self) -> dict:
        """Block until the next epoch's report (with done=True for the last epoch); raise if the job failed."""
        if self.final is not None:
            return self.replay()
        while True:
            self.touch_heartbeat()
            outcome = self.check_job()
            epochs = [e for e in self.epochs_on_disk() if e > self.last_epoch]
            if epochs:
                epoch = epochs[0]
                report = self.read_epoch(epoch)
                if epoch >= self.config.epochs:
                    outcome = outcome or self.wait_for_outcome()
                    if outcome[0] == "failed":
                        self.fail(outcome[1])
                    self.wait_for_evaluation()
                    self.finish()
                    report["done"] = True
                return self.reported(epoch, report)
            if outcome is not None:
                if outcome[0] == "failed":
                    self.fail(outcome[1])
                if outcome[0] == "stopped":
                    return self.stopped_outside(outcome[1])
                self.fail(f"SLURM job {self.job.job_id} completed, but metrics of epochs "
                          f"{self.last_epoch + 1}..{self.config.epochs} are missing from "
                          f"{self.store.metrics_dir(self.trial_id)}")
            time.sleep(self.options.poll_s)

    def reported(self, epoch: int, report: dict) -> dict:
        self.last_epoch, self.last_report = epoch, report
        if self.first_report is None:
            self.first_report = time.time()
            if self.job is not None:
                self.write_registry(first_report=self.first_report)
        return report

    def replay(self) -> dict:
        """The next epoch of a final trial from the store; its last epoch is done (or raises its failure)."""
        epochs = [e for e in self.epochs_on_disk() if e > self.last_epoch]
        if not epochs:
            self.finished = True
            error = self.final.get("error") or f"trial {self.trial_id} is {self.final['status']} with no epoch"
            raise SlurmTrialError(f"trial {self.trial_id} ({self.final['status']} earlier):\n{error}")
        report = self.read_epoch(epochs[0])
        if len(epochs) == 1 and self.final["status"] != "failed":
            report["done"] = True
            self.finished = True
        return self.reported(epochs[0], report)

    def stopped_outside(self, row: dict) -> dict:
        """The job was stopped by someone else (--cancel, its heartbeat): end the Tune trial with what it has."""
        self.finish()
        if self.last_report is None:
            raise SlurmTrialError(f"trial {self.trial_id} was stopped before its first epoch: "
                                  f"{row.get('error') or row.get('stop_reason')}")
        return {**self.last_report, "done": True}

    def wait_for_outcome(self, job: SlurmJobRef | None = None) -> tuple[str, Any]:
        """After the last epoch's metrics: wait for the job to return (train.run finishes its bookkeeping)."""
        while True:
            outcome = self.check_job(job)
            if outcome is not None:
                return outcome
            self.touch_heartbeat()
            time.sleep(min(self.options.poll_s, 1.0))

    def wait_for_evaluation(self) -> None:
        """With an evaluation job of its own: the trial is done when that job has written its eval metrics; a
        failed evaluation is recorded in the trial's error (the trained model stays completed, as in train.run)."""
        if self.eval_job is None:
            return
        outcome = self.wait_for_outcome(self.eval_job)
        if outcome[0] != "completed":
            self.store.write_trial(self.trial_id, error=f"evaluation failed (SLURM job {self.eval_job.job_id}): "
                                   f"{outcome[1]}")

    def fail(self, detail: str) -> None:
        """Record the job's remote traceback as the trial's error and raise it. A job that could not write its
        results (a full disk, a read-only folder) is one line naming the file, raised as the WriteError it was,
        so the sweep stops as it does on the local backend."""
        written = write_error_in(detail)
        self.store.write_trial(self.trial_id, status="failed", error=str(written or detail), end_time=time.time(),
                               job_id=self.job.job_id if self.job else None)
        self.finish()
        failure = SlurmTrialError(f"trial {self.trial_id}: SLURM job {self.job.job_id if self.job else '-'} "
                                  f"failed:\n{detail}")
        if written is not None:
            raise written from failure
        raise failure

    def finish(self) -> None:
        if not self.finished and self.job is not None:
            self.write_registry(finished=True, ended=time.time())
        self.finished = True

    def stop(self) -> None:
        """Tune stopped the trial (ASHA, a stop criterion): cancel the job unless it already finished and record
        the trial as stopped early. Leaves the job alone when the driver already cancelled it."""
        if self.finished or self.job is None:
            self.finished = True
            return
        if self.registry().get("finished"):
            self.finished = True
            return
        if self.eval_job is not None and self.eval_job.outcome() is None:
            scancel(self.eval_job.job_id)
        if self.job.outcome() is None:
            log.info("trial %s stopped early: cancelling SLURM job %s", self.trial_id, self.job.job_id)
            self.job.cancel(self.dir, EARLY)
            # the job may still finish an epoch (and write its row) until its watchdog records the stop
            deadline = time.monotonic() + self.options.cancel_wait_s
            while time.monotonic() < deadline and self.job.outcome() is None and \
                    (self.store.read_trial(self.trial_id) or {}).get("status") in ("pending", "running") and \
                    self.squeue.alive(self.job.job_id):
                time.sleep(0.5)
            mark_stopped(self.store, self.trial_id, EARLY)
        self.finish()


class SlurmTrial(tune.Trainable):
    """The Ray Tune trial of the SLURM backend: a light poller that reports its job's epochs to Tune."""

    def setup(self, config: dict, results: str = "", sweep: str = "", options: SlurmOptions | None = None,
              driver: Driver | None = None) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.poller = TrialPoller(TrainConfig.from_dict(config), results, sweep, options or SlurmOptions(),
                                  driver or Driver.here())
        self.poller.start()

    def step(self) -> dict:
        return self.poller.next_report()

    def save_checkpoint(self, checkpoint_dir: str) -> dict:
        return {"last_epoch": self.poller.last_epoch}

    def load_checkpoint(self, checkpoint: dict | str | None) -> None:
        if isinstance(checkpoint, dict):
            self.poller.last_epoch = int(checkpoint.get("last_epoch", 0))

    def cleanup(self) -> None:
        self.poller.stop()


# -- the driver ------------------------------------------------------------------------------------------


class DriverLife:
    """How this sweep driver ends: an interactive one cancels its jobs, a SLURM-job driver detaches from them."""

    def __init__(self, store: ResultsStore, driver: Driver, options: SlurmOptions):
        self.store, self.driver, self.options = store, driver, options
        self.stopping: str | None = None

    def interrupted(self, why: str) -> None:
        """Ctrl-C, SIGTERM (scancel, preemption) or sweep.sh's time-limit warning reached the driver."""
        if self.stopping:
            return
        self.stopping = why
        if self.driver.batch_job:
            self.detach(why)
        else:
            log.warning("%s: cancelling this driver's SLURM jobs and stopping the sweep", why)
            cancel_jobs(self.store, CANCELLED, f"the sweep driver was interrupted ({why})",
                        driver=self.driver.tag, wait_s=0)

    def detach(self, why: str) -> None:
        """Exit at once, without Tune's graceful stop (which would cancel the trials' jobs): Ray's processes go
        with the driver, the trial jobs keep running, and their rows stay as they are for the next driver."""
        running = [r["job_id"] for _, r in job_records(self.store)
                   if r.get("driver") == self.driver.tag and not r.get("finished")]
        log.warning("%s: the driver (SLURM job %s) detaches; its %d trial job(s) keep running (%s) for the next "
                    "driver to adopt within %.0f s", why, self.driver.batch_job, len(running), ", ".join(running)
                    or "none", self.options.heartbeat_s)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(143)

    def at_exit(self) -> None:
        ids = cancel_jobs(self.store, CANCELLED, "the sweep driver exited", driver=self.driver.tag)
        if ids:
            log.warning("driver exit: cancelled SLURM job(s) %s", ", ".join(ids))

    def install(self) -> None:
        """Hook the exit and the signals. Tune's own SIGINT handler is turned off (TUNE_DISABLE_SIGINT_HANDLER) so
        that ours runs first; ours then raises SIGUSR1, which Tune handles as a graceful stop."""
        atexit.register(self.at_exit)
        if threading.current_thread() is not threading.main_thread():
            return
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"

        def handler(signum, frame) -> None:
            name = signal.Signals(signum).name
            if self.stopping:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                log.warning("%s again: the sweep is already stopping", name)
                return
            try:
                self.interrupted(name)
            finally:
                signal.raise_signal(signal.SIGUSR1)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def make_trainable(results: Path, sweep: str, options: SlurmOptions):
    """The Tune trainable of the SLURM backend; call it in the sweep driver (it snapshots the code and hooks the
    driver's exit and signals, see `DriverLife`)."""
    store = ResultsStore(Path(results).resolve(), sweep)
    store.dir.mkdir(parents=True, exist_ok=True)
    code = snapshot_code(store.code_dir()) if options.snapshot else None
    driver = Driver.here(code, options.python)
    DriverLife(store, driver, options).install()
    trainable = tune.with_parameters(SlurmTrial, results=str(store.root), sweep=sweep, options=options,
                                     driver=driver)
    return tune.with_resources(trainable, {"cpu": options.trial_cpus, "gpu": 0})
