"""Memorisation: is a generated galaxy closer to a training galaxy than to held-out ones?

Images are compared as 32x32 greyscale pixel vectors (2x2 means; less sky noise), under the
8 flips and 90-degree rotations. For each sample x, r(x) = d(x, train) / d(x, held-out reference)
with d the nearest-neighbour distance. Real held-out galaxies (not in the reference) calibrate r:
`memorisation_ratio` is the median r of the samples over the median r of those real galaxies
(about 1: as novel as new real galaxies; towards 0: copies of training images; higher is better),
and `memorisation_copy_frac` is the fraction of samples with r below the 5th percentile of the real
galaxies' r (about 0.05 for real galaxies, 1 for a copier; lower is better).
"""

from __future__ import annotations

import numpy as np

COPY_QUANTILE = 0.05
MAX_TRAIN = 20000


def pixel_vectors(images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) -> float32 (N, S/2, S/2) greyscale in [0, 1], 2x2 averaged."""
    images = np.asarray(images)
    n, s2 = len(images), images.shape[1] // 2
    out = np.empty((n, s2, s2), np.float32)
    for i in range(0, n, 1024):
        block = images[i : i + 1024, : 2 * s2, : 2 * s2].reshape(-1, s2, 2, s2, 2, 3)
        out[i : i + 1024] = block.sum((2, 4, 5), dtype=np.uint16) / np.float32(12 * 255)
    return out


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float32)


def nn_distance(x: np.ndarray, bank: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Distance from each image of x (N, s, s) to its nearest image in bank, over the 8 dihedral transforms."""
    bank_flat = _flat(bank)
    bank_sq = (bank_flat**2).sum(1)
    best = np.full(len(x), np.inf, np.float64)
    for t in range(8):
        y = np.rot90(x, t % 4, axes=(1, 2))
        y = _flat(y[:, :, ::-1] if t >= 4 else y)
        y_sq = (y**2).sum(1)
        for i in range(0, len(bank_flat), chunk):
            d2 = y_sq[:, None] + bank_sq[None, i : i + chunk] - 2 * y @ bank_flat[i : i + chunk].T
            best = np.minimum(best, d2.min(1))
    return np.sqrt(np.clip(best, 0, None))


def ratios(x: np.ndarray, train_bank: np.ndarray, heldout_bank: np.ndarray) -> np.ndarray:
    """r(x) = d(x, train) / d(x, held-out) per image of x."""
    return nn_distance(x, train_bank) / np.maximum(nn_distance(x, heldout_bank), 1e-12)


def memorisation_metrics(sample_ratios: np.ndarray, real_ratios: np.ndarray) -> dict[str, float]:
    """memorisation_ratio (higher is better, about 1 for real) and memorisation_copy_frac (lower is better)."""
    threshold = np.quantile(real_ratios, COPY_QUANTILE)
    return {
        "memorisation_ratio": float(np.median(sample_ratios) / np.median(real_ratios)),
        "memorisation_copy_frac": float((sample_ratios < threshold).mean()),
    }
