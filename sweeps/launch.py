"""`python -m sweeps.launch NAME`: run a named sweep with Ray Tune, locally or as SLURM jobs.

Every trial's results go to RESULTS/NAME (Parquet + TensorBoard + checkpoints). Trial ids are hashes
of their configs, so running the same command again (or with --resume) finishes an interrupted sweep
without re-running finished trials. Exit status: 0 every trial completed, 1 some trial failed, 2 bad
input (nothing written), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import logging
import os
import pickle
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from galaxygen import cli
from galaxygen.config import ConfigError, TrainConfig, parse_assignments
from galaxygen.evaluate import quick
from galaxygen.results import ResultsStore, WriteError, atomic_write_json, write_error
from sweeps import slurm_options, spaces

log = logging.getLogger("sweeps.launch")

DEFAULT_EPOCHS = 5
BUDGET_EPOCHS = 10000  # the epoch cap of a trial trained for --budget-min minutes (the budget ends it first)
# --metric NAME -> the per-epoch value Tune ranks and stops trials by (lower is better for each)
METRICS = {"loss": "val_loss", "fid_domain": f"val_{quick.METRIC}"}
DEFAULT_EVAL_N = 64
HEARTBEAT_S = 30.0  # the console is never silent for longer while trials run


def slurm_available() -> bool:
    """True when a SLURM controller answers (sinfo exits 0)."""
    if not shutil.which("sinfo"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {s.name:15s} {s.description}" for s in spaces.SWEEPS.values())
    p = cli.Parser(prog="python -m sweeps.launch", description=__doc__ + "\nsweeps:\n" + listing,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="sweep name (see --list), or a new name with --grid")
    p.add_argument("--list", action="store_true", help="print the named sweeps, what they vary and its values")
    p.add_argument("--backend", choices=("auto", "local", "slurm"),
                   help="where trials run (auto: slurm when a SLURM controller answers, else local); default: the "
                   "backend the sweep started with, auto for a new sweep")
    p.add_argument("--data", default="", help="cache folder (default: the built-in synthetic galaxies)")
    p.add_argument("--epochs", type=cli.positive, help=f"epochs per trial (default {DEFAULT_EPOCHS}; with "
                   "--budget-min, a cap beside the budget)")
    p.add_argument("--budget-min", type=cli.number(float, 0), default=0.0, metavar="M",
                   help="train each trial for M minutes instead of a number of epochs (it stops after the epoch that "
                   "reaches M; the table's epochs_done says how far it got); compares models at equal compute: minutes "
                   "of wall clock on a GPU, of CPU time per thread on a CPU, so waiting for a shared core is not "
                   "counted (train_seconds, beside train_wall_seconds)")
    p.add_argument("--metric", choices=sorted(METRICS), default="loss",
                   help="what trials are ranked (and, in the search sweep, stopped by ASHA) by: the held-out loss "
                   "(default) or fid_domain, estimated each epoch on quick_eval_n samples (default "
                   f"{quick.DEFAULT_N}; val {quick.METRIC})")
    p.add_argument("--model", help="base model (default cnn, the report's Table III; mlp2 for the MLP studies)")
    p.add_argument("--results", default="results", help="results folder (default ./results)")
    p.add_argument("--max-concurrent", type=cli.positive, help="trials at once (default: CPUs / --cpus-per-trial; on "
                   "SLURM, trial jobs in flight: max_jobs of the cluster profile, else every trial)")
    p.add_argument("--cpus-per-trial", type=cli.positive, default=1,
                   help="CPU threads per local trial (default 1; at most this machine's CPUs)")
    p.add_argument("--gpus-per-trial", type=cli.number(float, 0), default=0,
                   help="GPUs per local trial, fractions allowed (default 0; at most this machine's GPUs)")
    p.add_argument("--samples", type=cli.positive,
                   help="samples of a sampled search space such as search (default: the sweep's own)")
    p.add_argument("--seed", type=cli.number(int, 0, 2**32 - 1), default=0,
                   help="seed of the search-space sampling (default 0)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted sweep (also the default: finished "
                   "trials are never re-run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the base config")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="ad-hoc sweep values")
    p.add_argument("--no-figures", action="store_true", help="skip rebuilding the figures at the end")
    p.add_argument("--eval-n", type=cli.non_negative, default=DEFAULT_EVAL_N,
                   help=f"generated samples scored per trial at its end (default {DEFAULT_EVAL_N}; 0 = off)")
    p.add_argument("--dry-run", action="store_true", help="print the trial configs and exit")
    p.add_argument("--cancel", action="store_true", help="cancel the sweep's SLURM jobs (trials and drivers) and "
                   "record its unfinished trials as stopped; running the sweep again resumes them")
    slurm_options.add_arguments(p)
    return p


def resolve_sweep(args) -> tuple[spaces.Sweep, dict]:
    """The sweep and the base config from the command line, validated before anything starts."""
    if not args.name:
        raise ConfigError("give a sweep name: one of " + ", ".join(spaces.SWEEPS) + " (or --list)")
    grid = spaces.parse_grid(args.grid)
    sweep = spaces.adhoc(args.name, grid) if grid and args.name not in spaces.SWEEPS else spaces.get(args.name)
    if grid and args.name in spaces.SWEEPS:
        sweep = spaces.Sweep(sweep.name, sweep.description, {**sweep.grid, **grid}, sweep.sample, sweep.base,
                             sweep.samples, sweep.early_stopping)
    base = parse_assignments(args.set)
    base["epochs"] = args.epochs if args.epochs is not None else BUDGET_EPOCHS if args.budget_min else DEFAULT_EPOCHS
    if args.budget_min:
        base["budget_min"] = args.budget_min
    if args.metric == "fid_domain":
        base.setdefault("quick_eval_n", quick.DEFAULT_N)
    if args.model:
        base["model"] = args.model
    from galaxygen.data import Cache, CacheError, resolve_cache

    if args.data:
        try:
            Cache.require(args.data)
        except CacheError as err:
            raise ConfigError(f"--data {err}") from None
    # the cache's path (the built-in synthetic galaxies' without --data), so trial ids are final; rendered only
    # when the sweep runs
    base["data"] = str(resolve_cache(args.data, create=False).resolve())
    base.setdefault("eval_n", args.eval_n)
    TrainConfig.from_dict(base)
    return sweep, base


def resolve_backend(args, store: ResultsStore) -> str:
    """--backend if given, else the backend the sweep started with, else auto (slurm where it answers)."""
    if args.backend is None:
        try:
            args.backend = json.loads(store.meta_path().read_text()).get("backend")
        except (OSError, ValueError):
            args.backend = None
        if args.backend in ("local", "slurm"):
            log.info("backend %s: the one this sweep started with (--backend to change it)", args.backend)
            return args.backend
        args.backend = "auto"
    if args.backend == "auto":
        args.backend = "slurm" if slurm_available() else "local"
    return args.backend


def check_local_resources(args) -> None:
    """Trials that ask for more CPUs or GPUs than this machine has would wait forever: refuse them."""
    cpus = os.cpu_count() or 1
    if args.cpus_per_trial > cpus:
        raise ConfigError(f"--cpus-per-trial {args.cpus_per_trial}: this machine has {cpus} CPU(s); "
                          f"allowed 1 to {cpus} on the local backend")
    if args.gpus_per_trial:
        import torch

        gpus = torch.cuda.device_count()
        if args.gpus_per_trial > gpus:
            raise ConfigError(f"--gpus-per-trial {args.gpus_per_trial:g}: this machine has {gpus} GPU(s); "
                              f"allowed 0 to {gpus} on the local backend (or --backend slurm)")


def rerun_command(argv: list[str]) -> str:
    """The command line that finishes this sweep: the same launcher command, with the same interpreter."""
    python = sys.executable
    try:
        relative = os.path.relpath(python)
        if not relative.startswith(".."):
            python = relative if os.sep in relative else f".{os.sep}{relative}"
    except ValueError:
        pass
    return shlex.join([python, "-m", "sweeps.launch", *argv])


def ray_temp_dir(results: Path) -> str:
    """A short per-results-folder temp dir (Ray's socket paths must stay under ~107 characters)."""
    return f"/tmp/ray-{hashlib.sha1(str(results.resolve()).encode()).hexdigest()[:8]}"


def tune_dir(results: Path) -> str:
    """Ray Tune's own state, beside Ray's session files: a rerun resumes from the results store, never from
    it, so it takes no space on the results disk and a full results disk cannot break Tune's records."""
    return f"{ray_temp_dir(results)}/tune"


class LockBusy(RuntimeError):
    """Another launcher runs this sweep."""


class SweepLock:
    """One launcher per sweep folder: RESULTS/SWEEP/launcher.lock names its holder (host, pid, command) and
    is flock-ed while the launcher runs, so a dead holder's lock is free; where the file system has no locks,
    a lock of a process that is gone from this host is taken over."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    @staticmethod
    def holder_alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # cannot tell from here: assume it runs
        try:
            os.kill(int(holder.get("pid", 0)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, TypeError):
            return True
        return True

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def busy(self, holder: dict) -> LockBusy:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        return LockBusy(f"sweep folder {self.path.parent} is in use by another launcher: pid {holder.get('pid', '?')} "
                        f"on host {holder.get('host', '?')}, running since {since}; wait for it to finish or stop it")

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self.busy(self.read()) from None
            except OSError as err:  # no locks on this file system: judge by the recorded holder
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                    os.close(fd)
                    raise
                holder = self.read()
                if holder and holder.get("pid") != os.getpid() and self.holder_alive(holder):
                    os.close(fd)
                    raise self.busy(holder) from None
            try:  # the holder may have released (and removed) the file between our open and flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = self.read()
        if stale.get("pid"):
            log.warning("took over the lock of launcher pid %s on %s, which is gone", stale.get("pid"), stale.get("host"))
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "command": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


class Interrupt:
    """Ctrl-C and SIGTERM: while Tune runs, the first one stops it gracefully (trials stop, their status is
    reconciled, the resume command is printed) and a second one stops at once; outside Tune, at once."""

    def __init__(self):
        self.signum: int | None = None
        self.graceful = False
        self.previous: dict[int, object] = {}
        self.backend: dict[int, object] = {}

    def install(self, backend: dict[int, object] | None = None) -> None:
        """Take SIGINT and SIGTERM (again after Ray's own handlers); `backend` are the backend's handlers,
        which run too while Tune runs (the SLURM driver's: cancel or detach its jobs)."""
        self.backend = dict(backend or {})
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(signum, self.handle)
            self.previous.setdefault(signum, previous)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum: int, frame) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if not (first and self.graceful):
            raise KeyboardInterrupt
        print(f"\n{signal.Signals(signum).name}: stopping the sweep (again to stop at once); finished epochs are kept",
              file=sys.stderr, flush=True)
        if callable(self.backend.get(signum)):
            self.backend[signum](signum, frame)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum if self.signum else 0


def stopper(stop: Callable[[], bool]):
    """A Tune stopper that ends the experiment once `stop()` says so (the launcher was interrupted, or the
    results folder takes no more writes)."""
    from ray import tune

    class OnInterrupt(tune.Stopper):
        def __call__(self, trial_id, result) -> bool:
            return False

        def stop_all(self) -> bool:
            return stop()

    return OnInterrupt()


def searcher(configs: list[TrainConfig], concurrent: int, metric: str):
    """A Tune searcher that suggests exactly the launcher's configs (expanded, checked, distinct, unfinished)."""
    from ray.tune.search import ConcurrencyLimiter, Searcher

    class Configs(Searcher):
        def __init__(self):
            super().__init__(metric=metric, mode="min")
            self.todo = [c.to_dict() for c in configs]

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True

        def suggest(self, trial_id: str):
            return self.todo.pop(0) if self.todo else Searcher.FINISHED

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
            pass

        def save(self, checkpoint_path: str) -> None:
            pass  # a rerun resumes from the results store, never from Tune's experiment state

        def restore(self, checkpoint_path: str) -> None:
            pass

    return ConcurrencyLimiter(Configs(), max_concurrent=concurrent)


def local_trainable(results: Path, sweep: str, cpus: int):
    """The Tune function trainable that trains one trial in-process and reports every epoch."""

    def train_trial(params: dict) -> None:
        import torch
        from ray import tune

        from galaxygen.train import run

        torch.set_num_threads(cpus)
        config = TrainConfig.from_dict(params)
        run(config, results, sweep, config.resolved().signature(), report=lambda m: tune.report(m))

    return train_trial


def first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "unknown error")


def trial_exception(trial) -> BaseException | None:
    """The exception Tune pickled beside a failed trial (in Ray's session folder) before it called back."""
    try:
        with open(trial.pickled_error_file, "rb") as f:
            return pickle.load(f)
    except Exception:  # no or unreadable error file
        return None


def trial_error(store: ResultsStore, trial_id: str, trial) -> str:
    """A failed trial's cause in one line: the file it could not write (a full disk, a read-only folder), its
    own recorded error, or why Ray lost its process."""
    from ray.exceptions import RayActorError

    error = trial_exception(trial)
    if (written := write_error(error)) is not None:
        return str(written)
    row = store.read_trial(trial_id) or {}
    if row.get("status") == "failed" and row.get("error"):
        return first_line(row["error"])
    if isinstance(error, RayActorError) or error is None:
        return ("its process died before the trial ended (killed by a signal, e.g. the out-of-memory killer, or "
                f"crashed); its log is in the worker-*.err files under {ray_temp_dir(store.root)}/session_latest/logs")
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {first_line(cause)}"


class Progress:
    """What the console shows while trials run: one line per trial epoch, a line when a trial fails (its
    cause) or starts its end-of-run evaluation, and a heartbeat whenever nothing was said for HEARTBEAT_S."""

    def __init__(self, store: ResultsStore, varies: list[str], epochs: dict[str, int], eval_n: int):
        self.store, self.varies, self.epochs, self.eval_n = store, varies, epochs, eval_n
        self.last_print = time.monotonic()
        self.state: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.ended: set[str] = set()
        self.write_error: WriteError | None = None  # the first trial error of a full or read-only results folder

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)
        self.last_print = time.monotonic()

    def label(self, trial) -> str:
        return " ".join(f"{k}={trial.config.get(k)}" for k in self.varies) or trial_id_of(trial)

    def result(self, trial, result: dict) -> None:
        epoch = result.get("epoch")
        bits = result.get("val_bits_per_dim")  # a likelihood model's only
        self.say(f"{self.label(trial):28s} epoch {epoch}: val_loss {result.get('val_loss', float('nan')):.4g}"
                 + (f" ({bits:.4f} bits/dim)" if bits is not None else ""))
        total = self.epochs.get(trial_id_of(trial))
        self.state[trial.trial_id] = f"epoch {epoch}/{total}"
        if epoch == total and self.eval_n:
            self.state[trial.trial_id] = "evaluating"
            self.say(f"{self.label(trial):28s} evaluating {self.eval_n} samples from the prior (morphology, "
                     "feature-space metrics)")

    def error(self, trial) -> None:
        trial_id = trial_id_of(trial)
        cause = trial_error(self.store, trial_id, trial)
        self.errors[trial_id] = cause
        self.write_error = self.write_error or write_error(trial_exception(trial))
        self.ended.add(trial_id)
        self.state.pop(trial.trial_id, None)
        self.say(f"{self.label(trial):28s} FAILED: {cause}")

    def complete(self, trial) -> None:
        self.state.pop(trial.trial_id, None)
        self.ended.add(trial_id_of(trial))

    def heartbeat(self, trials) -> None:
        if time.monotonic() - self.last_print < HEARTBEAT_S:
            return
        running = [t for t in trials if t.status == "RUNNING"]
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        now = ", ".join(f"{self.label(t)} ({self.state.get(t.trial_id, 'starting')})" for t in running)
        self.say(f"{done} of {len(self.epochs)} trial(s) done; running: {now or 'none (waiting for resources)'}")

    def callback(self):
        from ray import tune

        progress = self

        class Callback(tune.Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):
                progress.result(trial, result)

            def on_trial_error(self, iteration, trials, trial, **info):
                progress.error(trial)

            def on_trial_complete(self, iteration, trials, trial, **info):
                progress.complete(trial)

            def on_step_end(self, iteration, trials, **info):
                progress.heartbeat(trials)

        return Callback()


