"""The domain encoder: a small CNN trained once per dataset, whose features replace Inception's.

It is trained on the train split to predict rotation-invariant image descriptors (band fluxes,
radial light fractions, size, ellipticity, colours, sharpness, power in four spatial-frequency
bands, which blur and missing sky noise change) plus every numeric catalog label (ground truth of
synthetic galaxies, vote fractions of Galaxy Zoo), with random flips and 90-degree rotations, for
15 epochs (at most 800 steps of 64 images, on one thread: about 30 s on a shared 2-core machine
for the 4,000-galaxy synthetic cache). The artifact lives in
`galaxygen.home()/encoders/<content_hash>-v<VERSION>/` as `encoder.pt` (state dict) and
`config.json` (training config, target names and normalisation, validation R^2); a file lock
makes concurrent trials train it once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from galaxygen import home
from galaxygen.cli import progress_bar
from galaxygen.data.cache import Cache, content_hash
from galaxygen.data.loader import to_float
from galaxygen.results import atomic_path

log = logging.getLogger(__name__)

VERSION = 1  # bump when the architecture, the targets or the training change
FEATURE_DIM = 64
TRAIN_CONFIG = {"epochs": 15, "max_steps": 800, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4, "seed": 0,
                "max_train": 20000, "threads": 1}
NON_LABELS = {"id", "source", "split", "file", "path", "filename", "index", "seed", "objid", "dr7objid", "asset_id"}
DESCRIPTOR_NAMES = (
    "log_flux_r", "log_flux_g", "log_flux_b", "frac_r2", "frac_r4", "frac_r8", "frac_r16",
    "log_size", "moment_ellipticity", "colour_inner", "colour_outer", "sharpness", "peak",
    "log_power_k1", "log_power_k2", "log_power_k3", "log_power_k4",
)
POWER_BANDS = (0.03, 0.08, 0.16, 0.3, 0.5)  # radial frequency band edges, cycles per pixel


def artifact_dir(cache: Cache) -> Path:
    """Folder of this dataset's encoder, reference statistics and baselines."""
    digest = cache.manifest.get("content_hash") or content_hash(cache.images, cache.catalog)
    return home() / "encoders" / f"{digest}-v{VERSION}"


@contextmanager
def one_thread():
    """Run torch on one thread: small convolutions on a shared 2-core machine are 2-10x faster so."""
    before = torch.get_num_threads()
    torch.set_num_threads(TRAIN_CONFIG["threads"])
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def locked(folder: Path, name: str = "lock"):
    """Hold an exclusive file lock in `folder` (one writer per dataset across processes)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{name}", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def label_columns(catalog: pd.DataFrame) -> list[str]:
    """Numeric, non-constant, mostly present catalog columns: the ground truth or labels."""
    out = []
    for col in catalog.columns:
        if col.lower() in NON_LABELS or col.lower().endswith("_id") or not pd.api.types.is_numeric_dtype(catalog[col]):
            continue
        if pd.api.types.is_bool_dtype(catalog[col]):
            continue
        values = catalog[col].to_numpy(dtype=np.float64)
        finite = np.isfinite(values)
        if finite.mean() >= 0.5 and np.nanstd(values[finite]) > 0:
            out.append(col)
    return out


def descriptors(images: np.ndarray) -> np.ndarray:
    """Rotation-invariant descriptors of uint8 (N, S, S, 3) images, columns `DESCRIPTOR_NAMES`."""
    from scipy.ndimage import gaussian_filter

    x = np.asarray(images, dtype=np.float64) / 255.0
    n, s = x.shape[:2]
    sky = np.median(x[:, [0, -1]].reshape(n, -1, 3), axis=1)
    x = np.clip(x - sky[:, None, None, :], 0, None)
    grey = x.mean(-1)
    yy, xx = np.mgrid[:s, :s].astype(np.float64)
    total = grey.sum((1, 2)) + 1e-9
    cy = (grey * yy).sum((1, 2)) / total
    cx = (grey * xx).sum((1, 2)) / total
    r = np.hypot(yy[None] - cy[:, None, None], xx[None] - cx[:, None, None])
    fracs = [(grey * (r < rad)).sum((1, 2)) / total for rad in (2, 4, 8, 16)]
    dy, dx = yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]
    ixx, iyy, ixy = ((grey * d).sum((1, 2)) / total for d in (dx * dx, dy * dy, dx * dy))
    trace = ixx + iyy + 1e-9
    ellip = np.hypot(ixx - iyy, 2 * ixy) / trace
    inner, outer = r < 6, (r >= 6) & (r < 16)
    colour_in = np.log((x[..., 0] * inner).sum((1, 2)) + 1e-3) - np.log((x[..., 2] * inner).sum((1, 2)) + 1e-3)
    colour_out = np.log((x[..., 0] * outer).sum((1, 2)) + 1e-3) - np.log((x[..., 2] * outer).sum((1, 2)) + 1e-3)
    smooth = gaussian_filter(grey, (0, 1.0, 1.0))
    sharp = np.log((grey - smooth).std((1, 2)) + 1e-4)
    flux = np.log1p(x.sum((1, 2)))
    cols = [flux[:, 0], flux[:, 1], flux[:, 2], *fracs, np.log(np.sqrt(trace)), ellip, colour_in, colour_out,
            sharp, grey.max((1, 2)), *band_power(grey)]
    return np.stack(cols, 1)


def band_power(grey: np.ndarray) -> list[np.ndarray]:
    """log mean power of (N, S, S) images in the radial frequency bands POWER_BANDS (blur and noise show here)."""
    power = np.abs(np.fft.rfft2(grey)) ** 2 / grey.shape[1] ** 2
    fy = np.fft.fftfreq(grey.shape[1])[:, None]
    fx = np.fft.rfftfreq(grey.shape[2])[None, :]
    k = np.hypot(fy, fx)
    return [np.log(power[:, (k >= lo) & (k < hi)].mean(1) + 1e-12) for lo, hi in zip(POWER_BANDS, POWER_BANDS[1:])]


class DomainEncoder(nn.Module):
    """Three stride-2 convolutions, a 128-unit layer and a FEATURE_DIM embedding; a linear head for training."""

    def __init__(self, image_size: int, n_targets: int, feature_dim: int = FEATURE_DIM):
        super().__init__()
        side = image_size // 8
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(), nn.Flatten(),
            nn.Linear(64 * side * side, 128), nn.ReLU(), nn.Linear(128, feature_dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, n_targets))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features (B, feature_dim) of images (B, 3, S, S) in [0, 1]."""
        return self.body(x - 0.5)


def dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The batch under one random flip and 90-degree rotation (a different one per batch)."""
    t = int(torch.randint(0, 8, (1,), generator=generator))
    y = torch.rot90(x, t % 4, (2, 3))
    return y.flip(3) if t >= 4 else y


@torch.no_grad()
def embed(encoder: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Encoder features (N, D) float64 of uint8 (N, S, S, 3) images."""
    encoder.eval()
    parts = [encoder(to_float(images[i : i + batch_size])).double().numpy() for i in range(0, len(images), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, FEATURE_DIM))


def targets_of(cache: Cache, rows: np.ndarray, labels: list[str]) -> np.ndarray:
    """Descriptor and label targets (N, T) of cache rows (NaN where a label is missing)."""
    desc = descriptors(cache.images[rows])
    lab = cache.catalog[labels].to_numpy(dtype=np.float64)[rows] if labels else np.zeros((len(rows), 0))
    return np.concatenate([desc, lab], 1)


def train(cache: Cache, out: Path, config: dict | None = None, progress: bool = True) -> tuple[nn.Module, dict]:
    """Train the encoder on the train split, save it in `out`, return (encoder, config)."""
    cfg = {**TRAIN_CONFIG, **(config or {})}
    start = time.time()
    rng = np.random.default_rng(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    labels = label_columns(cache.catalog)
    train_rows = cache.indices("train")
    if len(train_rows) > cfg["max_train"]:
        train_rows = np.sort(rng.choice(train_rows, cfg["max_train"], replace=False))
    val_rows = cache.indices("val")
    if len(train_rows) < 16:
        raise ValueError(f"{cache.path}: the encoder needs at least 16 train images, the cache has {len(train_rows)}")
    y_train = targets_of(cache, train_rows, labels)
    mean, std = np.nanmean(y_train, 0), np.nanstd(y_train, 0)
    std[~(std > 0)] = 1.0
    x = torch.as_tensor(np.array(cache.images[train_rows], dtype=np.uint8))
    y = torch.from_numpy((y_train - mean) / std).float()
    model = DomainEncoder(cache.size, y.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps = min(cfg["epochs"] * int(np.ceil(len(x) / cfg["batch_size"])), cfg["max_steps"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=steps)
    bar = progress_bar(total=steps, desc="domain encoder", unit="step", disable=not progress)
    model.train()
    step = 0
    with one_thread():
        while step < steps:
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), cfg["batch_size"]):
                if step == steps:
                    break
                idx = order[i : i + cfg["batch_size"]]
                batch = x[idx].permute(0, 3, 1, 2).float().div_(255.0)
                target = y[idx]
                known = torch.isfinite(target)
                pred = model.head(model(dihedral(batch, gen)))
                loss = ((pred - torch.nan_to_num(target)) ** 2 * known).sum() / known.sum().clamp(min=1)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)  # refresh=True would bypass the log interval
    bar.close()
    model.eval()
    names = [*DESCRIPTOR_NAMES, *labels]
    val_r2 = {}
    if len(val_rows):
        with torch.no_grad():
            pred = model.head(torch.from_numpy(embed(model, cache.images[val_rows])).float()).numpy() * std + mean
        truth = targets_of(cache, val_rows, labels)
        for j, name in enumerate(names):
            ok = np.isfinite(truth[:, j])
            if ok.sum() > 2 and truth[ok, j].var() > 0:
                val_r2[name] = float(1 - ((pred[ok, j] - truth[ok, j]) ** 2).mean() / truth[ok, j].var())
    meta = {
        "version": VERSION, "cache": str(cache.path), "content_hash": out.name.rsplit("-v", 1)[0],
        "image_size": cache.size, "feature_dim": FEATURE_DIM, "train_config": cfg, "targets": names,
        "labels": labels, "target_mean": mean.tolist(), "target_std": std.tolist(), "n_train": int(len(train_rows)),
        "val_r2": val_r2, "train_seconds": round(time.time() - start, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with atomic_path(out / "encoder.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    log.info("trained the domain encoder in %.1f s (median val R^2 %.2f) -> %s", meta["train_seconds"],
             float(np.median(list(val_r2.values()))) if val_r2 else float("nan"), out)
    return model, meta


def load_or_train(cache: Cache, progress: bool = True) -> tuple[nn.Module, dict]:
    """This dataset's encoder, trained on first use (under a lock, so concurrent callers train it once)."""
    out = artifact_dir(cache)
    if not (out / "config.json").exists():
        with locked(out, "encoder.lock"):
            if not (out / "config.json").exists():
                log.info("training the domain encoder for %s (once per dataset)", cache.path)
                return train(cache, out, progress=progress)
    meta = json.loads((out / "config.json").read_text())
    model = DomainEncoder(meta["image_size"], len(meta["targets"]), meta["feature_dim"])
    model.load_state_dict(torch.load(out / "encoder.pt", weights_only=True))
    model.eval()
    return model, meta
