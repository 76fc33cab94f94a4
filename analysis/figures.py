"""Rebuild a sweep's comparison figures, table and report page from its Parquet results and checkpoints.

    python -m analysis.figures RESULTS/SWEEP [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from analysis import plots
from analysis.report import FigureEntry, write_report
from analysis.tables import (
    AnalysisError,
    SweepData,
    best_uid,
    comparison_table,
    load_sweep,
    short,
    write_table,
)
from galaxygen.cli import positive
from galaxygen.data.loader import to_float
from galaxygen.results import ResultsStore

log = logging.getLogger(__name__)

N_SAMPLES = 32
N_RECON = 6
N_LATENT = 256
SEED = 0
FIGURE_NAMES = ("loss_curves", "elbo_curves", "within_epoch_loss", "gan_losses", "eval_metrics", "samples",
                "reconstructions", "latent_concentration", "latent_best")
TRUTH_COLUMNS = {"bulge_frac": "bulge fraction (truth)", "ellipticity": "ellipticity (truth)",
                 "class": "class (truth)", "hlr_px": "half-light radius [px] (truth)",
                 "r_half": "half-light radius [px] (truth)"}


@dataclass
class HeldOut:
    """Held-out galaxies of one cache: images (N, S, S, 3) uint8, their catalog rows and a concentration index."""

    images: np.ndarray
    catalog: pd.DataFrame
    concentration_name: str


@dataclass
class TrialOutputs:
    """What a trial's checkpoint produced: prior samples, reconstructions, 2-D latent of held-out galaxies."""

    samples: np.ndarray | None = None
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
    try:
        from galaxygen.evaluate.encoder import artifact_dir
    except ImportError:
        return None
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
    return HeldOut(images, catalog, name)


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


def prior_samples(model: torch.nn.Module, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED)
    try:
        return model.sample(n, generator=gen)
    except TypeError:
        torch.manual_seed(SEED)
        return model.sample(n)


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
    """Fill `out` with prior samples, reconstructions of `inputs` and the latent of held-out galaxies."""
    out.samples = to_images(prior_samples(model, N_SAMPLES))
    if getattr(model, "kind", "vae") != "vae" or not hasattr(model, "encode"):
        out.reasons["recon"] = out.reasons["latent"] = f"{getattr(model, 'kind', 'model')}: no encoder"
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
    mu, _ = model.encode(to_tensor(held.images, config.image_size))
    out.latent, out.held = project(mu.float().numpy()), held


def render(data: SweepData, out: Path, source: str, n_latent: int = N_LATENT, statmorph: bool = False,
           by_sweep: bool = False) -> Path:
    """Every figure, the table (CSV, markdown) and report.html for the trials in `data`; returns the page."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / f"{n}.{ext}" for n in FIGURE_NAMES for ext in ("png", "pdf")] + list(out.glob("baselines.*")):
        stale.unlink(missing_ok=True)
    notes = list(data.notes)
    for row in data.trials.itertuples():
        name = row.label if row.label == str(row.trial_id) else f"{row.label} [{row.trial_id}]"
        if row.status == "failed":
            notes.append(f"trial {name} failed: {short(row.error, 200) or 'no error recorded'}")
        if not isinstance(row.checkpoint, str):
            notes.append(f"trial {name} ({row.status}) has no checkpoint: no samples, reconstructions or latent")
    table = comparison_table(data, by_sweep=by_sweep)
    write_table(table, out)
    figures: list[FigureEntry] = []

    def add(make, name: str, title: str, caption: str, optional: bool = False) -> None:
        """Draw and save one figure; a figure without data or that fails is noted, never fatal."""
        try:
            fig = make()
            if fig is not None:
                figures.append(FigureEntry(name, title, caption, plots.save(fig, out, name)))
            elif not optional:
                notes.append(f"figure '{title}' not drawn: no data for it yet")
        except Exception as exc:  # the report must still be written
            log.exception("figure %s failed", name)
            notes.append(f"figure '{title}' failed: {short(f'{type(exc).__name__}: {exc}', 200)}")
            plots.plt.close("all")

    curve_figures(data, add)
    add(lambda: plots.eval_metrics(data), "eval_metrics", "Sample quality against the baselines",
        "Every sample-quality metric of the end-of-trial evaluation (split eval), one panel each: one point per "
        "evaluated trial (numbered as in the legend), the real-vs-real floor and one-image generator of its data "
        "set as labelled horizontal lines; log scale when the values span more than a factor of 30.",
        optional=True)
    if data.trials["checkpoint"].notna().any():
        notes += checkpoint_figures(data, HeldOutSets(n_latent, statmorph), add)
    else:
        notes.append("samples, reconstructions and latent space not drawn: no trial has a checkpoint yet")
    title = f"Sweep report: {data.title}" if not by_sweep else f"Sweep comparison: {data.title}"
    baselines = baseline_table(data)
    for frame in baselines.values():
        write_table(frame, out, "baselines")
    return write_report(out, title, source, table, figures, notes, baselines)


def curve_figures(data: SweepData, add) -> None:
    """Loss and ELBO against epoch, held-out loss within epochs, GAN losses (from the Parquet metrics)."""
    add(lambda: plots.epoch_curves(data, "loss", "nats/image", "loss"), "loss_curves", "Loss curves",
        "Training and held-out loss (the minimised objective recon + alpha*KL) per epoch, one line per trial "
        "(report Figures 8, 10, 11, 12).")
    add(lambda: plots.epoch_curves(data, "bits_per_dim", "bits/dim", "negative ELBO"), "elbo_curves",
        "Negative ELBO (bits/dim)", "Training and held-out negative ELBO in bits/dim per epoch (alpha = 1, "
        "comparable across settings).")
    add(lambda: plots.within_epoch(data), "within_epoch_loss", "Held-out loss within epochs",
        "Held-out loss on a fixed held-out batch every few steps (report Figures 13, 14).")
    add(lambda: plots.gan_curves(data), "gan_losses", "GAN losses", "Discriminator and generator losses per epoch.",
        optional=True)


def checkpoint_figures(data: SweepData, heldouts: HeldOutSets, add) -> list[str]:
    """Samples, reconstructions and latent-space figures from each trial's checkpoint; returns notes."""
    inputs, notes = heldouts.reference(data)
    outputs: dict[str, TrialOutputs] = {}
    for row in tqdm(list(data.trials.itertuples()), desc="checkpoints", unit="trial", disable=None):
        outputs[row.uid] = trial_outputs(row, inputs, heldouts)
    reason = lambda part: {u: o.reasons.get(part, "") for u, o in outputs.items()}
    if not any(o.samples is not None for o in outputs.values()):
        return notes + ["samples, reconstructions and latent space not drawn: no checkpoint could be read"]
    add(lambda: plots.sample_grid(data, {u: o.samples for u, o in outputs.items()}, reason("samples")), "samples",
        "Samples from the prior", "32 images decoded from z ~ N(0, I) per trial, best checkpoint, same seed "
        "(report Figures 9, 15).")
    if not len(inputs):
        return notes + ["reconstructions and latent space not drawn: no held-out galaxies could be read"]
    if any(o.recon is not None for o in outputs.values()):
        add(lambda: plots.recon_pairs(data, inputs, {u: o.recon for u, o in outputs.items()}, reason("recon")),
            "reconstructions", "Reconstructions", "Held-out galaxies (left) and each trial's reconstruction "
            "decode(mu) (report Figure 5).")
    latent_figures(data, outputs, reason("latent"), add)
    return notes


