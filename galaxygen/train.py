"""`python -m galaxygen.train`: one training run = one validated config.

Works as one process, under torchrun, or as SLURM tasks (the environment says which); only rank 0
writes results, checkpoints and TensorBoard events. A run checkpoints every epoch and resumes from
its last checkpoint with the same results as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import random
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from galaxygen import checkpoint, distributed
from galaxygen.cli import progress_bar
from galaxygen.config import NOT_IDENTITY, ConfigError, TrainConfig, parse_assignments
from galaxygen.data import Cache, CacheError, resolve_cache
from galaxygen.data.loader import BatchLoader, reduce_indices
from galaxygen.evaluate import quick
from galaxygen.models import MODELS, build_model, generate, memory_format
from galaxygen.models.registry import evaluating
from galaxygen.results import (
    ResultsStore,
    StoreError,
    WriteError,
    atomic_write_json,
    check_trial_id,
    epoch_report,
    write_error,
)

log = logging.getLogger(__name__)

SINGLE_RUNS = "train"  # the results group of runs started by this command (OUT/train/runs/<id>)
HELD_OUT_PROBE = 32  # images in the fixed held-out batch scored every `log_every` steps
GRID = 32  # samples in the prior grid logged to TensorBoard
TIMINGS = ("images_per_s", "epoch_time_s", "step_time_s")  # train metrics that measure the machine, not the model


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunData:
    """The run's cache and the indices of its (reduced) train split and of its val split."""

    cache: Cache
    train: np.ndarray
    val: np.ndarray


def open_data(config: TrainConfig, world_size: int = 1, in_memory: bool | None = None,
              cache: Cache | None = None) -> RunData:
    """Check everything about a run's inputs that can be wrong, before any work; open its data (or take
    `cache`, already open, so several configs on one cache read it once).

    Raises one ConfigError (or CacheError) naming the problem: a batch that does not divide over the
    ranks, a cache of another image size or without a val split, a train split smaller than one batch,
    or a model that cannot take the image size.
    """
    if config.batch_size % world_size:
        raise ConfigError(f"invalid config batch_size={config.batch_size}: the global batch must divide "
                          f"evenly over {world_size} ranks")
    config.check_model()
    cache = cache or Cache.open(resolve_cache(config.data), in_memory=in_memory)
    if cache.size != config.image_size:
        raise ConfigError(f"invalid config image_size={config.image_size}: the cache {cache.path} holds "
                          f"{cache.size} px images")
    ids = cache.catalog["id"].astype(str).to_numpy()
    train = reduce_indices(cache.indices("train"), ids, config.data_fraction, config.data_count)
    val = cache.indices("val")
    if len(val) == 0:
        raise ConfigError(f"the cache {cache.path} has no val split")
    if len(train) < config.batch_size:
        raise ConfigError(f"invalid config batch_size={config.batch_size}: allowed at most the {len(train)} "
                          f"training images of {cache.path} (after data_fraction/data_count)")
    return RunData(cache, train, val)


