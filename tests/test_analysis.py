"""analysis: figures, table and report page of a tiny sweep, including a failed trial and one without checkpoint."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import plots
from analysis.compare import build_comparison
from analysis.figures import build, main, render
from analysis.inference import light_concentration
from analysis.tables import comparison_table, load_sweep, swept_keys
from galaxygen.evaluate import base_metric
from galaxygen.results import ResultsStore, load
from tests.conftest import run_launcher

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FIGURES = ("loss_curves", "elbo_curves", "within_epoch_loss", "eval_metrics", "samples", "reconstructions",
           "colour", "latent_concentration", "latent_best")
SWEEP = "dropout-tiny"


def blob_cache(out: Path, n: int = 48, size: int = 64) -> Path:
    """A tiny cache of elliptical blobs with a synthetic-style ground-truth catalog."""
    from galaxygen.data.cache import CacheWriter

    rng = np.random.default_rng(0)
    writer = CacheWriter(out, n, size)
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    rows = []
    for i in range(n):
        ell, angle, hlr = rng.uniform(0, 0.7), rng.uniform(0, np.pi), rng.uniform(3, 10)
        bulge = rng.uniform(0, 1)
        u = xx * np.cos(angle) + yy * np.sin(angle)
        v = (-xx * np.sin(angle) + yy * np.cos(angle)) / (1 - ell)
        r = np.hypot(u, v)
        light = bulge * np.exp(-((r / (0.5 * hlr)) ** 0.5)) + (1 - bulge) * np.exp(-r / hlr)
        img = np.stack([light * c for c in (1.0, 0.8, 0.6)], axis=-1)
        writer.images[i] = np.clip(255 * img / img.max() + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
        rows.append({"id": f"g{i}", "source": "blob", "split": "val" if i % 4 == 0 else "train",
                     "class": "elliptical" if bulge > 0.5 else "spiral", "bulge_frac": bulge,
                     "ellipticity": ell, "hlr_px": hlr})
    return writer.finish(pd.DataFrame(rows), {"source": "test blobs"})


def epoch_rows(epoch: int, step: int, scale: float) -> list[dict]:
    """Per-epoch and per-step metrics as training writes them."""
    rows = []
    for split, offset in (("train", 0.0), ("val", 40.0)):
        nelbo = scale * (3000 + offset) / epoch
        values = {"loss": nelbo * 0.98, "recon": nelbo * 0.95, "kl": nelbo * 0.05, "nelbo": nelbo,
                  "bits_per_dim": nelbo / (3 * 64 * 64 * np.log(2))}
        rows += [{"step": step, "epoch": epoch, "split": split, "metric": k, "value": v, "wall_time": 1e9 + step}
                 for k, v in values.items()]
    for s in range(step - 10, step, 2):
        rows.append({"step": s, "epoch": epoch, "split": "val", "metric": "loss_step",
                     "value": scale * 3100 / epoch + np.sin(s), "wall_time": 1e9 + s})
        rows.append({"step": s, "epoch": epoch, "split": "train", "metric": "loss_step",
                     "value": scale * 3050 / epoch + np.cos(s), "wall_time": 1e9 + s})
    return rows


def hand_made_sweep(root: Path, cache: Path) -> Path:
    """Results written with ResultsStore and checkpoints of registered models (used until train.run exists)."""
    import torch

    from galaxygen import checkpoint
    from galaxygen.config import TrainConfig
    from galaxygen.models import build_model

    store = ResultsStore(root, SWEEP)
    for i, dropout in enumerate((0.0, 0.2, 0.5)):
        cfg = TrainConfig(model="mlp1", latent_dim=3, dropout=dropout, epochs=2, batch_size=16, data=str(cache))
        trial_id = f"t{i}-{cfg.signature()}"
        store.write_trial(trial_id, status="completed", config_hash=cfg.signature(), **cfg.to_dict(),
                          start_time=1e9, end_time=1e9 + 30 + i, epochs_done=2)
        for epoch in (1, 2):
            store.write_metrics(trial_id, f"epoch-{epoch:05d}", epoch_rows(epoch, 20 * epoch, 1 + 0.1 * i))
        torch.manual_seed(i)
        model = build_model(cfg.resolved())
        checkpoint.save(store.run_dir(trial_id) / "checkpoints" / "best.pt", config=cfg.to_dict(),
                        model=model.state_dict(), epoch=2)
    return store.dir


def trained_sweep(root: Path, cache: Path) -> Path:
    """Two tiny real trainings through galaxygen.train.run."""
    from galaxygen.config import TrainConfig
    from galaxygen.train import run

    for dropout in (0.0, 0.3):
        cfg = TrainConfig(model="mlp1", dropout=dropout, epochs=2, batch_size=16, data=str(cache), amp=False,
                          log_every=1)
        run(cfg, root, SWEEP, f"d{dropout}-{cfg.signature()}")
    return root / SWEEP


def add_broken_trials(sweep_dir: Path) -> None:
    """A failed trial (no metrics, no checkpoint) and a running one with metrics but no checkpoint."""
    store = ResultsStore(sweep_dir.parent, sweep_dir.name)
    base = {k: v for k, v in store.trials().iloc[0].to_dict().items()
            if k not in ("trial_id", "status", "error", "updated_time", "epochs_done", "end_time")}
    key = "dropout" if "dropout" in base else None
    store.write_trial("failed-trial", **{**base, **({key: 0.8} if key else {})}, status="failed",
                      error="RuntimeError: simulated out of memory", epochs_done=0)
    store.write_trial("nockpt-trial", **{**base, **({key: 0.35} if key else {})}, status="running", epochs_done=1)
    store.write_metrics("nockpt-trial", "epoch-00001", epoch_rows(1, 20, 1.3))
    first = str(store.trials().sort_values("trial_id").iloc[0]["trial_id"])
    if (store.metrics(first).split == "eval").any():
        return  # the sweep evaluated its trials for real
    store.write_metrics(first, "eval", [
        {"step": 99, "epoch": 2, "split": split, "metric": "morph_score", "value": value, "wall_time": 1e9}
        for split, value in (("eval", 0.75), ("eval_real_vs_real", 0.1), ("eval_one_image", 3.0))])


@pytest.fixture(scope="module")
def sweep_dir(request, tmp_path_factory) -> Path:
    """The lead's `tiny_sweep` when conftest has it, else a tiny real training, else a hand-made store."""
    root = tmp_path_factory.mktemp("results")
    try:
        source = Path(request.getfixturevalue("tiny_sweep"))
        target = root / source.name
        shutil.copytree(source, target)
    except pytest.FixtureLookupError:
        cache = blob_cache(tmp_path_factory.mktemp("data") / "blobs")
        if importlib.util.find_spec("galaxygen.train") is not None:
            target = trained_sweep(root, cache)
        else:
            target = hand_made_sweep(root, cache)
    add_broken_trials(target)
    return target


