"""Baselines, computed by the same code and stored once per dataset and n (baselines.json).

- real_vs_real: half B of the held-out galaxies as the "samples" (the floor any generator can reach).
- one_image: every sample the same real training galaxy (the mode-collapse ceiling; it is also a
  perfect memoriser), averaged over 5 such generators, each with a random training galaxy.
For the latent probes, the real-vs-real column holds the probe R^2 of the domain encoder's 64-d features.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from galaxygen.evaluate import encoder, probes
from galaxygen.evaluate.reference import STATS_VERSION, Reference
from galaxygen.results import atomic_path

log = logging.getLogger(__name__)

NAMES = ("real_vs_real", "one_image")


ONE_IMAGE_DRAWS = 5


def one_image_rows(ref: Reference) -> np.ndarray:
    """ONE_IMAGE_DRAWS training galaxies drawn at random (seeded): one one-image generator each."""
    return np.sort(np.random.default_rng(1).choice(ref.train_rows, ONE_IMAGE_DRAWS, replace=False))


def truth(ref: Reference, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Ground-truth (label) columns of cache rows."""
    cat = ref.cache.catalog
    return {c: cat[c].to_numpy(np.float64)[rows] for c in ref.meta["labels"]}


def probe_rows(ref: Reference) -> tuple[np.ndarray, np.ndarray]:
    """Train rows to fit probes on and held-out rows to score them on (up to probes.MAX_FIT each)."""
    rng = np.random.default_rng(0)
    train, test = ref.train_rows, ref.pool
    if len(train) > probes.MAX_FIT:
        train = np.sort(rng.choice(train, probes.MAX_FIT, replace=False))
    if len(test) > probes.MAX_FIT:
        test = np.sort(rng.choice(test, probes.MAX_FIT, replace=False))
    return train, test


def _mean(values: list[float]) -> float:
    """Mean over the draws that could be measured (a galaxy statmorph flags gives NaN distances)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def compute(ref: Reference) -> dict[str, dict[str, float]]:
    """Both baselines' metrics (not cached)."""
    log.info("computing the baselines for n=%d (once per dataset)", ref.n)
    rvr = ref.compare(ref.cache.images[ref.rows_b], morph=ref.real_morphology(ref.rows_b),
                      feats=ref.pool_features(ref.rows_b))
    rows = one_image_rows(ref)
    morphs = ref.real_morphology(rows)
    draws = []
    for i, row in enumerate(rows):
        image = ref.cache.images[row : row + 1]
        draws.append(ref.compare(np.repeat(image, ref.n, axis=0),
                                 morph=morphs.loc[np.full(ref.n, i)].reset_index(drop=True),
                                 feats=np.repeat(ref.embed(image), ref.n, axis=0)))
    one = {k: _mean([d[k] for d in draws]) for k in draws[0]}
    train_rows, test_rows = probe_rows(ref)
    f_train = ref.f_train_raw[np.searchsorted(ref.train_rows, train_rows)]
    rvr.update(probes.probe_r2(f_train, truth(ref, train_rows), ref.pool_features(test_rows, raw=True),
                               truth(ref, test_rows)))
    return {"real_vs_real": rvr, "one_image": one, "one_image_rows": rows.tolist()}


def load_or_compute(ref: Reference) -> dict[str, dict[str, float]]:
    """The cached baselines of this dataset and n, computed on first use."""
    path = ref.dir / "baselines.json"
    key = f"v{STATS_VERSION}-n{ref.n}" + (f"-inception-{ref.inception_tag}" if ref.inception is not None else "")
    stored = json.loads(path.read_text()) if path.exists() else {}
    if key not in stored:
        with encoder.locked(ref.dir, "baselines.lock"):
            stored = json.loads(path.read_text()) if path.exists() else {}
            if key not in stored:
                stored[key] = compute(ref)
                with atomic_path(path) as tmp:
                    tmp.write_text(json.dumps(stored, indent=2, default=float))
    return stored[key]
