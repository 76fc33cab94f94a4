"""Simple numpy bulge + disk galaxies with known truth, for tests and benchmarks (no GalSim needed)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

TRUTH_COLUMNS = ("bulge_frac", "r_half", "ellipticity", "flux", "knots")


def sersic(r: np.ndarray, r_e: float, n: float) -> np.ndarray:
    """Unit-amplitude Sersic profile exp(-b_n ((r/r_e)^(1/n) - 1)) with the usual b_n approximation."""
    b = 2 * n - 1 / 3 + 4 / (405 * n)
    return np.exp(-b * ((r / r_e) ** (1 / n) - 1))


def knots(xx: np.ndarray, yy: np.ndarray, r_disk: float, q: float, angle: float, count: int,
          rng: np.random.Generator) -> np.ndarray:
    """Unit-flux image of `count` compact star-forming knots scattered over the disk (zero when count is 0)."""
    out = np.zeros_like(xx)
    for _ in range(count):
        rad, phi = rng.gamma(2.0, 0.5) * r_disk, rng.uniform(0, 2 * np.pi)
        u, v = rad * np.cos(phi), rad * np.sin(phi) * q
        kx, ky = u * np.cos(angle) - v * np.sin(angle), u * np.sin(angle) + v * np.cos(angle)
        out += np.exp(-((xx - kx) ** 2 + (yy - ky) ** 2) / (2 * 0.8**2)) * rng.uniform(0.5, 1.5)
    return out / out.sum() if count else out


def draw_params(n: int, seed: int = 0) -> pd.DataFrame:
    """Random truth parameters: bulge fraction, disk half-light radius (px), ellipticity, angle, flux, knots."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "bulge_frac": rng.uniform(0.0, 1.0, n),
        "r_half": rng.uniform(3.0, 8.0, n),
        "ellipticity": rng.uniform(0.0, 0.6, n),
        "angle": rng.uniform(0.0, np.pi, n),
        "flux": rng.uniform(0.6, 1.0, n),
        "knots": rng.integers(0, 9, n),
    })


def render(params: pd.DataFrame, size: int = 64, seed: int = 0, size_scale: float = 1.0,
           noise: float = 4.0) -> np.ndarray:
    """Render uint8 (N, S, S, 3) galaxies: red de Vaucouleurs bulge + blue exponential disk, PSF, sky noise."""
    rng = np.random.default_rng(seed + 1)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    out = np.empty((len(params), size, size, 3), np.uint8)
    bulge_rgb, disk_rgb = np.array([1.0, 0.8, 0.55]), np.array([0.6, 0.75, 1.0])
    for i, p in enumerate(params.itertuples()):
        q = 1 - p.ellipticity
        x = xx * np.cos(p.angle) + yy * np.sin(p.angle)
        y = -xx * np.sin(p.angle) + yy * np.cos(p.angle)
        r = np.hypot(x * np.sqrt(q), y / np.sqrt(q))
        r_disk = p.r_half * size_scale
        disk = sersic(r, r_disk, 1.0)
        bulge = sersic(np.hypot(x, y), 0.35 * r_disk, 4.0)
        disk, bulge = disk / disk.sum(), bulge / bulge.sum()
        disk = 0.8 * disk + 0.2 * knots(xx, yy, r_disk, q, p.angle, int(p.knots), rng)
        light = (p.bulge_frac * bulge)[..., None] * bulge_rgb + ((1 - p.bulge_frac) * disk)[..., None] * disk_rgb
        light = gaussian_filter(light, (1.0, 1.0, 0))
        light *= p.flux * 250 / light.max()
        img = np.arcsinh(light / 10) / np.arcsinh(250 / 10) * 240 + rng.normal(6, noise, light.shape)
        out[i] = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return out


def write_toy_cache(out: str | os.PathLike, n: int = 400, size: int = 64, seed: int = 0) -> os.PathLike:
    """A cache of n toy galaxies with a truth catalog (splits by the usual id hash)."""
    from galaxygen.data.cache import CacheWriter
    from galaxygen.splits import split_of

    params = draw_params(n, seed)
    writer = CacheWriter(out, n, size)
    writer.images[:] = render(params, size, seed)
    ids = [f"toy-{seed}-{i:05d}" for i in range(n)]
    catalog = pd.DataFrame({"id": ids, "source": "toy", "split": [split_of(i) for i in ids]})
    for col in TRUTH_COLUMNS:
        catalog[col] = params[col].to_numpy()
    return writer.finish(catalog, {"source": "toy", "n": n, "seed": seed})
