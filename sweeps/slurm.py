"""The SLURM backend: every Ray Tune trial is one submitit job; the trial in Ray only polls the results folder.

A trial's job trains with `galaxygen.train.run` on `nodes x tasks_per_node` SLURM tasks (one per GPU, DDP
from the SLURM task environment) and writes its metrics to RESULTS/SWEEP/metrics/<trial_id>/. The Tune
trial (`SlurmTrial`, a fraction of a CPU, no GPU) reports each new epoch part to Tune, so ASHA and other
schedulers work across jobs, and cancels the job when Tune stops the trial. Job state comes from
submitit's result files and `squeue`, never `sacct`.

Files under RESULTS/SWEEP/:

    code/<hash>/                    the code snapshot the jobs import (editing the repo does not touch them)
    slurm_logs/<trial_id>/job.json  the trial's current job: id, submitit folder, driver
    slurm_logs/<trial_id>/heartbeat touched by the poller; a job whose heartbeat stops cancels itself
    slurm_logs/<trial_id>/cancel-<jobid>  asks that job to record the trial as stopped and exit at once
    slurm_logs/<trial_id>/<time>/   submitit's folder: sbatch script, pickles, <jobid>_<task>_log.{out,err}

Cancellation, three ways: `SlurmTrial.cleanup` (Tune stops a trial), the driver's exit hook (Ctrl-C,
SIGTERM, driver shutdown; SIGTERM is turned into Tune's graceful SIGINT stop), and the heartbeat (the
driver was killed with SIGKILL or its host died: the job cancels itself after `heartbeat_s`, 10 minutes
by default).
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import tomllib
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ray import tune

from galaxygen.config import TrainConfig
from galaxygen.results import ResultsStore, atomic_write_json, epoch_report
from sweeps.slurm_job import (  # noqa: F401 - re-exported: the backend's job side
    ACTIVE_STATES,
    HEARTBEAT,
    Driver,
    SlurmJobRef,
    SlurmOptionsError,
    cancel_marker,
    executor_parameters,
    sbatch_parameters,
    submit,
)

log = logging.getLogger("sweeps.slurm")

PACKAGES = ("galaxygen", "sweeps", "analysis")
EPOCH_PART = re.compile(r"^epoch-(\d+)\.parquet$")


class SlurmTrialError(RuntimeError):
    """A trial's SLURM job failed; the message holds the job's remote traceback."""


@dataclass(frozen=True)
class SlurmOptions:
    """How each trial's SLURM job is shaped and watched (command line > profile file > these defaults)."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one task per GPU (or 1 without GPUs)
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    timeout_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch: tuple[str, ...] = ()  # extra "#SBATCH" lines, e.g. "--mail-type=FAIL" or "--exclusive"
    setup: tuple[str, ...] = ()  # shell lines run before srun, e.g. "module load cuda/12.4"
    signal_delay_s: int = 120  # USR2 this long before the time limit: checkpoint and requeue
    max_requeues: int = 3  # requeues after time-outs (preemptions do not count)
    poll_s: float = 5.0  # how often a trial looks for new metrics
    squeue_s: float = 30.0  # how often a trial asks squeue whether its job still exists
    heartbeat_s: float = 600.0  # a job with no poller for this long cancels itself (0: never)
    cancel_wait_s: float = 120.0  # after scancel, wait this long for the job to end before recording "stopped"
    trial_cpus: float = 0.1  # Ray CPUs per polling trial
    snapshot: bool = True  # run jobs from a copy of the code in RESULTS/SWEEP/code/
    python: str | None = None  # the jobs' python (default: the driver's, i.e. the project's .venv)

    def __post_init__(self) -> None:
        def bad(key: str, allowed: str) -> None:
            raise SlurmOptionsError(f"invalid SLURM option {key}={getattr(self, key)!r}: allowed {allowed}")

        for key in ("nodes", "timeout_min"):
            if getattr(self, key) < 1:
                bad(key, "an integer >= 1")
        for key in ("tasks_per_node", "cpus_per_task"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                bad(key, "an integer >= 1 (or unset)")
        for key in ("gpus_per_node", "signal_delay_s", "max_requeues"):
            if getattr(self, key) < 0:
                bad(key, "an integer >= 0")
        if self.mem_gb is not None and not self.mem_gb > 0:
            bad("mem_gb", "a number of GB > 0 (or unset for the cluster's DefMemPerCPU)")
        for key in ("poll_s", "squeue_s", "trial_cpus", "cancel_wait_s"):
            if not getattr(self, key) > 0:
                bad(key, "a number > 0")
        if self.heartbeat_s < 0:
            bad("heartbeat_s", "a number of seconds >= 0 (0 disables the heartbeat)")
        sbatch_parameters(self.sbatch)

    @property
    def tasks(self) -> int:
        """SLURM tasks per node: one per GPU unless set."""
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SlurmOptions:
        """Options from a profile or the command line; keys may use dashes; unknown keys fail."""
        out: dict[str, Any] = {}
        names = {f.name: f for f in fields(cls)}
        for raw, value in values.items():
            key = raw.replace("-", "_")
            if key not in names:
                raise SlurmOptionsError(f"unknown SLURM option {raw!r}: allowed {', '.join(names)}")
            out[key] = _coerce(key, names[key].type, value)
        return cls(**out)


def _coerce(key: str, hint: str, value: Any) -> Any:
    if value is None:
        return None
    try:
        if hint.startswith("tuple"):
            return tuple(str(v) for v in ([value] if isinstance(value, str) else value))
        if hint.startswith("bool"):
            if isinstance(value, str):
                return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[value.lower()]
            return bool(value)
        if hint.startswith("int"):
            if float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if hint.startswith("float"):
            return float(value)
        return str(value)
    except (KeyError, TypeError, ValueError):
        raise SlurmOptionsError(f"invalid SLURM option {key}={value!r}: expected {hint}") from None


# -- profile files and the command line ------------------------------------------------------------------


def default_profile() -> Path | None:
    """$GALAXYGEN_SLURM_PROFILE, else the first of ~/.config/galaxygen/slurm.{yaml,yml,toml} that exists."""
    if os.environ.get("GALAXYGEN_SLURM_PROFILE"):
        return Path(os.environ["GALAXYGEN_SLURM_PROFILE"])
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "galaxygen"
    for name in ("slurm.yaml", "slurm.yml", "slurm.toml"):
        if (config / name).is_file():
            return config / name
    return None


def load_profile(path: str | os.PathLike) -> dict[str, Any]:
    """A cluster profile: a YAML or TOML mapping of SlurmOptions keys (optionally under a `slurm` table)."""
    path = Path(path)
    if not path.is_file():
        raise SlurmOptionsError(f"SLURM profile {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as err:
        raise SlurmOptionsError(f"SLURM profile {path} is not valid {path.suffix.lstrip('.').upper() or 'YAML'}: "
                                f"{err}") from None
    if not isinstance(data, dict):
        raise SlurmOptionsError(f"SLURM profile {path} must be a mapping of option: value")
    if isinstance(data.get("slurm"), dict):
        data = data["slurm"]
    SlurmOptions.from_dict(data)  # fail early, naming the file's bad key
    return data


# (flag, option, type, metavar, help); every default is None so that a profile's value shows through
CLI = [
    ("--nodes", "nodes", int, "N", "nodes per trial job (default 1)"),
    ("--gpus-per-node", "gpus_per_node", int, "N", "GPUs per node (default 0); one task per GPU"),
    ("--tasks-per-node", "tasks_per_node", int, "N", "tasks per node (default: one per GPU, or 1)"),
    ("--cpus-per-task", "cpus_per_task", int, "N", "CPUs per task (default: the cluster's)"),
    ("--mem-gb", "mem_gb", float, "GB", "memory per node (default: the cluster's DefMemPerCPU)"),
    ("--timeout-min", "timeout_min", int, "MIN", "time limit per job; the job is checkpointed and requeued "
     "before it (default 60)"),
    ("--partition", "partition", str, "NAME", "SLURM partition (default: the cluster's)"),
    ("--account", "account", str, "NAME", "SLURM account"),
    ("--qos", "qos", str, "NAME", "SLURM quality of service"),
    ("--constraint", "constraint", str, "EXPR", "SLURM node constraint, e.g. a100"),
    ("--slurm-signal-delay-s", "signal_delay_s", int, "S", "USR2 (checkpoint + requeue) this long before the "
     "time limit (default 120)"),
    ("--slurm-max-requeues", "max_requeues", int, "N", "requeues after time-outs (default 3)"),
    ("--slurm-poll-s", "poll_s", float, "S", "seconds between metric polls per trial (default 5)"),
    ("--slurm-squeue-s", "squeue_s", float, "S", "seconds between squeue checks per trial (default 30)"),
    ("--slurm-heartbeat-s", "heartbeat_s", float, "S", "a job whose sweep driver is gone cancels itself after "
     "this many seconds (default 600; 0 never)"),
    ("--slurm-python", "python", str, "CMD", "python command of the jobs (default: this python)"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the SLURM backend's options (used with --backend slurm) to the launcher's parser."""
    group = parser.add_argument_group("SLURM backend (--backend slurm)", "Defaults come from a cluster profile: "
                                      "--slurm-profile, $GALAXYGEN_SLURM_PROFILE or ~/.config/galaxygen/slurm.yaml "
                                      "(YAML or TOML: partition, gpus_per_node, cpus_per_task, mem_gb, timeout_min, "
                                      "account, qos, constraint, sbatch: [lines], setup: [lines], ...); flags override it.")
    group.add_argument("--slurm-profile", metavar="FILE", help="cluster profile (YAML or TOML)")
    for flag, dest, typ, metavar, help_text in CLI:
        group.add_argument(flag, dest=f"slurm_{dest}", type=typ, default=None, metavar=metavar, help=help_text)
    group.add_argument("--sbatch", dest="slurm_sbatch", action="append", default=None, metavar="LINE",
                       help="extra #SBATCH line, repeatable (e.g. --sbatch=--mail-type=FAIL)")
    group.add_argument("--slurm-setup", dest="slurm_setup", action="append", default=None, metavar="LINE",
                       help="shell line run in the job before training, repeatable (e.g. 'module load cuda')")
    group.add_argument("--slurm-no-snapshot", dest="slurm_snapshot", action="store_false", default=None,
                       help="run jobs from the live code instead of a snapshot in RESULTS/SWEEP/code/")


def options_from_args(args: argparse.Namespace) -> SlurmOptions:
    """SlurmOptions from parsed arguments: the profile's values, overridden (lists: extended) by flags."""
    profile = getattr(args, "slurm_profile", None) or default_profile()
    values = dict(load_profile(profile)) if profile else {}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    for _, dest, _, _, _ in CLI:
        if getattr(args, f"slurm_{dest}", None) is not None:
            values[dest] = getattr(args, f"slurm_{dest}")
    for dest in ("sbatch", "setup"):
        extra = getattr(args, f"slurm_{dest}", None)
        if extra:
            before = values.get(dest) or []
            values[dest] = [*([before] if isinstance(before, str) else before), *extra]
    if getattr(args, "slurm_snapshot", None) is False:
        values["snapshot"] = False
    return SlurmOptions.from_dict(values)


# -- the code snapshot -----------------------------------------------------------------------------------


def source_root() -> Path:
    """The folder holding the galaxygen, sweeps and analysis packages this process imports."""
    import galaxygen

    return Path(galaxygen.__file__).resolve().parent.parent


def snapshot_code(dest: Path, root: Path | None = None) -> Path:
    """Copy the packages' source into dest/<content hash>/ (once per distinct code) and return that folder."""
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
    tmp = dest / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
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


# -- the poller ------------------------------------------------------------------------------------------


class TrialPoller:
    """One trial on SLURM, without Ray: submits (or adopts) its job and yields one report per finished epoch."""

    def __init__(self, config: TrainConfig, results: str | os.PathLike, sweep: str, options: SlurmOptions,
                 driver: Driver, trial_id: str | None = None):
        self.config = config.resolved()
        self.trial_id = trial_id or self.config.signature()
        self.store = ResultsStore(results, sweep)
        self.options, self.driver = options, driver
        self.dir = self.store.dir / "slurm_logs" / self.trial_id
        self.metrics_dir = self.store.dir / "metrics" / self.trial_id
        self.heartbeat = self.dir / HEARTBEAT
        self.job: SlurmJobRef | None = None
        self.last_epoch = 0
        self.finished = False
        self.last_squeue = 0.0
        self.missing = 0
        self.state: str | None = None
        self.first_report: float | None = None

    # state shared with other drivers through job.json
    def registry(self) -> dict:
        try:
            return json.loads((self.dir / "job.json").read_text())
        except (OSError, ValueError):
            return {}

    def write_registry(self, **changes) -> None:
        record = {**self.registry(), **changes}
        if self.job is not None:
            record.update(dataclasses.asdict(self.job))
        record.update(trial_id=self.trial_id, driver=self.driver.tag)
        atomic_write_json(record, self.dir / "job.json")

    def beat(self) -> None:
        self.heartbeat.parent.mkdir(parents=True, exist_ok=True)
        self.heartbeat.write_text(f"{time.time():.3f} {self.driver.tag}\n")

    def start(self) -> None:
        """Submit the trial's job, adopt a live one from an earlier driver, or do nothing if already completed."""
        self.beat()
        row = self.store.read_trial(self.trial_id) or {}
        if row.get("status") == "completed" and (row.get("epochs_done") or 0) >= self.config.epochs:
            log.info("trial %s is already completed; reporting its metrics", self.trial_id)
            return
        old = self.registry()
        if old.get("job_id") and not old.get("finished"):
            job = SlurmJobRef(old["job_id"], old["folder"], old.get("tasks", 1), old.get("submitted", 0.0))
            if job.outcome() is None and job.alive():
                log.info("trial %s adopts its running job %s", self.trial_id, job.job_id)
                self.job = job
                self.write_registry(finished=False, adopted=time.time())
                return
        from sweeps.slurm_job import TrialJob

        self.store.write_trial(self.trial_id, status="pending", error=None, config_hash=self.config.signature(),
                               **self.config.to_dict())
        function = TrialJob(self.config.to_dict(), str(self.store.root), self.store.sweep, self.trial_id,
                            control=str(self.dir), heartbeat_timeout_s=self.options.heartbeat_s)
        for old_marker in self.dir.glob("cancel-*"):  # requests to earlier jobs (job ids can be reused)
            old_marker.unlink(missing_ok=True)
        folder = self.dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.job = submit(function, folder, self.options, self.driver, f"{self.store.sweep}-{self.trial_id}")
        self.write_registry(finished=False, first_report=None)
        log.info("trial %s: submitted SLURM job %s (logs in %s)", self.trial_id, self.job.job_id, folder)

    def epochs_on_disk(self) -> list[int]:
        if not self.metrics_dir.is_dir():
            return []
        found = (EPOCH_PART.match(p.name) for p in self.metrics_dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def read_epoch(self, epoch: int) -> dict:
        import pandas as pd

        return epoch_report(pd.read_parquet(self.metrics_dir / f"epoch-{epoch:05d}.parquet"), epoch)

    def check_job(self) -> tuple[str, Any] | None:
        """The job's outcome; a job that left squeue without a result is reported failed (after a recheck)."""
        if self.job is None:
            return "completed", None
        outcome = self.job.outcome()
        if outcome is not None:
            return outcome
        now = time.monotonic()
        if now - self.last_squeue < self.options.squeue_s:
            return None
        self.last_squeue = now
        state = self.job.squeue_state()
        if state in ACTIVE_STATES or state == "UNKNOWN":
            self.state, self.missing = state, 0
            return None
        self.missing += 1
        if self.missing < 2:
            return None
        outcome = self.job.outcome()
        return outcome or ("failed", f"SLURM job {self.job.job_id} ended without a result (state "
                                     f"{state or 'gone from squeue'}, last seen {self.state}: cancelled, "
                                     f"out of memory, node failure or time limit?). Last lines of "
                                     f"{self.job.log_path(0, 'err')}:\n{self.job.log_tail()}")

    def next_report(self) -> dict:
        """Block until the next epoch's report (with done=True for the last epoch); raise if the job failed."""
        while True:
            self.beat()
            outcome = self.check_job()
            epochs = [e for e in self.epochs_on_disk() if e > self.last_epoch]
            if epochs:
                epoch = epochs[0]
                report = self.read_epoch(epoch)
                if epoch >= self.config.epochs:
                    outcome = outcome or self.wait_for_outcome()
                    if outcome[0] == "failed":
                        self.fail(outcome[1])
                    self.finish()
                    report["done"] = True
                self.last_epoch = epoch
                if self.first_report is None:
                    self.first_report = time.time()
                    if self.job is not None:
                        self.write_registry(first_report=self.first_report)
                return report
            if outcome is not None:
                if outcome[0] == "failed":
                    self.fail(outcome[1])
                self.fail(f"SLURM job {self.job.job_id if self.job else '-'} completed, but metrics of epochs "
                          f"{self.last_epoch + 1}..{self.config.epochs} are missing from {self.metrics_dir}")
            time.sleep(self.options.poll_s)

    def wait_for_outcome(self) -> tuple[str, Any]:
        """After the last epoch's metrics: wait for the job to return (train.run finishes its bookkeeping)."""
        while True:
            outcome = self.check_job()
            if outcome is not None:
                return outcome
            self.beat()
            time.sleep(min(self.options.poll_s, 1.0))

    def fail(self, detail: str) -> None:
        """Record the job's remote traceback as the trial's error and raise it."""
        self.store.write_trial(self.trial_id, status="failed", error=str(detail), end_time=time.time(),
                               job_id=self.job.job_id if self.job else None)
        self.finish()
        raise SlurmTrialError(f"trial {self.trial_id}: SLURM job {self.job.job_id if self.job else '-'} failed:\n"
                              f"{detail}")

    def finish(self) -> None:
        if not self.finished and self.job is not None:
            self.write_registry(finished=True, ended=time.time())
        self.finished = True

    def stop(self) -> None:
        """Cancel the job unless it already finished (Tune stopped the trial), and record the trial as stopped."""
        if self.finished or self.job is None:
            self.finished = True
            return
        if self.job.outcome() is None:
            log.info("trial %s stopped: cancelling SLURM job %s", self.trial_id, self.job.job_id)
            self.job.cancel(self.dir)
            # the job may still finish an epoch (and write its row) until it is gone: wait, then record
            self.job.wait_gone(self.options.cancel_wait_s)
            mark_stopped(self.store, self.trial_id)
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


def cancel_driver_jobs(sweep_dir: Path, tag: str, wait_s: float = 30.0) -> list[str]:
    """Cancel every unfinished job this driver's trials submitted (run at driver exit); returns their ids."""
    cancelled = []
    for path in sorted((sweep_dir / "slurm_logs").glob("*/job.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("driver") != tag or record.get("finished") or not record.get("job_id"):
            continue
        job = SlurmJobRef(record["job_id"], record["folder"], record.get("tasks", 1))
        if job.outcome() is None:
            job.cancel(path.parent)
            cancelled.append((job, record["trial_id"]))
        atomic_write_json({**record, "finished": True, "ended": time.time()}, path)
    if cancelled:
        log.warning("driver exit: cancelled SLURM job(s) %s", ", ".join(j.job_id for j, _ in cancelled))
        store = ResultsStore(sweep_dir.parent, sweep_dir.name)
        deadline = time.monotonic() + wait_s
        for job, trial_id in cancelled:
            job.wait_gone(max(0.0, deadline - time.monotonic()))
            mark_stopped(store, trial_id)
    return [job.job_id for job, _ in cancelled]


def mark_stopped(store: ResultsStore, trial_id: str) -> None:
    """Record a cancelled trial as stopped, unless its job completed or failed first."""
    row = store.read_trial(trial_id)
    if row and row.get("status") not in ("completed", "failed"):
        store.write_trial(trial_id, status="stopped", end_time=time.time())


def stop_on_sigterm(sweep_dir: Path, tag: str) -> None:
    """SIGTERM to the driver (scancel of a sweep.sh job, the time-limit warning, kill): cancel this driver's
    jobs at once, then raise SIGINT, which Ray Tune handles as a graceful stop. Replaces Ray's own handler
    (which exits abruptly); later SIGTERMs are ignored so the stop stays graceful."""
    seen = []

    def handler(signum, frame) -> None:
        if seen:
            log.warning("SIGTERM again: the sweep is already stopping")
            return
        seen.append(time.time())
        log.warning("SIGTERM: cancelling this driver's SLURM jobs and stopping the sweep")
        try:
            cancel_driver_jobs(sweep_dir, tag, wait_s=0)
        finally:
            signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, handler)


def make_trainable(results: Path, sweep: str, options: SlurmOptions):
    """The Tune trainable of the SLURM backend; call it in the sweep driver (it snapshots the code and
    registers the exit hook that cancels this driver's jobs)."""
    sweep_dir = Path(results).resolve() / sweep
    sweep_dir.mkdir(parents=True, exist_ok=True)
    code = snapshot_code(sweep_dir / "code") if options.snapshot else None
    driver = Driver.here(code, options.python)
    atexit.register(cancel_driver_jobs, sweep_dir, driver.tag)
    if threading.current_thread() is threading.main_thread():
        stop_on_sigterm(sweep_dir, driver.tag)
    trainable = tune.with_parameters(SlurmTrial, results=str(Path(results).resolve()), sweep=sweep, options=options,
                                     driver=driver)
    return tune.with_resources(trainable, {"cpu": options.trial_cpus, "gpu": 0})
