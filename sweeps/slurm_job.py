"""A trial's SLURM job: what runs inside it (train, requeue on SLURM's warning signal, stop on request) and,
on the driver's side, how it is submitted (submitit) and watched (result files and one shared squeue per poll
interval, never sacct). Ray-free: the Ray-side backend (`sweeps.slurm`) and the evaluation jobs
(`sweeps.evaluate`) build on it.

This module is imported on the compute node from the sweep's code snapshot (see `snapshot_code`), so it
imports only the standard library, submitit and the leaf `sweeps.slurm_options` at the top, and the training
code only inside the job.

The job's rank 0 runs a watchdog thread over the trial's control folder (RESULTS/SWEEP/slurm_logs/<trial>):
  * `cancel-<jobid>` appears (the poller, the driver or `sweeps.launch --cancel` cancels the job): record the
    trial as stopped with the reason written in the marker, and end the job at once, instead of training on
    through SLURM's KillWait and overwriting that record;
  * `heartbeat` stops changing for `heartbeat_timeout_s` (no driver has polled the trial for that long: it
    was killed with SIGKILL, its host died, or a requeued driver did not come back in time): record the trial
    as stopped with the reason, and end the job.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit

from sweeps.slurm_options import SlurmOptions, sbatch_parameters

if TYPE_CHECKING:
    from galaxygen.results import ResultsStore

log = logging.getLogger("sweeps.slurm_job")

HEARTBEAT = "heartbeat"
PACKAGES = ("galaxygen", "sweeps", "analysis")
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
# Variables never passed from the driver to a job: the driver's own SLURM allocation (the driver may itself
# be a job, and srun in the trial job would read them) and Ray's settings; SLURM_CONF is kept.
DROPPED_ENV_PREFIXES = ("SLURM_", "RAY_", "SUBMITIT_", "GALAXYGEN_DRIVER_JOB")
KEPT_ENV = ("SLURM_CONF",)
# Why a trial was stopped (its row's stop_reason). Only "early" (the scheduler's decision) is final: a rerun of
# the sweep resumes trials stopped for any other reason from their last checkpoint.
EARLY, CANCELLED, ORPHANED = "early", "cancelled", "orphaned"


def cancel_marker(control: Path, job_id: str) -> Path:
    """The file whose existence asks job `job_id` to stop; it holds the stop reason as JSON."""
    return control / f"cancel-{job_id}"


def mark_stopped(store: ResultsStore, trial_id: str, reason: str, detail: str | None = None) -> None:
    """Record a trial as stopped (with why), unless it completed or failed first."""
    row = store.read_trial(trial_id)
    if row and row.get("status") not in ("completed", "failed"):
        store.write_trial(trial_id, status="stopped", stop_reason=reason, error=detail, end_time=time.time())


def is_final(row: dict | None, config) -> bool:
    """True when a trial's row says it needs no more work for its (resolved) TrainConfig: completed its epochs or
    wall-clock budget, failed, or stopped early by the scheduler. A trial that failed because its results could
    not be written (a full disk, a read-only folder) is not final: a rerun resumes it, as on the local backend."""
    from galaxygen.results import write_error_in
    from galaxygen.train import trained_enough

    status = (row or {}).get("status")
    if status == "completed":
        return trained_enough(row, config)
    if status == "failed":
        return write_error_in(row.get("error") or "") is None
    return status == "stopped" and row.get("stop_reason") == EARLY


class TrialJob(submitit.helpers.Checkpointable):
    """One trial's training as a submitit job: `checkpoint()` (on USR2) requeues it, and `train.run` resumes
    from runs/<trial_id>/checkpoints/last.pt, rewriting any epoch it repeats (so metrics never duplicate)."""

    def __init__(self, config: dict, results: str, sweep: str, trial_id: str, control: str | None = None,
                 heartbeat_timeout_s: float = 0.0, evaluate: bool = True):
        self.config = dict(config)
        self.results = str(results)
        self.sweep = sweep
        self.trial_id = trial_id
        self.control = control
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.evaluate = evaluate  # False: the end-of-run evaluation is a job of its own (see eval_argv)

    def __call__(self) -> dict:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        import galaxygen
        from galaxygen.config import TrainConfig
        from galaxygen.train import run

        rank = int(os.environ.get("SLURM_PROCID", "0"))
        job_id = os.environ.get("SLURM_JOB_ID", "")
        log.info("trial %s of sweep %s on %s (rank %s, job %s, restarts %s); code from %s", self.trial_id,
                 self.sweep, socket.gethostname(), rank, job_id, os.environ.get("SLURM_RESTART_COUNT", "0"),
                 Path(galaxygen.__file__).parent)
        if rank == 0 and self.control and job_id:
            Watchdog(Path(self.control), job_id, self.heartbeat_timeout_s, self.stop_now).start()
        return run(TrainConfig.from_dict(self.config), self.results, self.sweep, trial_id=self.trial_id,
                   evaluate=self.evaluate)

    def stop_now(self, reason: str, detail: str | None) -> None:
        """Record the trial as stopped (unless it already ended), cancel this job and die at once."""
        from galaxygen.results import ResultsStore

        log.warning("stopping (%s): %s", reason, detail or "cancelled by the sweep")
        try:
            mark_stopped(ResultsStore(self.results, self.sweep), self.trial_id, reason, detail)
        finally:
            job_id = os.environ.get("SLURM_JOB_ID")
            if job_id:  # marks the job CANCELLED and ends the other tasks
                subprocess.run(["scancel", job_id], check=False, timeout=60)
            # die now, so the training thread cannot overwrite the "stopped" record during KillWait
            os.kill(os.getpid(), signal.SIGKILL)


def eval_argv(store: ResultsStore, trial_id: str, n: int, seed: int, workers: int) -> list[str]:
    """`galaxygen.evaluate` arguments scoring a trial's best checkpoint into its eval part, like the in-job
    evaluation of train.run (same n, seed and baselines)."""
    return [str(store.checkpoint(trial_id, "best")), "--n", str(n), "--seed", str(seed), "--out", str(store.dir),
            "--trial", trial_id, "--workers", str(workers), "--no-progress"]


def run_evaluate(argv: list[str], complete: str | None = None) -> None:
    """One evaluation job: `python -m galaxygen.evaluate ARGV` (raises, so SLURM and submitit see a failure).

    complete: a trial's best checkpoint to complete first (`checkpoint.complete`: a VAE's latent prior), which its
    training job leaves to this CPU job."""
    from galaxygen.evaluate.__main__ import main

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if complete:
        from galaxygen import checkpoint

        checkpoint.complete(complete)
    status = main(argv)
    if status:
        raise RuntimeError(f"python -m galaxygen.evaluate {' '.join(argv)} exited with status {status}")


class Watchdog(threading.Thread):
    """Watches the control folder every second: a cancel marker, or a heartbeat silent for `timeout_s`.

    The heartbeat counts as alive while its content or mtime changes, timed on this node's monotonic clock,
    so clock skew between the driver's host and the compute node does not matter. timeout_s=0: no heartbeat.
    """

    def __init__(self, control: Path, job_id: str, timeout_s: float, stop: Callable[[str, str | None], None]):
        super().__init__(name="trial-watchdog", daemon=True)
        self.heartbeat = control / HEARTBEAT
        self.marker = cancel_marker(control, job_id)
        self.timeout_s = timeout_s
        self.stop = stop

    def heartbeat_stamp(self) -> tuple | None:
        """The heartbeat file's mtime and content (None while it does not exist)."""
        try:
            return self.heartbeat.stat().st_mtime_ns, self.heartbeat.read_bytes()
        except OSError:
            return None

    def cancel_request(self) -> tuple[str, str | None] | None:
        """(reason, detail) from this job's cancel marker, or None while there is none."""
        try:
            text = self.marker.read_text()
        except OSError:
            return None
        try:
            request = json.loads(text)
            return str(request.get("reason") or CANCELLED), request.get("detail")
        except (ValueError, AttributeError):  # a marker touched by hand
            return CANCELLED, None

    def run(self) -> None:
        last, changed = self.heartbeat_stamp(), time.monotonic()
        while True:
            time.sleep(1.0)
            request = self.cancel_request()
            if request is not None:
                self.stop(*request)
                return
            if self.timeout_s <= 0:
                continue
            now = self.heartbeat_stamp()
            if now != last:
                last, changed = now, time.monotonic()
            elif time.monotonic() - changed > self.timeout_s:
                self.stop(ORPHANED, f"the sweep driver's poller has not touched {self.heartbeat} for "
                          f"{time.monotonic() - changed:.0f} s (driver killed, or a requeued driver did not come "
                          "back in time); run the sweep's command again to resume it")
                return