def trial_id_of(trial) -> str:
    return TrainConfig.from_dict(trial.config).resolved().signature()


def run_sweep(args, sweep: spaces.Sweep, base: dict, configs: list[TrainConfig], interrupt: Interrupt,
              options=None) -> tuple[dict[str, str], WriteError | None]:
    """Run the configs with Ray Tune; returns the failed trials' causes by trial id (Ray's view), and the
    first write error of a full or read-only results folder, which stopped the sweep."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    results = Path(args.results).resolve()
    store = ResultsStore(results, sweep.name)
    backend = args.backend
    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, num_gpus=0 if backend == "slurm" else None, include_dashboard=False,
             dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", _temp_dir=ray_temp_dir(results),
             logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)
    for name in ("ray.tune", "ray.air", "ray.train"):  # the launcher reports trials and their errors itself
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        backend_handlers = {}
        if backend == "slurm":
            from sweeps import slurm

            trainable = slurm.make_trainable(results, sweep.name, options)
            concurrent = args.max_concurrent or options.max_jobs or len(configs)
            backend_handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        else:
            resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
            trainable = tune.with_resources(local_trainable(results, sweep.name, args.cpus_per_trial), resources)
            concurrent = args.max_concurrent or max(1, cpus // args.cpus_per_trial)
        interrupt.install(backend_handlers)  # again, after Ray's (and the backend's): the launcher decides the exit
        scheduler = ASHAScheduler(time_attr="epoch", max_t=base["epochs"], grace_period=1, reduction_factor=2) \
            if sweep.early_stopping else None
        progress = Progress(store, sweep.varies, {c.resolved().signature(): c.epochs for c in configs},
                            base.get("eval_n", 0))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=METRICS[args.metric], mode="min", scheduler=scheduler, num_samples=len(configs),
                search_alg=searcher(configs, concurrent, METRICS[args.metric]),
                trial_dirname_creator=lambda t: f"{t.trial_id}",
                # each trial in its own worker process: a reused worker outlives a stopped sweep's driver and keeps
                # its open files, so after a full disk the rerun found no room (test_disk_faults)
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(name=f"tune-{int(time.time())}", storage_path=tune_dir(results),
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=0,
                                      callbacks=[progress.callback()],
                                      stop=stopper(lambda: interrupt.signum is not None or progress.write_error is not None)),
        )
        log.info("sweep %s: %d trial(s) on the %s backend, %d at a time; results in %s",
                 sweep.name, len(configs), backend, concurrent, store.dir)
        interrupt.graceful = True
        try:
            tuner.fit()
        except Exception as err:  # Tune's own records (e.g. its files on a full disk), after or instead of trials
            log.warning("Ray Tune could not finish its own records in %s: %s", tune_dir(results), first_line(err))
            for config in configs:  # a trial whose outcome Tune never reported failed with it
                trial_id = config.resolved().signature()
                if trial_id not in progress.ended:
                    progress.errors[trial_id] = f"Ray Tune failed before the trial ended: {first_line(err)}"
        finally:
            interrupt.graceful = False
        # a trial that Ray saw end after the interrupt (its process got the signal too) was stopped, not failed
        return (progress.errors if interrupt.signum is None else {}), progress.write_error
    finally:
        ray.shutdown()


def reconcile(store: ResultsStore, configs: list[TrainConfig], errors: dict[str, str]) -> None:
    """Every trial's recorded status is true once the launcher is done: a trial Ray saw fail is failed
    (with its cause), one left running (stopped early, interrupted, or never finished) is stopped."""
    for config in configs:
        trial_id = config.resolved().signature()
        try:
            row = store.read_trial(trial_id)
            if trial_id in errors and (row is None or row.get("status") != "failed"):
                known = {} if row else {**config.to_dict(), "config_hash": trial_id}
                store.write_trial(trial_id, status="failed", error=errors[trial_id], end_time=time.time(), **known)
            elif row is not None and row.get("status") in ("running", "pending"):
                store.write_trial(trial_id, status="stopped", end_time=time.time())
        except OSError as err:  # a full disk or a read-only folder: say so, the next run reconciles
            log.error("could not record the status of trial %s: %s", trial_id, err)


def finished(store: ResultsStore, configs: list[TrainConfig]) -> set[str]:
    """The trial ids among configs that completed what they ask (their epochs or budget) in an earlier run."""
    from galaxygen.train import trained_enough

    rows = {row["trial_id"]: row for row in store.trials().to_dict("records")}
    return {c.resolved().signature() for c in configs if trained_enough(rows.get(c.resolved().signature()), c)}


def failed_count(store: ResultsStore, trial_ids: list[str]) -> int:
    """How many of this run's trials failed (rows left in the sweep by an earlier grid do not count)."""
    trials = store.trials()
    return int(((trials["status"] == "failed") & trials["trial_id"].isin(trial_ids)).sum())


