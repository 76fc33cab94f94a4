"""A sweep's results as the analysis sees them: trials with labels, metrics, swept keys, and the comparison table."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from galaxygen.config import TrainConfig
from galaxygen.results import METRIC_SCHEMA, ResultsStore, load

CONFIG_KEYS = TrainConfig.keys()
METRIC_COLUMNS = list(METRIC_SCHEMA.names)
ELBO_COLUMNS = {
    "train_nelbo_nats": ("train", "nelbo"),
    "train_bits_per_dim": ("train", "bits_per_dim"),
    "val_nelbo_nats": ("val", "nelbo"),
    "val_bits_per_dim": ("val", "bits_per_dim"),
    "val_loss": ("val", "loss"),
}
UNITS = {
    "train_nelbo_nats": "negative ELBO on the training split, nats/image",
    "train_bits_per_dim": "negative ELBO on the training split, bits/dim",
    "val_nelbo_nats": "negative ELBO on the held-out split, nats/image",
    "val_bits_per_dim": "negative ELBO on the held-out split, bits/dim",
    "val_loss": "held-out minimised objective: a VAE's recon + alpha*KL (nats/image), a GAN's loss_d + loss_g, "
                "a diffusion model's denoising MSE per pixel",
    "wall_time_s": "trial wall time, seconds",
}


class AnalysisError(ValueError):
    """The input is not something the analysis can read; the message says what and what is expected."""


@dataclass
class SweepData:
    """Trials (one row each, with `uid`, `label`, `checkpoint`) and long-format metrics of one or more sweeps."""

    title: str
    trials: pd.DataFrame
    metrics: pd.DataFrame
    keys: list[str]
    notes: list[str] = field(default_factory=list)
    legend_title: str = ""

    def __post_init__(self) -> None:
        self.legend_title = self.legend_title or ", ".join(self.keys) or "trial"

    def metric(self, uid: str, split: str, name: str) -> pd.DataFrame:
        """One trial's rows of one metric, sorted by step."""
        m = self.metrics
        rows = m[(m["uid"] == uid) & (m["split"] == split) & (m["metric"] == name)]
        return rows.sort_values(["step", "wall_time"])


def is_sweep_dir(path: Path) -> bool:
    return ResultsStore.from_dir(path).is_sweep()


def read_sweep_meta(sweep_dir: Path) -> dict:
    """The sweep's own metadata (sweep.json) or {} when it is absent or unreadable."""
    path = ResultsStore.from_dir(sweep_dir).meta_path()
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def meta_keys(meta: dict) -> list[str]:
    """The varied config keys named by sweep.json (any of the usual spellings), or []."""
    for name in ("varies", "varied", "varied_keys", "swept", "swept_keys", "keys", "params", "parameters", "search_space"):
        value = meta.get(name)
        if isinstance(value, dict):
            value = list(value)
        if isinstance(value, list | tuple) and value:
            return [str(k) for k in value if str(k) in CONFIG_KEYS]
    return []


def same(a, b) -> bool:
    if is_missing(a) and is_missing(b):
        return True
    if is_missing(a) or is_missing(b):
        return False
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def is_missing(value) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def swept_keys(trials: pd.DataFrame, meta: dict | None = None) -> list[str]:
    """The config keys whose values differ across trials (sweep.json's varied keys first when present)."""
    named = [k for k in meta_keys(meta or {}) if k in trials.columns]
    if named:
        return named
    rows = trials[trials["model"].notna()] if "model" in trials.columns else trials.iloc[0:0]
    keys = []
    for key in CONFIG_KEYS:
        if key not in rows.columns or len(rows) < 2:
            continue
        values = rows[key].tolist()
        if any(not same(values[0], v) for v in values[1:]):
            keys.append(key)
    return keys


def format_value(value) -> str:
    if is_missing(value):
        return "default"
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, float | np.floating):
        value = float(value)
        return str(int(value)) if value.is_integer() and abs(value) < 1e6 else f"{value:g}"
    return str(value)


def label_for(row: pd.Series, keys: list[str]) -> str:
    """`dropout=0.2, lr=0.001` for the swept keys, or the trial id when nothing is swept."""
    if not keys or ("model" in row and is_missing(row.get("model"))):
        return str(row["trial_id"])
    return ", ".join(f"{k}={format_value(row.get(k))}" for k in keys)