# -- submission and state, on the driver's side ----------------------------------------------------------


# -- submission, on the driver's side --------------------------------------------------------------------


@dataclass(frozen=True)
class Driver:
    """What the sweep driver hands to its trials: where it runs, its environment, python and code snapshot.

    `batch_job` is the driver's own SLURM job id when it runs as `slurm/sweep.sh` (which exports
    GALAXYGEN_DRIVER_JOB): such a driver detaches from its trial jobs when it stops (time limit, preemption,
    scancel) instead of cancelling them, and the next driver of the sweep adopts them.
    """

    tag: str
    cwd: str
    python: str
    environ: dict[str, str] = field(default_factory=dict)
    code: str | None = None
    batch_job: str | None = None

    @classmethod
    def here(cls, code: Path | None = None, python: str | None = None) -> Driver:
        env = {k: v for k, v in os.environ.items() if k in KEPT_ENV or not k.startswith(DROPPED_ENV_PREFIXES)}
        return cls(f"{socket.gethostname()}:{os.getpid()}", os.getcwd(), python or sys.executable, env,
                   str(code) if code else None, os.environ.get("GALAXYGEN_DRIVER_JOB") or None)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Temporarily replace os.environ (sbatch passes the submitting environment on to the job)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def job_setup_lines(options: SlurmOptions, driver: Driver) -> list[str]:
    """Shell lines of the sbatch script before srun: the code snapshot first on PYTHONPATH, then the user's."""
    lines = []
    if driver.code:
        code = shlex.quote(driver.code)
        # PYTHONSAFEPATH: `python -m` must not put the working directory (often the live repo) first
        lines += [f"export PYTHONPATH={code}${{PYTHONPATH:+:$PYTHONPATH}}", "export PYTHONSAFEPATH=1",
                  f"export GALAXYGEN_CODE={code}"]
    lines.append("export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}")
    return lines + list(options.setup)