def print_table(store: ResultsStore, trial_ids: list[str], varies: list[str], rank_by: str = "val_loss") -> None:
    trials = store.trials()
    if trials.empty:
        print("no trials recorded")
        return
    trials = trials[trials["trial_id"].isin(trial_ids)].copy()
    metrics = store.metrics()
    final = metrics[~metrics["metric"].str.endswith("_step")]
    final = final.sort_values("epoch").groupby(["trial_id", "split", "metric"]).tail(1)
    shown = list(dict.fromkeys(("train_loss", "val_loss", "val_bits_per_dim", rank_by)))
    for key in shown:
        split, metric = key.split("_", 1)
        values = final[(final["split"] == split) & (final["metric"] == metric)].set_index("trial_id")["value"]
        trials[key] = trials["trial_id"].map(values)
    trials = trials.sort_values(rank_by, na_position="last")
    cols = ["trial_id", *[v for v in varies if v in trials], "status", "epochs_done", *shown]
    print(trials[[c for c in cols if c in trials]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for row in trials[trials["status"] == "failed"].itertuples():
        print(f"  {row.trial_id} failed: {first_line(row.error) if row.error else 'unknown error'}")


def build_figures(store: ResultsStore) -> None:
    from analysis.figures import build

    print(f"[{time.strftime('%H:%M:%S')}] making the figures and report.html of {store.dir} ...", flush=True)
    try:
        print(f"report: {build(store.dir)}")
    except Exception as err:  # figures must never cost a finished sweep its exit status
        log.warning("could not build the figures: %s", err)


def cancel(results: Path, name: str | None) -> int:
    """--cancel: end every SLURM job of the sweep (its drivers' and trials') and record its trials stopped."""
    from sweeps.slurm_job import cancel_sweep

    store = ResultsStore(results, name or "")
    if not name or not store.is_sweep():
        print(f"error: {store.dir} is not a sweep's results folder: give the sweep's NAME and "
              "--results DIR", file=sys.stderr)
        return 2
    cancelled = cancel_sweep(store)
    print(f"cancelled {len(cancelled)} SLURM job(s) of sweep {name}" + (f": {', '.join(cancelled)}" if cancelled else ""))
    return 0


def list_sweeps() -> None:
    for s in spaces.SWEEPS.values():
        print(f"{s.name:15s} {s.description}")
        for key, values in s.values().items():
            print(f"{'':15s}   {key}: {values}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.list:
        list_sweeps()
        return 0
    if args.cancel:
        return cancel(Path(args.results).resolve(), args.name)
    try:
        sweep, base = resolve_sweep(args)
        configs = spaces.expand(sweep, base, args.samples, args.seed)
        store = ResultsStore(Path(args.results).resolve(), sweep.name)
        if resolve_backend(args, store) == "local":
            check_local_resources(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    options = None
    if args.backend == "slurm":
        try:
            options = slurm_options.options_from_args(args)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    trial_ids = [c.resolved().signature() for c in configs]
    if args.dry_run:
        for trial_id, c in zip(trial_ids, configs):
            print(trial_id, json.dumps({k: getattr(c, k) for k in sweep.varies}))
        return 0
    from galaxygen.data import Cache, CacheError, resolve_cache

    if not args.data:
        resolve_cache(None)  # render the built-in synthetic galaxies (once)
    from galaxygen.train import open_data

    try:  # every trial's inputs against the data (image size, split sizes, model), before Ray starts
        caches: dict[str, Cache] = {}
        for c in configs:
            if c.data not in caches:
                caches[c.data] = Cache.open(c.data, in_memory=False)
            open_data(c.resolved(), cache=caches[c.data])
    except (ConfigError, CacheError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    lock = SweepLock(store.lock_path())
    try:
        lock.acquire()
    except LockBusy as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write to the results folder {store.dir}: {err.strerror or err}", file=sys.stderr)
        return 2
    try:
        return run(args, argv, sweep, base, configs, store, options)
    except OSError as err:  # the sweep's own files cannot be written (a full disk, a read-only folder)
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        lock.release()


def run(args, argv: list[str], sweep: spaces.Sweep, base: dict, configs: list[TrainConfig], store: ResultsStore,
        options) -> int:
    """The sweep once its input is checked and its folder is ours: train what is unfinished, report, exit."""
    trial_ids = [c.resolved().signature() for c in configs]
    store.remove_stale()  # the temporaries of killed writers of this host (kill -9 of a launcher or a trial)
    atomic_write_json({"name": sweep.name, "description": sweep.description, "varies": sweep.varies,
                       "base": base, "trials": trial_ids, "backend": args.backend,
                       "command": rerun_command(argv), "started": time.time()}, store.meta_path())
    from galaxygen.checkpoint import repair

    for line in repair(store):  # unreadable files of an earlier run
        log.warning("repaired %s", line)
    done = finished(store, configs)
    todo = [c for c in configs if c.resolved().signature() not in done]
    if done:
        print(f"{len(done)} of {len(configs)} trials already finished"
              + (f"; running the other {len(todo)}" if todo else f" ({store.dir}); nothing to do"), flush=True)
    interrupt = Interrupt()
    errors: dict[str, str] = {}
    disk: WriteError | None = None
    if todo:
        store.reserve_space(len(todo))  # room to record every trial's final status should the disk fill up
        interrupt.install()
        try:
            if base["eval_n"]:
                from galaxygen.evaluate import prepare

                log.info("preparing the evaluation reference of %s (domain encoder, real statistics, baselines; "
                         "once per dataset)", base["data"])
                prepare(base["data"], base["eval_n"], workers=os.cpu_count() or 1)
            errors, disk = run_sweep(args, sweep, base, todo, interrupt, options)
        except KeyboardInterrupt:  # outside Tune, or a second signal: stop at once
            interrupt.signum = interrupt.signum or signal.SIGINT
        finally:
            interrupt.restore()
            store.release_space()
            reconcile(store, todo, errors)
    print()
    print_table(store, trial_ids, sweep.varies, METRICS[args.metric])
    if interrupt.signum:
        finished_now = len(finished(store, configs))
        print(f"{signal.Signals(interrupt.signum).name}: {finished_now} of {len(configs)} trials finished; resume "
              f"with: {rerun_command(argv)}", file=sys.stderr)
        return interrupt.exit_status
    if disk is not None:  # the disk filled up (or became read-only): the sweep stopped, its finished trials are kept
        print(f"error: {disk}; the sweep stopped with {len(finished(store, configs))} of {len(configs)} trials "
              f"finished: free space (or make the folder writable) and rerun: {rerun_command(argv)}", file=sys.stderr)
        return 1
    if not args.no_figures and (todo or not store.report_dir().exists()):
        build_figures(store)
    print(f"results: {store.dir}  (TensorBoard: tensorboard --logdir {store.runs_dir()} --host 127.0.0.1)")
    failed = failed_count(store, trial_ids)
    if failed:
        print(f"{failed} trial(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
