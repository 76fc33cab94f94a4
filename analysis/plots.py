"""Matplotlib (Agg) drawing of the sweep figures: loss curves, sample quality, image grids, latent scatters."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from analysis.tables import SweepData, final_values, sort_key  # noqa: E402
from galaxygen.evaluate import METRICS, base_metric, direction  # noqa: E402
from galaxygen.evaluate.morphology import scaled_distance  # noqa: E402

DPI = 110
plt.rcParams.update({"font.size": 9, "axes.titlesize": 9, "legend.fontsize": 8, "figure.dpi": DPI})


def save(fig: plt.Figure, out: Path, name: str) -> Path:
    """Write `name`.png and `name`.pdf into `out`, close the figure, return the PNG path."""
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{name}.png"
    fig.savefig(png, dpi=DPI, bbox_inches="tight")
    fig.savefig(out / f"{name}.pdf", bbox_inches="tight")
    plt.close(fig)
    return png


def trial_colors(data: SweepData) -> dict[str, str]:
    """One colour per trial: ordered along viridis when one numeric key is swept, else a qualitative map."""
    uids = data.trials["uid"].tolist()
    n = max(1, len(uids))
    numeric = len(data.keys) == 1 and all(sort_key(v)[0] == 0 for v in data.trials.get(data.keys[0], []))
    if numeric or n > 10:
        cmap = plt.get_cmap("viridis")
        return {u: to_hex(cmap(0.9 * i / max(1, n - 1))) for i, u in enumerate(uids)}
    cmap = plt.get_cmap("tab10")
    return {u: to_hex(cmap(i % 10)) for i, u in enumerate(uids)}


def wrap(text: str, width: int = 28) -> str:
    return "\n".join(textwrap.wrap(str(text), width)) or str(text)


def missing_handles(data: SweepData, present: set[str], colors: dict[str, str], metric: str) -> list[Line2D]:
    """Legend entries (not drawn on the axes) for trials without this metric, saying why."""
    handles = []
    for row in data.trials.itertuples():
        if row.uid not in present:
            text = f"{row.label} ({row.status}, no {metric} recorded)"
            handles.append(Line2D([], [], color=colors[row.uid], ls=":", label=text))
    return handles


def tagged(row) -> str:
    """The trial's label, with its status when it did not complete."""
    return row.label if row.status == "completed" else f"{row.label} [{row.status}]"


def auto_log(ax: plt.Axes) -> None:
    """Log y-axis when the plotted positive values span more than a factor of 30."""
    values = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()] or [[]])
    values = values[np.isfinite(values)]
    if len(values) and values.min() > 0 and values.max() / values.min() > 30:
        ax.set_yscale("log")


def legend_outside(ax: plt.Axes, extra: list[Line2D] | None = None, title: str | None = None) -> None:
    handles, labels = ax.get_legend_handles_labels()
    handles += extra or []
    labels += [h.get_label() for h in extra or []]
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  frameon=False, title=title)


def epoch_curves(data: SweepData, metric: str, unit: str, title: str) -> plt.Figure | None:
    """Training (top) and held-out (bottom) `metric` against epoch, one line per trial, final value in the legend."""
    colors = trial_colors(data)
    fig, axes = plt.subplots(2, 1, figsize=(8.5, 6.4), sharex=True, layout="constrained")
    present: set[str] = set()
    for ax, split, name in zip(axes, ("train", "val"), ("training", "held-out")):
        for row in data.trials.itertuples():
            rows = data.metric(row.uid, split, metric)
            if rows.empty:
                continue
            rows = rows.drop_duplicates("epoch", keep="last")
            present.add(row.uid)
            final = rows["value"].iloc[-1]
            ax.plot(rows["epoch"], rows["value"], marker="o", ms=3, color=colors[row.uid],
                    label=f"{tagged(row)} (final {final:.4g})")
        auto_log(ax)
        ax.set_title(f"{name} {title}")
        ax.set_ylabel(f"{name} {title} [{unit}]")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if not present:
        plt.close(fig)
        return None
    axes[1].set_xlabel("epoch")
    for ax in axes:
        legend_outside(ax, missing_handles(data, present, colors, metric), title=data.legend_title)
    return fig


def fractional_epoch(steps: pd.Series, epoch_ends: pd.Series) -> np.ndarray:
    """Global steps as epochs elapsed, from the steps at which epochs ended (else the last step seen)."""
    ends = np.sort(epoch_ends.dropna().unique())
    if len(ends) >= 2:
        per_epoch = float(np.median(np.diff(ends)))
    elif len(ends) == 1:
        per_epoch = float(ends[0])
    else:
        per_epoch = float(steps.max())
    return steps.to_numpy(dtype=float) / max(per_epoch, 1.0)


