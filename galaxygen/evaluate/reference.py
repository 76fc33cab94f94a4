"""The real side of every comparison, computed once per dataset and cached beside the encoder.

The held-out pool is the val and test splits. A fixed permutation of it (seed `REF_SEED`, the same
for every trial) gives half A, the n real galaxies every sample set's morphology is compared with,
and half B, the real-vs-real baseline. Feature-space metrics (cheap) compare with the whole pool
except B, which makes them less noisy at small n. Cached in the artifact folder: encoder features of the train split and
the pool (features.npz, with the whitening projection onto their top 16 principal components and
the k-means centroids; whitened features are soft-clipped at +-3 sigma), the statmorph rows of every
real galaxy measured so far (morph_pool.parquet), and the memorisation calibration per n (memo_n<N>.npy).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from galaxygen.data.cache import Cache
from galaxygen.evaluate import diversity, encoder, features, memorisation, morphology
from galaxygen.results import atomic_path

log = logging.getLogger(__name__)

REF_SEED = 0
STATS_VERSION = 8  # bump when the cached real-side statistics or the metric definitions change
MIN_N = 5
MAX_TRAIN = 20000
MAX_MEMO_CALIBRATION = 500


def _save_npz(path: Path, **arrays) -> None:
    with atomic_path(path, ".npz") as tmp:
        np.savez(tmp, **arrays)


def read_pool(path: Path) -> pd.DataFrame | None:
    """The measured real galaxies (one row per cache row), or None when there are none or they lack a column
    of the current measurement (written by an older version: measured again)."""
    if not path.exists():
        return None
    known = pd.read_parquet(path)
    return known if set(morphology.COLUMNS) <= set(known.columns) else None


class Reference:
    """Real-data statistics of one dataset for comparisons of n galaxies."""

    def __init__(self, cache: Cache, n: int, workers: int = 1, progress: bool = True,
                 inception: str | os.PathLike | None = None):
        self.cache, self.workers, self.progress = cache, workers, progress
        self.dir = encoder.artifact_dir(cache)
        self.encoder, self.meta = encoder.load_or_train(cache, progress=progress)
        rng = np.random.default_rng(REF_SEED)
        train = cache.indices("train")
        if len(train) > MAX_TRAIN:
            train = np.sort(rng.choice(train, MAX_TRAIN, replace=False))
        self.train_rows = train
        pool = np.sort(np.concatenate([cache.indices("val"), cache.indices("test")]))
        if len(pool) < 2 * MIN_N:
            raise ValueError(f"{cache.path}: evaluation needs at least {2 * MIN_N} held-out (val/test) galaxies, "
                             f"the cache has {len(pool)}")
        self.pool = pool
        self.n = min(int(n), len(pool) // 2)
        if self.n < int(n):
            log.warning("evaluating %d samples, not %d: the held-out pool has %d galaxies (two halves are needed)",
                        self.n, n, len(pool))
        if self.n < MIN_N:
            raise ValueError(f"evaluation needs n >= {MIN_N}, got {n}")
        perm = np.random.default_rng(REF_SEED).permutation(pool)
        self.rows_a, self.rows_b = perm[: self.n], perm[self.n : 2 * self.n]
        self.rest = perm[self.n :]
        self.rows_features = np.concatenate([perm[: self.n], perm[2 * self.n :]])  # the pool without B
        self._load_features()
        self.inception = features.InceptionFeatures(inception) if inception else None
        self.inception_tag = features.file_tag(inception) if inception else ""

    def _load_features(self) -> None:
        path = self.dir / "features.npz"
        if not self._current(path):
            with encoder.locked(self.dir, "features.lock"):
                if not self._current(path):
                    f_train = encoder.embed(self.encoder, self.cache.images[self.train_rows])
                    f_pool = encoder.embed(self.encoder, self.cache.images[self.pool])
                    mean, proj = features.whitener(f_train)
                    centroids = diversity.kmeans(features.squash((f_train - mean) @ proj), seed=REF_SEED)
                    _save_npz(path, train_rows=self.train_rows, f_train=f_train, pool=self.pool, f_pool=f_pool,
                              mean=mean, proj=proj, centroids=centroids, version=STATS_VERSION)
        data = np.load(path)
        if not (np.array_equal(data["train_rows"], self.train_rows) and np.array_equal(data["pool"], self.pool)):
            raise RuntimeError(f"{path} does not match the cache's splits; delete {self.dir} to rebuild it")
        self.mean, self.proj, self.centroids = data["mean"], data["proj"], data["centroids"]
        self.f_train_raw = data["f_train"]
        self.f_train = self.whiten(self.f_train_raw)
        self.f_pool_raw = dict(zip(self.pool.tolist(), data["f_pool"]))
        self.f_pool = dict(zip(self.pool.tolist(), self.whiten(data["f_pool"])))

    def whiten(self, raw: np.ndarray) -> np.ndarray:
        """Raw encoder features -> top principal components, whitened and soft-clipped at +-3."""
        return features.squash((raw - self.mean) @ self.proj)

    @staticmethod
    def _current(path: Path) -> bool:
        if not path.exists():
            return False
        with np.load(path) as data:
            return "version" in data and int(data["version"]) == STATS_VERSION

    def pool_features(self, rows: np.ndarray, raw: bool = False) -> np.ndarray:
        """Whitened (or raw) encoder features of held-out cache rows."""
        table = self.f_pool_raw if raw else self.f_pool
        return np.stack([table[int(r)] for r in rows])

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Whitened encoder features (see `whiten`) of uint8 images."""
        return self.whiten(encoder.embed(self.encoder, images))

    def real_morphology(self, rows: np.ndarray, exclusive: bool = True) -> pd.DataFrame:
        """statmorph rows of real cache rows, measuring (and caching) only the ones not seen before.

        exclusive: measure while holding the dataset's lock, so concurrent trials measure each galaxy
        once; SLURM array shards (disjoint rows) pass False and only lock to merge their rows in.
        """
        path = self.dir / "morph_pool.parquet"
        known = read_pool(path)
        if known is None or not np.isin(rows, known["row"]).all():
            with encoder.locked(self.dir, "morph.lock") if exclusive else contextlib.nullcontext():
                known = self._measure_missing(path, rows)
        return known.set_index("row").loc[rows].reset_index(drop=True)

    def _measure_missing(self, path: Path, rows: np.ndarray) -> pd.DataFrame:
        known = read_pool(path)
        todo = np.setdiff1d(rows, known["row"].to_numpy()) if known is not None else np.unique(rows)
        if not len(todo):
            return known
        log.info("measuring the morphology of %d held-out galaxies (cached per dataset)", len(todo))
        fresh = morphology.measure(self.cache.images[todo], self.workers, self.progress)
        fresh.insert(0, "row", todo)
        with encoder.locked(self.dir, "morph-write.lock"):
            known = read_pool(path)
            if known is not None:
                fresh = pd.concat([known, fresh[~fresh["row"].isin(known["row"])]], ignore_index=True)
            with atomic_path(path) as tmp:
                fresh.to_parquet(tmp, index=False)
        return fresh

    def memorisation_banks(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel vectors of the train set and of half A."""
        if not hasattr(self, "_banks"):
            self._banks = (memorisation.pixel_vectors(self.cache.images[self.train_rows]),
                           memorisation.pixel_vectors(self.cache.images[self.rows_a]))
        return self._banks

    def real_ratios(self) -> np.ndarray:
        """Memorisation ratios of real held-out galaxies outside half A (the calibration), cached per n."""
        path = self.dir / f"memo_n{self.n}.npy"
        if path.exists():
            return np.load(path)
        rows = self.rest[:MAX_MEMO_CALIBRATION]
        train_bank, a_bank = self.memorisation_banks()
        values = memorisation.ratios(memorisation.pixel_vectors(self.cache.images[rows]), train_bank, a_bank)
        with atomic_path(path, ".npy") as tmp:
            np.save(tmp, values)
        return values

    def compare(self, images: np.ndarray, morph: pd.DataFrame | None = None,
                feats: np.ndarray | None = None) -> dict[str, float]:
        """Every sample-quality metric of uint8 images (N, S, S, 3) against the held-out reference."""
        if images.shape[1:] != self.cache.images.shape[1:]:
            raise ValueError(f"samples have shape {images.shape[1:]}, the dataset {self.cache.images.shape[1:]}")
        if morph is None:
            morph = morphology.measure(images, self.workers, self.progress)
        out = morphology.distances(morph, self.real_morphology(self.rows_a))
        f_sample = self.embed(images) if feats is None else feats
        f_real = self.pool_features(self.rows_features)
        out["fid_domain"] = features.frechet_distance(f_sample, f_real)
        out["kid_domain"] = features.kernel_inception_distance(f_sample, f_real, seed=REF_SEED)
        out.update(diversity.diversity_metrics(f_sample, f_real, self.centroids))
        train_bank, a_bank = self.memorisation_banks()
        sample_ratios = memorisation.ratios(memorisation.pixel_vectors(images), train_bank, a_bank)
        out.update(memorisation.memorisation_metrics(sample_ratios, self.real_ratios()))
        if self.inception is not None:
            i_sample, i_real = self.inception(images), self.inception_real()
            out["fid_inception"] = features.frechet_distance(i_sample, i_real)
            out["kid_inception"] = features.kernel_inception_distance(i_sample, i_real, seed=REF_SEED)
        return out

    def inception_real(self) -> np.ndarray:
        """Inception features of half A, cached per weights file and n."""
        path = self.dir / f"inception-{self.inception_tag}-n{self.n}.npy"
        if path.exists():
            return np.load(path)
        values = self.inception(self.cache.images[self.rows_a])
        with atomic_path(path, ".npy") as tmp:
            np.save(tmp, values)
        return values