@pytest.fixture(scope="module")
def report(sweep_dir, tmp_path_factory) -> Path:
    return build(sweep_dir, tmp_path_factory.mktemp("report"))


def test_every_figure_and_table_is_written(report):
    out = report.parent
    for name in FIGURES:
        assert (out / f"{name}.png").stat().st_size > 1000, name
        assert (out / f"{name}.pdf").stat().st_size > 1000, name
    assert (out / "table.csv").is_file() and (out / "table.md").is_file()
    assert report.name == "report.html"


def test_loss_curves_have_one_line_per_trial_with_data(sweep_dir):
    data = load_sweep(sweep_dir)
    with_loss = {u for u in data.trials["uid"] if not data.metric(u, "train", "loss").empty}
    assert "failed-trial" not in with_loss and "nockpt-trial" in with_loss
    fig = plots.epoch_curves(data, "loss", "nats/image", "loss")
    train_ax, val_ax = fig.axes[:2]
    assert len(train_ax.get_lines()) == len(with_loss)
    labels = [t.get_text() for t in train_ax.get_legend().get_texts()]
    assert all("final" in lab for lab in labels[: len(with_loss)])
    assert any("failed" in t.get_text() for leg in fig.legends + [a.get_legend() for a in fig.axes if a.get_legend()]
               for t in leg.get_texts())
    plots.plt.close(fig)


