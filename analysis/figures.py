"""Rebuild a sweep's comparison figures, table and report page from its Parquet results and checkpoints.

    python -m analysis.figures RESULTS/SWEEP [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from analysis import plots
from analysis.inference import (
    N_COLOUR,
    N_LATENT,
    N_SAMPLES,
    TRUTH_COLUMNS,
    HeldOutSets,
    TrialOutputs,
    trial_outputs,
)
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
from galaxygen.cli import positive, progress_bar
from galaxygen.results import ResultsStore

log = logging.getLogger(__name__)

FIGURE_NAMES = ("loss_curves", "elbo_curves", "within_epoch_loss", "gan_losses", "eval_metrics", "samples",
                "reconstructions", "colour", "latent_concentration", "latent_best")


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
    for row in progress_bar(list(data.trials.itertuples()), desc="checkpoints", unit="trial"):
        outputs[row.uid] = trial_outputs(row, inputs, heldouts)
    reason = lambda part: {u: o.reasons.get(part, "") for u, o in outputs.items()}
    if not any(o.samples is not None for o in outputs.values()):
        return notes + ["samples, reconstructions and latent space not drawn: no checkpoint could be read"]
    source = sampled_from({o.latent_name for o in outputs.values() if o.samples is not None})
    add(lambda: draw_samples(data, outputs), "samples", "Samples", f"{N_SAMPLES} images per trial from its best "
        f"checkpoint, same seed (report Figures 9, 15); {source}.")
    if not len(inputs):
        return notes + ["reconstructions and latent space not drawn: no held-out galaxies could be read"]
    if any(o.recon is not None for o in outputs.values()):
        add(lambda: plots.recon_pairs(data, inputs, {u: o.recon for u, o in outputs.items()}, reason("recon")),
            "reconstructions", "Reconstructions", "Held-out galaxies (left) and each trial's reconstruction "
            "decode(mu) (report Figure 5).")
    colour_figure(data, outputs, add)
    latent_figures(data, outputs, reason("latent"), add)
    return notes


def draw_samples(data: SweepData, outputs: dict[str, TrialOutputs]):
    """The figure of every trial's samples (a panel each; why, where a trial has none), or None when no trial
    has any."""
    if not any(o.samples is not None for o in outputs.values()):
        return None
    source = sampled_from({o.latent_name for o in outputs.values() if o.samples is not None})
    return plots.sample_grid(data, {u: o.samples for u, o in outputs.items()},
                             {u: o.reasons.get("samples", "") for u, o in outputs.items()}, source)


def colour_figure(data: SweepData, outputs: dict[str, TrialOutputs], add) -> None:
    """Colour index of real held-out galaxies against each trial's samples, and the best trial's
    reconstructions against their inputs."""
    held = next((o.held for o in outputs.values() if o.held is not None), None)
    if held is None:
        return
    best = best_uid(data)
    recon = outputs[best].recon_colour if best in outputs else None
    label = data.trials.set_index("uid").loc[best, "label"] if recon is not None else ""
    add(lambda: plots.colour_figure(data, held.colour, {u: o.sample_colour for u, o in outputs.items()},
                                    (label, held.colour, recon) if recon is not None else None),
        "colour", "Colour of real and generated galaxies",
        f"A g-r-like colour index, -2.5 log10 of the blue over the red channel's sky-subtracted flux summed over "
        f"each galaxy's segment, for {N_COLOUR} held-out galaxies (grey) and {N_COLOUR} samples per trial (same "
        "latents as the sample figure), with their 1-D Wasserstein distance in units of the real spread (the "
        "evaluation's colour_w); right: the best trial's reconstructions against their inputs.", optional=True)


LATENT_CAPTIONS = {
    "fitted": "VAEs decode latents drawn from their fitted latent prior (a Gaussian mixture fitted to the "
              "posterior means of their training galaxies), not from N(0, I), and add sky noise from their fitted "
              "pixel-noise model (the power spectrum of their training residuals)",
    "noiseless": "VAEs decode latents drawn from their fitted latent prior to the decoder's mean, without noise",
    "prior": "generated from z ~ N(0, I)",  # a GAN decodes z, a diffusion model denoises it (x_T)
}


def sampled_from(latents: set[str]) -> str:
    """What the sample figure's images were decoded from, for its caption."""
    return "; ".join(LATENT_CAPTIONS[k] if k != "prior" or len(latents) == 1
                     else "the others start from N(0, I) (a GAN's z, a diffusion model's x_T)"
                     for k in sorted(latents))


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
