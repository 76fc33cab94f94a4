"""statmorph morphology of galaxy images, measured in parallel worker processes.

Each RGB image becomes greyscale (mean of the bands, 8-bit units). The sky level and noise are a
3-sigma-clipped median and standard deviation; images whose sky is smoother than `RMS_FLOOR`
(noiseless generated samples) get seeded Gaussian noise up to that floor, because statmorph needs a
sky to measure against. photutils segments the sky-subtracted image (smoothed by a 1-pixel Gaussian)
at 1.5 sigma; the main source is the segment under the centre pixel, else the largest one, and the
other segments are masked. statmorph then measures the main source (gain `GAIN` e-/ADU for the
Poisson part of the weight map), computing only the statistics used here (the MID statistics are
skipped, about 40% of statmorph's time): concentration, asymmetry, smoothness, gini, m20,
ellipticity (statmorph's ellipticity_asymmetry), sersic_n (NaN when the Sersic fit is flagged) and
r_half (rhalf_circ, pixels). A measurement is kept (`ok`) when statmorph's flag is <= 1; images
without a source, statmorph errors and bad flags are rows with ok=False and an `error` text.
Colour is measured on the same main segment, whatever statmorph says: `colour` = -2.5 log10(F_blue / F_red),
F the sky-subtracted flux of the blue and red channels summed over the segment (a g-r-like index: redder
is larger; NaN when either flux is not positive).
Workers are forked processes (statmorph is imported once, before the fork).
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd

from galaxygen.cli import progress_bar

log = logging.getLogger(__name__)

STATS = ("concentration", "asymmetry", "smoothness", "gini", "m20", "ellipticity", "sersic_n", "r_half")
COLUMNS = (*STATS, "colour", "flag", "flag_sersic", "ok", "error")
STATMORPH_NAMES = {
    "concentration": "concentration", "asymmetry": "asymmetry", "smoothness": "smoothness", "gini": "gini",
    "m20": "m20", "ellipticity": "ellipticity_asymmetry", "sersic_n": "sersic_n", "r_half": "rhalf_circ",
}
THRESHOLD_SIGMA = 1.5
MIN_PIXELS = 5
SMOOTH_SIGMA = 1.0
RMS_FLOOR = 1.0
GAIN = 10.0
MAX_FLAG = 1
FAILED_FLAG = 4
CHUNK = 8
WINSOR = (2, 98)


def to_grey(images: np.ndarray) -> np.ndarray:
    """(..., S, S, 3) uint8 -> (..., S, S) float64 greyscale in 8-bit units."""
    return np.asarray(images, dtype=np.float64).mean(axis=-1)


def _failed(error: str, flag: int = FAILED_FLAG, colour: float = np.nan) -> dict:
    return {**{s: np.nan for s in STATS}, "colour": colour, "flag": flag, "flag_sersic": FAILED_FLAG, "ok": False,
            "error": error}


def colour_index(image: np.ndarray, region: np.ndarray) -> float:
    """-2.5 log10(F_blue / F_red) of an (S, S, 3) image over a boolean region, each channel's sky (its
    3-sigma-clipped median) subtracted; NaN unless both fluxes are positive."""
    from astropy.stats import sigma_clipped_stats

    flux = []
    for channel in (2, 0):
        band = np.asarray(image[..., channel], dtype=np.float64)
        _, sky, _ = sigma_clipped_stats(band, sigma=3.0, maxiters=10)
        flux.append(float((band[region] - sky).sum()))
    blue, red = flux
    return float(-2.5 * np.log10(blue / red)) if blue > 0 and red > 0 else float("nan")


@functools.cache
def _morph_class():
    """statmorph's SourceMorphology computing only the statistics used here (skips MID and others)."""
    import statmorph

    needed = (*STATMORPH_NAMES.values(), "sky_mean", "sky_sigma")

    class NeededMorphology(statmorph.SourceMorphology):
        def _calculate_morphology(self) -> None:
            for name in needed:
                _ = self[name]

    return NeededMorphology


def segment(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, float] | None:
    """Sky-subtracted image, segmentation map, main label and sky rms; None when nothing is detected."""
    from astropy.stats import sigma_clipped_stats
    from photutils.segmentation import detect_sources
    from scipy.ndimage import gaussian_filter

    _, median, rms = sigma_clipped_stats(grey, sigma=3.0, maxiters=10)
    image = grey - median
    if rms < RMS_FLOOR:
        rng = np.random.default_rng(zlib.crc32(np.ascontiguousarray(grey).tobytes()))
        image = image + rng.normal(0.0, np.sqrt(RMS_FLOOR**2 - rms**2), image.shape)
        rms = RMS_FLOOR
    seg = detect_sources(gaussian_filter(image, SMOOTH_SIGMA), THRESHOLD_SIGMA * rms, MIN_PIXELS)
    if seg is None or seg.nlabels == 0:
        return None
    cy, cx = (np.asarray(grey.shape) - 1) // 2
    label = int(seg.data[cy, cx])
    if label == 0:
        label = int(seg.labels[np.argmax(seg.areas)])
    return image, seg.data, label, float(rms)