def test_table_has_one_row_per_trial_matching_parquet(sweep_dir, report):
    trials, metrics = load(sweep_dir.parent, sweep_dir.name)
    table = pd.read_csv(report.parent / "table.csv")
    assert sorted(table["trial_id"].astype(str)) == sorted(trials["trial_id"].astype(str))
    epoch_level = metrics[~metrics["metric"].str.endswith("_step")]
    for row in table.itertuples():
        for split in ("train", "val"):
            rows = epoch_level[(epoch_level.trial_id == row.trial_id) & (epoch_level.split == split)
                               & (epoch_level.metric == "nelbo")]
            got = getattr(row, f"{split}_nelbo_nats")
            if rows.empty:
                assert np.isnan(got)
            else:
                assert got == pytest.approx(rows.sort_values("epoch")["value"].iloc[-1], rel=1e-9)
    evals = metrics[(metrics.split == "eval") & (metrics.metric == "morph_score")].set_index("trial_id")["value"]
    shown = table.set_index("trial_id")["morph_score"].reindex(evals.index)
    np.testing.assert_allclose(shown.to_numpy(float), evals.to_numpy(float), rtol=1e-9, equal_nan=True)
    assert "real_vs_real_morph_score" not in table.columns
    baselines = pd.read_csv(report.parent / "baselines.csv")
    assert sorted(baselines["baseline"]) == ["one_image", "real_vs_real"]
    failed = table.set_index("trial_id").loc["failed-trial"]
    assert failed["status"] == "failed" and "simulated out of memory" in failed["error"]
    assert table.set_index("trial_id").loc["nockpt-trial", "checkpoint"] == "none"
    assert table["best"].sum() == 1
    md = (report.parent / "table.md").read_text()
    assert len([ln for ln in md.splitlines() if ln.startswith("| ")]) == len(trials) + 1


def test_eval_metrics_figure_shows_every_metric_beside_its_stored_baselines(sweep_dir, report):
    assert 'data-figure="eval_metrics"' in report.read_text()
    _, metrics = load(sweep_dir.parent, sweep_dir.name)
    evals = metrics[metrics.split == "eval"]
    assert not evals.empty, "the sweep under test was not evaluated"
    data = load_sweep(sweep_dir)
    fig = plots.eval_metrics(data)
    panels = {ax.get_gid().removeprefix("eval:"): ax for ax in fig.axes if (ax.get_gid() or "").startswith("eval:")}
    assert set(panels) == {m for m in evals.metric if not base_metric(m)[1]} - {"eval_n"}
    variants = {m: base_metric(m) for m in evals.metric if base_metric(m)[1]}
    latest = metrics.sort_values(["epoch", "wall_time"]).drop_duplicates(["split", "metric"], keep="last")
    baselines = latest[latest.split.isin(["eval_real_vs_real", "eval_one_image"])]
    own = evals.sort_values(["epoch", "wall_time"]).drop_duplicates(["trial_id", "metric"], keep="last")
    assert set(baselines.metric) & set(panels), "no stored baseline to check against"
    for name, ax in panels.items():
        finite = np.isfinite(own[own.metric == name].value).sum()
        points = {c.get_gid(): len(c.get_offsets()) for c in ax.collections}
        assert points.get("points:default", 0) == finite, name
        for variant, (base, latent) in variants.items():  # another latent's value: hollow points on its panel
            if base == name:
                assert points.get(f"points:{latent}", 0) == np.isfinite(own[own.metric == variant].value).sum(), name
        lines = {line.get_gid().split(":")[1]: line for line in ax.get_lines()
                 if (line.get_gid() or "").startswith("baseline:")}
        stored = baselines[baselines.metric == name].set_index("split")["value"]
        assert set(lines) == {s.removeprefix("eval_") for s in stored.index}, name
        for split, value in stored.items():
            line = lines[split.removeprefix("eval_")]
            assert list(line.get_ydata()) == pytest.approx([value, value], rel=1e-12), (name, split)
            assert line.get_label() == {"eval_real_vs_real": "real vs real",
                                        "eval_one_image": "one-image generator"}[split]
            assert any(t.get_text().startswith(line.get_label()) for t in ax.texts), "the line is not labelled"
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    unevaluated = data.trials[~data.trials.trial_id.isin(evals.trial_id)]
    assert {"failed-trial", "nockpt-trial"} <= set(unevaluated.trial_id)
    for row in unevaluated.itertuples():
        assert f"{row.label} ({row.status}, no eval metrics recorded)" in legend
    assert "real vs real" in legend and "one-image generator" in legend
    plots.plt.close(fig)