def within_epoch(data: SweepData) -> plt.Figure | None:
    """Held-out loss on a fixed batch every few steps (the report's Figures 13-14), one line per trial."""
    colors = trial_colors(data)
    fig, ax = plt.subplots(figsize=(8, 3.8), layout="constrained")
    present: set[str] = set()
    for row in data.trials.itertuples():
        rows = data.metric(row.uid, "val", "loss_step")
        if rows.empty:
            continue
        present.add(row.uid)
        ends = data.metric(row.uid, "train", "loss")["step"]
        x = fractional_epoch(rows["step"], ends)
        ax.plot(x, rows["value"], lw=1.2, color=colors[row.uid],
                label=f"{tagged(row)} (last {rows['value'].iloc[-1]:.4g})")
    if not present:
        plt.close(fig)
        return None
    auto_log(ax)
    ax.set_xlabel("training progress [epochs]")
    ax.set_ylabel("held-out loss [nats/image]")
    ax.set_title("held-out loss within epochs (fixed held-out batch)")
    ax.grid(alpha=0.3)
    legend_outside(ax, missing_handles(data, present, colors, "held-out loss_step"),
                   title=data.legend_title)
    return fig


def gan_curves(data: SweepData) -> plt.Figure | None:
    """Discriminator and generator losses of GAN trials against epoch."""
    colors = trial_colors(data)
    fig, ax = plt.subplots(figsize=(8, 3.8), layout="constrained")
    drawn = False
    for row in data.trials.itertuples():
        for metric, ls in (("loss_d", "-"), ("loss_g", "--")):
            rows = data.metric(row.uid, "train", metric).drop_duplicates("epoch", keep="last")
            if rows.empty:
                continue
            drawn = True
            ax.plot(rows["epoch"], rows["value"], ls=ls, marker="o", ms=3, color=colors[row.uid],
                    label=f"{row.label} {metric} (final {rows['value'].iloc[-1]:.4g})")
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel("GAN loss [nats/image]")
    ax.set_title("GAN training losses (solid: discriminator, dashed: generator)")
    ax.grid(alpha=0.3)
    legend_outside(ax)
    return fig


EVAL_BASELINES = {"real_vs_real": ("real vs real", "#1b9e3a", "--"),
                  "one_image": ("one-image generator", "#c0392b", ":")}
GOALS = {"lower": "lower is better", "higher": "higher is better", "one": "1 is ideal"}


def dataset_name(path: str) -> str:
    return Path(path).name if path else "synthetic (default)"


def eval_baselines(data: SweepData) -> pd.DataFrame:
    """The evaluation's stored baselines (splits eval_real_vs_real, eval_one_image): the latest value per
    data set, baseline and metric, as columns data, baseline, metric, value."""
    m = data.metrics
    rows = m[m["split"].str.startswith("eval_")]
    if rows.empty:
        return pd.DataFrame(columns=["data", "baseline", "metric", "value"])
    datasets = data.trials.set_index("uid")["data"] if "data" in data.trials.columns else pd.Series(dtype=object)
    rows = rows.assign(data=rows["uid"].map(datasets).fillna("").astype(str),
                       baseline=rows["split"].str.removeprefix("eval_"))
    rows = rows.sort_values(["epoch", "wall_time"]).drop_duplicates(["data", "baseline", "metric"], keep="last")
    return rows[["data", "baseline", "metric", "value"]].reset_index(drop=True)


def eval_metric_order(names) -> list[str]:
    """Sample-quality metric names in galaxygen.evaluate's order (headline scores first), without 'info' ones."""
    order = [k.removesuffix("*") for k in METRICS]
    first = ("morph_score", "fid_domain", "kid_domain")

    def key(name: str):
        rank = next((i for i, k in enumerate(order) if name == k or (k.endswith("_") and name.startswith(k))),
                    len(order))
        return (name not in first, first.index(name) if name in first else rank, name)

    return sorted((n for n in names if direction(n) != "info"), key=key)


def goal(name: str) -> str:
    return GOALS.get(direction(name), "")


