"""analysis.docpage: the docs page of a sweep (budget, machine, every trial's scores against the baselines, the
fraction of the ceiling-to-floor distance closed, a sample figure) from a tiny results folder."""

from __future__ import annotations

import json
import math

import matplotlib.image as mpimg
import pytest

from analysis.docpage import build, closed_fraction, main, score_table
from analysis.tables import load_sweep
from galaxygen.results import ResultsStore
from tests.test_analysis import SWEEP, blob_cache, trained_sweep

# every metric's one-image ceiling and real-vs-real floor; the trials' values per latent
BASE = {"one_image": {"fid_domain": 20.0, "kid_domain": 10.0, "morph_score": 2.0, "colour_w": 1.0},
        "real_vs_real": {"fid_domain": 2.0, "kid_domain": 0.0, "morph_score": 0.2, "colour_w": 1.5}}
FITTED = [{"fid_domain": 6.5, "kid_domain": 2.0, "morph_score": 0.65, "colour_w": 0.5},
          {"fid_domain": 29.0, "kid_domain": 5.0, "morph_score": 0.3, "colour_w": 0.7}]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two trained mlp1 trials with a CPU-clock budget, eval rows from both latents and the stored baselines."""
    sweep_dir = trained_sweep(tmp_path_factory.mktemp("results"), blob_cache(tmp_path_factory.mktemp("data") / "b"))
    store = ResultsStore(sweep_dir.parent, SWEEP)
    for i, trial_id in enumerate(sorted(store.trials()["trial_id"])):
        store.write_trial(trial_id, budget_min=5.0, budget_clock="cpu", train_seconds=300.0 + i,
                          train_wall_seconds=600.0, epochs_done=10 - i, hardware="host: Test CPU, 2 cores, 1 thread")
        rows = [{"split": "eval", "metric": k, "value": v} for k, v in FITTED[i].items()]
        rows += [{"split": "eval", "metric": f"{k}_prior", "value": 2 * v} for k, v in FITTED[i].items()]
        rows += [{"split": "eval", "metric": "eval_n", "value": 72.0}]
        rows += [{"split": f"eval_{b}", "metric": k, "value": v} for b, values in BASE.items() for k, v in values.items()]
        store.write_metrics(trial_id, "eval", [{**r, "step": 40, "epoch": 2, "wall_time": 1e9} for r in rows])
    meta = store.meta_path()
    meta.write_text(json.dumps({"name": SWEEP, "varies": ["dropout"], "started": 1.7e9,
                                "command": "python -m sweeps.launch dropout --budget-min 5"}))
    return sweep_dir


def test_closed_fraction_runs_from_the_ceiling_to_the_floor():
    assert closed_fraction(20.0, 20.0, 2.0) == 0 and closed_fraction(2.0, 20.0, 2.0) == 1
    assert closed_fraction(6.5, 20.0, 2.0) == pytest.approx(0.75)
    assert closed_fraction(29.0, 20.0, 2.0) == pytest.approx(-0.5)  # worse than one galaxy repeated
    assert math.isnan(closed_fraction(0.5, 1.0, 1.5))  # a ceiling below its floor separates nothing
    assert math.isnan(closed_fraction(math.nan, 20.0, 2.0))


def test_table_has_a_row_per_trial_and_latent_and_the_baselines(sweep):
    table = score_table(load_sweep(sweep))
    trials = table[~table["status"].isin(["ceiling", "floor"])]
    assert sorted(trials["latent"]) == ["fitted"] * 2 + ["prior"] * 2
    fitted = trials[trials["latent"] == "fitted"].reset_index(drop=True)
    assert list(fitted["epochs"]) == [10, 9] and list(fitted["train_min"]) == pytest.approx([5.0, 5 + 1 / 60])
    assert list(fitted["wall_min"]) == pytest.approx([10.0] * 2)
    for metric in BASE["one_image"]:
        ceiling, floor = BASE["one_image"][metric], BASE["real_vs_real"][metric]
        assert list(fitted[metric]) == pytest.approx([v[metric] for v in FITTED])
        expected = [(ceiling - v[metric]) / (ceiling - floor) if ceiling > floor else math.nan for v in FITTED]
        assert list(fitted[f"{metric}_closed"]) == pytest.approx(expected, nan_ok=True)
    prior = trials[trials["latent"] == "prior"].reset_index(drop=True)
    assert list(prior["fid_domain"]) == pytest.approx([13.0, 58.0])
    marks = table.set_index("status")
    assert marks.loc["ceiling", "fid_domain"] == 20 and marks.loc["floor", "morph_score"] == pytest.approx(0.2)


def test_page_states_budget_machine_command_and_best_trials_and_draws_samples(sweep, tmp_path):
    page = build(sweep, tmp_path / "docs")
    assert page == tmp_path / "docs" / f"{SWEEP}.md"
    text = page.read_text()
    assert "python -m sweeps.launch dropout --budget-min 5" in text
    assert f"python -m analysis.docpage {sweep} --out {tmp_path / 'docs'}" in text
    assert "5 minutes of training per trial" in text and "CPU time per torch thread" in text
    assert "host: Test CPU, 2 cores, 1 thread" in text and "72 generated galaxies" in text
    assert "| dropout=0 | fitted | completed | 10 | 5 | 10 | 6.5 (75%) |" in text
    assert "| one-image generator |  | ceiling |  | — | — | 20 (0%) | 10 (0%) | 2 (0%) | 1 |" in text
    assert "| real vs real |  | floor |  | — | — | 2 (100%) | 0 (100%) | 0.2 (100%) | 1.5 |" in text
    assert "`fid_domain`: **dropout=0** (fitted latents) closes 75%" in text
    assert "`morph_score`: **dropout=0.3** (fitted latents) closes 94%" in text
    assert "| dropout=0.3 | prior | completed | 9 | 5.017 | 10 | 58 (-211%) |" in text
    assert "`colour_w`: no trial" in text  # its ceiling is below its floor
    image = mpimg.imread(tmp_path / "docs" / f"{SWEEP}_samples.png")
    assert image.shape[0] > 100 and image.shape[1] > 2 * 100  # a panel per trial, side by side
    assert f"]({SWEEP}_samples.png)" in text


def test_cli_refuses_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), "--out", str(tmp_path / "docs")])
    assert exc.value.code == 2 and "not a sweep folder" in capsys.readouterr().err
    assert not (tmp_path / "docs").exists()
