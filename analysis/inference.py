"""Checkpoint inference for the sweep figures: samples, reconstructions and posterior means of held-out
galaxies from each trial's best checkpoint, and the concentration index that colours the latent plots.
Nothing here draws; analysis.figures turns these arrays into figures.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from analysis.tables import AnalysisError, SweepData, short
from galaxygen.data.loader import to_float
from galaxygen.evaluate.morphology import colours
from galaxygen.models import MODELS, generate

log = logging.getLogger(__name__)

N_SAMPLES = 32
N_RECON = 6
N_LATENT = 256
N_COLOUR = 64  # samples per trial, and held-out galaxies and their reconstructions, whose colour is measured
SEED = 0
TRUTH_COLUMNS = {"bulge_frac": "bulge fraction (truth)", "ellipticity": "ellipticity (truth)",
                 "class": "class (truth)", "hlr_px": "half-light radius [px] (truth)",
                 "r_half": "half-light radius [px] (truth)"}


@dataclass
class HeldOut:
    """Held-out galaxies of one cache: images (N, S, S, 3) uint8, their catalog rows and a concentration index."""

    images: np.ndarray
    catalog: pd.DataFrame
    concentration_name: str
    colour: np.ndarray  # colour index of the first N_COLOUR images (galaxygen.evaluate.morphology.colours)


@dataclass
class TrialOutputs:
    """What a trial's checkpoint produced: samples (from `latent`), reconstructions, 2-D latent of held-out
    galaxies."""

    samples: np.ndarray | None = None
    latent_name: str = ""
    sample_colour: np.ndarray | None = None  # colour index of N_COLOUR samples
    recon_colour: np.ndarray | None = None  # ... of the reconstructions of the held-out set's first N_COLOUR
    recon: np.ndarray | None = None
    latent: tuple[np.ndarray, str, tuple | None] | None = None
    held: HeldOut | None = None
    reasons: dict[str, str] = field(default_factory=dict)


def light_concentration(images: np.ndarray) -> np.ndarray:
    """C = 5 log10(r80 / r20) of the greyscale light around the flux-weighted centre (a statmorph-free proxy)."""
    grey = images.astype(np.float32).mean(axis=3)
    n, s, _ = grey.shape
    border = np.concatenate([grey[:, :2].reshape(n, -1), grey[:, -2:].reshape(n, -1),
                             grey[:, :, :2].reshape(n, -1), grey[:, :, -2:].reshape(n, -1)], axis=1)
    flux = np.clip(grey - np.median(border, axis=1)[:, None, None], 0, None).reshape(n, -1)
    yy, xx = np.mgrid[0:s, 0:s]
    xx, yy = xx.ravel().astype(np.float32), yy.ravel().astype(np.float32)
    total = flux.sum(axis=1)
    safe = np.where(total > 0, total, 1.0)
    cx = (flux * xx).sum(axis=1) / safe
    cy = (flux * yy).sum(axis=1) / safe
    r = np.hypot(xx[None] - cx[:, None], yy[None] - cy[:, None])
    order = np.argsort(r, axis=1)
    r_sorted = np.take_along_axis(r, order, axis=1)
    cum = np.cumsum(np.take_along_axis(flux, order, axis=1), axis=1) / safe[:, None]
    r20 = r_sorted[np.arange(n), np.argmax(cum >= 0.2, axis=1)] + 0.5
    r80 = r_sorted[np.arange(n), np.argmax(cum >= 0.8, axis=1)] + 0.5
    out = 5.0 * np.log10(r80 / r20)
    out[total <= 0] = np.nan
    return out


PROXY_NAME = "concentration C (light profile)"
STATMORPH_NAME = "concentration C (statmorph)"


def evaluation_morphology(cache) -> pd.DataFrame | None:
    """statmorph rows the evaluation already measured for this dataset (indexed by cache row), if any."""
    from galaxygen.evaluate.encoder import artifact_dir

    path = artifact_dir(cache) / "morph_pool.parquet"
    if not path.is_file():
        return None
    try:
        table = pd.read_parquet(path)
    except (OSError, ValueError):
        return None
    table = table[table["ok"].astype(bool) & table["concentration"].notna()] if "ok" in table.columns else table
    return table.drop_duplicates("row").set_index("row")


def measured_concentration(images: np.ndarray, key: str) -> np.ndarray:
    """statmorph concentration of images via galaxygen.evaluate.morphology, cached under galaxygen.home()."""
    from galaxygen import home
    from galaxygen.evaluate.morphology import measure

    path = home() / "analysis" / f"concentration-{key}.npy"
    if path.is_file():
        return np.load(path)
    frame = measure(images, os.cpu_count() or 1)
    values = frame["concentration"].where(frame["ok"].astype(bool)).to_numpy(dtype=float)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, values)
    return values


def data_path(value) -> Path:
    """The cache a trial trained on: its config's `data`, or the built-in synthetic cache (never rendered here)."""
    from galaxygen.data import Cache, resolve_cache

    data = value if isinstance(value, str) else None
    path = resolve_cache(data, create=False)
    if not data and not Cache.exists(path):
        raise AnalysisError(f"the default synthetic cache {path} has not been rendered")
    return path