def sort_key(value):
    if is_missing(value):
        return (2, 0.0, "")
    if isinstance(value, bool | np.bool_ | int | float | np.integer | np.floating):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def checkpoint_of(sweep_dir: Path, trial_id: str) -> str | None:
    """The trial's best checkpoint, else its last one, else None."""
    store = ResultsStore.from_dir(sweep_dir)
    for kind in ("best", "last"):
        if store.checkpoint(str(trial_id), kind).is_file():
            return str(store.checkpoint(str(trial_id), kind))
    return None


def load_sweep(sweep_dir: str | os.PathLike) -> SweepData:
    """Read RESULTS/SWEEP into a SweepData (labels by swept value, trials sorted by it)."""
    sweep_dir = Path(sweep_dir).resolve()
    if not sweep_dir.is_dir():
        raise AnalysisError(f"{sweep_dir} does not exist: expected a sweep folder RESULTS/SWEEP")
    if not is_sweep_dir(sweep_dir):
        raise AnalysisError(
            f"{sweep_dir} is not a sweep folder: it has no trials/ (expected RESULTS/SWEEP written by sweeps.launch)"
        )
    trials, metrics = load(sweep_dir.parent, sweep_dir.name)
    if trials.empty:
        raise AnalysisError(f"{sweep_dir} has no trials yet (trials/*.parquet is empty)")
    meta = read_sweep_meta(sweep_dir)
    trials = trials.copy()
    trials["sweep"] = str(meta.get("name") or sweep_dir.name)
    trials["sweep_dir"] = str(sweep_dir)
    trials["uid"] = trials["trial_id"].astype(str)
    metrics = metrics[METRIC_COLUMNS].copy()
    metrics["uid"] = metrics["trial_id"].astype(str)
    keys = swept_keys(trials, meta)
    return SweepData(str(meta.get("name") or sweep_dir.name), finish_trials(trials, keys), metrics, keys)


