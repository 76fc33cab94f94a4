"""`python -m sweeps.launch NAME`: run a named sweep with Ray Tune, locally or as SLURM jobs.

Every trial's results go to RESULTS/NAME (Parquet + TensorBoard + checkpoints). Trial ids are hashes
of their configs, so running the same command again (or with --resume) finishes an interrupted sweep
without re-running finished trials.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from galaxygen.config import ConfigError, TrainConfig, parse_assignments
from galaxygen.evaluate import quick
from galaxygen.results import ResultsStore, atomic_write_json
from sweeps import slurm_options, spaces

log = logging.getLogger("sweeps.launch")

DEFAULT_EPOCHS = 5
BUDGET_EPOCHS = 10000  # the epoch cap of a trial trained for --budget-min minutes (the budget ends it first)
# --metric NAME -> the per-epoch value Tune ranks and stops trials by (lower is better for each)
METRICS = {"loss": "val_loss", "fid_domain": f"val_{quick.METRIC}"}
DEFAULT_EVAL_N = 64


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
    p = argparse.ArgumentParser(prog="python -m sweeps.launch", description=__doc__ + "\nsweeps:\n" + listing,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="sweep name (see --list), or a new name with --grid")
    p.add_argument("--list", action="store_true", help="print the named sweeps and what they vary")
    p.add_argument("--backend", choices=("auto", "local", "slurm"), default="auto",
                   help="where trials run (auto: slurm when a SLURM controller answers, else local)")
    p.add_argument("--data", default="", help="cache folder (default: the built-in synthetic galaxies)")
    p.add_argument("--epochs", type=int, help=f"epochs per trial (default {DEFAULT_EPOCHS}; with --budget-min, a cap "
                   "beside the budget)")
    p.add_argument("--budget-min", type=float, default=0.0, metavar="M",
                   help="train each trial for M minutes of wall-clock time instead of a number of epochs (it stops after "
                   "the epoch that reaches M; the table's epochs_done says how far it got); compares models at equal time")
    p.add_argument("--metric", choices=sorted(METRICS), default="loss",
                   help="what trials are ranked (and, in the search sweep, stopped by ASHA) by: the held-out loss "
                   "(default) or fid_domain, estimated each epoch on quick_eval_n samples (default "
                   f"{quick.DEFAULT_N}; val {quick.METRIC})")
    p.add_argument("--model", help="base model (default cnn, the report's Table III; mlp2 for the MLP studies)")
    p.add_argument("--results", default="results", help="results folder (default ./results)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: CPUs / --cpus-per-trial; on SLURM, "
                   "trial jobs in flight: max_jobs of the cluster profile, else every trial)")
    p.add_argument("--cpus-per-trial", type=int, default=1, help="CPU threads per local trial (default 1)")
    p.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs per local trial (default 0)")
    p.add_argument("--samples", type=int, help="samples of the search space (default: the sweep's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search-space sampling (default 0)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted sweep (also the default: finished "
                   "trials are never re-run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the base config")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="ad-hoc sweep values")
    p.add_argument("--no-figures", action="store_true", help="skip rebuilding the figures at the end")
    p.add_argument("--eval-n", type=int, default=DEFAULT_EVAL_N,
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


def ray_temp_dir(results: Path) -> str:
    """A short per-results-folder temp dir (Ray's socket paths must stay under ~107 characters)."""
    return f"/tmp/ray-{hashlib.sha1(str(results.resolve()).encode()).hexdigest()[:8]}"


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


def progress_callback(varies: list[str]):
    """A Tune callback printing one line per trial epoch (instead of Tune's wide status tables)."""
    from ray import tune

    class Progress(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            swept = " ".join(f"{k}={trial.config.get(k)}" for k in varies)
            bits = result.get("val_bits_per_dim")  # a likelihood model's only
            print(f"[{time.strftime('%H:%M:%S')}] {swept:28s} epoch {result.get('epoch')}: "
                  f"val_loss {result.get('val_loss', float('nan')):.4g}"
                  + (f" ({bits:.4f} bits/dim)" if bits is not None else ""), flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            swept = " ".join(f"{k}={trial.config.get(k)}" for k in varies)
            print(f"[{time.strftime('%H:%M:%S')}] {swept:28s} FAILED (see the results table)", flush=True)

    return Progress()


def run_sweep(args, sweep: spaces.Sweep, base: dict, trial_ids: list[str], options=None) -> int:
    """Run the sweep with Ray Tune; returns how many of its trials (trial_ids) failed."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    results = Path(args.results).resolve()
    store = ResultsStore(results, sweep.name)
    store.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json({"name": sweep.name, "description": sweep.description, "varies": sweep.varies,
                       "base": base, "trials": trial_ids,
                       "command": sys.argv, "started": time.time()}, store.meta_path())
    backend = args.backend
    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, num_gpus=0 if backend == "slurm" else None, include_dashboard=False,
             dashboard_host="127.0.0.1", _temp_dir=ray_temp_dir(results), logging_level=logging.WARNING,
             log_to_driver=backend == "local", configure_logging=True)
    if backend == "slurm":
        from sweeps import slurm

        trainable = slurm.make_trainable(results, sweep.name, options)
        concurrent = args.max_concurrent or options.max_jobs or len(trial_ids)
    else:
        resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
        trainable = tune.with_resources(local_trainable(results, sweep.name, args.cpus_per_trial), resources)
        concurrent = args.max_concurrent or max(1, cpus // args.cpus_per_trial)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=base["epochs"], grace_period=1, reduction_factor=2) \
        if sweep.early_stopping else None
    tuner = tune.Tuner(
        trainable,
        param_space=spaces.param_space(sweep, base),
        tune_config=tune.TuneConfig(
            metric=METRICS[args.metric], mode="min", scheduler=scheduler, num_samples=args.samples or sweep.samples,
            search_alg=BasicVariantGenerator(random_state=args.seed, max_concurrent=concurrent),
            trial_dirname_creator=lambda t: f"{t.trial_id}",
        ),
        run_config=tune.RunConfig(name=f"tune-{int(time.time())}", storage_path=str(store.ray_dir()),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=0,
                                  callbacks=[progress_callback(sweep.varies)]),
    )
    log.info("sweep %s: %d trials on the %s backend, %d at a time; results in %s",
             sweep.name, len(trial_ids), backend, concurrent, store.dir)
    try:
        tuner.fit()
    finally:
        reconcile(store, trial_ids)
        ray.shutdown()
    return failed_count(store, trial_ids)


def failed_count(store: ResultsStore, trial_ids: list[str]) -> int:
    """How many of this run's trials failed (rows left in the sweep by an earlier grid do not count)."""
    trials = store.trials()
    return int(((trials["status"] == "failed") & trials["trial_id"].isin(trial_ids)).sum())


def reconcile(store: ResultsStore, trial_ids: list[str]) -> None:
    """Trials that Tune stopped early (or that never finished) are marked stopped, not left running."""
    trials = store.trials()
    for row in trials.itertuples():
        if row.trial_id in trial_ids and row.status == "running":
            store.write_trial(row.trial_id, status="stopped", end_time=time.time())


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
    print(trials[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for row in trials[trials["status"] == "failed"].itertuples():
        first = str(row.error).strip().splitlines()[0] if row.error else "unknown error"
        print(f"  {row.trial_id} failed: {first}")


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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.list:
        for s in spaces.SWEEPS.values():
            print(f"{s.name:15s} varies {', '.join(s.varies):40s} {s.description}")
        return 0
    if args.cancel:
        return cancel(Path(args.results).resolve(), args.name)
    try:
        sweep, base = resolve_sweep(args)
        configs = spaces.expand(sweep, base, args.samples, args.seed)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.backend == "auto":
        args.backend = "slurm" if slurm_available() else "local"
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
    if base["eval_n"]:
        from galaxygen.evaluate import prepare

        log.info("preparing the evaluation reference of %s (domain encoder, real statistics, baselines; once per dataset)",
                 base["data"])
        prepare(base["data"], base["eval_n"], workers=os.cpu_count() or 1)
    from galaxygen.checkpoint import repair

    for line in repair(ResultsStore(Path(args.results).resolve(), sweep.name)):  # unreadable files of an earlier run
        log.warning("repaired %s", line)
    failed = run_sweep(args, sweep, base, trial_ids, options)
    store = ResultsStore(Path(args.results).resolve(), sweep.name)
    print()
    print_table(store, trial_ids, sweep.varies, METRICS[args.metric])
    if not args.no_figures:
        try:
            from analysis.figures import build
        except ImportError:
            build = None
        if build is not None:
            try:
                print(f"\nreport: {build(store.dir)}")
            except Exception as err:  # figures must never cost a finished sweep its exit status
                log.warning("could not build the figures: %s", err)
    print(f"results: {store.dir}  (TensorBoard: tensorboard --logdir {store.runs_dir()} --host 127.0.0.1)")
    if failed:
        print(f"{failed} trial(s) failed", file=sys.stderr)
    return min(failed, 100)


if __name__ == "__main__":
    sys.exit(main())
