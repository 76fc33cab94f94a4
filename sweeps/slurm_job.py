"""A trial's SLURM job: what runs inside it (train, requeue on SLURM's warning signal, stop on request) and,
on the driver's side, how it is submitted (submitit) and watched (result files and squeue, never sacct).

This module is imported on the compute node from the sweep's code snapshot (see `sweeps.slurm`), so it
imports only the standard library and submitit at the top, and the training code only inside the job.

The job's rank 0 runs a watchdog thread over the trial's control folder (RESULTS/SWEEP/slurm_logs/<trial>):
  * `cancel-<jobid>` appears (the poller or the driver cancels the job): record the trial as stopped and
    end the job at once, instead of training on through SLURM's KillWait and overwriting that record;
  * `heartbeat` stops changing for `heartbeat_timeout_s` (the driver was killed with SIGKILL or its host
    died): record the trial as stopped with the reason, and end the job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
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

if TYPE_CHECKING:
    from sweeps.slurm import SlurmOptions

log = logging.getLogger("sweeps.slurm_job")

HEARTBEAT = "heartbeat"
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
# Variables never passed from the driver to a job: the driver's own SLURM allocation (the driver may itself
# be a job, and srun in the trial job would read them) and Ray's settings; SLURM_CONF is kept.
DROPPED_ENV_PREFIXES = ("SLURM_", "RAY_", "SUBMITIT_")
KEPT_ENV = ("SLURM_CONF",)


class SlurmOptionsError(ValueError):
    """A SLURM option or profile key is not allowed; the message names it and what is allowed."""


def cancel_marker(control: Path, job_id: str) -> Path:
    """The file whose existence asks job `job_id` to stop."""
    return control / f"cancel-{job_id}"


class TrialJob(submitit.helpers.Checkpointable):
    """One trial's training as a submitit job: `checkpoint()` (on USR2) requeues it, and `train.run` resumes
    from runs/<trial_id>/checkpoints/last.pt, rewriting any epoch it repeats (so metrics never duplicate)."""

    def __init__(self, config: dict, results: str, sweep: str, trial_id: str, control: str | None = None,
                 heartbeat_timeout_s: float = 0.0):
        self.config = dict(config)
        self.results = str(results)
        self.sweep = sweep
        self.trial_id = trial_id
        self.control = control
        self.heartbeat_timeout_s = heartbeat_timeout_s

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
        return run(TrainConfig.from_dict(self.config), self.results, self.sweep, trial_id=self.trial_id)

    def stop_now(self, error: str | None) -> None:
        """Record the trial as stopped (unless it already ended), cancel this job and die at once."""
        from galaxygen.results import ResultsStore

        log.warning("stopping: %s", error or "cancelled by the sweep")
        try:
            store = ResultsStore(self.results, self.sweep)
            if (store.read_trial(self.trial_id) or {}).get("status") not in ("completed", "failed"):
                store.write_trial(self.trial_id, status="stopped", error=error, end_time=time.time())
        finally:
            job_id = os.environ.get("SLURM_JOB_ID")
            if job_id:  # marks the job CANCELLED and ends the other tasks
                subprocess.run(["scancel", job_id], check=False, timeout=60)
            # die now, so the training thread cannot overwrite the "stopped" record during KillWait
            os.kill(os.getpid(), signal.SIGKILL)


class Watchdog(threading.Thread):
    """Watches the control folder every second: a cancel marker, or a heartbeat silent for `timeout_s`.

    The heartbeat counts as alive while its content or mtime changes, timed on this node's monotonic clock,
    so clock skew between the driver's host and the compute node does not matter. timeout_s=0: no heartbeat.
    """

    def __init__(self, control: Path, job_id: str, timeout_s: float, stop: Callable[[str | None], None]):
        super().__init__(name="trial-watchdog", daemon=True)
        self.heartbeat = control / HEARTBEAT
        self.marker = cancel_marker(control, job_id)
        self.timeout_s = timeout_s
        self.stop = stop

    def beat(self) -> tuple | None:
        try:
            return self.heartbeat.stat().st_mtime_ns, self.heartbeat.read_bytes()
        except OSError:
            return None

    def run(self) -> None:
        last, changed = self.beat(), time.monotonic()
        while True:
            time.sleep(1.0)
            if self.marker.exists():
                self.stop(None)
                return
            if self.timeout_s <= 0:
                continue
            now = self.beat()
            if now != last:
                last, changed = now, time.monotonic()
            elif time.monotonic() - changed > self.timeout_s:
                self.stop(f"stopped: the sweep driver's poller has not touched {self.heartbeat} for "
                          f"{time.monotonic() - changed:.0f} s (driver killed?); resume the sweep with --resume")
                return


# -- submission and state, on the driver's side ----------------------------------------------------------


def sbatch_parameters(lines: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Extra `#SBATCH` lines ("#SBATCH --mail-type=FAIL", "--exclusive", "gres=gpu:a100:2") as submitit's
    additional_parameters (these override the generated ones)."""
    out: dict[str, Any] = {}
    for line in lines:
        text = line.strip()
        text = text[len("#SBATCH"):].strip() if text.startswith("#SBATCH") else text
        text = text.lstrip("-")
        match = re.fullmatch(r"([A-Za-z][\w-]*)(?:[= ]\s*(.+))?", text)
        if not match:
            raise SlurmOptionsError(f"invalid sbatch line {line!r}: expected '--option=value' or '--flag'")
        key, value = match.group(1).replace("_", "-"), match.group(2)
        out[key] = True if value is None else value.strip()
    return out