def held_out(path: Path, n: int, statmorph: bool = False) -> HeldOut:
    """Up to n held-out (val/test) galaxies with a concentration index.

    The statmorph concentration comes free when the evaluation already measured these galaxies (its cache
    per dataset); otherwise the light-profile proxy is used, or statmorph is run when `statmorph` is set
    (about 0.3 s per galaxy per core, so not by default at the end of a sweep).
    """
    from galaxygen.data.cache import Cache

    cache = Cache.open(path)
    pool = np.sort(np.concatenate([cache.indices("val"), cache.indices("test")]))
    if not len(pool):
        pool = np.arange(len(cache))
    known = evaluation_morphology(cache)
    name = PROXY_NAME
    if known is not None and len(rows := np.intersect1d(known.index.to_numpy(), pool)) >= min(n, len(pool)) // 2:
        idx = rows[:n]
        values = known.loc[idx, "concentration"].to_numpy(dtype=float)
        name = STATMORPH_NAME
    else:
        idx = pool[:n]
    images = np.asarray(cache.images[idx])
    if name == PROXY_NAME and statmorph:
        key = f"{str(cache.manifest.get('content_hash', path.name))[:16]}-{hashlib.sha1(idx.tobytes()).hexdigest()[:10]}"
        values, name = measured_concentration(images, key), STATMORPH_NAME
    elif name == PROXY_NAME:
        values = light_concentration(images)
    catalog = cache.catalog.iloc[idx].reset_index(drop=True)
    catalog["concentration"] = values
    return HeldOut(images, catalog, name, colours(images[:N_COLOUR]))


