"""Physics in the latent space: linear probes from a VAE's posterior mean to each ground-truth parameter.

A ridge regression (small penalty, standardised inputs) is fitted on train-split galaxies and scored
by R^2 on held-out galaxies (higher is better; 1 = the parameter is a linear function of the latent).
"""

from __future__ import annotations

import re

import numpy as np

RIDGE = 1e-3
MAX_FIT = 2000


def metric_name(column: str) -> str:
    """`probe_r2_<column>` with the column name made safe (lower case, [a-z0-9_])."""
    return "probe_r2_" + re.sub(r"[^a-z0-9_]+", "_", column.lower()).strip("_")


def fit_ridge(x: np.ndarray, y: np.ndarray, ridge: float = RIDGE):
    """A predict(x) function from a ridge regression of y (N,) on x (N, D)."""
    mean, std = x.mean(0), x.std(0)
    std[~(std > 0)] = 1.0
    z = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], 1)
    reg = ridge * len(x) * np.eye(z.shape[1])
    reg[-1, -1] = 0.0
    w = np.linalg.solve(z.T @ z + reg, z.T @ y)
    return lambda q: np.concatenate([(q - mean) / std, np.ones((len(q), 1))], 1) @ w


def r2(pred: np.ndarray, truth: np.ndarray) -> float:
    var = truth.var()
    return float(1 - ((pred - truth) ** 2).mean() / var) if var > 0 else float("nan")


def probe_r2(train_x: np.ndarray, train_y: dict[str, np.ndarray], test_x: np.ndarray,
             test_y: dict[str, np.ndarray]) -> dict[str, float]:
    """{probe_r2_<param>: held-out R^2} for each parameter (rows with a missing value are skipped)."""
    out = {}
    for name, y in train_y.items():
        ok, ok_test = np.isfinite(y), np.isfinite(test_y[name])
        if ok.sum() < 10 or ok_test.sum() < 3:
            continue
        predict = fit_ridge(train_x[ok], y[ok])
        out[metric_name(name)] = r2(predict(test_x[ok_test]), test_y[name][ok_test])
    return out
