"""Named sweeps, the launcher with real Ray Tune, resume after a driver kill, atomic writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow.dataset as ds
import pytest

from galaxygen.models import MODELS
from galaxygen.results import METRIC_SCHEMA, ResultsStore, load
from sweeps import spaces
from tests.conftest import run_launcher

EXPECTED = {
    "dropout": ("dropout", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),
    "batch_size": ("batch_size", [8, 16, 32, 64]),
    "latent_dim": ("latent_dim", [2, 4, 8, 12, 16, 32]),
    "alpha": ("alpha", [1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7]),
    "recon_loss": ("recon_loss", ["bce", "l1", "mse", "gaussian"]),
    "data_reduction": ("data_fraction", [1.0, 0.5, 0.25, 0.1]),
    "architecture": ("model", sorted(MODELS)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_grid_sweeps_expand_to_the_report_values_on_the_table_iii_base(name):
    key, values = EXPECTED[name]
    configs = spaces.expand(spaces.get(name), {"epochs": 2})
    assert [getattr(c, key) for c in configs] == values
    others = {k for k in ("model", "batch_size", "latent_dim", "alpha", "recon_loss", "dropout") if k != key}
    for c in configs:
        assert c.epochs == 2
        base = c.replace(**{key: getattr(spaces.expand(spaces.get(name), {})[0], key)})
        if key != "model":
            assert c.model == "cnn"
        assert {k: getattr(c, k) for k in others} == {k: getattr(base, k) for k in others}


def test_the_main_job_trains_a_wider_cnn_under_the_gaussian_likelihood_unless_set_otherwise():
    main = [c.resolved() for c in spaces.expand(spaces.get("dropout"), {})]
    assert {(c.model, c.recon_loss, c.width, c.latent_dim) for c in main} == {("cnn", "gaussian", 32, 32)}
    report = spaces.expand(spaces.get("dropout"), {"width": 16, "latent_dim": 12, "recon_loss": "bce"})
    assert {(c.recon_loss, c.width, c.latent_dim) for c in report} == {("bce", 16, 12)}  # --set overrides it
    others = [c.resolved() for c in spaces.expand(spaces.get("batch_size"), {})]  # other sweeps keep the defaults
    assert {(c.recon_loss, c.width, c.latent_dim) for c in others} == {("bce", 16, 12)}


def test_augmentation_and_search_sweeps():
    aug = [(c.model, c.augment) for c in spaces.expand(spaces.get("augmentation"), {})]
    assert sorted(aug) == sorted([("mlp2", True), ("mlp2", False), ("cnn", True), ("cnn", False)])
    search = spaces.expand(spaces.get("search"), {}, samples=20, seed=3)
    assert len(search) == 20 and len({c.signature() for c in search}) == 20
    assert all(1e-4 <= c.lr <= 3e-3 and 1e-3 <= c.alpha <= 1 and 0 <= c.dropout <= 0.5 for c in search)
    assert [c.signature() for c in search] == [c.signature() for c in spaces.expand(spaces.get("search"), {}, 20, 3)]
    assert spaces.get("search").early_stopping


def test_mlp_studies_and_adhoc_grids():
    configs = spaces.expand(spaces.get("batch_size"), {"model": "mlp2"})
    assert {c.model for c in configs} == {"mlp2"}
    grid = spaces.parse_grid(["latent_dim=8,16", "lr=1e-3,3e-4"])
    assert len(spaces.expand(spaces.adhoc("mine", grid), {})) == 4


@pytest.mark.parametrize("args,needle", [
    (["nosuch"], "unknown sweep 'nosuch'"),
    (["dropout", "--set", "colour=red"], "unknown config key colour"),
    (["dropout", "--grid", "dropout=0.1,2"], "dropout=2.0"),
    (["dropout", "--set", "batch_size=0"], "batch_size"),
    (["dropout", "--data", "/nonexistent"], "not a galaxygen cache"),
    # checked against the data, still before Ray starts
    (["dropout", "--data", "BLOBS", "--set", "image_size=32"], "image_size=32: the cache"),
    (["mine", "--data", "BLOBS", "--grid", "data_count=100,10"], "allowed at most the 10 training images"),
])
def test_bad_input_fails_at_once_before_ray_starts(tmp_path, blob_cache, args, needle):
    args = [str(blob_cache) if a == "BLOBS" else a for a in args]
    proc = run_launcher([*args, "--backend", "local"], tmp_path / "r", timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", ["dropout", "mine"])
def test_an_unknown_grid_key_fails_at_once_naming_it_and_the_allowed_keys(tmp_path, name):
    from galaxygen.config import TrainConfig
    from sweeps.launch import ray_temp_dir

    proc = run_launcher([name, "--grid", "colour=red,blue", "--backend", "local"], tmp_path / "r", timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unknown config key colour" in errors[0]
    allowed = errors[0].split("allowed", 1)[1]
    assert all(key in allowed for key in TrainConfig.keys())
    assert not (tmp_path / "r").exists()
    assert not os.path.exists(ray_temp_dir(tmp_path / "r"))


def test_list_prints_every_sweep_what_it_varies_and_the_values(tmp_path):
    proc = run_launcher(["--list"], tmp_path)
    assert proc.returncode == 0
    for name in spaces.SWEEPS:
        assert name in proc.stdout
    assert "dropout: 0.1, 0.2, 0.3, 0.4, 0.5, 0.6" in proc.stdout
    assert "model: " + ", ".join(sorted(MODELS)) in proc.stdout
    assert "lr: log-uniform 0.0001..0.003" in proc.stdout and "latent_dim: one of 4, 8, 12, 16, 32" in proc.stdout


def test_grid_values_are_checked_and_a_sweep_has_distinct_trials():
    from galaxygen.config import ConfigError

    for bad, needle in [(["dropout="], "lists no values"), (["lr=1e-3,0.001"], "lr=0.001 twice"),
                        (["dropout=0.1,,0.2"], "empty value"), (["lr=1", "lr=2"], "given twice")]:
        with pytest.raises(ConfigError, match=needle):
            spaces.parse_grid(bad)
    with pytest.raises(ConfigError, match="would repeat the same configs"):
        spaces.expand(spaces.get("dropout"), {}, samples=2)
    # cnn's default dropout is filled in: "none" and that value are one trial
    default = spaces.expand(spaces.adhoc("d", {"dropout": [None]}), {})[0].resolved().dropout
    with pytest.raises(ConfigError, match="same config"):
        spaces.expand(spaces.adhoc("d", {"dropout": [None, default]}), {})


def test_a_real_tiny_sweep_fills_the_parquet_store(tiny_sweep):
    trials, metrics = load(tiny_sweep.parent, "dropout")
    assert sorted(trials.dropout) == [0.1, 0.5] and set(trials.status) == {"completed"}
    assert set(trials.trial_id) == set(json.loads((tiny_sweep / "sweep.json").read_text())["trials"])
    epochs = metrics[~metrics.metric.str.endswith("_step")]
    for trial_id in trials.trial_id:
        own = epochs[epochs.trial_id == trial_id]
        assert set(own.epoch) == {1, 2}
        assert set(own[own.split == "val"].metric) >= {"loss", "nelbo", "bits_per_dim", "recon", "kl"}
    assert not metrics.duplicated(["trial_id", "epoch", "step", "split", "metric"]).any()
    assert "dropout" in metrics.columns  # config columns joined
    evals = metrics[metrics.split == "eval"]
    for trial_id in trials.trial_id:  # every trial is scored at its end, beside the dataset's baselines
        own = evals[evals.trial_id == trial_id].set_index("metric")["value"]
        assert {"fid_domain", "kid_domain", "kmeans_occupancy_error", "memorisation_ratio"} <= set(own.index)
        assert own["fid_domain"] > 0
    floor = metrics[(metrics.split == "eval_real_vs_real") & (metrics.metric == "fid_domain")].value
    assert len(floor) == 2 and (floor < evals[evals.metric == "fid_domain"].value.min()).all()
    duckdb = pytest.importorskip("duckdb")
    n = duckdb.sql(f"SELECT count(*) FROM '{tiny_sweep}/metrics/*/*.parquet'").fetchall()[0][0]
    assert n == len(metrics)
    for trial_id in trials.trial_id:
        assert any((tiny_sweep / "runs" / trial_id / "tb").iterdir())
        assert (tiny_sweep / "runs" / trial_id / "checkpoints" / "best.pt").exists()


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, blob_cache):
    proc = run_launcher(["fail", "--backend", "local", "--data", str(blob_cache), "--epochs", "1",
                         "--grid", "lr=1e-3,1e9", "--set", "batch_size=16", "--no-figures", "--eval-n", "0"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    trials = ResultsStore(tmp_path, "fail").trials().set_index("lr")
    assert trials.loc[1e-3, "status"] == "completed"
    assert trials.loc[1e9, "status"] == "failed" and "non-finite" in trials.loc[1e9, "error"]
    assert "1 trial(s) failed" in proc.stderr


def test_the_exit_status_counts_only_this_runs_failed_trials(tmp_path, blob_cache):
    from galaxygen.config import TrainConfig

    store = ResultsStore(tmp_path, "mixed")  # an earlier grid under the same sweep name left a failed trial
    old = TrainConfig(dropout=0.7, epochs=1, batch_size=16, data=str(blob_cache), eval_n=0)
    old_id = old.resolved().signature()
    store.write_trial(old_id, status="failed", error="RuntimeError: an earlier grid's failure",
                      config_hash=old_id, **old.to_dict(), start_time=1e9, end_time=1e9 + 1, epochs_done=0)
    proc = run_launcher(["mixed", "--backend", "local", "--data", str(blob_cache), "--epochs", "1",
                         "--grid", "dropout=0.1", "--set", "batch_size=16", "--no-figures", "--eval-n", "0"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trial(s) failed" not in proc.stderr and old_id not in proc.stdout
    trials = store.trials().set_index("trial_id")
    assert len(trials) == 2 and trials.loc[old_id, "status"] == "failed"
    assert (trials.drop(old_id).status == "completed").all()


def test_driver_killed_mid_sweep_then_rerun_finishes_without_rerunning(tmp_path, blob_cache):
    args = ["resume", "--backend", "local", "--data", str(blob_cache), "--epochs", "2", "--max-concurrent", "1",
            "--grid", "dropout=0.1,0.3,0.5", "--set", "batch_size=16", "--no-figures", "--eval-n", "0",
            "--results", str(tmp_path)]
    driver = subprocess.Popen([sys.executable, "-m", "sweeps.launch", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    store = ResultsStore(tmp_path, "resume")
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        t = store.trials()
        if len(t) and (t.status == "completed").sum() >= 1:
            break
        time.sleep(0.2)
    assert driver.poll() is None, "the sweep finished before it could be killed"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    done = store.trials().query("status == 'completed'")
    first = done.set_index("trial_id")["start_time"].to_dict()
    assert 1 <= len(first) < 3
    try:
        proc = run_launcher(args[:-2] + ["--resume"], tmp_path)
    finally:
        subprocess.run(["pkill", "-9", "-s", str(driver.pid)], check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = store.trials().set_index("trial_id")
    assert len(trials) == 3 and set(trials.status) == {"completed"}
    for trial_id, started in first.items():
        assert trials.loc[trial_id, "start_time"] == started, "a finished trial was re-run"
    metrics = store.metrics()
    assert not metrics.duplicated(["trial_id", "epoch", "step", "split", "metric"]).any()
    assert set(metrics.groupby("trial_id").epoch.max()) == {2}


def test_the_same_sweep_with_more_epochs_continues_each_trial(tmp_path, blob_cache):
    args = ["longer", "--backend", "local", "--data", str(blob_cache), "--grid", "dropout=0.1", "--set",
            "batch_size=16", "--no-figures", "--eval-n", "0"]
    first = run_launcher([*args, "--epochs", "1"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    store = ResultsStore(tmp_path, "longer")
    [trial_id] = store.trials()["trial_id"]
    epoch_one = store.read_epoch(trial_id, 1)
    more = run_launcher([*args, "--epochs", "2"], tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    row = store.read_trial(trial_id)
    assert list(store.trials()["trial_id"]) == [trial_id], "more epochs are the same trial"
    assert row["status"] == "completed" and row["epochs_done"] == 2
    assert store.read_epoch(trial_id, 1).equals(epoch_one), "epoch 1 must not be trained again"
    assert store.epochs(trial_id) == [1, 2]
    assert not store.metrics().duplicated(["trial_id", "epoch", "step", "split", "metric"]).any()


WRITER = """
import sys, numpy as np, pandas as pd
from pathlib import Path
from galaxygen.results import atomic_write_parquet
path = Path(sys.argv[1])
i = 0
while True:
    i += 1
    n = 200_000
    atomic_write_parquet(pd.DataFrame({"i": np.full(n, i), "x": np.random.rand(n)}), path)
    print(i, flush=True)
"""


def test_a_killed_writer_leaves_no_corrupt_file(tmp_path):
    target = tmp_path / "metrics" / "t" / "epoch-00001.parquet"
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
        for _ in range(2 + attempt):
            proc.stdout.readline()
        time.sleep(0.013 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        frame = pd.read_parquet(target)  # always a complete file
        assert len(frame) == 200_000 and frame.i.nunique() == 1
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(".")]
    table = ds.dataset(tmp_path / "metrics", format="parquet").to_table()
    assert table.num_rows == 200_000, f"readers must ignore hidden temporaries {leftovers}"
    assert METRIC_SCHEMA.names[0] == "sweep"
