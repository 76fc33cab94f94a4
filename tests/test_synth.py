"""The synthetic galaxies: the rendered images show their ground truth, and the outputs follow the contracts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import spearmanr

from galaxygen.data.cache import Cache
from galaxygen.data.synth import synthesize
from galaxygen.data.synth_model import CLASSES, sample_galaxy
from galaxygen.splits import split_of

N = 300
CATALOG_COLUMNS = ("id", "source", "split", "class", "bulge_frac", "hlr_px", "hlr_arcsec", "ellipticity",
                   "position_angle", "sersic_n", "mag_r", "color_gr", "n_arms", "has_bar", "n_neighbours")
HART16_COLUMNS = ("dr7objid", "ra", "dec", "gz2_class", "total_classifications", "total_votes",
                  "t01_smooth_or_features_a01_smooth_debiased",
                  "t01_smooth_or_features_a02_features_or_disk_debiased", "t02_edgeon_a04_yes_debiased",
                  "t03_bar_a06_bar_debiased", "t04_spiral_a08_spiral_debiased")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Cache:
    out = synthesize(tmp_path_factory.mktemp("synth") / "cache", n=N, seed=0, workers=2)
    return Cache.open(out)


@pytest.fixture(scope="module")
def gz2(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("gz2") / "gz2", n=6, seed=3, layout="gz2", workers=1)


def green(img: np.ndarray) -> np.ndarray:
    """Background-subtracted green channel, y up (row 0 is the top row of the image)."""
    g = img[..., 1].astype(float)
    border = np.concatenate([g[:5].ravel(), g[-5:].ravel(), g[:, :5].ravel(), g[:, -5:].ravel()])
    return g - np.median(border)


def centred_coords(n: int) -> tuple[np.ndarray, np.ndarray]:
    """x to the right and y up, from the image centre, in pixels."""
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    return xx, -yy


def shape_of(img: np.ndarray) -> tuple[float, float]:
    """Ellipticity 1 - b/a and position angle (deg) from second moments of the bright central light."""
    g = np.clip(green(img), 0, None)
    xx, yy = centred_coords(g.shape[0])
    w = g * (np.hypot(xx, yy) < 0.3 * g.shape[0])
    w = np.where(w > 0.15 * w.max(), w, 0)
    f = w.sum()
    mx, my = (w * xx).sum() / f, (w * yy).sum() / f
    qxx, qyy = (w * (xx - mx) ** 2).sum() / f, (w * (yy - my) ** 2).sum() / f
    qxy = (w * (xx - mx) * (yy - my)).sum() / f
    t = np.hypot((qxx - qyy) / 2, qxy)
    a2, b2 = (qxx + qyy) / 2 + t, (qxx + qyy) / 2 - t
    return 1 - np.sqrt(b2 / a2), np.degrees(0.5 * np.arctan2(2 * qxy, qxx - qyy)) % 180


def half_light_radius(img: np.ndarray) -> float:
    """Radius of the circle holding half the light within 20 px of the centre."""
    g = green(img)
    xx, yy = centred_coords(g.shape[0])
    r = np.hypot(xx, yy)
    radii = np.arange(0.5, 20.5, 0.5)
    enclosed = np.array([g[r < x].sum() for x in radii])
    return float(np.interp(0.5 * enclosed[-1], enclosed, radii))


def arm_strength(img: np.ndarray, q: float, pa: float, hlr: float) -> float:
    """Strongest m = 1..3 azimuthal Fourier amplitude of the deprojected light between 0.8 and 2.2 hlr."""
    g = green(img)
    xx, yy = centred_coords(g.shape[0])
    a = np.radians(pa)
    u = xx * np.cos(a) + yy * np.sin(a)
    v = (-xx * np.sin(a) + yy * np.cos(a)) / q
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    ring = (r > 0.8 * hlr) & (r < 2.2 * hlr)
    w, t = g[ring], theta[ring]
    return max(abs((w * np.exp(-1j * m * t)).sum()) / w.sum() for m in (1, 2, 3))


def test_cache_contract(cache):
    assert cache.images.shape == (N, 64, 64, 3) and cache.images.dtype == np.uint8
    cat = cache.catalog
    assert all(c in cat.columns for c in CATALOG_COLUMNS)
    assert list(cat["id"]) == [f"synth-{i:06d}" for i in range(N)]
    assert (cat["source"] == "synthetic").all()
    assert list(cat["split"]) == [split_of(i, (0.8, 0.1, 0.1)) for i in cat["id"]]
    assert set(cat["class"]) <= set(CLASSES)
    man = cache.manifest
    assert man["source"] == "synthetic" and man["skipped"] == []
    assert man["options"]["n"] == N and man["options"]["seed"] == 0 and man["options"]["layout"] == "cache"
    assert man["options"]["generator_version"] >= 1
    assert sum(man["counts"]["classes"].values()) == N


def test_truth_is_consistent(cache):
    cat = cache.catalog
    frac = cat["class"].value_counts(normalize=True)
    assert 0.25 < frac["elliptical"] < 0.45 and 0.25 < frac["spiral"] < 0.45
    assert (cat["has_bar"] == (cat["class"] == "barred_spiral")).all()
    disks = cat["class"].isin(["spiral", "barred_spiral"])
    assert (cat.loc[disks, "n_arms"] > 0).all() and (cat.loc[~disks, "n_arms"] == 0).all()
    assert cat.loc[cat["class"] == "elliptical", "color_gr"].mean() > cat.loc[disks, "color_gr"].mean() + 0.1
    assert cat["hlr_px"].between(1, 30).all() and cat["mag_r"].between(12, 17.5).all()
    assert cat["ellipticity"].between(0, 1).all() and cat["position_angle"].between(0, 180).all()


def test_images_are_galaxies_on_dark_sky(cache):
    imgs = cache.images.astype(float)
    centre = imgs[:, 28:36, 28:36].mean(axis=(1, 2, 3))
    corners = imgs[:, :6, :6].mean(axis=(1, 2, 3))
    assert np.median(centre) > 120 and np.median(corners) < 25
    assert (centre > corners + 40).mean() > 0.95


def test_measured_ellipticity_and_angle_follow_truth(cache):
    cat = cache.catalog
    ok = (cat["class"] != "irregular").to_numpy()
    measured = np.array([shape_of(img) for img in cache.images])
    rho = spearmanr(cat["ellipticity"][ok], measured[ok, 0]).statistic
    assert rho > 0.5, rho
    elongated = ok & (cat["ellipticity"] > 0.4).to_numpy()
    error = (measured[elongated, 1] - cat["position_angle"][elongated] + 90) % 180 - 90
    assert np.median(np.abs(error)) < 10


def test_edge_on_more_elongated_than_elliptical(cache):
    cls = cache.catalog["class"].to_numpy()
    e = np.array([shape_of(img)[0] for img in cache.images])
    assert e[cls == "edge_on"].mean() > e[cls == "elliptical"].mean() + 0.2


def test_measured_size_follows_truth(cache):
    measured = [half_light_radius(img) for img in cache.images]
    rho = spearmanr(cache.catalog["hlr_px"], measured).statistic
    assert rho > 0.5, rho


def test_bulges_are_redder_than_disks(cache):
    cat = cache.catalog
    centre = cache.images[:, 29:35, 29:35].astype(float).mean(axis=(1, 2))
    red_minus_blue = centre[:, 0] - centre[:, 2]
    bulgy = (cat["bulge_frac"] > 0.6).to_numpy()
    disky = (cat["bulge_frac"] < 0.2).to_numpy()
    assert red_minus_blue[bulgy].mean() > red_minus_blue[disky].mean() + 15


def test_spiral_arms_are_visible(cache):
    cat = cache.catalog
    face_on = (cat["axis_ratio"] > 0.5).to_numpy()
    power = {}
    for cls in ("spiral", "elliptical"):
        rows = np.flatnonzero(face_on & (cat["class"] == cls).to_numpy())
        power[cls] = np.median([arm_strength(cache.images[i], cat["axis_ratio"][i], cat["position_angle"][i],
                                             cat["hlr_px"][i]) for i in rows])
    assert power["spiral"] > 1.5 * power["elliptical"], power


def test_deterministic_and_independent_of_workers_and_n(tmp_path, cache):
    a = Cache.open(synthesize(tmp_path / "a", n=24, seed=0, workers=1))
    b = Cache.open(synthesize(tmp_path / "b", n=24, seed=0, workers=2))
    c = Cache.open(synthesize(tmp_path / "c", n=24, seed=1, workers=1))
    assert a.images.tobytes() == b.images.tobytes()
    assert a.manifest["content_hash"] == b.manifest["content_hash"]
    pd.testing.assert_frame_equal(a.catalog, b.catalog)
    assert np.array_equal(a.images, cache.images[:24])
    assert not np.array_equal(a.images, c.images)
    assert not a.catalog["class"].equals(c.catalog["class"]) or not a.catalog["hlr_px"].equals(c.catalog["hlr_px"])


def test_other_sizes_and_fractions(tmp_path):
    cache = Cache.open(synthesize(tmp_path / "s", n=8, seed=0, size=32, workers=1, fractions=(0.5, 0.25, 0.25)))
    assert cache.images.shape == (8, 32, 32, 3)
    assert list(cache.catalog["split"]) == [split_of(i, (0.5, 0.25, 0.25)) for i in cache.catalog["id"]]
    assert cache.manifest["options"]["fractions"] == [0.5, 0.25, 0.25]


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(n=5, layout="fits"), dict(n=5, seed=-1), dict(n=5, size=0),
                                    dict(n=5, workers=0), dict(n=5, fractions=(0.5, 0.5, 0.5))])
def test_bad_arguments_fail_clearly(tmp_path, kwargs):
    with pytest.raises(ValueError):
        synthesize(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_gz2_layout(gz2):
    mapping = pd.read_csv(gz2 / "gz2_filename_mapping.csv")
    hart = pd.read_csv(gz2 / "gz2_hart16.csv")
    truth = pd.read_parquet(gz2 / "truth.parquet")
    assert list(mapping.columns) == ["objid", "sample", "asset_id"]
    assert all(c in hart.columns for c in HART16_COLUMNS)
    assert len(mapping) == len(hart) == len(truth) == 6
    joined = hart.merge(mapping, left_on="dr7objid", right_on="objid")
    assert len(joined) == 6 and joined["dr7objid"].is_unique
    for asset in joined["asset_id"]:
        with Image.open(gz2 / "images_gz2" / "images" / f"{asset}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (424, 424)
    by_id = joined.set_index("dr7objid").loc[truth["dr7objid"]]
    expected = np.where(truth["class"] == "elliptical", "E", "S")
    assert (by_id["gz2_class"].str[0].to_numpy() == expected).all()
    fractions = [c for c in hart.columns if c.startswith("t01_") and c.endswith("_fraction")]
    assert np.allclose(hart[fractions].sum(axis=1), 1, atol=0.01)
    smooth = by_id["t01_smooth_or_features_a01_smooth_debiased"].to_numpy()
    ell = (truth["class"] == "elliptical").to_numpy()
    if ell.any() and (~ell).any():
        assert smooth[ell].min() > smooth[~ell].max() - 0.3


def test_gz2_framing_matches_cache(gz2, tmp_path):
    """Packing a GZ2 JPEG (central 207 of 424 px, resized to 64) gives the cache image of the same galaxy."""
    cache = Cache.open(synthesize(tmp_path / "c", n=6, seed=3, workers=1))
    truth = pd.read_parquet(gz2 / "truth.parquet")
    lo = (424 - 207) // 2
    corr = []
    for i, asset in enumerate(truth["asset_id"]):
        with Image.open(gz2 / "images_gz2" / "images" / f"{asset}.jpg") as im:
            packed = np.asarray(im.crop((lo, lo, lo + 207, lo + 207)).resize((64, 64), Image.BILINEAR), float)
        corr.append(np.corrcoef(packed[..., 1].ravel(), cache.images[i][..., 1].astype(float).ravel())[0, 1])
    assert np.mean(corr) > 0.8, corr


def test_sampling_depends_on_seed_and_index_only():
    a, b = sample_galaxy(7, 123), sample_galaxy(7, 123)
    assert a.truth == b.truth or json.dumps(a.truth, default=str) == json.dumps(b.truth, default=str)
    assert sample_galaxy(8, 123).truth["mag_r"] != a.truth["mag_r"]