def eval_metrics(data: SweepData) -> plt.Figure | None:
    """One panel per sample-quality metric (split `eval`): one point per evaluated trial (filled: samples from
    the family's default latent, a VAE's fitted prior; hollow: the same metric from another latent, e.g. a VAE's
    N(0, I) as `<metric>_prior`), the real-vs-real and one-image baselines of its data set as labelled
    horizontal lines; None when no trial has eval rows."""
    finals = final_values(data.metrics[data.metrics["split"] == "eval"])
    columns = [c.removeprefix("eval_") for c in finals.columns]
    names = eval_metric_order([c for c in columns if not base_metric(c)[1]])
    variants = {c: base_metric(c) for c in columns if base_metric(c)[1]}
    present = {u for u in finals.index if finals.loc[u].notna().any()}
    trials = [row for row in data.trials.itertuples() if row.uid in present]
    if not names or not trials:
        return None
    colors = trial_colors(data)
    base = eval_baselines(data)
    several = base["data"].nunique() > 1
    fig, axes = panel_grid(len(names), 2.7, 2.3, max_cols=4)
    lines: dict[str, Line2D] = {}
    for ax, name in zip(axes, names):
        ax.set_gid(f"eval:{name}")
        values: list[float] = []
        for column, latent in [(name, ""), *((c, lat) for c, (b, lat) in variants.items() if b == name)]:
            points = [(i, float(finals[f"eval_{column}"].get(row.uid, np.nan)), colors[row.uid])
                      for i, row in enumerate(trials, 1)]
            points = [p for p in points if np.isfinite(p[1])]
            if points:
                xs, ys, cs = zip(*points)
                style = dict(c=list(cs)) if not latent else dict(facecolors="none", edgecolors=list(cs), linewidths=1.2)
                ax.scatter(xs, ys, s=30, zorder=3, gid=f"points:{latent or 'default'}",
                           **(style | (dict(edgecolors="k", linewidths=0.4) if not latent else {})))
                values += [p[1] for p in points]
        if not values:
            ax.text(0.5, 0.5, "not measured\n(no finite value)", ha="center", va="center", fontsize=7, color="#a00",
                    transform=ax.transAxes)
        to_line = blended_transform_factory(ax.transAxes, ax.transData)
        for row in base[base["metric"] == name].itertuples():
            text, color, ls = EVAL_BASELINES.get(row.baseline, (row.baseline.replace("_", " "), "#555", "-."))
            label = f"{text} ({dataset_name(row.data)})" if several else text
            lines[label] = ax.axhline(row.value, color=color, ls=ls, lw=1.2, label=label,
                                      gid=f"baseline:{row.baseline}:{row.data}")
            ax.text(0.99, row.value, f"{label} {row.value:.3g}", transform=to_line, ha="right", va="bottom",
                    fontsize=6, color=color)
            values.append(float(row.value))
        finite = np.asarray(values, dtype=float)
        finite = finite[np.isfinite(finite)]
        if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 30:
            ax.set_yscale("log")
        ax.margins(y=0.15)
        ax.set_xlabel("trial", fontsize=7)
        ax.set_title(f"{name}\n({goal(name)})" if goal(name) else name, fontsize=8)
        ax.set_xticks(range(1, len(trials) + 1))
        ax.set_xlim(0.4, len(trials) + 0.6)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    n_eval = finals["eval_eval_n"] if "eval_eval_n" in finals.columns else pd.Series(dtype=float)
    handles = []
    for i, row in enumerate(trials, 1):
        n = n_eval.get(row.uid, np.nan)
        suffix = f" (n={int(n)})" if np.isfinite(n) else ""
        handles.append(Line2D([], [], color=colors[row.uid], marker="o", ls="", mec="k", mew=0.4,
                              label=f"{i}: {tagged(row)}{suffix}"))
    handles += [Line2D([], [], color="#555", marker="o", ls="", mfc="none", label=f"hollow: latent {latent}")
                for latent in sorted({lat for _, lat in variants.values()})]
    handles += [Line2D([], [], color=line.get_color(), ls=line.get_linestyle(), label=label)
                for label, line in lines.items()]
    handles += missing_handles(data, present, colors, "eval metrics")
    fig.legend(handles=handles, loc="outside right upper", frameon=False, title=data.legend_title)
    fig.suptitle("sample quality of each trial against the baselines")
    return fig