def test_eval_metrics_figure_is_skipped_without_eval_rows(sweep_dir, tmp_path):
    data = load_sweep(sweep_dir)
    data.metrics = data.metrics[~data.metrics["split"].str.startswith("eval")]
    data.trials["checkpoint"] = None  # only the metric figures are under test
    assert plots.eval_metrics(data) is None
    (tmp_path / "eval_metrics.png").write_bytes(b"stale")
    page = render(data, tmp_path, str(sweep_dir))
    assert not (tmp_path / "eval_metrics.png").exists() and not (tmp_path / "eval_metrics.pdf").exists()
    text = page.read_text()
    assert "eval_metrics" not in text and "Sample quality" not in text
    assert (tmp_path / "loss_curves.png").is_file()


def test_launcher_ends_by_printing_the_report_it_wrote(tiny_sweep, tmp_path):
    """Re-running the finished tiny sweep without --no-figures skips training and only builds the report."""
    shutil.copytree(tiny_sweep, tmp_path / tiny_sweep.name, ignore=shutil.ignore_patterns("ray", "report"))
    command = shlex.split(json.loads((tiny_sweep / "sweep.json").read_text())["command"])[3:]  # after python -m sweeps.launch
    i = command.index("--results")
    args = [a for a in command[:i] + command[i + 2:] if a != "--no-figures"]
    started = ResultsStore(tmp_path, tiny_sweep.name).trials().set_index("trial_id")["start_time"]
    proc = run_launcher(args, tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = re.findall(r"^report: (.+)$", proc.stdout, flags=re.M)
    assert len(reports) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    page = Path(reports[0])
    assert page == (tmp_path / tiny_sweep.name / "report" / "report.html").resolve() and page.is_file()
    assert proc.stdout.rstrip().splitlines()[-1].startswith("results: ")
    assert 'data-figure="eval_metrics"' in page.read_text()
    after = ResultsStore(tmp_path, tiny_sweep.name).trials().set_index("trial_id")["start_time"]
    pd.testing.assert_series_equal(after.sort_index(), started.sort_index())  # nothing was trained again


def test_swept_keys_inferred_and_from_sweep_json(sweep_dir):
    trials, _ = load(sweep_dir.parent, sweep_dir.name)
    keys = swept_keys(trials)
    assert keys and all(trials[k].astype(str).nunique() > 1 for k in keys)
    assert swept_keys(trials, {"name": "x", "varied": ["lr"]}) == ["lr"]
    assert swept_keys(trials, {"varied": {"unknown_key": [1, 2]}}) == keys


def test_report_shows_missing_pieces(report):
    text = report.read_text()
    assert "simulated out of memory" in text
    assert "nockpt-trial" in text and "has no checkpoint" in text
    assert len(re.findall(r'<img src="data:image/png;base64,', text)) == len(FIGURES)


def test_light_concentration_orders_profiles():
    yy, xx = np.mgrid[0:64, 0:64] - 31.5
    r = np.hypot(xx, yy)
    peaked = np.exp(-7.67 * (r / 8) ** 0.25)
    gauss = np.exp(-0.5 * (r / 6) ** 2)
    images = np.stack([np.repeat((255 * p / p.max())[..., None], 3, axis=2) for p in (peaked, gauss)]).astype(np.uint8)
    c_peaked, c_gauss = light_concentration(images)
    assert c_peaked > c_gauss
    assert c_gauss == pytest.approx(5 * np.log10(np.sqrt(np.log(5) / np.log(1.25))), abs=0.35)


def test_cli_rejects_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a sweep folder" in err


def test_compare_puts_best_trials_side_by_side(sweep_dir, tmp_path):
    other = tmp_path / "results" / "other-sweep"
    shutil.copytree(sweep_dir, other, ignore=shutil.ignore_patterns("report"))
    (other / "sweep.json").write_text(json.dumps({"name": "other-sweep"}))
    page = build_comparison([sweep_dir, other], tmp_path / "cmp")
    table = pd.read_csv(page.parent / "table.csv")
    assert list(table["sweep"]) == [sweep_dir.name, "other-sweep"]
    assert table["trial_id"].nunique() == 1  # the same best trial in both copies
    best = comparison_table(load_sweep(sweep_dir)).query("best")["trial_id"].iloc[0]
    assert table["trial_id"].iloc[0] == best
    for name in ("loss_curves", "samples", "latent_concentration"):
        assert (page.parent / f"{name}.png").is_file()


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless chromium is not installed (apt-get install chromium)")
def test_report_renders_every_figure_in_headless_chromium(report, tmp_path):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", "--virtual-time-budget=5000",
           report.resolve().as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    match = re.search(r'data-images-decoded="(\d+)/(\d+)"', dom)
    assert match, f"the page's load script did not run; DOM starts: {dom[:300]!r}"
    decoded, total = map(int, match.groups())
    assert total == len(FIGURES) and decoded == total


def test_unreadable_checkpoint_is_reported_not_fatal(tmp_path):
    from types import SimpleNamespace

    from analysis.inference import HeldOutSets, trial_outputs

    bad = tmp_path / "best.pt"
    bad.write_bytes(b"not a checkpoint")
    row = SimpleNamespace(checkpoint=str(bad), status="completed", error=None, trial_id="x", data="")
    out = trial_outputs(row, np.zeros((0, 64, 64, 3), np.uint8), HeldOutSets(8))
    assert out.samples is None and out.reasons["samples"].startswith("checkpoint unreadable")


def test_colour_figure_shows_real_against_each_trials_samples_and_the_best_reconstructions(sweep_dir, report):
    from analysis.inference import N_COLOUR, HeldOutSets, trial_outputs

    assert 'data-figure="colour"' in report.read_text() and "colour_w" in report.read_text()
    data = load_sweep(sweep_dir)
    heldouts = HeldOutSets(N_COLOUR)
    outputs = {row.uid: trial_outputs(row, np.zeros((0, 64, 64, 3), np.uint8), heldouts)
               for row in data.trials.itertuples()}
    drawn = {u: o for u, o in outputs.items() if o.sample_colour is not None}
    held = next(o.held for o in drawn.values())
    assert len(held.colour) == min(N_COLOUR, len(held.images))
    assert all(len(o.sample_colour) == N_COLOUR and len(o.recon_colour) == len(held.colour) for o in drawn.values())
    assert np.isfinite(held.colour).mean() > 0.9  # the blobs are coloured: every segment has a colour
    best = next(iter(drawn))
    fig = plots.colour_figure(data, held.colour, {u: o.sample_colour for u, o in outputs.items()},
                              ("best", held.colour, drawn[best].recon_colour))
    hist, scatter = fig.axes[:2]
    gids = {p.get_gid() for p in hist.patches} | {c.get_gid() for c in hist.containers if hasattr(c, "get_gid")}
    assert "colour:real" in gids and {f"colour:{u}" for u in drawn} <= gids
    labels = [t.get_text() for t in hist.get_legend().get_texts()]
    assert sum("W/spread" in t for t in labels) == len(drawn)
    points = next(c for c in scatter.collections if c.get_gid() == "colour:recon").get_offsets()
    ok = np.isfinite(held.colour) & np.isfinite(drawn[best].recon_colour)
    np.testing.assert_allclose(points, np.column_stack([held.colour[ok], drawn[best].recon_colour[ok]]))
    plots.plt.close(fig)