def executor_parameters(options: SlurmOptions, driver: Driver, name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (its sbatch names) for one job."""
    params: dict[str, Any] = {
        "job_name": name, "time": options.timeout_min, "nodes": options.nodes,
        "ntasks_per_node": options.tasks, "signal_delay_s": options.signal_delay_s,
        "setup": job_setup_lines(options, driver),
        # one task failing kills the others, so a rank never waits forever for a dead peer
        "srun_args": ["--kill-on-bad-exit=1"],
        "additional_parameters": {"chdir": driver.cwd, **sbatch_parameters(options.sbatch)},
    }
    if options.gpus_per_node:
        params["gpus_per_node"] = options.gpus_per_node
    if options.mem_gb is not None:
        params["mem"] = f"{int(options.mem_gb)}G" if options.mem_gb == int(options.mem_gb) \
            else f"{round(options.mem_gb * 1024)}M"
    for key in ("cpus_per_task", "partition", "account", "qos", "constraint"):
        if getattr(options, key) is not None:
            params[key] = getattr(options, key)
    return params


def executor(folder: Path, options: SlurmOptions, driver: Driver, name: str, **changes) -> submitit.SlurmExecutor:
    """A submitit executor for jobs shaped by `options` (plus sbatch parameter `changes`), run from the driver's
    code snapshot."""
    folder.mkdir(parents=True, exist_ok=True)
    out = submitit.SlurmExecutor(folder=folder, max_num_timeout=options.max_requeues,
                                 python=shlex.quote(options.python or driver.python))
    out.update_parameters(**{**executor_parameters(options, driver, name), **changes})
    return out


def submit(function, folder: Path, options: SlurmOptions, driver: Driver, name: str) -> SlurmJobRef:
    """Submit `function()` as one SLURM job (all its tasks run it) and return a reference to it."""
    with environment(driver.environ):
        job = executor(folder, options, driver, name).submit(function)
    return SlurmJobRef(str(job.job_id), str(folder), options.nodes * options.tasks, time.time())


def source_root() -> Path:
    """The folder holding the galaxygen, sweeps and analysis packages this process imports."""
    return Path(__file__).resolve().parent.parent


def snapshot_code(dest: Path, root: Path | None = None) -> Path:
    """Copy the packages' source into dest/<content hash>/ (once per distinct code) and return that folder."""
    from galaxygen import staging
    from galaxygen.results import atomic_write_json

    root = root or source_root()
    files = sorted(
        p for pkg in PACKAGES if (root / pkg).is_dir() for p in (root / pkg).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not any(s.startswith(".") for s in p.relative_to(root).parts)
        and p.suffix not in (".pyc", ".pyo")
    )
    digest = hashlib.sha1()
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    out = dest / digest.hexdigest()[:12]
    if (out / "SNAPSHOT.json").exists():
        return out
    tmp = staging.temporary(out)  # .<hash>.tmp-<host>-<pid>: the next launcher removes it if this one is killed
    shutil.rmtree(tmp, ignore_errors=True)
    for path in files:
        target = tmp / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    atomic_write_json({"source": str(root), "files": len(files), "created": time.time(),
                       "git": git_describe(root)}, tmp / "SNAPSHOT.json")
    try:
        os.replace(tmp, out)
    except OSError:  # another driver made the same snapshot first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("code snapshot %s (%d files from %s)", out, len(files), root)
    return out


def git_describe(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


# -- job state, on the driver's side ---------------------------------------------------------------------


@dataclass
class SlurmJobRef:
    """A submitted job: its SLURM id and submitit folder. State from result files and squeue, not sacct."""

    job_id: str
    folder: str
    tasks: int = 1
    submitted: float = 0.0

    def result_path(self, task: int) -> Path:
        return Path(self.folder) / f"{self.job_id}_{task}_result.pkl"

    def log_path(self, task: int = 0, kind: str = "err") -> Path:
        return Path(self.folder) / f"{self.job_id}_{task}_log.{kind}"

    def results(self) -> dict[int, tuple[str, Any]]:
        """The tasks that finished: {task: ("success", value) or ("error", remote traceback)}."""
        from submitit.core.utils import pickle_load

        out = {}
        for task in range(self.tasks):
            path = self.result_path(task)
            if path.exists():
                try:
                    out[task] = pickle_load(path)
                except Exception as err:  # a truncated or foreign pickle: report it as the task's error
                    out[task] = ("error", f"could not read {path}: {err}")
        return out

    def outcome(self) -> tuple[str, Any] | None:
        """("completed", rank 0's return value) or ("failed", remote traceback) once known, else None."""
        results = self.results()
        for task in sorted(results):
            if results[task][0] == "error":
                return "failed", results[task][1]
        if 0 in results:
            return "completed", results[0][1]
        return None

    def cancel(self, control: Path | None = None, reason: str = CANCELLED, detail: str | None = None) -> None:
        """Ask the job to stop: its cancel marker in the trial's control folder, holding why (the job's watchdog
        records the trial as stopped with that reason and exits within a second), then scancel (SLURM sends
        SIGTERM, which submitit ignores, and SIGKILL after the cluster's KillWait)."""
        if control is not None:
            from galaxygen.results import atomic_write_json

            with contextlib.suppress(OSError):
                atomic_write_json({"reason": reason, "detail": detail}, cancel_marker(control, self.job_id))
        scancel(self.job_id)

    def log_tail(self, lines: int = 30) -> str:
        path = self.log_path(0, "err")
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"(no log at {path})"


def scancel(*job_ids: str) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=60, check=False)


def ask_squeue(job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
    """{job id: (state, reason)} of the jobs SLURM still lists, from ONE `squeue` call (`-t all`: jobs that ended
    recently are listed too, with their final state); None when squeue is missing or fails. Never sacct."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-t", "all", f"--jobs={','.join(job_ids)}", "-o", "%i|%T|%r"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:  # one unknown id alone is an error; several are simply not listed
        return {} if "Invalid job id" in out.stderr else None
    jobs = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|", 2)
        if len(parts) == 3:
            jobs[parts[0]] = (parts[1], parts[2])
    return jobs


class SqueueSnapshot:
    """The SLURM state of every unfinished job of a sweep, from ONE `squeue` call per `max_age_s`, shared by all
    its pollers (each trial polls in its own Ray worker process) and by `sweeps.status` through
    slurm_logs/squeue.json (`ResultsStore.squeue_path`).

    Whichever poller first finds the file older than `max_age_s` takes an fcntl lock, asks
    `squeue --jobs=<every unfinished job id in slurm_logs/*/job.json>` and rewrites the file atomically; the
    others read it. A job submitted after the snapshot counts as alive until the next one asks about it.
    The file: {"time", "max_age_s", "asked": [ids], "ok": squeue answered, "jobs": {id: state},
    "reasons": {id: SLURM's reason, for pending jobs}}.
    """

    def __init__(self, store: ResultsStore, max_age_s: float):
        self.store = store
        self.path = store.squeue_path()
        self.max_age_s = max_age_s

    def read(self) -> dict | None:
        try:
            snap = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return snap if isinstance(snap, dict) else None

    def fresh(self, snap: dict | None) -> bool:
        return snap is not None and 0 <= time.time() - snap.get("time", 0) < self.max_age_s

    def current(self) -> dict:
        """The snapshot, refreshed first if it is older than max_age_s."""
        snap = self.read()
        if self.fresh(snap):
            return snap
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / f".{self.path.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            snap = self.read()  # another poller may have refreshed it while we waited for the lock
            if not self.fresh(snap):
                snap = self.refresh()
        return snap

    def refresh(self) -> dict:
        from galaxygen.results import atomic_write_json

        ids = sorted(unfinished_jobs(self.store), key=lambda j: (len(j), j))
        jobs = ask_squeue(ids)
        snap: dict[str, Any] = {"time": time.time(), "max_age_s": self.max_age_s, "asked": ids,
                                "ok": jobs is not None, "jobs": {j: s for j, (s, _) in (jobs or {}).items()},
                                "reasons": {j: r for j, (s, r) in (jobs or {}).items() if s == "PENDING"}}
        atomic_write_json(snap, self.path)
        return snap

    def state(self, job_id: str) -> str | None:
        """The job's squeue state, "UNKNOWN" when squeue cannot tell (not asked yet, or it failed), None when
        squeue no longer lists it."""
        snap = self.current()
        if not snap.get("ok") or job_id not in snap.get("asked", ()):
            return "UNKNOWN"
        return snap["jobs"].get(job_id)

    def alive(self, job_id: str) -> bool:
        return self.state(job_id) in ACTIVE_STATES | {"UNKNOWN"}


def live_snapshot(store: ResultsStore) -> dict | None:
    """The sweep's squeue snapshot while a driver keeps it up to date (its pollers refresh it once it is older
    than its max_age_s, at their next poll), else None: younger than twice that interval."""
    snap = SqueueSnapshot(store, 0).read()
    if snap is None:
        return None
    age = time.time() - float(snap.get("time", 0))
    return snap if 0 <= age < 2 * float(snap.get("max_age_s", 0)) else None


def job_records(store: ResultsStore) -> Iterator[tuple[Path, dict]]:
    """(path, record) of every trial's slurm_logs/<trial>/job.json."""
    for path in store.job_records():
        try:
            yield path, json.loads(path.read_text())
        except (OSError, ValueError):
            continue


def unfinished_jobs(store: ResultsStore) -> list[str]:
    """Job ids (training and evaluation) of the trials whose job record is not finished."""
    out = []
    for _, record in job_records(store):
        if not record.get("finished"):
            out += [j for j in (record.get("job_id"), (record.get("eval_job") or {}).get("job_id")) if j]
    return out


def cancel_jobs(store: ResultsStore, reason: str, detail: str, driver: str | None = None,
                wait_s: float = 30.0) -> list[str]:
    """Cancel every unfinished trial job of the sweep (only `driver`'s, when given), mark the jobs finished and
    their trials stopped with `reason`; returns the cancelled job ids."""
    cancelled = []
    for path, record in job_records(store):
        if record.get("finished") or not record.get("job_id") or driver not in (None, record.get("driver")):
            continue
        job = SlurmJobRef(record["job_id"], record["folder"], record.get("tasks", 1))
        evaluation = SlurmJobRef(**record["eval_job"]) if record.get("eval_job") else None
        if job.outcome() is None:
            job.cancel(path.parent, reason, detail)
            cancelled.append((job, record["trial_id"]))
        if evaluation is not None and evaluation.outcome() is None:
            scancel(evaluation.job_id)
            cancelled.append((evaluation, record["trial_id"]))
        from galaxygen.results import atomic_write_json

        atomic_write_json({**record, "finished": True, "ended": time.time()}, path)
    deadline = time.monotonic() + wait_s
    for _, trial_id in cancelled:  # the job's watchdog records the reason; wait for it, then make sure
        while time.monotonic() < deadline and (store.read_trial(trial_id) or {}).get("status") in ("pending", "running"):
            time.sleep(0.5)
        mark_stopped(store, trial_id, reason, detail)
    return [job.job_id for job, _ in cancelled]


def cancel_sweep(store: ResultsStore) -> list[str]:
    """`sweeps.launch NAME --cancel`: cancel the sweep's drivers that run as SLURM jobs (so none requeues
    itself) and every unfinished trial job of every driver; their trials are recorded stopped ("cancelled")."""
    drivers = sorted({r.get("batch_job") for _, r in job_records(store)} - {None})
    scancel(*drivers)
    return drivers + cancel_jobs(store, CANCELLED, "cancelled with sweeps.launch --cancel")
