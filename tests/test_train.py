"""The training run: config validation, results, checkpoints and resume, NaN handling, DDP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from galaxygen import checkpoint, distributed
from galaxygen.config import ConfigError, TrainConfig
from galaxygen.data import Cache
from galaxygen.models.latent_prior import LatentPrior, fit_rows
from galaxygen.models.vae import posterior_means
from galaxygen.results import ResultsStore
from galaxygen.train import TIMINGS, Trainer, TrainingDiverged, main, open_data, run


def tiny(blob_cache, **kw) -> TrainConfig:
    values = dict(model="cnn", epochs=2, batch_size=16, data=str(blob_cache), log_every=4)
    values.update(kw)
    return TrainConfig(**values)


@pytest.mark.parametrize("bad,key", [(["--set", "dropout=1.5"], "dropout"), (["--set", "batch_size=0"], "batch_size"),
                                     (["--model", "vqvae"], "model"), (["--set", "recon_loss=huber"], "recon_loss"),
                                     (["--set", "colour=red"], "colour"), (["--epochs", "0"], "epochs"),
                                     (["--model", "cnn", "--set", "depth=4"], "depth"),
                                     # checked against the data, still before any work
                                     (["--set", "image_size=32"], "image_size=32: the cache"),
                                     (["--set", "data_count=10"], "batch_size=32: allowed at most the 10"),
                                     (["--model", "resvae", "--set", "image_size=48"], "power-of-two"),
                                     (["--data", "MISSING"], "is not a galaxygen cache"),
                                     (["--trial-id", "../elsewhere"], "invalid trial id")])
def test_bad_config_fails_before_any_work(tmp_path, blob_cache, bad, key):
    bad = [str(tmp_path / "missing") if a == "MISSING" else a for a in bad]
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "galaxygen.train", "--out", str(out), "--data", str(blob_cache), *bad],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and key in lines[0], proc.stderr
    assert "allowed" in lines[0] or "cache" in lines[0]
    assert not out.exists(), "nothing may be written for a bad config"


def test_the_train_command_opens_its_data_once(tmp_path, blob_cache, monkeypatch):
    # the inputs' check before any work opens the run's data, and the run trains on that same opening
    opened = []
    real = Cache.open.__func__
    monkeypatch.setattr(Cache, "open", classmethod(lambda cls, *a, **kw: opened.append(a) or real(cls, *a, **kw)))
    assert main(["--data", str(blob_cache), "--epochs", "1", "--set", "batch_size=16", "--out", str(tmp_path)]) == 0
    assert len(opened) == 1


def test_a_training_job_imports_no_package_it_does_not_train_with():
    """Start-up is part of every job: rendering (GalSim, astropy, scipy), the latent prior (scikit-learn, imported when
    it is fitted), evaluation (statmorph, photutils) and the diffusion model's library stay unimported."""
    code = ("import sys; from galaxygen.train import run; from galaxygen.data import default_cache; "
            "default_cache(create=False); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'galsim', 'astropy', 'scipy', 'sklearn', "
            "'statmorph', 'photutils', 'diffusers', 'matplotlib'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_config_resolves_model_defaults_and_signature_is_stable():
    a = TrainConfig(model="mlp2").resolved()
    assert (a.latent_dim, a.width, a.dropout) == (10, 40, 0.2)
    assert TrainConfig(model="mlp2").signature() == TrainConfig(model="mlp2", latent_dim=10).signature()
    assert TrainConfig(model="mlp2").signature() != TrainConfig(model="mlp2", latent_dim=11).signature()
    with pytest.raises(ConfigError, match="data_fraction"):
        TrainConfig(data_fraction=0)


def test_run_writes_results_checkpoints_and_tensorboard(tmp_path, blob_cache, monkeypatch):
    fits = []  # sizes of the latent-prior fits the run makes
    fit = LatentPrior.fit.__func__
    monkeypatch.setattr(LatentPrior, "fit", classmethod(lambda cls, z, *a, **kw: fits.append(len(z)) or fit(cls, z, *a, **kw)))
    summary = run(tiny(blob_cache), tmp_path, "t", "trial")
    # the prior is fitted where it is sampled: once, for the best checkpoint, not at every epoch's checkpoint
    assert len(fits) == 1
    store = ResultsStore(tmp_path, "t")
    row = store.read_trial("trial")
    assert row["status"] == "completed" and row["epochs_done"] == 2 and row["model"] == "cnn"
    metrics = store.metrics("trial")
    epochs = metrics[~metrics.metric.str.endswith("_step")]
    assert set(epochs.epoch) == {1, 2}
    assert {"loss", "recon", "kl", "nelbo", "bits_per_dim"} <= set(epochs[epochs.split == "val"].metric)
    assert not metrics.duplicated(["epoch", "step", "split", "metric"]).any()
    assert set(metrics[metrics.metric == "loss_step"].split) == {"train", "val"}
    # the time in batches and steps, within the epoch's time (which adds the held-out probe and logging)
    times = epochs[epochs.split == "train"].pivot_table(index="epoch", columns="metric", values="value")
    assert ((times.step_time_s > 0) & (times.step_time_s < times.epoch_time_s)).all()
    assert summary["epoch"] == 2 and np.isfinite(summary["val_nelbo"])
    # the val loss is the sum of its parts (alpha = 1): reductions defined once
    assert summary["val_loss"] == pytest.approx(summary["val_recon"] + summary["val_kl"], rel=1e-4)
    run_dir = store.run_dir("trial")
    model, config = checkpoint.load_model(run_dir / "checkpoints" / "best.pt")
    assert config.model == "cnn" and model.sample(4).shape == (4, 3, 64, 64)
    # the objective picks the best checkpoint (a VAE's: lowest held-out negative ELBO) and the VAE's best checkpoint
    # carries the latent prior fitted to its own weights (refitting gives the same mixture: deterministic)
    nelbo = epochs.query("split == 'val' and metric == 'nelbo'").set_index("epoch")["value"]
    assert checkpoint.load(run_dir / "checkpoints" / "best.pt")["epoch"] == nelbo.idxmin() == row["best_epoch"]
    assert "latent_prior" not in checkpoint.load(run_dir / "checkpoints" / "last.pt")["model"]["_extra_state"]
    data = open_data(config)
    refit = LatentPrior.fit(posterior_means(model, data.cache.images[fit_rows(data.train)]))
    for stored, again in zip(model.latent_prior.state().values(), refit.state().values()):
        torch.testing.assert_close(stored, again, rtol=1e-4, atol=1e-4)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb")).Reload()
    tags = events.Tags()
    assert {"samples_from_prior", "reconstructions"} <= set(tags["images"])
    assert {"train/loss", "val/loss", "val/nelbo", "val/bits_per_dim", "val/recon", "val/kl", "train/lr",
            "train/images_per_s", "train_step/loss", "val_step/loss"} <= set(tags["scalars"])
    # the hyperparameters with the final val metrics, in the hparams plugin's session records
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams, metric_tags = {}, set()
    for content in events.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            hparams = dict(data.session_start_info.hparams)
        if data.HasField("experiment"):
            metric_tags = {m.name.tag for m in data.experiment.metric_infos}
    assert hparams["model"].string_value == "cnn" and hparams["dropout"].number_value == pytest.approx(0.2)
    assert {"hparam/val_nelbo", "hparam/val_loss"} <= metric_tags
    assert json.loads((run_dir / "config.json").read_text()) == tiny(blob_cache).resolved().to_dict()
    # a rerun of a completed trial does no work and returns the same summary
    before = os.path.getmtime(run_dir / "checkpoints" / "last.pt")
    assert run(tiny(blob_cache), tmp_path, "t", "trial") == pytest.approx(summary)
    assert os.path.getmtime(run_dir / "checkpoints" / "last.pt") == before


def test_a_best_checkpoint_saved_without_its_latent_prior_gets_it_where_it_is_sampled(tmp_path, blob_cache):
    # a training job whose evaluation is someone else's (a CPU job after it) leaves the prior to that job
    run(tiny(blob_cache, epochs=1), tmp_path, "t", "x", evaluate=False)
    store = ResultsStore(tmp_path, "t")
    best = store.checkpoint("x", "best")
    bare = checkpoint.load(best)
    assert "latent_prior" not in bare["model"]["_extra_state"]
    model, _ = checkpoint.load_model(best)  # loading it to sample fits the prior from the run's data ...
    assert model.latent_prior is not None
    assert "latent_prior" not in checkpoint.load(best)["model"]["_extra_state"]  # ... and never writes
    assert checkpoint.complete(best) and not checkpoint.complete(best)  # the evaluation job writes it in, once
    prior = checkpoint.load(best)["model"]["_extra_state"]["latent_prior"]
    torch.testing.assert_close(prior, model.latent_prior.state())  # deterministic: the same mixture
    # a job killed between saving its best checkpoint and completing it: the resume completes it
    checkpoint.save(best, **bare)
    store.write_trial("x", status="running")
    run(tiny(blob_cache, epochs=1), tmp_path, "t", "x")  # trains nothing, completes the best checkpoint
    torch.testing.assert_close(checkpoint.load(best)["model"]["_extra_state"]["latent_prior"], prior)
    # without the run's data, such a checkpoint is refused in one line, never sampled from N(0, I) instead
    gone = tmp_path / "bare.pt"
    checkpoint.save(gone, **{**bare, "config": {**bare["config"], "data": str(tmp_path / "moved")}})
    with pytest.raises(checkpoint.CheckpointError, match="needs its run's data .*moved to fit its latent prior"):
        checkpoint.load_model(gone)


def test_killed_run_resumes_to_the_same_metrics(tmp_path, blob_cache):
    cfg = ["--data", str(blob_cache), "--epochs", "3", "--set", "batch_size=16", "--set", "log_every=4",
           "--trial-id", "t1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run([sys.executable, "-m", "galaxygen.train", "--out", str(tmp_path / "a"), *cfg],
                              capture_output=True, text=True, env=env, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, "-m", "galaxygen.train", "--out", str(tmp_path / "b"), *cfg],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "b" / "train" / "runs" / "t1" / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.load(last)["epoch"] < 3, "the run must be killed before it finished"
    resumed = subprocess.run([sys.executable, "-m", "galaxygen.train", "--out", str(tmp_path / "b"), *cfg],
                             capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = ResultsStore(tmp_path / "a", "train").metrics("t1").sort_values(["epoch", "step", "split", "metric"])
    b = ResultsStore(tmp_path / "b", "train").metrics("t1").sort_values(["epoch", "step", "split", "metric"])
    keep = ~a.metric.isin(TIMINGS)
    assert len(a) == len(b) and not b.duplicated(["epoch", "step", "split", "metric"]).any()
    np.testing.assert_allclose(a[keep].value.to_numpy(), b[~b.metric.isin(TIMINGS)].value.to_numpy(),
                               rtol=1e-5)


def test_resume_continues_only_the_same_config(tmp_path, blob_cache):
    run(tiny(blob_cache, epochs=1), tmp_path, "t", "x")
    with pytest.raises(ConfigError, match=r"another config \(dropout=0\.2\).*only epochs may change"):
        run(tiny(blob_cache, epochs=2, dropout=0.3), tmp_path, "t", "x")
    summary = run(tiny(blob_cache, epochs=2), tmp_path, "t", "x")  # more epochs of the same run: continues
    assert summary["epoch"] == 2
    metrics = ResultsStore(tmp_path, "t").metrics("x")
    assert sorted(set(metrics.epoch)) == [1, 2] and not metrics.duplicated(["epoch", "step", "split", "metric"]).any()


@pytest.mark.parametrize("likelihood", ["bce", "gaussian"])  # gaussian: its running variance is resumed too
def test_more_epochs_continue_a_finished_run_to_the_metrics_of_an_uninterrupted_one(tmp_path, blob_cache, likelihood):
    def config(**kw) -> TrainConfig:
        return tiny(blob_cache, recon_loss=likelihood, **kw)

    # epochs are not part of a trial's identity; what changes past training (evaluation) is
    assert config(epochs=1).signature() == config(epochs=3).signature()
    assert tiny(blob_cache, eval_n=8).signature() != tiny(blob_cache).signature()
    torch.set_num_threads(1)
    run(config(epochs=3), tmp_path / "a", "t")
    run(config(epochs=1), tmp_path / "b", "t")
    trial_id = config().resolved().signature()
    store = ResultsStore(tmp_path / "b", "t")
    first = store.read_epoch(trial_id, 1)
    assert run(config(epochs=3), tmp_path / "b", "t")["epoch"] == 3
    row = store.read_trial(trial_id)
    assert row["status"] == "completed" and row["epochs_done"] == 3 and row["epochs"] == 3
    assert store.read_epoch(trial_id, 1).equals(first), "epoch 1 must not be trained again (same rows, same times)"
    # fewer epochs than a trial has: nothing to do, the trial is complete
    assert run(config(epochs=2), tmp_path / "b", "t")["epoch"] == 3
    order = ["epoch", "step", "split", "metric"]
    a = ResultsStore(tmp_path / "a", "t").metrics(trial_id).sort_values(order)
    b = store.metrics(trial_id).sort_values(order)
    timing = TIMINGS
    a, b = a[~a.metric.isin(timing)], b[~b.metric.isin(timing)]
    assert a[order].values.tolist() == b[order].values.tolist()
    # same process, same CPU kernels, RNG state restored from the checkpoint: equal up to float32 rounding
    np.testing.assert_allclose(a.value.to_numpy(), b.value.to_numpy(), rtol=1e-5)


def test_nan_stops_the_run_with_a_recorded_reason(tmp_path, blob_cache):
    with pytest.raises(TrainingDiverged):
        run(tiny(blob_cache, lr=1e9, epochs=3), tmp_path, "t", "nan")
    row = ResultsStore(tmp_path, "t").read_trial("nan")
    assert row["status"] == "failed" and "non-finite" in row["error"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: TrainConfig, out, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = distributed.read_env()
    # each rank gets its own results folder, so anything a rank other than 0 writes is visible
    trainer = Trainer(cfg.resolved(), ResultsStore(out / f"rank{rank}", "ddp"), "trial", env, distributed.setup(env))
    summary = trainer.fit()
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()]).numpy()
    if trainer.model.recon_variance is not None:  # the gaussian likelihood's running variance: a model parameter too
        params = np.concatenate([params, trainer.model.recon_variance.numpy()])
    distributed.teardown()
    queue.put((rank, summary, params))


@pytest.mark.parametrize("likelihood", ["bce", "gaussian"])  # gaussian: the global batch's optimal variance
def test_two_process_ddp_matches_one_process(tmp_path, blob_cache, likelihood):
    cfg = tiny(blob_cache, epochs=1, dropout=0.0, augment=False, batch_size=32, recon_loss=likelihood)
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, cfg, tmp_path / "two", queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r: (s, params) for r, s, params in (queue.get(timeout=600) for _ in procs)}
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    torch.set_num_threads(1)
    single = run(cfg, tmp_path / "one", "ddp", "trial")
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert results[1][0] == {}, "only rank 0 reports"
    assert not [f for f in (tmp_path / "two" / "rank1").rglob("*") if f.is_file()], "only rank 0 writes"
    assert ResultsStore(tmp_path / "two" / "rank0", "ddp").read_trial("trial")["status"] == "completed"
    two = results[0][0]
    assert two["val_nelbo"] == pytest.approx(single["val_nelbo"], rel=0.03)
    assert two["train_loss"] == pytest.approx(single["train_loss"], rel=0.03)
