"""Sample-quality metrics: they rank real, blurred and collapsed galaxies correctly, detect a size shift,
record statmorph failures instead of crashing, and are deterministic for a seed.

The galaxies are the toy bulge + disk + knots renderer (galaxygen.evaluate.toy): one homogeneous
population with known truth, so 60 galaxies per set separate the baselines clearly (the GalSim
synthetic mix of classes needs a few hundred per set for stable per-statistic distances).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.ndimage import gaussian_filter, zoom

from galaxygen.data.cache import Cache
from galaxygen.evaluate import (
    METRICS,
    MORPH_STATS,
    baseline_metrics,
    direction,
    diversity,
    evaluate_model,
    features,
    memorisation,
    morphology,
    probes,
    sample_images,
)
from galaxygen.evaluate import __main__ as cli
from galaxygen.evaluate.reference import Reference
from galaxygen.evaluate.toy import draw_params, render, write_toy_cache

N_GALAXIES = 1000
N = 60
BLUR_SIGMA = 1.5
# distances that must rank real-vs-real < blurred copy < one-image generator
FIDELITY = ("morph_score", "fid_domain", "kid_domain", "kmeans_centroid_dist")
# plus the mode-coverage distance, which a blurred copy (all modes kept) need not worsen
ORDERED = (*FIDELITY, "kmeans_occupancy_error")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GALAXYGEN_HOME", str(tmp_path_factory.mktemp("home")))
        yield


@pytest.fixture(scope="module")
def cache(home, tmp_path_factory) -> Cache:
    return Cache.open(write_toy_cache(tmp_path_factory.mktemp("data") / "toy", n=N_GALAXIES, seed=0))


@pytest.fixture(scope="module")
def ref(cache) -> Reference:
    return Reference(cache, N, workers=2, progress=False)


@pytest.fixture(scope="module")
def base(cache, ref) -> dict:
    return baseline_metrics(cache, N, workers=2, progress=False)


def blurred(images: np.ndarray, sigma: float) -> np.ndarray:
    return gaussian_filter(images.astype(np.float64), (0, sigma, sigma, 0)).round().astype(np.uint8)


def magnified(images: np.ndarray, factor: float) -> np.ndarray:
    """Every galaxy `factor` times larger: zoom about the centre and crop to the original size."""
    big = zoom(images.astype(np.float64), (1, factor, factor, 1), order=1)
    size, off = images.shape[1], (big.shape[1] - images.shape[1]) // 2
    return np.clip(big[:, off : off + size, off : off + size], 0, 255).round().astype(np.uint8)


def test_failures_are_rows_not_crashes(monkeypatch):
    rng = np.random.default_rng(0)
    galaxy = render(draw_params(1, seed=3))
    empty = np.zeros((1, 64, 64, 3), np.uint8)
    noise = np.clip(rng.normal(8, 4, (1, 64, 64, 3)), 0, 255).astype(np.uint8)
    flat = np.full((1, 64, 64, 3), 200, np.uint8)
    table = morphology.measure(np.concatenate([empty, galaxy, noise, flat]), workers=1, progress=False)
    assert list(table.columns) == list(morphology.COLUMNS)
    assert table["ok"].tolist() == [False, True, False, False]
    failed = table[~table["ok"]]
    assert (failed["error"] != "").all() and (failed["flag"] > morphology.MAX_FLAG).all()
    assert failed[list(MORPH_STATS)].isna().all().all()
    assert table.loc[1, list(MORPH_STATS)].notna().all()

    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("statmorph blew up")

    monkeypatch.setattr(morphology, "_morph_class", lambda: Broken)
    broken = morphology.measure(galaxy, workers=1, progress=False)
    assert not broken.loc[0, "ok"] and "statmorph blew up" in broken.loc[0, "error"]


def test_frechet_kid_and_kmeans_on_known_sets():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 4)), rng.normal(size=(400, 4))
    shift = np.array([2.0, 0, 0, 0])
    assert features.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert features.frechet_distance(a, a + shift) == pytest.approx(4.0, rel=1e-6)
    from scipy.linalg import sqrtm

    wide = rng.normal(size=(30, 16))
    for x, y in ((a[:30] @ rng.normal(size=(4, 4)), b), (wide[:10], wide[10:] * 2 + 1)):  # d*d and n*n paths
        cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        textbook = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(cx + cy - 2 * np.real(sqrtm(cx @ cy)))
        assert features.frechet_distance(x, y) == pytest.approx(textbook, rel=1e-6)
    assert abs(features.kernel_inception_distance(a, b)) < 0.05 < features.kernel_inception_distance(a, b + shift)
    centres = np.eye(4)[:3] * 10
    x = np.concatenate([c + rng.normal(scale=0.1, size=(50, 4)) for c in centres])
    found = diversity.kmeans(x, k=3, seed=0)
    assert np.sort(np.linalg.norm(found, axis=1)) == pytest.approx([10, 10, 10], abs=0.1)
    one_cluster = diversity.diversity_metrics(x[:50], x, found)
    assert one_cluster["kmeans_occupancy_error"] == pytest.approx(2 / 3)


def test_linear_probe_recovers_a_linear_parameter():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 5))
    y = {"linear": z @ np.arange(5.0), "unrelated": rng.normal(size=300)}
    r2 = probes.probe_r2(z[:200], {k: v[:200] for k, v in y.items()}, z[200:], {k: v[200:] for k, v in y.items()})
    assert r2["probe_r2_linear"] > 0.99
    assert r2["probe_r2_unrelated"] < 0.1


def test_baselines_are_cached_and_ordered(ref, base):
    assert set(base) == {"real_vs_real", "one_image"}
    rvr, one = base["real_vs_real"], base["one_image"]
    for name in ORDERED:
        assert rvr[name] < one[name], name
    for stat in MORPH_STATS:
        assert rvr[f"morph_w_{stat}"] < one[f"morph_w_{stat}"], stat
    assert one["memorisation_copy_frac"] == 1.0 and one["memorisation_ratio"] < 0.1
    assert 0.7 < rvr["memorisation_ratio"] < 1.3 and rvr["memorisation_copy_frac"] < 0.2
    assert rvr["probe_r2_bulge_frac"] > 0.5 and rvr["probe_r2_r_half"] > 0.3
    stored = json.loads((ref.dir / "baselines.json").read_text())
    assert len(stored) == 1
    assert baseline_metrics(ref.cache, N, progress=False)["real_vs_real"] == rvr


def test_blurred_real_set_ranks_between_the_baselines(ref, base):
    blur = ref.compare(blurred(ref.cache.images[ref.rows_b], BLUR_SIGMA))
    for name in FIDELITY:
        assert base["real_vs_real"][name] < blur[name] < base["one_image"][name], name
    assert blur["kmeans_occupancy_error"] < base["one_image"]["kmeans_occupancy_error"]
    for stat in MORPH_STATS:
        assert blur[f"morph_w_{stat}"] < base["one_image"][f"morph_w_{stat}"], stat
    # blurring is a change of concentration and light profile: those distances must see it
    for stat in ("concentration", "m20"):
        assert blur[f"morph_w_{stat}"] > 1.5 * base["real_vs_real"][f"morph_w_{stat}"], stat


def test_size_shift_is_detected_by_the_size_distance(ref, base):
    big = ref.compare(magnified(ref.cache.images[ref.rows_b[:30]], 1.5))
    rvr = base["real_vs_real"]
    assert big["morph_w_r_half"] > 3 * rvr["morph_w_r_half"]
    assert big["morph_w_r_half"] == max(big[f"morph_w_{s}"] for s in MORPH_STATS)
    assert big["morph_score"] > 1.5 * rvr["morph_score"]


def test_parallel_measurement_matches_serial_and_is_cached(ref):
    rows = ref.rows_b[:4]
    serial = morphology.measure(ref.cache.images[rows], workers=1, progress=False)
    cached = ref.real_morphology(rows)  # measured by 2 worker processes for the baselines
    pd.testing.assert_frame_equal(serial, cached[serial.columns])


def test_memorisation_flags_training_copies(ref):
    train_bank, a_bank = ref.memorisation_banks()
    copies = memorisation.pixel_vectors(np.rot90(ref.cache.images[ref.train_rows[:10]], 1, axes=(1, 2)))
    fresh = memorisation.pixel_vectors(ref.cache.images[ref.rows_b[:10]])
    real = ref.real_ratios()
    copied = memorisation.memorisation_metrics(memorisation.ratios(copies, train_bank, a_bank), real)
    assert copied["memorisation_copy_frac"] == 1.0 and copied["memorisation_ratio"] < 0.05
    assert memorisation.memorisation_metrics(memorisation.ratios(fresh, train_bank, a_bank), real)[
        "memorisation_copy_frac"] < 0.5


def checkpoint_of(tmp_path, cache: Cache):
    from galaxygen.checkpoint import save
    from galaxygen.config import TrainConfig
    from galaxygen.models import build_model

    config = TrainConfig(model="cnn", data=str(cache.path)).resolved()
    torch.manual_seed(0)
    model = build_model(config)
    path = tmp_path / "runs" / "trial-7" / "checkpoints" / "last.pt"
    save(path, config=config.to_dict(), model=model.state_dict(), epoch=2, step=20)
    return path, model, config


def test_evaluate_model_cli_and_shards_agree(tmp_path, cache, base, capsys):
    path, model, config = checkpoint_of(tmp_path, cache)
    n = 12
    assert np.array_equal(sample_images(model, n, seed=3), sample_images(model, n, seed=3))
    assert not np.array_equal(sample_images(model, n, seed=3), sample_images(model, n, seed=4))

    out = tmp_path / "results" / "sweep"
    assert cli.main([str(path), "--n", str(n), "--seed", "3", "--workers", "1", "--no-progress", "--out", str(out),
                     "--json", str(tmp_path / "m.json")]) == 0
    table = capsys.readouterr().out
    assert "metric" in table and "real-vs-real" in table and "morph_score" in table
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert metrics["eval_n"] == n and "probe_r2_bulge_frac" in metrics
    for name in metrics:
        assert direction(name) in ("lower", "higher", "one", "info"), name
    assert set(metrics) - {k for k in metrics if k.startswith("probe_r2_")} <= set(METRICS)

    from galaxygen.results import ResultsStore

    rows = ResultsStore(out.parent, out.name).metrics("trial-7")
    assert set(rows["split"]) == {"eval", "eval_real_vs_real", "eval_one_image"}
    assert rows.query("split == 'eval' and metric == 'fid_domain'")["value"].item() == pytest.approx(
        metrics["fid_domain"])

    shards = tmp_path / "shards"
    for i in range(2):
        assert cli.main([str(path), "--n", str(n), "--seed", "3", "--workers", "1", "--no-progress",
                         "--shard", f"{i}/2", "--shard-dir", str(shards)]) == 0
    merged = evaluate_model(model, config, cache, n, seed=3, progress=False, morph=cli.merged_shards(shards, n, 3))
    assert merged.keys() == metrics.keys()
    for name, value in metrics.items():  # same seed, same samples: sharded == unsharded, run to run
        assert merged[name] == pytest.approx(value, nan_ok=True), name


def test_slurm_array_scripts(tmp_path, cache):
    path, _, _ = checkpoint_of(tmp_path, cache)
    args = cli.build_parser().parse_args([str(path), "--n", "500", "--slurm-array", "4", "--shard-dir",
                                          str(tmp_path / "s"), "--out", str(tmp_path / "r" / "sw")])
    array, merge = cli.slurm_scripts(args, str(cache.path), tmp_path / "s")
    assert "#SBATCH --array=0-3" in array and '--shard "$SLURM_ARRAY_TASK_ID/4"' in array
    assert "--shard " not in merge and "--out" in merge and "--shard-dir" in merge
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([str(path), "--shard", "5/4"])


def test_inception_weights_file_is_used_offline(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), weights)
    extract = features.InceptionFeatures(weights)
    feats = extract(render(draw_params(2, seed=1)))
    assert feats.shape == (2, 2048) and np.isfinite(feats).all() and not np.allclose(feats[0], feats[1], rtol=1e-3, atol=0)
    assert math.isfinite(features.frechet_distance(np.repeat(feats, 2, axis=0), feats))
