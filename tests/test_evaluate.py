"""Sample-quality metrics: they rank real, blurred and collapsed galaxies correctly, detect a size shift,
record statmorph failures instead of crashing, and are deterministic for a seed; the domain encoder
trains reproducibly and records its version and config.

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
    baselines,
    direction,
    diversity,
    encoder,
    evaluate_images,
    evaluate_model,
    features,
    memorisation,
    morphology,
    probes,
    sample_images,
)
from galaxygen.evaluate import __main__ as cli
from galaxygen.evaluate.reference import Reference
from galaxygen.evaluate.toy import TRUTH_COLUMNS, draw_params, render, write_toy_cache

N_GALAXIES = 1000
N = 60
BLUR_SIGMA = 1.5
# Every metric ranks real-vs-real < blurred copy < one-image generator in its own worse direction
# (galaxygen.evaluate.direction), except these, whose meaningful behaviour is asserted instead:
BLUR_NOT_WORSE_THAN_REAL = ("morph_w_r_half", "memorisation_ratio", "memorisation_copy_frac", "colour_w")
ONE_IMAGE_NOT_WORSE = ("morph_kept_frac", "morph_kept_frac_gap")
# given only with an Inception weights file (never downloaded) or for a model with an encoder (probes)
OPTIONAL = ("fid_inception", "kid_inception", "probe_r2_*")


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


@pytest.fixture(scope="module")
def blur_eval(ref) -> tuple[dict, pd.DataFrame]:
    """What evaluate gives a blurred copy of half B, and the statmorph table of those images."""
    images = blurred(ref.cache.images[ref.rows_b], BLUR_SIGMA)
    morph = morphology.measure(images, workers=2, progress=False)
    return evaluate_images(images, ref.cache, workers=2, progress=False, morph=morph), morph


def worse(name: str, value: float) -> float:
    """A metric value mapped so that larger is worse, by the metric's direction in galaxygen.evaluate."""
    goal = direction(name)
    if goal == "one":
        return abs(value - 1.0)
    if goal in ("lower", "higher"):
        return value if goal == "lower" else -value
    raise ValueError(f"{name} is not better or worse ({goal})")


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
    ranked = [name for name in one if name not in ONE_IMAGE_NOT_WORSE]
    assert set(ranked) >= {"morph_score", "fid_domain", "kid_domain", "kmeans_occupancy_error",
                           "kmeans_centroid_dist", *(f"morph_w_{s}" for s in MORPH_STATS)}
    for name in ranked:
        assert worse(name, rvr[name]) < worse(name, one[name]), name
    # one repeated real galaxy is measured or not as a whole: its kept fraction is that galaxy's, no collapse signal
    kept = ref.real_morphology(baselines.one_image_rows(ref))["ok"].to_numpy(np.float64)
    real_kept = ref.real_morphology(ref.rows_a)["ok"].mean()
    assert one["morph_kept_frac"] == pytest.approx(kept.mean())
    assert one["morph_kept_frac_gap"] == pytest.approx(np.abs(kept - real_kept).mean())
    assert rvr["morph_kept_frac_gap"] == pytest.approx(abs(rvr["morph_kept_frac"] - real_kept))
    assert one["memorisation_copy_frac"] == 1.0 and one["memorisation_ratio"] < 0.1
    assert 0.7 < rvr["memorisation_ratio"] < 1.3 and rvr["memorisation_copy_frac"] < 0.2
    assert rvr["probe_r2_bulge_frac"] > 0.5 and rvr["probe_r2_r_half"] > 0.3
    stored = json.loads((ref.dir / "baselines.json").read_text())
    assert len(stored) == 1
    assert baseline_metrics(ref.cache, N, progress=False)["real_vs_real"] == rvr