class Trainer:
    """Everything one run needs: data, model, objective, logging; `fit` runs (or resumes) it."""

    def __init__(self, config: TrainConfig, store: ResultsStore, trial_id: str, env: distributed.DistEnv,
                 device: torch.device, data: RunData | None = None):
        self.config, self.store, self.trial_id, self.env, self.device = config, store, trial_id, env, device
        self.run_dir = store.run_dir(trial_id)
        data = data or open_data(config, env.world_size)
        self.cache, train_idx, val_idx = data.cache, data.train, data.val
        self.train_idx = train_idx
        seed_everything(config.seed)
        self.model = build_model(config)
        layout = memory_format(self.model)
        self.model.to(device, memory_format=layout)
        per_rank = config.batch_size // env.world_size
        self.train_loader = BatchLoader(self.cache.images, train_idx, per_rank, augment=config.augment,
                                        seed=config.seed, rank=env.rank, world_size=env.world_size, device=device,
                                        memory_format=layout)
        self.val_loader = BatchLoader(self.cache.images, val_idx, per_rank, shuffle=False, rank=env.rank,
                                      world_size=env.world_size, drop_last=False, device=device, memory_format=layout)
        self.probe = self.val_loader.load(val_idx[:HELD_OUT_PROBE])
        self.family = MODELS[config.model].family
        self.objective = self.family.objective(self.model, config, env, device)
        self.epoch = 0
        self.step = 0
        self.best = math.inf  # the objective's score of the best checkpoint (lower is better)
        self.best_epoch = 0
        self.clock = BudgetClock(device)
        self.train_seconds = 0.0  # the budget clock's time of the run's epochs so far, over resumes (config.budget_min)
        self.train_wall_seconds = 0.0  # their wall-clock time: beside train_seconds, the share of the CPU the run got
        self.writer = None
        self.quick = None
        if config.quick_eval_n and env.is_main:
            self.quick = quick.QuickEstimate(self.cache, config.quick_eval_n)

    # -- state --------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"config": self.config.to_dict(), "epoch": self.epoch, "step": self.step, "best": self.best,
                "best_epoch": self.best_epoch, "model": self.model.state_dict(), "optimizers": [o.state_dict() for o in self.objective.optimizers],
                "rng": checkpoint.rng_state(), "trial_id": self.trial_id, "train_seconds": self.train_seconds,
                "train_wall_seconds": self.train_wall_seconds}

    def restore(self) -> bool:
        path = self.store.checkpoint(self.trial_id, "last")
        if not path.exists():
            return False
        state = checkpoint.load(path, self.device)
        saved = TrainConfig.from_dict(state["config"]).resolved().to_dict()
        differ = [k for k, v in self.config.to_dict().items() if k not in NOT_IDENTITY and saved[k] != v]
        if differ:
            raise ConfigError(f"{path} was trained with another config ({', '.join(f'{k}={saved[k]!r}' for k in differ)}); "
                              "resuming needs the same config (only epochs may change): pick another trial id")
        self.model.load_state_dict(state["model"])
        for opt, opt_state in zip(self.objective.optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        self.epoch, self.step, self.best = state["epoch"], state["step"], state["best"]
        self.best_epoch = state.get("best_epoch", 0)
        self.train_seconds = state.get("train_seconds", 0.0)
        self.train_wall_seconds = state.get("train_wall_seconds", self.train_seconds)
        checkpoint.set_rng_state(state["rng"])
        if self.env.is_main and state.get("epoch_rows"):
            self.store.write_epoch(self.trial_id, self.epoch, state["epoch_rows"])
        log.info("resumed %s from epoch %d", self.trial_id, self.epoch)
        return True

    # -- the loop -----------------------------------------------------------------------------------------
    def fit(self, report: Callable[[dict], None] | None = None, evaluate: bool = True) -> dict:
        resumed = self.restore()
        main = self.env.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.config.to_dict(), self.store.config_path(self.trial_id))
            self.store.clear_metrics(self.trial_id, after_epoch=self.epoch)
            self.store.write_trial(self.trial_id, status="running", error=None, job_id=os.environ.get("SLURM_JOB_ID"),
                                   config_hash=self.config.signature(), **self.config.to_dict(),
                                   start_time=time.time(), epochs_done=self.epoch, hardware=hardware(self.device))
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.store.tb_dir(self.trial_id), purge_step=self.step if resumed else None)
        summary: dict = {}
        while self.epoch < self.config.epochs and not self.out_of_budget():
            started, started_wall = self.clock(), time.perf_counter()
            rows = self.train_epoch()
            rows += self.validate()
            self.epoch += 1
            if main:
                if self.quick is not None:  # the cheap sample-quality estimate, on the model this epoch checkpoints
                    self.family.fit_sampling(self.model, self.training_data)  # e.g. a VAE's latent prior
                    value = self.quick(self.model, self.config, self.config.seed)
                    rows.append({**self.row("val", quick.METRIC, value), "epoch": self.epoch})
                self.train_seconds += self.clock() - started
                self.train_wall_seconds += time.perf_counter() - started_wall
                summary = epoch_report(pd.DataFrame(rows), self.epoch)
                self.log_epoch(summary)
                score = self.objective.score(summary)  # the objective decides which checkpoint is best
                best = self.store.checkpoint(self.trial_id, "best")
                improved = score < self.best or not best.exists()
                if improved:
                    self.best, self.best_epoch = score, self.epoch
                # the checkpoint carries the epoch's rows, so a kill between these writes loses nothing; an improved
                # epoch's state is serialised once and written as both the last and the best checkpoint
                checkpoint.save(self.store.checkpoint(self.trial_id, "last"), *([best] if improved else []),
                                **self.state(), epoch_rows=rows)
                self.store.write_epoch(self.trial_id, self.epoch, rows)
                self.store.write_trial(self.trial_id, status="running", epochs_done=self.epoch, best_epoch=self.best_epoch,
                                       **self.timing())
                if report is not None:
                    report(summary)
        if main and evaluate:  # else whoever evaluates completes the best checkpoint (checkpoint.complete)
            self.finish_best()
            if self.config.eval_n:
                self.evaluate()
        if main:
            trained = bool(summary)
            if not trained:  # resumed after its last epoch (e.g. killed during evaluation): nothing was reported
                summary = epoch_report(self.store.metrics(self.trial_id), self.epoch)
            self.writer.add_hparams(hparams(self.config), {f"hparam/{k}": v for k, v in summary.items() if k != "epoch"},
                                    run_name=".")
            self.writer.close()
            self.store.write_trial(self.trial_id, status="completed", end_time=time.time(), epochs_done=self.epoch,
                                   best_epoch=self.best_epoch, **self.timing())
            if not trained and report is not None:
                report(summary)
        return summary

    def timing(self) -> dict:
        """The trial row's training time: on the budget's clock (see BudgetClock), on the wall, and which clock."""
        return {"train_seconds": self.train_seconds, "train_wall_seconds": self.train_wall_seconds,
                "budget_clock": self.clock.name}

    def out_of_budget(self) -> bool:
        """True once the run's epochs have used its training budget (config.budget_min; 0 = no budget); every rank
        takes rank 0's decision (its clock includes the checkpoints), so all stop after the same epoch."""
        if not self.config.budget_min:
            return False
        spent = torch.tensor(float(self.env.is_main and finished_budget(self.config, self.train_seconds)), device=self.device)
        return bool(distributed.all_sum(spent).item())

    def training_data(self) -> tuple[np.ndarray, np.ndarray]:
        """The run's images and train rows (`Family.fit_sampling` fits to them)."""
        return self.cache.images, self.train_idx

    def finish_best(self) -> None:
        """Load the best checkpoint into the model and complete it with what sampling needs beside the weights (a
        VAE's latent prior, fitted to the run's open data: `checkpoint.complete`): once here, for the checkpoint
        that is sampled, not every epoch; after a resume too, when the job that saved it was killed before this."""
        checkpoint.complete(self.store.checkpoint(self.trial_id, "best"), self.training_data, self.model, self.device)

    def evaluate(self) -> None:
        """Sample-quality metrics of the best checkpoint (loaded by `finish_best`), from each latent of its family,
        beside the dataset's baselines (split "eval")."""
        from galaxygen.evaluate import baseline_metrics, evaluate_model, metric_rows

        try:
            n = self.config.eval_n
            metrics = evaluate_model(self.model, self.config, self.cache, n=n, workers=1, seed=self.config.seed,
                                     progress=False)
            baselines = baseline_metrics(self.cache, n, workers=1, progress=False)
        except Exception as err:  # a failed measurement must not cost the trained model
            log.exception("evaluation of %s failed", self.trial_id)
            self.store.write_trial(self.trial_id, status="running", error=f"evaluation failed: {type(err).__name__}: {err}")
            return
        self.store.write_eval(self.trial_id, metric_rows(metrics, baselines, self.step, self.epoch))
        for key, value in metrics.items():
            self.writer.add_scalar(f"eval/{key}", value, self.epoch)

    def train_epoch(self) -> list[dict]:
        self.model.train()
        self.train_loader.set_epoch(self.epoch)
        n_batches = len(self.train_loader)
        sums: dict[str, torch.Tensor] = {}
        window: dict[str, torch.Tensor] = {}
        in_window = 0
        rows: list[dict] = []
        seen = 0
        step_time = 0.0  # batches and steps only: the epoch's time minus the periodic probe and logging
        start = tick = time.perf_counter()
        bar = progress_bar(self.train_loader, total=n_batches, desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
                   disable=not self.env.is_main or None, leave=False, mininterval=2, file=sys.stderr)
        for i, x in enumerate(bar):
            parts = self.objective.train_step(x, self.epoch + i / n_batches)
            self.step += 1
            seen += len(x) * self.env.world_size
            in_window += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v
                window[k] = window.get(k, 0) + v
            if self.step % self.config.log_every == 0 or i == n_batches - 1:
                if self.device.type == "cuda":  # the queued steps belong to the steps' time, not the logging's
                    torch.cuda.synchronize(self.device)
                step_time += time.perf_counter() - tick
                means = self.reduce({k: v / in_window for k, v in window.items()})
                window, in_window = {}, 0
                held_out = self.probe_loss()
                rows += [self.row("train", f"{k}_step", v) for k, v in means.items()]
                rows.append(self.row("val", "loss_step", held_out))
                if self.writer:
                    for k, v in means.items():
                        self.writer.add_scalar(f"train_step/{k}", v, self.step)
                    self.writer.add_scalar("val_step/loss", held_out, self.step)
                bar.set_postfix(loss=f"{means['loss']:.1f}", refresh=False)
                tick = time.perf_counter()
        elapsed = time.perf_counter() - start
        means = self.reduce({k: v / n_batches for k, v in sums.items()})
        rows += [self.row("train", k, v) for k, v in means.items()]
        rows.append(self.row("train", "lr", self.objective.optimizers[0].param_groups[0]["lr"]))
        rows += [self.row("train", k, v) for k, v in zip(TIMINGS, (seen / elapsed, elapsed, step_time))]
        return rows

    def reduce(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean over ranks of per-rank means; fails the run if any value is NaN or infinite."""
        keys = sorted(values)
        stacked = distributed.all_mean(torch.stack([torch.as_tensor(values[k], dtype=torch.float32).to(self.device)
                                                    for k in keys]))
        out = dict(zip(keys, stacked.tolist()))
        bad = {k: v for k, v in out.items() if not math.isfinite(v)}
        if bad:
            raise TrainingDiverged(f"loss became non-finite at epoch {self.epoch + 1}, step {self.step}: {bad}")
        return out

    @torch.no_grad()
    def probe_loss(self) -> float:
        """Held-out loss on a fixed batch (the within-epoch held-out curve)."""
        with evaluating(self.model):
            return float(self.objective.eval_step(self.probe)["loss"])

    @torch.no_grad()
    def validate(self) -> list[dict]:
        """Held-out metrics over the whole val split (each rank a shard; image-weighted mean over ranks)."""
        self.model.eval()
        totals: dict[str, torch.Tensor] = {}
        n = torch.zeros((), device=self.device)
        for x in self.val_loader:
            for k, v in self.objective.eval_step(x).items():
                totals[k] = totals.get(k, 0) + v.to(self.device) * len(x)
            n += len(x)
        keys = sorted(totals)
        summed = distributed.all_sum(torch.stack([totals[k] for k in keys] + [n]))
        values = dict(zip(keys, (summed[:-1] / summed[-1]).tolist()))
        return [self.row("val", k, v) for k, v in values.items()]

    def row(self, split: str, metric: str, value: float) -> dict:
        return {"step": self.step, "epoch": self.epoch + 1,
                "split": split, "metric": metric, "value": float(value), "wall_time": time.time()}

    def log_epoch(self, summary: dict) -> None:
        w = self.writer
        for key, value in summary.items():
            if key != "epoch":
                split, metric = key.split("_", 1)
                w.add_scalar(f"{split}/{metric}", value, self.epoch)
        w.add_images("samples_from_prior", generate(self.model, GRID, "prior", self.config.seed), self.epoch)
        if hasattr(self.model, "reconstruct"):
            x = self.probe[:8]
            pairs = torch.stack([x, self.model.reconstruct(x).float()], 1).flatten(0, 1)
            w.add_images("reconstructions", pairs.cpu(), self.epoch)
        w.flush()
        log.info("epoch %d/%d %s", self.epoch, self.config.epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in summary.items() if k.startswith(("train_loss", "val_"))))


class BudgetClock:
    """The clock a training budget (config.budget_min) is charged on: the compute the run was given.

    On an accelerator (CUDA, MPS) it is the wall clock: the device is the run's alone, and the host's CPU time would
    miss the device's work. On a CPU it is the process's CPU time divided by its torch threads: on an idle machine
    that is the wall clock, and on a shared one (other jobs on the same cores) it does not count the time the run
    waited for a core, so models trained one after another under changing load get the same compute. Batches are
    made in the training thread (BatchLoader), so the process's CPU time includes them.
    """

    def __init__(self, device: torch.device):
        self.name = "wall" if device.type != "cpu" else "cpu"

    def __call__(self) -> float:
        if self.name == "wall":
            return time.perf_counter()
        return time.process_time() / torch.get_num_threads()


def hardware(device: torch.device) -> str:
    """What a run trains on, for its trial row: the host and its accelerator, or its CPU model, cores and threads."""
    host = socket.gethostname()
    if device.type == "cuda":
        return f"{host}: {torch.cuda.get_device_name(device)}"
    if device.type != "cpu":
        return f"{host}: {device.type}"
    cpu = platform.processor() or "CPU"
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return f"{host}: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"


def finished_budget(config: TrainConfig, train_seconds: float) -> bool:
    """True when a run with a training budget (config.budget_min > 0) has trained for at least that long on its
    BudgetClock."""
    return config.budget_min > 0 and train_seconds >= 60 * config.budget_min


def trained_enough(row: dict | None, config: TrainConfig) -> bool:
    """True when a trial's row says it completed what `config` asks: its epochs, or its training budget."""
    if not row or row.get("status") != "completed":
        return False
    return (row.get("epochs_done") or 0) >= config.epochs or finished_budget(config, row.get("train_seconds") or 0)


def hparams(config: TrainConfig) -> dict:
    return {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in config.to_dict().items()}


def run(config: TrainConfig, results: str | os.PathLike, sweep: str = SINGLE_RUNS, trial_id: str | None = None,
        report: Callable[[dict], None] | None = None, evaluate: bool = True, data: RunData | None = None) -> dict:
    """Train (or resume, or skip if already completed) one run; returns its final per-epoch report.

    evaluate=False leaves the end-of-run evaluation (config.eval_n) and the completion of the best checkpoint (its
    latent prior: `checkpoint.complete`) to someone else, e.g. a CPU job after a GPU training job
    (`SlurmOptions.eval_job`). `data`: the run's data when the caller has opened it already (`open_data`)."""
    config = config.resolved()
    trial_id = trial_id or config.signature()
    store = ResultsStore(results, sweep)
    env = distributed.read_env()
    existing = store.read_trial(trial_id)
    if trained_enough(existing, config):
        summary = epoch_report(store.metrics(trial_id), int(existing["epochs_done"]))
        if report is not None and env.is_main:
            report(summary)
        return summary
    if env.is_main:
        store.remove_stale(trial_id)  # temporaries of a killed earlier attempt of this trial
    device = distributed.setup(env)
    try:
        trainer = Trainer(config, store, trial_id, env, device, data)
        return trainer.fit(report, evaluate)
    except Exception as err:
        # a full disk or a read-only folder is one line naming the file (a traceback adds nothing), and raised as
        # a WriteError whatever wrote it (TensorBoard's writer raises a bare OSError, naming no file: its folder)
        written = write_error(err, where=store.tb_dir(trial_id))
        if env.is_main:
            try:
                store.write_trial(trial_id, status="failed", end_time=time.time(),
                                  error=str(written) if written else f"{type(err).__name__}: {err}\n"
                                                                     f"{traceback.format_exc()}",
                                  **({} if store.read_trial(trial_id) else {**config.to_dict(),
                                                                              "config_hash": config.signature()}))
            except OSError as row_err:  # a full disk or a read-only folder: the caller records it (or reports it)
                log.error("could not record the failure of %s: %s", trial_id, row_err)
        if written is not None and written is not err:
            raise written from err
        raise
    finally:
        distributed.teardown()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m galaxygen.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="cache folder (default: the built-in synthetic galaxies, made once)")
    p.add_argument("--model", help="model name (default cnn, the report's Table III)")
    p.add_argument("--epochs", type=int, help="number of epochs")
    p.add_argument("--out", default="results", help="results folder (default ./results)")
    p.add_argument("--sweep", default=SINGLE_RUNS, help=f"group name under --out (default {SINGLE_RUNS}: a run's "
                   f"folder is OUT/{SINGLE_RUNS}/runs/ID)")
    p.add_argument("--trial-id", help="run id (default: a hash of the config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config value, repeatable; keys: " + ", ".join(TrainConfig.keys()))
    p.add_argument("--config", help="a config.json to start from (e.g. a previous run's)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint (default behaviour "
                   "when one exists; the flag only documents intent)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        values = json.loads(Path(args.config).read_text()) if args.config else {}
        values.update(parse_assignments(args.set))
        for key in ("model", "epochs", "data"):
            if getattr(args, key) is not None:
                values[key] = getattr(args, key)
        config = TrainConfig.from_dict(values).resolved()
        data = open_data(config, distributed.read_env().world_size)  # every input problem before any work
        check_trial_id(args.trial_id or config.signature())
    except (ConfigError, CacheError, StoreError, OSError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = run(config, args.out, args.sweep, args.trial_id, data=data)
    except (ConfigError, checkpoint.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"failed: {err}", file=sys.stderr)
        return 1
    except WriteError as err:  # a full disk or a read-only results folder: the run resumes once it is fixed
        print(f"error: {err}", file=sys.stderr)
        return 1
    env = distributed.read_env()
    if env.is_main:
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