def finish_trials(trials: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Add label and checkpoint columns and sort by swept values."""
    trials = trials.copy()
    if "status" not in trials.columns:
        trials["status"] = "unknown"
    if "error" not in trials.columns:
        trials["error"] = None
    if "label" not in trials.columns:
        trials["label"] = [label_for(row, keys) for _, row in trials.iterrows()]
    trials["checkpoint"] = [checkpoint_of(Path(d), t) for d, t in zip(trials["sweep_dir"], trials["trial_id"])]
    order = sorted(
        range(len(trials)),
        key=lambda i: (
            *[sort_key(trials.iloc[i].get(k)) for k in keys],
            str(trials.iloc[i]["sweep"]),
            str(trials.iloc[i]["trial_id"]),
        ),
    )
    return trials.iloc[order].reset_index(drop=True)


def final_values(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per trial (uid) and `split_metric`, the value at the trial's last epoch with that metric."""
    rows = metrics[~metrics["metric"].str.endswith("_step")]
    if rows.empty:
        return pd.DataFrame(index=pd.Index([], name="uid"))
    rows = rows.sort_values(["epoch", "step", "wall_time"]).drop_duplicates(["uid", "split", "metric"], keep="last")
    rows = rows.assign(column=rows["split"] + "_" + rows["metric"])
    return rows.pivot(index="uid", columns="column", values="value")


def best_uid(data: SweepData) -> str | None:
    """The trial with the lowest final held-out negative ELBO (else held-out loss, else training loss)."""
    finals = final_values(data.metrics)
    for column in ("val_nelbo", "val_loss", "train_nelbo", "train_loss", "train_loss_g"):
        if column in finals.columns and finals[column].notna().any():
            return str(finals[column].idxmin())
    with_ckpt = data.trials[data.trials["checkpoint"].notna()]
    return str(with_ckpt["uid"].iloc[0]) if len(with_ckpt) else None


def short(text, limit: int = 120) -> str:
    if is_missing(text):
        return ""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def comparison_table(data: SweepData, by_sweep: bool = False) -> pd.DataFrame:
    """One row per trial: swept values, status, final train/val ELBO (nats/image, bits/dim), eval metrics."""
    finals = final_values(data.metrics)
    best = best_uid(data)
    out = pd.DataFrame()
    if by_sweep:
        out["sweep"] = data.trials["sweep"].astype(str).to_numpy()
    out["trial_id"] = data.trials["trial_id"].astype(str).to_numpy()
    has_config = data.trials["model"].notna().to_numpy() if "model" in data.trials.columns else [True] * len(out)
    for key in data.keys:
        values = data.trials[key] if key in data.trials.columns else [None] * len(out)
        out[key] = [format_value(v) if ok else "" for v, ok in zip(values, has_config)]
    out["status"] = data.trials["status"].astype(str).to_numpy()
    epochs = data.trials["epochs_done"] if "epochs_done" in data.trials.columns else pd.Series([np.nan] * len(out))
    out["epochs_done"] = pd.to_numeric(epochs, errors="coerce").to_numpy()
    uids = data.trials["uid"].tolist()

    def column(name: str) -> list[float]:
        if name not in finals.columns:
            return [math.nan] * len(uids)
        return [float(finals[name].get(u, math.nan)) for u in uids]

    for out_name, (split, metric) in ELBO_COLUMNS.items():
        out[out_name] = column(f"{split}_{metric}")
    evals = final_values(data.metrics[data.metrics["split"] == "eval"])
    for name in sorted(evals.columns):
        out[name.removeprefix("eval_")] = [float(evals[name].get(u, math.nan)) for u in uids]
    if {"start_time", "end_time"} <= set(data.trials.columns):
        start = pd.to_numeric(data.trials["start_time"], errors="coerce")
        end = pd.to_numeric(data.trials["end_time"], errors="coerce")
        out["wall_time_s"] = (end - start).to_numpy()
    out["checkpoint"] = [Path(c).name if isinstance(c, str) else "none" for c in data.trials["checkpoint"]]
    out["best"] = [u == best for u in uids]
    out["error"] = [short(e) for e in data.trials["error"]]
    return out


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (numbers to 4 significant digits, missing as —)."""
    def cell(v) -> str:
        if isinstance(v, bool | np.bool_):
            return "★" if v else ""
        if is_missing(v):
            return "—"
        if isinstance(v, float | np.floating):
            return f"{float(v):.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_table(df: pd.DataFrame, out: Path, name: str = "table") -> tuple[Path, Path]:
    """Write `name`.csv and `name`.md (with a units legend) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    csv = out / f"{name}.csv"
    md = out / f"{name}.md"
    df.to_csv(csv, index=False)
    legend = "".join(f"- `{k}`: {v}\n" for k, v in UNITS.items() if k in df.columns)
    md.write_text(to_markdown(df) + ("\n" + legend if legend else ""))
    return csv, md


def combine(datas: list[SweepData], best_only: bool = True) -> SweepData:
    """Several sweeps as one SweepData: each sweep's best trial (or all), labelled `sweep: swept values`."""
    trials, metrics, keys, notes = [], [], [], []
    for data in datas:
        chosen = data.trials
        if best_only:
            best = best_uid(data)
            if best is None:
                notes.append(f"sweep {data.title}: no trial with metrics or a checkpoint, left out")
                continue
            chosen = chosen[chosen["uid"] == best]
        chosen = chosen.copy()
        chosen["label"] = [f"{data.title}: {lab}" for lab in chosen["label"]]
        chosen["uid"] = [f"{data.title}/{u}" for u in chosen["uid"]]
        sub = data.metrics[data.metrics["trial_id"].isin(chosen["trial_id"])].copy()
        sub["uid"] = data.title + "/" + sub["uid"].astype(str)
        trials.append(chosen)
        metrics.append(sub)
        keys += [k for k in data.keys if k not in keys]
        notes += [f"{data.title}: {n}" for n in data.notes]
    if not trials:
        raise AnalysisError("none of the sweeps has a trial to compare (no metrics and no checkpoints)")
    title = " vs ".join(d.title for d in datas)
    merged = pd.concat(trials, ignore_index=True)
    return SweepData(title, merged, pd.concat(metrics, ignore_index=True), keys, notes, "sweep: swept values")
