"""Early stopping on science (the per-epoch fid_domain estimate) and equal training budgets (BudgetClock)."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from galaxygen import checkpoint
from galaxygen.config import TrainConfig
from galaxygen.evaluate.quick import QuickEstimate
from galaxygen.models import build_model
from galaxygen.models.vae import fit_sampling
from galaxygen.results import ResultsStore
from galaxygen.train import BudgetClock, run
from tests.conftest import run_launcher


def tiny(blob_cache, **kw) -> TrainConfig:
    values = dict(model="cnn", epochs=2, batch_size=16, data=str(blob_cache), log_every=4, data_count=64)
    values.update(kw)
    return TrainConfig(**values)


def test_the_quick_estimate_ranks_galaxies_above_noise_and_is_seeded(blob_cache):
    estimate = QuickEstimate(blob_cache, 16)
    images = estimate.ref.cache.images
    galaxies = images[estimate.ref.train_rows[:16]]
    noise = np.random.default_rng(0).integers(0, 256, galaxies.shape, dtype=np.uint8)
    assert 0 < estimate.score_images(galaxies) < estimate.score_images(noise) / 5
    config = tiny(blob_cache).resolved()
    model = build_model(config)
    fit_sampling(model, lambda: (galaxies, np.arange(len(galaxies))))  # a VAE samples its fitted prior and noise
    assert estimate(model, config, seed=3) == estimate(model, config, seed=3)
    assert estimate(model, config, seed=3) != estimate(model, config, seed=4)


def test_quick_eval_logs_fid_domain_each_epoch_without_changing_training(tmp_path, blob_cache):
    plain = run(tiny(blob_cache), tmp_path, "t", "plain")
    scored = run(tiny(blob_cache, quick_eval_n=16), tmp_path, "t", "scored")
    assert scored["val_loss"] == plain["val_loss"] and scored["train_loss"] == plain["train_loss"]
    assert "val_fid_domain_quick" not in plain and scored["val_fid_domain_quick"] > 0
    metrics = ResultsStore(tmp_path, "t").metrics("scored")
    quick = metrics[(metrics.split == "val") & (metrics.metric == "fid_domain_quick")]
    assert sorted(quick.epoch) == [1, 2] and np.isfinite(quick.value).all()
    # the estimate samples the fitted prior: fitted at each epoch, so the checkpoints carry it; without it, only
    # the best checkpoint does (fitted at the end)
    store = ResultsStore(tmp_path, "t")
    assert {"latent_prior", "pixel_noise"} <= set(checkpoint.load(store.checkpoint("scored", "last"))["model"]["_extra_state"])
    assert not {"latent_prior", "pixel_noise"} & set(checkpoint.load(store.checkpoint("plain", "last"))["model"]["_extra_state"])
    assert TrainConfig(quick_eval_n=16).signature() != TrainConfig().signature()  # it changes what a trial records


def test_the_budget_clock_counts_compute_not_waiting_on_a_cpu_and_the_wall_on_a_gpu():
    clock = BudgetClock(torch.device("cpu"))
    assert clock.name == "cpu" and BudgetClock(torch.device("cuda", 0)).name == "wall"
    before = clock()
    time.sleep(0.3)  # waiting (for a core, for I/O) is not training
    waited = clock() - before
    before, start = clock(), time.process_time()
    while time.process_time() - start < 0.3:  # computing is, however long the wall clock takes on a busy machine
        pass
    computed = clock() - before
    assert waited < 0.05 and computed == pytest.approx(0.3 / torch.get_num_threads(), rel=0.2)


def test_a_training_budget_ends_the_run_after_the_epoch_that_reaches_it(tmp_path, blob_cache):
    config = tiny(blob_cache, epochs=3, budget_min=1e-4)  # 6 ms: the first epoch crosses it
    assert config.signature() == tiny(blob_cache).signature()  # like epochs, a budget extends the same trial
    summary = run(config, tmp_path, "t", "budget")
    store = ResultsStore(tmp_path, "t")
    row = store.read_trial("budget")
    assert row["status"] == "completed" and row["epochs_done"] == summary["epoch"] == 1
    assert row["train_seconds"] >= 6e-3 and row["train_wall_seconds"] > 0 and row["budget_clock"] == "cpu"
    assert "cores" in row["hardware"]
    last = store.checkpoint("budget", "last")
    before = os.path.getmtime(last)
    assert run(config, tmp_path, "t", "budget") == pytest.approx(summary)  # spent: a rerun does no work
    assert os.path.getmtime(last) == before
    longer = run(config.replace(budget_min=0), tmp_path, "t", "budget")  # no budget: continues to its epochs
    assert longer["epoch"] == store.read_trial("budget")["epochs_done"] == 3


def test_launcher_budget_keeps_trial_ids_and_bad_values_fail(tmp_path):
    def ids(*args):
        proc = run_launcher(["architecture", "--dry-run", *args], tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return [line.split()[0] for line in proc.stdout.splitlines()]

    assert ids("--budget-min", "3") == ids()
    proc = run_launcher(["architecture", "--budget-min", "-1"], tmp_path)
    assert proc.returncode == 2 and "--budget-min" in proc.stderr and not (tmp_path / "architecture").exists()
    proc = run_launcher(["search", "--metric", "lpips"], tmp_path)
    assert proc.returncode == 2 and "fid_domain" in proc.stderr


def test_search_ranks_and_stops_trials_by_fid_domain(tmp_path, blob_cache):
    proc = run_launcher(["search", "--backend", "local", "--data", str(blob_cache), "--metric", "fid_domain",
                         "--samples", "2", "--epochs", "2", "--set", "batch_size=16", "--set", "data_count=64",
                         "--set", "quick_eval_n=16", "--eval-n", "0", "--no-figures"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    store = ResultsStore(tmp_path, "search")
    trials = store.trials()
    assert len(trials) == 2 and (trials.quick_eval_n == 16).all()
    metrics = store.metrics()
    quick = metrics[metrics.metric == "fid_domain_quick"]
    for row in trials.itertuples():  # every epoch a trial ran has its estimate
        assert len(quick[quick.trial_id == row.trial_id]) == row.epochs_done >= 1
    # the table is ranked by the metric the sweep was asked for
    table = proc.stdout[proc.stdout.index("trial_id"):].splitlines()
    assert "val_fid_domain_quick" in table[0]
    col = table[0].split().index("val_fid_domain_quick")
    values = [float(line.split()[col]) for line in table[1:3]]
    assert values == sorted(values)
    assert json.loads((store.dir / "sweep.json").read_text())["base"]["quick_eval_n"] == 16