def measure_one(rgb: np.ndarray, morph_class=None) -> dict:
    """Measure one (S, S, 3) image; never raises (failures are rows with ok=False)."""
    colour = np.nan
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = segment(to_grey(rgb))
            if found is None:
                return _failed("no source detected")
            image, segmap, label, rms = found
            colour = colour_index(rgb, segmap == label)
            mask = (segmap > 0) & (segmap != label)
            weightmap = np.sqrt(rms**2 + np.clip(image, 0, None) / GAIN)
            morph = (morph_class or _morph_class())(image, segmap, label, mask=mask, weightmap=weightmap)
            row = {s: float(morph[name]) for s, name in STATMORPH_NAMES.items()}
            flag, flag_sersic = int(morph.flag), int(morph.flag_sersic)
    except Exception as err:  # statmorph and photutils raise many kinds of errors on odd images
        return _failed(f"{type(err).__name__}: {err}", colour=colour)
    row = {s: (v if np.isfinite(v) and v != -99.0 else np.nan) for s, v in row.items()}
    if flag_sersic > 0:
        row["sersic_n"] = np.nan
    ok = flag <= MAX_FLAG and np.isfinite([row[s] for s in STATS if s != "sersic_n"]).all()
    error = "" if ok else (f"statmorph flag {flag}" if flag > MAX_FLAG else "non-finite statistics")
    return {**row, "colour": colour, "flag": flag, "flag_sersic": flag_sersic, "ok": bool(ok), "error": error}


def _measure_chunk(images: np.ndarray) -> list[dict]:
    morph_class = _morph_class()
    return [measure_one(image, morph_class) for image in images]


def measure(images: np.ndarray, workers: int = 1, progress: bool = True) -> pd.DataFrame:
    """statmorph statistics of each (N, S, S, 3) uint8 image, one row per image (columns `COLUMNS`)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"measure expects images of shape (N, S, S, 3), got {images.shape}")
    chunks = [images[i : i + CHUNK] for i in range(0, len(images), CHUNK)]
    rows: list[dict] = []
    bar = progress_bar(total=len(images), desc="statmorph", unit="img", disable=not progress or len(images) < 2 * CHUNK)
    if workers <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            rows.extend(_measure_chunk(chunk))
            bar.update(len(chunk))
    else:
        _morph_class()  # import statmorph once here: forked workers inherit it
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=ctx) as pool:
            for chunk_rows in pool.map(_measure_chunk, chunks):
                rows.extend(chunk_rows)
                bar.update(len(chunk_rows))
    bar.close()
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["ok"] = frame["ok"].astype(bool)
    frame["flag"] = frame["flag"].astype(int)
    frame["flag_sersic"] = frame["flag_sersic"].astype(int)
    if len(frame) and not frame["ok"].all():
        log.info("statmorph kept %d of %d images", int(frame["ok"].sum()), len(frame))
    return frame


def robust_spread(values: np.ndarray) -> float:
    """IQR / 1.349 (the std of a normal), falling back to the std, then 1."""
    q75, q25 = np.percentile(values, [75, 25])
    return float((q75 - q25) / 1.349) or float(values.std()) or 1.0


def scaled_distance(sample: np.ndarray, real: np.ndarray, min_count: int = 3) -> float:
    """1-D Wasserstein distance of the finite values over the real spread, both winsorised at the real 2nd and
    98th percentiles; NaN when either side has fewer than `min_count` values."""
    from scipy.stats import wasserstein_distance

    s, r = sample[np.isfinite(sample)], real[np.isfinite(real)]
    if len(s) < min_count or len(r) < min_count:
        return float("nan")
    lo, hi = np.percentile(r, WINSOR)
    s, r = np.clip(s, lo, hi), np.clip(r, lo, hi)
    return float(wasserstein_distance(s, r) / robust_spread(r))


def colours(images: np.ndarray) -> np.ndarray:
    """The colour index (see `colour_index`) of each (N, S, S, 3) image in 8-bit units over its main segment,
    without statmorph (a few ms per image); NaN where nothing is detected."""
    out = np.full(len(images), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, rgb in enumerate(images):
            found = segment(to_grey(rgb))
            if found is not None:
                out[i] = colour_index(rgb, found[1] == found[2])
    return out


def distances(sample: pd.DataFrame, real: pd.DataFrame, min_count: int = 3) -> dict[str, float]:
    """Per-statistic 1-D Wasserstein distances over the real spread, their mean, the kept fractions, and the
    same distance for the colour index (`colour_w`, over every sample with a segment, statmorph's flag aside).

    Both sets are winsorised at the real 2nd and 98th percentiles first, so a few catastrophic
    statmorph values (a neighbour in the segment) do not dominate a distance; the spread is the
    real IQR / 1.349. morph_w_<stat> and morph_score are lower-is-better (NaN when fewer than `min_count` samples were
    kept); morph_kept_frac is the fraction of samples statmorph measured with flag <= 1 (higher is
    better, compare with the real value) and morph_kept_frac_gap its distance to the real fraction.
    """
    out: dict[str, float] = {}
    s_ok, r_ok = sample[sample["ok"]], real[real["ok"]]
    for stat in STATS:
        out[f"morph_w_{stat}"] = scaled_distance(s_ok[stat].to_numpy(np.float64), r_ok[stat].to_numpy(np.float64),
                                                 min_count)
    values = [out[f"morph_w_{stat}"] for stat in STATS]
    out["morph_score"] = float(np.mean(values)) if np.isfinite(values).all() else float("nan")
    kept = float(sample["ok"].mean()) if len(sample) else 0.0
    out["morph_kept_frac"] = kept
    out["morph_kept_frac_gap"] = abs(kept - float(real["ok"].mean()))
    out["colour_w"] = scaled_distance(sample["colour"].to_numpy(np.float64), real["colour"].to_numpy(np.float64),
                                      min_count)
    return out