def montage(images: np.ndarray, cols: int) -> np.ndarray:
    """(N, S, S, 3) images in [0, 1] tiled row by row into one image, with a 1-pixel white gutter."""
    n, s = len(images), images.shape[1]
    rows = math.ceil(n / cols)
    out = np.ones((rows * (s + 1) - 1, cols * (s + 1) - 1, 3), dtype=np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[r * (s + 1): r * (s + 1) + s, c * (s + 1): c * (s + 1) + s] = img
    return out


def placeholder(ax: plt.Axes, text: str, shape: tuple[int, ...] | None = None) -> None:
    """An empty panel (of an image's shape when given) that says why it is empty."""
    ax.set_facecolor("#f3f3f3")
    if shape is not None:
        ax.imshow(np.full(shape, 0.95, dtype=np.float32), vmin=0, vmax=1)
    width = 16 if shape and shape[0] > 2 * shape[1] else 30
    ax.text(0.5, 0.5, wrap(text, width), ha="center", va="center", fontsize=8, color="#a00", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def panel_grid(n: int, width: float, height: float, max_cols: int = 3) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = max(1, min(n, max_cols))
    rows = max(1, math.ceil(n / cols))
    size = (cols * width, rows * height)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def sample_grid(data: SweepData, samples: dict[str, np.ndarray | None], reasons: dict[str, str],
                source: str) -> plt.Figure:
    """32 samples per trial (4 x 8), one panel per trial in swept-value order (Figures 9, 15); `source` says
    what they were decoded from."""
    fig, axes = panel_grid(len(data.trials), 4.4, 2.7)
    shape = next((montage(v, 8).shape for v in samples.values() if v is not None), None)
    for ax, row in zip(axes, data.trials.itertuples()):
        images = samples.get(row.uid)
        ax.set_title(wrap(row.label, 48))
        if images is None:
            placeholder(ax, reasons.get(row.uid, "no samples"), shape)
            continue
        ax.imshow(montage(images, 8), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(wrap(f"samples, best checkpoint of each trial: {source}", 110))
    return fig


def recon_pairs(data: SweepData, inputs: np.ndarray, recons: dict[str, np.ndarray | None],
                reasons: dict[str, str]) -> plt.Figure:
    """Held-out inputs (first column) and each trial's reconstruction decode(mu) (Figure 5)."""
    n = len(data.trials) + 1
    fig, axes = plt.subplots(1, n, figsize=(1.25 * n + 0.5, 1.25 * len(inputs) + 0.8), squeeze=False,
                             layout="constrained")
    axes = axes[0]
    first = montage(inputs.astype(np.float32) / 255.0, 1)
    axes[0].imshow(first, interpolation="nearest")
    axes[0].set_title("input\n(held-out)")
    for ax, row in zip(axes[1:], data.trials.itertuples()):
        ax.set_title(wrap(row.label, 14), fontsize=7)
        images = recons.get(row.uid)
        if images is None:
            placeholder(ax, reasons.get(row.uid, "no reconstruction"), first.shape)
            continue
        ax.imshow(montage(images, 1), interpolation="nearest")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("reconstructions of held-out galaxies (decoder of the posterior mean)")
    return fig


def latent_axes_labels(projection: str, explained: tuple[float, float] | None) -> tuple[str, str]:
    if projection == "pca" and explained:
        return (f"PC1 of posterior means ({100 * explained[0]:.1f}% var.)",
                f"PC2 of posterior means ({100 * explained[1]:.1f}% var.)")
    return "z1 (posterior mean)", "z2 (posterior mean)"


def scatter(ax: plt.Axes, xy: np.ndarray, values: pd.Series, name: str, vmin=None, vmax=None):
    """Scatter coloured by a continuous or a categorical column; returns the mappable (None if categorical)."""
    if values.dtype == object or isinstance(values.dtype, pd.StringDtype) or values.dtype.kind in "OSUb":
        cats = sorted(values.astype(str).unique())
        cmap = plt.get_cmap("tab10")
        for i, cat in enumerate(cats):
            mask = (values.astype(str) == cat).to_numpy()
            ax.scatter(xy[mask, 0], xy[mask, 1], s=9, color=cmap(i % 10), label=cat, alpha=0.8, lw=0)
        ax.legend(title=name, loc="best", fontsize=7, title_fontsize=7, framealpha=0.7, markerscale=1.5)
        return None
    v = values.to_numpy(dtype=float)
    ok = np.isfinite(v)
    if (~ok).any():
        ax.scatter(xy[~ok, 0], xy[~ok, 1], s=7, color="#bbb", lw=0, label="not measured")
    return ax.scatter(xy[ok, 0], xy[ok, 1], c=v[ok], s=9, cmap="plasma", vmin=vmin, vmax=vmax, lw=0)


def latent_trials(data: SweepData, latents: dict[str, tuple[np.ndarray, str, tuple | None] | None],
                  colour: dict[str, pd.Series], reasons: dict[str, str], name: str) -> plt.Figure:
    """Posterior means of held-out galaxies (2-D), one panel per trial, coloured by `name` (Figure 17)."""
    fig, axes = panel_grid(len(data.trials), 3.6, 3.2)
    values = pd.concat([v for v in colour.values() if v is not None]) if colour else pd.Series(dtype=float)
    finite = values.to_numpy(dtype=float)[np.isfinite(values.to_numpy(dtype=float))] if len(values) else []
    vmin, vmax = (np.percentile(finite, [2, 98]) if len(finite) else (None, None))
    mappable = None
    for ax, row in zip(axes, data.trials.itertuples()):
        ax.set_title(wrap(row.label, 40))
        entry = latents.get(row.uid)
        if entry is None:
            placeholder(ax, reasons.get(row.uid, "no latent space"))
            continue
        xy, projection, explained = entry
        mappable = scatter(ax, xy, colour[row.uid], name, vmin, vmax) or mappable
        xl, yl = latent_axes_labels(projection, explained)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.locator_params(nbins=4)
        ax.grid(alpha=0.2)
    if mappable is not None:
        fig.colorbar(mappable, ax=axes, shrink=0.8, label=name)
    fig.suptitle(f"latent space of held-out galaxies, coloured by {name}")
    return fig


def latent_indices(label: str, xy: np.ndarray, projection: str, explained: tuple | None,
                   columns: dict[str, pd.Series]) -> plt.Figure:
    """One trial's latent scatter, one panel per morphology index or ground-truth column."""
    fig, axes = panel_grid(len(columns), 3.9, 3.2, max_cols=2)
    xl, yl = latent_axes_labels(projection, explained)
    for ax, (name, values) in zip(axes, columns.items()):
        mappable = scatter(ax, xy, values, name)
        if mappable is not None:
            fig.colorbar(mappable, ax=ax)
        ax.set_title(name)
        ax.locator_params(nbins=4)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.2)
    fig.suptitle(wrap(f"latent space of held-out galaxies, best trial: {label}", 90))
    return fig


COLOUR_LABEL = "colour index -2.5 log10(F_blue / F_red) (redder: larger)"


def colour_figure(data: SweepData, real: np.ndarray, samples: dict[str, np.ndarray | None],
                  best: tuple[str, np.ndarray, np.ndarray] | None) -> plt.Figure | None:
    """Colour of real vs generated galaxies: the colour index of held-out galaxies (grey) against each trial's
    samples, with their distance in units of the real spread (as the evaluation's colour_w); and, for the best
    trial (`best` = label, real colours, colours of their reconstructions), reconstruction against input."""
    real = real[np.isfinite(real)]
    drawn = {u: v[np.isfinite(v)] for u, v in samples.items() if v is not None and np.isfinite(v).sum() >= 3}
    if len(real) < 3 or not drawn:
        return None
    colors = trial_colors(data)
    fig, axes = plt.subplots(1, 2 if best else 1, figsize=(11 if best else 7, 3.8), squeeze=False,
                             layout="constrained")
    ax = axes[0][0]
    values = np.concatenate([real, *drawn.values()])
    bins = np.linspace(*np.percentile(values, [1, 99]), 30)
    ax.hist(real, bins=bins, density=True, color="#bbb", label=f"real held-out (n={len(real)})", gid="colour:real")
    for row in data.trials.itertuples():
        if row.uid in drawn:
            w = scaled_distance(drawn[row.uid], real)
            ax.hist(np.clip(drawn[row.uid], bins[0], bins[-1]), bins=bins, density=True, histtype="step", lw=1.5,
                    color=colors[row.uid], label=f"{tagged(row)} (W/spread {w:.2f})", gid=f"colour:{row.uid}")
    ax.set_xlabel(COLOUR_LABEL)
    ax.set_ylabel("density")
    ax.set_title("samples against real galaxies")
    legend_outside(ax, title=data.legend_title)
    if best:
        label, truth, recon = best
        ax = axes[0][1]
        ok = np.isfinite(truth) & np.isfinite(recon)
        ax.scatter(truth[ok], recon[ok], s=10, color="#246", gid="colour:recon")
        lo, hi = np.percentile(np.concatenate([truth[ok], recon[ok]]), [0, 100]) if ok.any() else (0, 1)
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--", label="reconstruction = input")
        ax.set_xlabel("input colour (held-out galaxy)")
        ax.set_ylabel("colour of its reconstruction")
        slope = np.polyfit(truth[ok], recon[ok], 1)[0] if ok.sum() >= 3 else float("nan")
        ax.set_title(wrap(f"reconstructions, best trial {label} (slope {slope:.2f}; 1 keeps colour, 0 loses it)", 60))
        ax.legend(loc="upper left", frameon=False)
        ax.grid(alpha=0.3)
    fig.suptitle("colour of real and generated galaxies (over each galaxy's segment, sky subtracted per channel)")
    return fig
