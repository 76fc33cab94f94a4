"""Faults in what the store, a cache and a checkpoint hold, and bad config values: each is one clear line
naming the file or key, readers never die on one bad file, and the launcher's repair restores the rows."""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from galaxygen import checkpoint, results
from galaxygen.config import MAX_PARAMETERS, ConfigError, TrainConfig
from galaxygen.data import Cache, CacheError
from galaxygen.results import ResultsStore, load
from galaxygen.train import TIMINGS, run
from sweeps import status
from tests.conftest import run_launcher
from tests.test_status import make_sweep


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def garbage(path) -> None:
    path.write_bytes(b"this is not what it claims to be\n" * 40)


# -- the results store ------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", [truncate, garbage])
def test_a_bad_parquet_part_is_reported_once_and_skipped_by_every_reader(tmp_path, caplog, damage):
    from analysis.tables import load_sweep

    store = make_sweep(tmp_path)
    bad = store.epoch_path("done", 2)
    damage(bad)
    damage(store.trial_path("fail"))
    results._reported.clear()
    with caplog.at_level("WARNING", logger="galaxygen.results"):
        trials, metrics = load(tmp_path, "sw")
        data = load_sweep(store.dir)
        text, _ = status.render(store)
    assert sorted(trials["trial_id"]) == ["done", "run"]
    assert sorted(metrics[metrics.trial_id == "done"]["epoch"].unique()) == [1, 3]
    assert len(data.trials) == 2 and "done" in text
    warned = [r.getMessage() for r in caplog.records]
    for path in (bad, store.trial_path("fail")):
        assert sum(str(path) in w for w in warned) == 1, warned
    assert [(b.trial_id, b.part, b.epoch) for b in store.bad_parts()] == [("done", "epoch-00002", 2),
                                                                          ("fail", "trial", None)]


def test_repair_rewrites_a_part_from_the_checkpoint_or_retrains_to_the_same_metrics(tmp_path, blob_cache):
    torch.set_num_threads(1)
    config = TrainConfig(model="cnn", epochs=2, batch_size=16, data=str(blob_cache), log_every=4)
    run(config, tmp_path, "sw", "t")
    store = ResultsStore(tmp_path, "sw")
    order = ["epoch", "step", "split", "metric"]
    timing = [*TIMINGS, "lr"]
    before = store.metrics("t").sort_values(order).reset_index(drop=True)
    # the last epoch's part is in the last checkpoint: rewritten exactly
    truncate(store.epoch_path("t", 2))
    [line] = checkpoint.repair(store)
    assert "rewritten from" in line and str(store.epoch_path("t", 2)) in line
    assert store.metrics("t").sort_values(order).reset_index(drop=True).equals(before)
    assert store.read_trial("t")["status"] == "completed"
    # an older epoch's rows are gone: the trial is reset and its next run trains it again, to the same metrics
    garbage(store.epoch_path("t", 1))
    [line] = checkpoint.repair(store)
    assert "trained again" in line and store.read_trial("t")["status"] == "stopped"
    assert not store.checkpoint("t", "last").exists() and store.bad_parts() == []
    run(config, tmp_path, "sw", "t")
    after = store.metrics("t").sort_values(order).reset_index(drop=True)
    keep = ~before.metric.isin(timing)
    assert after[order].equals(before[order])
    np.testing.assert_allclose(after[keep].value, before[keep].value, rtol=1e-5)
    assert store.read_trial("t")["status"] == "completed"


