"""Feature-space distances: Frechet distance (FID-style), KID, and optional Inception-v3 features.

Inception weights are never downloaded: pass a torchvision-format state dict file (for example
`inception_v3_google-0cc3c7bd.pth`) to get the standard FID as well. Its pool features (2048-d)
are taken from 299x299 bilinear resizes of the [0, 1] images mapped to [-1, 1].
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from galaxygen.data.loader import to_float

log = logging.getLogger(__name__)

KID_SUBSET = 1000
KID_SUBSETS = 10
PCA_DIM = 16
SOFT_CLIP = 3.0


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) between two feature sets (rows = samples).

    Tr (C_a C_b)^(1/2) is the sum of the singular values of A B^T (A, B the centred samples over
    sqrt(n - 1)) when the sets are smaller than the dimension, else of sqrt(C_a) C_b sqrt(C_a) by
    symmetric eigendecomposition: exact, stable, and fast for 2048-d Inception features.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca = (a - mu_a) / np.sqrt(max(len(a) - 1, 1))
    cb = (b - mu_b) / np.sqrt(max(len(b) - 1, 1))
    dim = a.shape[1]
    if len(a) * len(b) <= dim * dim:
        tr_covmean = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    else:
        w, v = np.linalg.eigh(ca.T @ ca)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root @ (cb.T @ cb) @ root), 0, None)).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + (ca**2).sum() + (cb**2).sum() - 2 * tr_covmean)
    return max(value, 0.0)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, seed: int = 0) -> float:
    """KID: unbiased MMD^2 with the kernel (x.y/d + 1)^3, averaged over random subsets of up to 1000."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    size = min(KID_SUBSET, len(a), len(b))
    if size < 2:
        return float("nan")
    if size == len(a) == len(b):
        return _mmd2_unbiased(a, b)
    rng = np.random.default_rng(seed)
    return float(np.mean([
        _mmd2_unbiased(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
        for _ in range(KID_SUBSETS)
    ]))


def file_tag(path: str | os.PathLike) -> str:
    """First 12 hex digits of a file's sha256 (names cached features of a weights file)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def squash(z: np.ndarray, clip: float = SOFT_CLIP) -> np.ndarray:
    """Soft-clip whitened features at +-clip (linear near 0), so a few outlier galaxies cannot dominate."""
    return clip * np.tanh(z / clip)


def whitener(reference: np.ndarray, k: int = PCA_DIM) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and projection (D, k) onto the top-k principal components of reference, whitened.

    Distances are measured in this space: every retained direction has unit variance on the real
    train features, and the weakest directions (mostly estimator noise at small n) are dropped.
    """
    mean = reference.mean(0)
    _, sv, vt = np.linalg.svd(reference - mean, full_matrices=False)
    k = min(k, len(sv))
    scale = sv[:k] / np.sqrt(max(len(reference) - 1, 1))
    scale[~(scale > 0)] = 1.0
    return mean, vt[:k].T / scale


class InceptionFeatures:
    """Pool features of a user-supplied torchvision Inception-v3 weights file (nothing is downloaded)."""

    def __init__(self, weights: str | os.PathLike):
        from torchvision.models import inception_v3

        model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.fc = torch.nn.Identity()
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """2048-d features (N, 2048) of uint8 (N, S, S, 3) images."""
        out = []
        for i in range(0, len(images), batch_size):
            x = to_float(images[i : i + batch_size])
            x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(self.model(x * 2 - 1).double().numpy())
        return np.concatenate(out)