def test_blurred_real_set_ranks_between_the_baselines(ref, base, blur_eval):
    blur, morph = blur_eval
    rvr, one = base["real_vs_real"], base["one_image"]
    assert set(blur) == set(METRICS) - set(OPTIONAL)  # every metric evaluate gives images is judged here
    assert blur["eval_n"] == N and direction("eval_n") == "info"
    for name in blur:
        if direction(name) == "info":
            continue
        if name not in BLUR_NOT_WORSE_THAN_REAL:
            assert worse(name, rvr[name]) < worse(name, blur[name]), name
        if name not in ONE_IMAGE_NOT_WORSE:
            assert worse(name, blur[name]) < worse(name, one[name]), name
    # blurring is a change of concentration and light profile: those distances must see it
    for stat in ("concentration", "m20"):
        assert blur[f"morph_w_{stat}"] > 1.5 * rvr[f"morph_w_{stat}"], stat
    # blur widens every galaxy (+0.4 px), less than the n=60 A/B offset, so r_half can't rank it: check it pairwise
    real = ref.real_morphology(ref.rows_b)
    both = morph["ok"] & real["ok"]
    assert both.mean() > 0.9 and (morph.loc[both, "r_half"] > real.loc[both, "r_half"]).all()
    # blur keeps each galaxy's colour (a linear filter per channel): its colour distance is the real band's
    assert blur["colour_w"] < one["colour_w"] and abs(blur["colour_w"] - rvr["colour_w"]) < 0.1 * one["colour_w"]
    # blurred held-out galaxies copy no training image: they sit in the real band, not below real-vs-real
    assert 0.7 < blur["memorisation_ratio"] < 1.3 and blur["memorisation_copy_frac"] < 0.2
    # probes score a model's posterior: image sets (blurred, one-image) have none, see the collapsed-probe test
    assert not [name for name in (*blur, *one) if name.startswith("probe_r2_")]


def test_probe_r2_of_a_collapsed_representation_explains_nothing(ref, base):
    # a one-image generator has no posterior (R^2 undefined); its analogue maps every galaxy to one feature vector
    train_rows, test_rows = baselines.probe_rows(ref)
    f_train = ref.f_train_raw[np.searchsorted(ref.train_rows, train_rows)]
    collapsed = np.repeat(ref.pool_features(test_rows[:1], raw=True), len(test_rows), axis=0)
    r2 = probes.probe_r2(f_train, baselines.truth(ref, train_rows), collapsed,
                         baselines.truth(ref, test_rows))
    rvr = {name: v for name, v in base["real_vs_real"].items() if name.startswith("probe_r2_")}
    assert r2.keys() == rvr.keys() == {probes.metric_name(c) for c in TRUTH_COLUMNS}
    for name, value in r2.items():
        assert direction(name) == "higher" and value <= 1e-9, name
        assert math.isfinite(rvr[name]), name
    for name in ("probe_r2_bulge_frac", "probe_r2_r_half"):  # what real features encode, collapse loses
        assert worse(name, rvr[name]) < worse(name, r2[name]), name


def test_domain_encoder_trains_reproducibly_and_records_version_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("GALAXYGEN_HOME", str(tmp_path / "home"))  # never the shared cache
    small = Cache.open(write_toy_cache(tmp_path / "small", n=48, size=32, seed=1))
    tiny = {"max_steps": 4, "batch_size": 8}
    (first, meta), (second, _) = (encoder.train(small, tmp_path / f"enc{i}", tiny, progress=False) for i in range(2))
    states = [torch.load(tmp_path / f"enc{i}" / "encoder.pt", weights_only=True) for i in range(2)]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    images = small.images[:]
    assert np.array_equal(encoder.embed(first, images), encoder.embed(second, images))
    other, _ = encoder.train(small, tmp_path / "seed1", {**tiny, "seed": 1}, progress=False)
    assert not np.array_equal(encoder.embed(other, images), encoder.embed(first, images))

    stored = json.loads((tmp_path / "enc0" / "config.json").read_text())
    assert stored == json.loads(json.dumps(meta))
    assert stored["version"] == encoder.VERSION and stored["train_config"] == {**encoder.TRAIN_CONFIG, **tiny}
    assert stored["labels"] == list(TRUTH_COLUMNS)
    assert stored["targets"] == [*encoder.DESCRIPTOR_NAMES, *TRUTH_COLUMNS]
    assert stored["image_size"] == 32 and stored["feature_dim"] == encoder.FEATURE_DIM
    assert stored["n_train"] == len(small.indices("train"))

    # the per-dataset artifact: under GALAXYGEN_HOME, versioned by folder name and config, trained once
    model, made = encoder.load_or_train(small, progress=False)
    folder = encoder.artifact_dir(small)
    assert folder.parent == tmp_path / "home" / "encoders" and folder.name.endswith(f"-v{encoder.VERSION}")
    assert made["version"] == encoder.VERSION and made["train_config"] == encoder.TRAIN_CONFIG
    assert folder.name == f"{made['content_hash']}-v{made['version']}"
    again, loaded = encoder.load_or_train(small, progress=False)
    assert loaded == json.loads((folder / "config.json").read_text()) == json.loads(json.dumps(made))
    assert np.array_equal(encoder.embed(again, images), encoder.embed(model, images))


