"""Shared fixtures: small real caches and a small real sweep."""

from __future__ import annotations

import os
import sys

import numpy as np
import pandas as pd
import pytest

from galaxygen.data.cache import CacheWriter
from galaxygen.splits import split_of

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# the slurm/ scripts the tests start run this interpreter (they fall back to REPO/.venv, absent in a git worktree)
os.environ.setdefault("GALAXYGEN_PYTHON", sys.executable)


def write_blob_cache(out, n: int = 240, size: int = 64, seed: int = 0):
    """A cache of n soft elliptical blobs on a dark noisy sky (fast; for loop and plumbing tests)."""
    rng = np.random.default_rng(seed)
    writer = CacheWriter(out, n, size)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    ids = [f"blob-{i:05d}" for i in range(n)]
    sizes = rng.uniform(2, 8, n)
    for i in range(n):
        q, pa = rng.uniform(0.4, 1), rng.uniform(0, np.pi)
        x = xx * np.cos(pa) + yy * np.sin(pa)
        y = (-xx * np.sin(pa) + yy * np.cos(pa)) / q
        light = np.exp(-np.hypot(x, y) / sizes[i])
        colour = np.array([1.0, rng.uniform(0.6, 0.9), rng.uniform(0.3, 0.8)])
        img = light[..., None] * colour * 230 + rng.normal(8, 3, (size, size, 3))
        writer.images[i] = np.clip(img, 0, 255).astype(np.uint8)
    catalog = pd.DataFrame({"id": ids, "source": "blobs", "split": [split_of(i) for i in ids], "hlr_px": sizes})
    return writer.finish(catalog, {"source": "blobs", "n": n})


@pytest.fixture(scope="session")
def blob_cache(tmp_path_factory):
    return write_blob_cache(tmp_path_factory.mktemp("data") / "blobs")


@pytest.fixture(scope="session")
def blob_cache_32(tmp_path_factory):
    return write_blob_cache(tmp_path_factory.mktemp("data") / "blobs32", size=32)


def run_launcher(args: list[str], results, timeout: float = 600, **kwargs):
    """Run `python -m sweeps.launch` in a subprocess (as a user would) and return the CompletedProcess."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "sweeps.launch", *args, "--results", str(results)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory, blob_cache):
    """A real two-trial Ray Tune sweep (dropout 0.1 and 0.5, 2 epochs, tiny data, evaluated); returns RESULTS/dropout."""
    results = tmp_path_factory.mktemp("results")
    proc = run_launcher(["dropout", "--backend", "local", "--data", str(blob_cache), "--epochs", "2",
                         "--grid", "dropout=0.1,0.5", "--set", "batch_size=16", "--set", "log_every=4",
                         "--eval-n", "16", "--no-figures"], results)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return results / "dropout"