def test_the_launcher_repairs_bad_parts_and_finishes_the_sweep(tiny_sweep, tmp_path):
    shutil.copytree(tiny_sweep, tmp_path / tiny_sweep.name, ignore=shutil.ignore_patterns("ray", "report"))
    store = ResultsStore(tmp_path, tiny_sweep.name)
    first, second = sorted(store.trials()["trial_id"])
    before = store.metrics()
    truncate(store.epoch_path(first, 2))  # the last epoch: its rows are in the last checkpoint
    garbage(store.part_path(second, "eval"))  # the evaluation: measured again
    (store.metrics_dir(first) / "epoch-00001 (copy).parquet").write_bytes(store.epoch_path(first, 1).read_bytes())
    command = shlex.split(json.loads(store.meta_path().read_text())["command"])[3:]  # after python -m sweeps.launch
    i = command.index("--results")
    proc = run_launcher(command[:i] + command[i + 2:], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count("repaired ") == 2, proc.stderr[-3000:]
    assert store.bad_parts() == [] and set(store.trials()["status"]) == {"completed"}
    after = store.metrics()
    key = ["trial_id", "epoch", "step", "split", "metric"]
    assert not after.duplicated(key).any() and len(after) == len(before)
    assert after.set_index(key).loc[first].sort_index().equals(before.set_index(key).loc[first].sort_index())
    assert (after[after.trial_id == second]["split"] == "eval").any()


# -- a corrupt cache --------------------------------------------------------------------------------------


def damage_images_truncated(cache):
    truncate(cache / "images.npy", 0.3)


def damage_images_garbage(cache):
    garbage(cache / "images.npy")


def damage_catalog(cache):
    garbage(cache / "catalog.parquet")


def damage_manifest(cache):
    (cache / "manifest.json").write_text('{"source": "blobs", "n": ')


def damage_manifest_list(cache):
    (cache / "manifest.json").write_text("[1, 2]")


@pytest.mark.parametrize("damage,name", [(damage_images_truncated, "images.npy"), (damage_images_garbage, "images.npy"),
                                         (damage_catalog, "catalog.parquet"), (damage_manifest, "manifest.json"),
                                         (damage_manifest_list, "manifest.json")])
def test_a_corrupt_cache_is_one_line_naming_the_file(tmp_path, blob_cache, damage, name):
    cache = tmp_path / "cache"
    shutil.copytree(blob_cache, cache)
    damage(cache)
    with pytest.raises(CacheError) as err:
        Cache.open(cache)
    message = str(err.value)
    assert str(cache / name) in message and "\n" not in message


def test_train_on_a_corrupt_cache_exits_2_with_one_line(tmp_path, blob_cache):
    cache = tmp_path / "cache"
    shutil.copytree(blob_cache, cache)
    damage_images_truncated(cache)
    proc = subprocess.run([sys.executable, "-m", "galaxygen.train", "--data", str(cache), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert str(cache / "images.npy") in proc.stderr and not (tmp_path / "r").exists()


# -- a bad checkpoint -------------------------------------------------------------------------------------


class RunsCode:
    """A pickle that would create a marker file when unpickled (os.system is what an attacker would use)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (shutil.copy, (__file__, str(self.marker)))


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    config = TrainConfig(model="mlp1").resolved()
    from galaxygen.models import build_model

    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    checkpoint.save(path, config=config.to_dict(), model=build_model(config).state_dict(), epoch=1, step=1)
    return path


@pytest.mark.parametrize("kind", ["truncated", "garbage", "code", "empty", "not a checkpoint"])
def test_a_bad_checkpoint_is_one_line_and_never_runs_code(tmp_path, good_checkpoint, kind):
    path = tmp_path / "bad.pt"
    marker = tmp_path / "pwned"
    if kind == "truncated":
        path.write_bytes(good_checkpoint.read_bytes()[:5000])
    elif kind == "garbage":
        garbage(path)
    elif kind == "code":
        torch.save({"config": {}, "model": RunsCode(marker)}, path)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        torch.save(torch.zeros(3), path)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load_model(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message and "weights_only" not in message
    assert not marker.exists()
    if kind == "code":
        assert "refused" in message and "shutil.copy" in message


def test_sample_of_a_bad_checkpoint_exits_2_with_one_line(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"config": {}, "model": RunsCode(tmp_path / "pwned")}, path)
    proc = subprocess.run([sys.executable, "-m", "galaxygen.sample", str(path), "--out", str(tmp_path / "g.png")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "refused" in proc.stderr and "weights_only" not in proc.stderr and not (tmp_path / "pwned").exists()


# -- config values ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["alpha", "weight_decay", "free_bits", "tv_weight", "grad_clip", "lr", "dropout",
                                 "data_fraction"])
@pytest.mark.parametrize("value", [math.inf, math.nan, "inf", "nan"])
def test_floats_must_be_finite(key, value):
    with pytest.raises(ConfigError, match=rf"invalid config {key}="):
        TrainConfig.from_dict({key: value})


@pytest.mark.parametrize("seed,ok", [(0, True), (2**32 - 1, True), (-1, False), (2**32, False)])
def test_seed_within_numpys_range(seed, ok):
    if ok:
        np.random.default_rng(TrainConfig(seed=seed).seed)
    else:
        with pytest.raises(ConfigError, match="invalid config seed"):
            TrainConfig(seed=seed)


@pytest.mark.parametrize("sizes", [dict(model="mlp2", width=10**7), dict(model="cnn", latent_dim=10**20),
                                   dict(model="resvae", width=10**6), dict(model="mlp1", image_size=2**20)])
def test_sizes_are_checked_against_the_memory_the_model_needs(sizes):
    with pytest.raises(ConfigError, match=re.escape(f"allowed at most {MAX_PARAMETERS:.0e} parameters")):
        TrainConfig(**sizes).check_model()
    assert 0 < TrainConfig(model=sizes["model"]).check_model() < MAX_PARAMETERS


def test_train_refuses_a_huge_model_at_once(tmp_path, blob_cache):
    proc = subprocess.run([sys.executable, "-m", "galaxygen.train", "--data", str(blob_cache), "--model", "mlp2",
                           "--set", "width=10000000", "--out", str(tmp_path / "r")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "parameters" in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()


def test_a_trial_id_that_would_leave_its_folder_is_refused_before_any_work(tmp_path, good_checkpoint, capsys):
    from galaxygen.evaluate.__main__ import main as evaluate_main

    assert evaluate_main([str(good_checkpoint), "--out", str(tmp_path / "sw"), "--trial", "../../etc"]) == 2
    assert "invalid trial id" in capsys.readouterr().err and not (tmp_path / "sw").exists()