def test_size_shift_is_detected_by_the_size_distance(ref, base):
    big = ref.compare(magnified(ref.cache.images[ref.rows_b[:30]], 1.5))
    rvr = base["real_vs_real"]
    assert big["morph_w_r_half"] > 3 * rvr["morph_w_r_half"]
    assert big["morph_w_r_half"] == max(big[f"morph_w_{s}"] for s in MORPH_STATS)
    assert big["morph_score"] > 1.5 * rvr["morph_score"]


def test_colour_index_of_known_colours_and_a_colour_shift_is_detected(ref, base):
    yy, xx = np.mgrid[:64, :64] - 31.5
    light = 200 * np.exp(-np.hypot(xx, yy) / 4)
    image = 10 + light[..., None] * np.array([1.0, 0.75, 0.5])  # red twice the blue, sky 10 in every channel
    row = morphology.measure_one(image.round())
    assert row["colour"] == pytest.approx(-2.5 * np.log10(0.5), abs=0.02)  # a g-r-like index: red is large
    assert morphology.colours(np.stack([image, image[..., ::-1]]).round())[1] == pytest.approx(-row["colour"], abs=0.02)
    # the toy galaxies: red bulge, blue disk, so the colour follows the bulge fraction
    real = ref.real_morphology(ref.rows_a)
    bulge = ref.cache.catalog["bulge_frac"].to_numpy()[ref.rows_a]
    ok = np.isfinite(real["colour"].to_numpy())
    assert ok.mean() > 0.9 and np.corrcoef(bulge[ok], real["colour"].to_numpy()[ok])[0, 1] > 0.7
    # the same galaxies made bluer (red x0.8, blue x1.25): shapes unchanged, colour far off
    bluer = np.clip(ref.cache.images[ref.rows_b].astype(np.float64) * [0.8, 1.0, 1.25], 0, 255).round().astype(np.uint8)
    shifted = ref.compare(bluer)
    rvr = base["real_vs_real"]
    assert shifted["colour_w"] > 5 * rvr["colour_w"]
    assert shifted["morph_score"] < 2 * rvr["morph_score"]


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
    from galaxygen.models.vae import fit_sampling

    config = TrainConfig(model="cnn", data=str(cache.path)).resolved()
    torch.manual_seed(0)
    model = build_model(config)
    fit_sampling(model, lambda: (cache.images, cache.indices("train")))
    path = tmp_path / "runs" / "trial-7" / "checkpoints" / "last.pt"
    save(path, config=config.to_dict(), model=model.state_dict(), epoch=2, step=20)
    return path, model, config


def test_evaluate_model_cli_and_shards_agree(tmp_path, cache, base, capsys):
    path, model, config = checkpoint_of(tmp_path, cache)
    n = 12
    assert np.array_equal(sample_images(model, n, "fitted", seed=3), sample_images(model, n, "fitted", seed=3))
    assert not np.array_equal(sample_images(model, n, "fitted", seed=3), sample_images(model, n, "fitted", seed=4))
    assert not np.array_equal(sample_images(model, n, "fitted", seed=3), sample_images(model, n, "prior", seed=3))

    out = tmp_path / "results" / "sweep"
    assert cli.main([str(path), "--n", str(n), "--seed", "3", "--workers", "1", "--no-progress", "--out", str(out),
                     "--json", str(tmp_path / "m.json")]) == 0
    table = capsys.readouterr().out
    assert "metric" in table and "real-vs-real" in table and "morph_score" in table
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert metrics["eval_n"] == n and "probe_r2_bulge_frac" in metrics
    for name in metrics:
        assert direction(name) in ("lower", "higher", "one", "info"), name
    others = ("noiseless", "prior")
    assert set(metrics) - {k for k in metrics if k.startswith("probe_r2_")} <= set(METRICS) | {
        f"{k}_{latent}" for k in METRICS for latent in others}
    # every latent scored: the fitted prior with its pixel noise under the plain names, the same latents without
    # the noise as <metric>_noiseless, N(0, I) as <metric>_prior; different samples
    plain = {k for k in metrics if k in METRICS and k != "eval_n"}
    for latent in others:
        assert direction(f"fid_domain_{latent}") == "lower" and metrics[f"fid_domain_{latent}"] != metrics["fid_domain"]
        assert {k for k in metrics if k.endswith(f"_{latent}")} == {f"{k}_{latent}" for k in plain}

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


def test_inception_weights_file_is_used_offline(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), weights)
    extract = features.InceptionFeatures(weights)
    feats = extract(render(draw_params(2, seed=1)))
    assert feats.shape == (2, 2048) and np.isfinite(feats).all() and not np.allclose(feats[0], feats[1], rtol=1e-3, atol=0)
    assert math.isfinite(features.frechet_distance(np.repeat(feats, 2, axis=0), feats))
