"""A sweep's page for the docs: how far each trial got in its budget and how good its samples are against the
evaluation's baselines, as a markdown table and a figure of every trial's samples.

    python -m analysis.docpage RESULTS/SWEEP [--out docs]

writes OUT/SWEEP.md and OUT/SWEEP_samples.png. For each metric a row shows the fraction of the distance from
the one-image generator (the ceiling: every sample the same real galaxy) to the real-vs-real floor (held-out
galaxies against held-out galaxies) that the trial's samples close: 0 is no better than one galaxy repeated,
1 is as close as real galaxies are to each other.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import pandas as pd

from analysis import plots
from analysis.figures import draw_samples
from analysis.inference import N_RECON, HeldOutSets, trial_outputs
from analysis.tables import (
    AnalysisError,
    SweepData,
    final_values,
    is_missing,
    load_sweep,
    read_sweep_meta,
    to_markdown,
)
from galaxygen.cli import progress_bar
from galaxygen.models import MODELS

log = logging.getLogger(__name__)

HEADLINE = ("fid_domain", "kid_domain", "morph_score", "colour_w")  # lower is better for each
CEILING, FLOOR = "one_image", "real_vs_real"  # the evaluation's baseline splits (eval_<name>)
CLOCKS = {"cpu": "CPU time per torch thread (time spent waiting for a shared core is not counted)",
          "wall": "wall clock (an accelerator's own time)"}


def closed_fraction(value: float, ceiling: float, floor: float) -> float:
    """(ceiling - value) / (ceiling - floor): 0 at the one-image ceiling, 1 at the real-vs-real floor; NaN when
    the ceiling is not above the floor (the metric cannot tell them apart) or a value is missing."""
    if not all(map(math.isfinite, (value, ceiling, floor))) or ceiling <= floor:
        return math.nan
    return (ceiling - value) / (ceiling - floor)


def baselines(data: SweepData) -> dict[str, dict[str, dict[str, float]]]:
    """{data set: {"one_image" | "real_vs_real": {metric: value}}} from the trials' stored eval baselines."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in plots.eval_baselines(data).itertuples():
        out.setdefault(row.data, {}).setdefault(row.baseline, {})[row.metric] = float(row.value)
    return out


def trial_latents(row) -> tuple[str, ...]:
    """The latents a trial's model samples from, its family's default first ("" when the model is unknown)."""
    spec = MODELS.get(str(row.get("model")))
    return spec.family.latents if spec is not None else ("",)


def score_table(data: SweepData) -> pd.DataFrame:
    """One row per trial and latent it was evaluated from: training reached, each headline metric and the
    fraction of the ceiling-to-floor distance it closes, then the two baselines of the trials' data sets."""
    evals = final_values(data.metrics[data.metrics["split"] == "eval"])
    base = baselines(data)
    rows = []
    for _, trial in data.trials.iterrows():
        marks = base.get(str(trial.get("data") or ""), {})
        for i, latent in enumerate(trial_latents(trial)):
            suffix = "" if i == 0 else f"_{latent}"
            values = {m: float(evals.at[trial["uid"], f"eval_{m}{suffix}"])
                      if f"eval_{m}{suffix}" in evals.columns and trial["uid"] in evals.index else math.nan
                      for m in HEADLINE}
            if i > 0 and not any(map(math.isfinite, values.values())):
                continue  # this latent was not evaluated
            row = {"trial": trial["label"], "latent": latent or "—", "status": trial["status"],
                   "epochs": trial.get("epochs_done"), "train_min": minutes(trial.get("train_seconds")),
                   "wall_min": minutes(trial.get("train_wall_seconds"))}
            for metric, value in values.items():
                row[metric] = value
                row[f"{metric}_closed"] = closed_fraction(value, marks.get(CEILING, {}).get(metric, math.nan),
                                                          marks.get(FLOOR, {}).get(metric, math.nan))
            rows.append(row)
    for data_set, marks in base.items():
        for name, status, title in ((CEILING, "ceiling", "one-image generator"), (FLOOR, "floor", "real vs real")):
            row = {"trial": title if len(base) == 1 else f"{title}, {plots.dataset_name(data_set)}", "latent": "",
                   "status": status}
            for metric in HEADLINE:
                row[metric] = marks.get(name, {}).get(metric, math.nan)
                ends = (marks.get(CEILING, {}).get(metric, math.nan), marks.get(FLOOR, {}).get(metric, math.nan))
                row[f"{metric}_closed"] = closed_fraction(row[metric], *ends)
            rows.append(row)
    return pd.DataFrame(rows, columns=["trial", "latent", "status", "epochs", "train_min", "wall_min",
                                       *[c for m in HEADLINE for c in (m, f"{m}_closed")]])


def minutes(seconds) -> float:
    return math.nan if is_missing(seconds) else float(seconds) / 60


def shown(table: pd.DataFrame) -> pd.DataFrame:
    """The table as the page shows it: each metric with its closed fraction in one cell, `12.3 (45%)`."""
    out = table[["trial", "latent", "status", "epochs", "train_min", "wall_min"]].copy()
    out["epochs"] = [("" if is_missing(v) else str(int(v))) for v in out["epochs"]]
    for metric in HEADLINE:
        out[metric] = [("—" if not math.isfinite(v) else f"{v:.3g}" + ("" if not math.isfinite(c) else f" ({c:.0%})"))
                       for v, c in zip(table[metric], table[f"{metric}_closed"])]
    out.columns = ["trial", "latent", "status", "epochs", "train min", "wall min",
                   *[f"{m} (closed)" for m in HEADLINE]]
    return out