@dataclass(frozen=True)
class Driver:
    """What the sweep driver hands to its trials: where it runs, its environment, python and code snapshot."""

    tag: str
    cwd: str
    python: str
    environ: dict[str, str] = field(default_factory=dict)
    code: str | None = None

    @classmethod
    def here(cls, code: Path | None = None, python: str | None = None) -> Driver:
        env = {k: v for k, v in os.environ.items() if k in KEPT_ENV or not k.startswith(DROPPED_ENV_PREFIXES)}
        return cls(f"{socket.gethostname()}:{os.getpid()}", os.getcwd(), python or sys.executable, env,
                   str(code) if code else None)


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
    """submitit SlurmExecutor parameters (its sbatch names) for one trial job."""
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


def submit(function, folder: Path, options: SlurmOptions, driver: Driver, name: str) -> SlurmJobRef:
    """Submit `function()` as one SLURM job (all its tasks run it) and return a reference to it."""
    import submitit

    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=options.max_requeues,
                                      python=shlex.quote(options.python or driver.python))
    executor.update_parameters(**executor_parameters(options, driver, name))
    with environment(driver.environ):
        job = executor.submit(function)
    return SlurmJobRef(str(job.job_id), str(folder), options.nodes * options.tasks, time.time())


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

    def squeue_state(self) -> str | None:
        """The job's state from `squeue -t all` (finished jobs stay visible for MinJobAge), or None if unknown."""
        try:
            out = subprocess.run(["squeue", "-h", "-t", "all", "-j", self.job_id, "-o", "%T"], capture_output=True,
                                 text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return "UNKNOWN"  # cannot tell: do not declare the job lost
        if out.returncode != 0:
            return None if "Invalid job id" in out.stderr else "UNKNOWN"
        states = out.stdout.split()
        return states[0] if states else None

    def alive(self) -> bool:
        return self.squeue_state() in ACTIVE_STATES | {"UNKNOWN"}

    def cancel(self, control: Path | None = None) -> None:
        """Ask the job to stop: its cancel marker in the trial's control folder (the job's watchdog records
        the trial as stopped and exits within a second), then scancel (SLURM sends SIGTERM, which submitit
        ignores, and SIGKILL after the cluster's KillWait)."""
        if control is not None:
            with contextlib.suppress(OSError):
                cancel_marker(control, self.job_id).touch()
        subprocess.run(["scancel", self.job_id], capture_output=True, timeout=60, check=False)

    def wait_gone(self, timeout_s: float) -> bool:
        """Wait until squeue no longer lists the job as active (a cancelled job still runs for KillWait)."""
        deadline = time.monotonic() + timeout_s
        while self.squeue_state() in ACTIVE_STATES | {"UNKNOWN"}:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def log_tail(self, lines: int = 30) -> str:
        path = self.log_path(0, "err")
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"(no log at {path})"