def latent_figures(data: SweepData, outputs: dict[str, TrialOutputs], reasons: dict, add) -> None:
    """Latent scatter of every trial coloured by concentration, and the best trial by every index."""
    latents = {u: o.latent for u, o in outputs.items()}
    if not any(v is not None for v in latents.values()):
        return
    colour = {u: o.held.catalog["concentration"] for u, o in outputs.items() if o.held is not None}
    name = next(o.held.concentration_name for o in outputs.values() if o.held is not None)
    add(lambda: plots.latent_trials(data, latents, colour, reasons, name), "latent_concentration",
        "Latent space by concentration", f"Posterior means of held-out galaxies (first two latent dims, or PCA "
        f"when the latent has more), coloured by {name}; C = 5 log10(r80/r20), r20 and r80 the radii holding "
        "20% and 80% of the light (report Figure 17).")
    best = best_uid(data)
    if best not in latents or latents[best] is None:
        best = next(u for u, v in latents.items() if v is not None)
    catalog = outputs[best].held.catalog
    columns = {name: catalog["concentration"]}
    columns.update({title: catalog[c] for c, title in TRUTH_COLUMNS.items() if c in catalog.columns})
    label = data.trials.set_index("uid").loc[best, "label"]
    xy, projection, explained = latents[best]
    add(lambda: plots.latent_indices(label, xy, projection, explained, columns), "latent_best",
        "Latent space of the best trial", "The best trial's latent space coloured by the concentration index "
        "and, for synthetic data, by ground-truth bulge fraction, ellipticity and class.")


def baseline_table(data: SweepData) -> dict[str, pd.DataFrame]:
    """The evaluation's per-dataset baselines (splits eval_real_vs_real, eval_one_image), one row per dataset."""
    rows = plots.eval_baselines(data)
    if rows.empty:
        return {}
    table = rows.pivot(index=["data", "baseline"], columns="metric", values="value").reset_index()
    table["data"] = [plots.dataset_name(d) for d in table["data"]]
    return {"Baselines (real vs real, one-image model)": table}


def build(sweep_dir: Path, out: Path | None = None, *, n_latent: int = N_LATENT, statmorph: bool = False) -> Path:
    """Rebuild the figures, table and report.html of RESULTS/SWEEP into `out` (default RESULTS/SWEEP/report)."""
    data = load_sweep(sweep_dir)
    out = Path(out) if out is not None else ResultsStore.from_dir(sweep_dir).report_dir()
    return render(data, out, str(Path(sweep_dir).resolve()), n_latent=n_latent, statmorph=statmorph)


def add_figure_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by analysis.figures and analysis.compare."""
    parser.add_argument("--latent-n", type=positive, default=N_LATENT, help="held-out galaxies in the latent plots")
    parser.add_argument("--statmorph", action="store_true",
                        help="measure the statmorph concentration when the evaluation has not (~0.3 s/galaxy/core)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.figures", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path, help="the sweep folder RESULTS/SWEEP")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RESULTS/SWEEP/report)")
    add_figure_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        page = build(args.sweep, args.out, n_latent=args.latent_n, statmorph=args.statmorph)
    except AnalysisError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