def best_lines(table: pd.DataFrame) -> list[str]:
    """Per headline metric, the trial and latent that close the largest fraction of its distance."""
    trials = table[~table["status"].isin(["ceiling", "floor"])]
    lines = []
    for metric in HEADLINE:
        closed = trials[f"{metric}_closed"]
        if not closed.notna().any():
            lines.append(f"- `{metric}`: no trial has a value and baselines that separate")
            continue
        best = trials.loc[closed.idxmax()]
        lines.append(f"- `{metric}`: **{best['trial']}** ({best['latent']} latents) closes {best[f'{metric}_closed']:.0%} "
                     f"of the distance ({best[metric]:.3g}; ceiling {mark(table, 'ceiling', metric)}, "
                     f"floor {mark(table, 'floor', metric)})")
    return lines


def mark(table: pd.DataFrame, status: str, metric: str) -> str:
    """The baseline rows' values of a metric (one per data set), as text."""
    return ", ".join(f"{v:.3g}" for v in table.loc[table["status"] == status, metric])


def budget_text(data: SweepData) -> str:
    trials = data.trials
    budgets = sorted({float(v) for v in trials.get("budget_min", pd.Series(dtype=float)) if not is_missing(v) and v})
    clocks = sorted({str(v) for v in trials.get("budget_clock", pd.Series(dtype=object)) if not is_missing(v)})
    if not budgets:
        epochs = sorted({int(v) for v in trials.get("epochs", pd.Series(dtype=float)) if not is_missing(v)})
        return f"no time budget: {', '.join(map(str, epochs))} epochs per trial"
    clock = "; ".join(CLOCKS.get(c, c) for c in clocks) or "clock not recorded"
    return (f"{', '.join(f'{b:g}' for b in budgets)} minutes of training per trial, measured in {clock}; "
            "a trial stops after the epoch that reaches it, so it may overrun by up to one epoch")


def page(data: SweepData, meta: dict, table: pd.DataFrame, figure: str | None, out: Path) -> str:
    hardware = sorted({str(v) for v in data.trials.get("hardware", pd.Series(dtype=object)) if not is_missing(v)})
    eval_n = data.metrics.loc[(data.metrics["split"] == "eval") & (data.metrics["metric"] == "eval_n"), "value"]
    started = meta.get("started")
    lines = [
        f"# Sweep `{data.title}`: sample quality against the baselines",
        "",
        f"Generated by `python -m analysis.docpage {data.trials['sweep_dir'].iloc[0]} --out {out}` from the sweep's "
        "results"
        + (f" (sweep started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))})." if started else "."),
        "",
        f"- Command: `{meta.get('command', 'not recorded')}`",
        f"- Budget: {budget_text(data)}.",
        f"- Machine: {'; '.join(hardware) or 'not recorded'}.",
        f"- Evaluation: {int(eval_n.max()) if len(eval_n) else 'no'} generated galaxies per trial and latent "
        "against held-out galaxies of the same data (split eval).",
        "",
        "Each metric is followed by the fraction of the distance from the one-image generator (ceiling) to the "
        "real-vs-real floor that the samples close (100% = as close to the held-out galaxies as real galaxies "
        "are; negative = worse than one galaxy repeated). Lower metric values are better. `train min` is the "
        "budget's clock, `wall min` the wall clock of the same epochs (their ratio is the share of a core the "
        "trial got on a shared CPU). VAEs are scored from their fitted latent prior with their "
        "fitted pixel noise around the decoder's mean (`fitted`, the default: images like observed galaxies), "
        "from the same latents without the noise (`noiseless`) and from N(0, I) decoded to the mean (`prior`).",
        "",
        to_markdown(shown(table)),
        "Best trial per metric:",
        "",
        *best_lines(table),
        "",
    ]
    if figure:
        lines += [f"![samples of every trial]({figure})", "",
                  "32 samples per trial from its best checkpoint, same seed; VAEs from their fitted latent prior, with "
                  "their fitted pixel noise.", ""]
    return "\n".join(lines)


def build(sweep_dir: Path, out: Path) -> Path:
    """Write OUT/SWEEP.md and OUT/SWEEP_samples.png for RESULTS/SWEEP; returns the page."""
    data = load_sweep(sweep_dir)
    meta = read_sweep_meta(Path(sweep_dir))
    table = score_table(data)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(sweep_dir).resolve().name
    figure = None
    if data.trials["checkpoint"].notna().any():
        heldouts = HeldOutSets(N_RECON)
        inputs, _ = heldouts.reference(data)
        outputs = {row.uid: trial_outputs(row, inputs, heldouts)
                   for row in progress_bar(list(data.trials.itertuples()), desc="samples", unit="trial")}
        fig = draw_samples(data, outputs)
        if fig is not None:
            figure = f"{name}_samples.png"
            fig.savefig(out / figure, dpi=plots.DPI, bbox_inches="tight")
            plots.plt.close(fig)
    path = out / f"{name}.md"
    path.write_text(page(data, meta, table, figure, out))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.docpage", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="the sweep folder RESULTS/SWEEP")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="output folder (default ./docs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        page_path = build(args.sweep, args.out)
    except AnalysisError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(page_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