def to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> float (N, 3, size, size) in [0, 1]."""
    x = to_float(images)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x


def to_images(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def project(mu: np.ndarray) -> tuple[np.ndarray, str, tuple | None]:
    """The first two latent dims when the latent is 2-D, else the PCA projection of the posterior means."""
    if mu.shape[1] == 1:
        return np.hstack([mu, np.zeros_like(mu)]), "dims", None
    if mu.shape[1] == 2:
        return mu, "dims", None
    centred = mu - mu.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    var = s**2 / max((s**2).sum(), 1e-12)
    return centred @ vt[:2].T, "pca", (float(var[0]), float(var[1]))


def why_missing(row) -> str:
    if row.status in ("failed", "stopped"):
        return f"{row.status}, no checkpoint: {short(row.error, 80)}" if short(row.error) else f"{row.status}, no checkpoint"
    return f"no checkpoint ({row.status})"


class HeldOutSets:
    """Held-out galaxies per data set, each loaded once (or the reason it could not be)."""

    def __init__(self, n: int, statmorph: bool = False):
        self.n, self.statmorph = n, statmorph
        self.sets: dict[str, HeldOut | str] = {}

    def get(self, value) -> HeldOut | str:
        """The held-out set of a config's `data` value, or a one-line reason it is unavailable."""
        try:
            key = str(data_path(value))
        except Exception as exc:  # shown on the page instead
            return f"data {value or '(default synthetic)'} unavailable: {short(exc, 100)}"
        if key not in self.sets:
            try:
                self.sets[key] = held_out(Path(key), self.n, self.statmorph)
            except Exception as exc:  # shown on the page instead
                self.sets[key] = f"data {key} unavailable: {short(exc, 100)}"
        return self.sets[key]

    def reference(self, data: SweepData) -> tuple[np.ndarray, list[str]]:
        """The galaxies every trial reconstructs: held-out ones of the first trial whose data can be read."""
        notes = []
        values = data.trials["data"].tolist() if "data" in data.trials.columns else []
        for value in dict.fromkeys(v for v in values if isinstance(v, str)):
            held = self.get(value)
            if isinstance(held, HeldOut):
                return held.images[:N_RECON], notes
            notes.append(held)
        return np.zeros((0, 64, 64, 3), np.uint8), notes


def trial_outputs(row, inputs: np.ndarray, heldouts: HeldOutSets) -> TrialOutputs:
    """Load a trial's checkpoint once and draw samples, reconstructions and the latent of held-out galaxies."""
    from galaxygen.checkpoint import load_model

    out = TrialOutputs()
    if not isinstance(row.checkpoint, str):
        out.reasons = dict.fromkeys(("samples", "recon", "latent"), why_missing(row))
        return out
    try:
        model, config = load_model(row.checkpoint)
    except Exception as exc:  # an unreadable checkpoint is reported, not fatal
        out.reasons = dict.fromkeys(("samples", "recon", "latent"), f"checkpoint unreadable: {short(exc, 80)}")
        return out
    try:
        with torch.no_grad():
            model_outputs(out, model, config, row, inputs, heldouts)
    except Exception as exc:  # a model that cannot sample or encode is reported, not fatal
        log.exception("trial %s: drawing from its checkpoint failed", row.trial_id)
        text = f"failed: {short(f'{type(exc).__name__}: {exc}', 80)}"
        out.reasons = {part: out.reasons.get(part, text) for part in ("samples", "recon", "latent")}
    return out


def model_outputs(out: TrialOutputs, model, config, row, inputs: np.ndarray, heldouts: HeldOutSets) -> None:
    """Fill `out` with samples from the family's default latent (a VAE's fitted prior), reconstructions of
    `inputs` and the latent of held-out galaxies."""
    family = MODELS[config.model].family
    out.latent_name = family.latents[0]
    samples = to_images(generate(model, max(N_SAMPLES, N_COLOUR), out.latent_name, SEED))
    out.samples, out.sample_colour = samples[:N_SAMPLES], colours(samples[:N_COLOUR] * 255)
    if not hasattr(model, "encode"):
        out.reasons["recon"] = out.reasons["latent"] = f"{family.kind}: no encoder"
        return
    if len(inputs):
        out.recon = to_images(model.reconstruct(to_tensor(inputs, config.image_size)))
    else:
        out.reasons["recon"] = "no held-out galaxies"
    value = getattr(row, "data", None)
    held = heldouts.get(value if isinstance(value, str) and value else config.data)
    if isinstance(held, str):
        out.reasons["latent"] = held
        return
    recon = model.reconstruct(to_tensor(held.images[:N_COLOUR], config.image_size))
    out.recon_colour = colours(to_images(recon) * 255)
    mu, _ = model.encode(to_tensor(held.images, config.image_size))
    out.latent, out.held = project(mu.float().numpy()), held
