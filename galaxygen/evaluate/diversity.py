"""Diversity and mode collapse from k-means clusters of real features (after Hackstein et al. 2023).

k-means (k=10) is fitted on the real train features. A sample set is compared with the real
reference set by the total-variation distance between their cluster occupancies (0: same
proportions, 1: disjoint clusters) and by the 1-D Wasserstein distance between their distributions
of the distance to the nearest centroid, in units of the reference's spread (a collapsed generator
puts every sample at one distance; an off-manifold one puts them far away).
"""

from __future__ import annotations

import numpy as np

K = 10


def kmeans(x: np.ndarray, k: int = K, seed: int = 0, n_init: int = 4, iters: int = 100) -> np.ndarray:
    """Centroids (k, D) by Lloyd's algorithm from k-means++ starts; the best of n_init by inertia."""
    x = np.asarray(x, np.float64)
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        centres = [x[rng.integers(len(x))]]
        for _ in range(1, k):
            d2 = sq_dist(x, np.array(centres)).min(1)
            centres.append(x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(len(x))])
        centres = np.array(centres)
        for _ in range(iters):
            assign = sq_dist(x, centres).argmin(1)
            new = np.array([x[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
            if np.allclose(new, centres):
                break
            centres = new
        inertia = sq_dist(x, centres).min(1).sum()
        if inertia < best_inertia:
            best, best_inertia = centres, inertia
    return best


def sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (len(a), len(b))."""
    return np.clip((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0, None)


def nearest(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid index and distance of each row of x."""
    d2 = sq_dist(np.asarray(x, np.float64), centroids)
    idx = d2.argmin(1)
    return idx, np.sqrt(d2[np.arange(len(x)), idx])


def occupancy(assign: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(assign, minlength=k) / max(len(assign), 1)


def diversity_metrics(sample: np.ndarray, reference: np.ndarray, centroids: np.ndarray) -> dict[str, float]:
    """kmeans_occupancy_error, kmeans_centroid_dist (both lower is better) and kmeans_centroid_dist_ratio (ideal 1)."""
    from scipy.stats import wasserstein_distance

    k = len(centroids)
    a_s, d_s = nearest(sample, centroids)
    a_r, d_r = nearest(reference, centroids)
    spread = d_r.std() or 1.0
    return {
        "kmeans_occupancy_error": float(0.5 * np.abs(occupancy(a_s, k) - occupancy(a_r, k)).sum()),
        "kmeans_centroid_dist": float(wasserstein_distance(d_s, d_r) / spread),
        "kmeans_centroid_dist_ratio": float(d_s.mean() / d_r.mean()),
    }
