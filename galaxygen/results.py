"""The Parquet results store of a sweep.

Layout under RESULTS/SWEEP/:

    trials/<trial_id>.parquet          one row: trial_id, sweep, config_hash, the flattened config,
                                       status, error, job_id, start_time, end_time, epochs_done
    metrics/<trial_id>/<part>.parquet  long format: sweep, trial_id, step, epoch, split, metric, value, wall_time
                                       (part = epoch-00003 for epoch 3, or eval); rewriting a part replaces it,
                                       so a resumed epoch never duplicates rows
    runs/<trial_id>/                   config.json, checkpoints/, tb/ (TensorBoard events), logs

Every file is written to a hidden temporary name and renamed into place, so readers (pandas,
pyarrow.dataset, duckdb) never see a partial file, and a killed writer leaves only a hidden
temporary that readers ignore. One writer per trial (rank 0).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

METRIC_SCHEMA = pa.schema(
    [
        ("sweep", pa.string()),
        ("trial_id", pa.string()),
        ("step", pa.int64()),
        ("epoch", pa.int64()),
        ("split", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("wall_time", pa.float64()),
    ]
)
STATUSES = ("pending", "running", "completed", "failed", "stopped")


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a hidden temporary path beside `path` to write to; then fsync it and rename it over `path`.

    Readers see the old file or the new one, never a partial one; a writer killed mid-write leaves only
    a hidden temporary, which pyarrow.dataset and ResultsStore skip. `suffix` keeps writers that append
    their own extension (np.save, np.savez) on the temporary name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}{suffix}"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_parquet(table: pa.Table | pd.DataFrame, path: Path) -> None:
    """Write a Parquet file atomically (see `atomic_path`)."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def atomic_write_json(obj, path: Path) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


class ResultsStore:
    """The results of one sweep: RESULTS/SWEEP."""

    def __init__(self, root: str | os.PathLike, sweep: str):
        self.root = Path(root)
        self.sweep = sweep
        self.dir = self.root / sweep

    def run_dir(self, trial_id: str) -> Path:
        return self.dir / "runs" / trial_id

    def trial_path(self, trial_id: str) -> Path:
        return self.dir / "trials" / f"{trial_id}.parquet"

    def write_trial(self, trial_id: str, **fields) -> dict:
        """Create or update a trial's row (fields are merged into the existing row)."""
        row = self.read_trial(trial_id) or {"trial_id": trial_id, "sweep": self.sweep, "error": None, "job_id": None}
        row.update(fields)
        row["updated_time"] = time.time()
        if row.get("status") not in STATUSES:
            raise ValueError(f"trial status must be one of {STATUSES}, got {row.get('status')!r}")
        atomic_write_parquet(pd.DataFrame([row]), self.trial_path(trial_id))
        return row

    def read_trial(self, trial_id: str) -> dict | None:
        path = self.trial_path(trial_id)
        if not path.exists():
            return None
        return pd.read_parquet(path).iloc[0].to_dict()

    def write_metrics(self, trial_id: str, part: str, rows: list[dict]) -> None:
        """Write (or replace) one part of a trial's metrics: rows of step, epoch, split, metric, value, wall_time."""
        data = {name: [] for name in METRIC_SCHEMA.names}
        for row in rows:
            full = {"sweep": self.sweep, "trial_id": trial_id, **row}
            for name in METRIC_SCHEMA.names:
                data[name].append(full.get(name))
        table = pa.Table.from_pydict(data, schema=METRIC_SCHEMA)
        atomic_write_parquet(table, self.dir / "metrics" / trial_id / f"{part}.parquet")

    def clear_metrics(self, trial_id: str, after_epoch: int) -> None:
        """Remove epoch parts beyond `after_epoch` (used when a trial restarts from an older checkpoint)."""
        folder = self.dir / "metrics" / trial_id
        for path in folder.glob("epoch-*.parquet"):
            if int(path.stem.split("-")[1]) > after_epoch:
                path.unlink(missing_ok=True)

    def trials(self) -> pd.DataFrame:
        files = sorted((self.dir / "trials").glob("[!.]*.parquet"))
        if not files:
            return pd.DataFrame(columns=["trial_id", "sweep", "status"])
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)

    def metrics(self, trial_id: str | None = None) -> pd.DataFrame:
        folder = self.dir / "metrics" / (trial_id or "")
        if not folder.exists() or not any(folder.rglob("[!.]*.parquet")):
            return METRIC_SCHEMA.empty_table().to_pandas()
        return ds.dataset(folder, format="parquet", schema=METRIC_SCHEMA).to_table().to_pandas()


def load(results_dir: str | os.PathLike, sweep: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trials and metrics of a sweep as DataFrames; the metrics carry the trial's config columns."""
    store = ResultsStore(results_dir, sweep)
    trials = store.trials()
    metrics = store.metrics()
    if len(trials) and len(metrics):
        config_cols = [c for c in trials.columns if c not in metrics.columns or c == "trial_id"]
        metrics = metrics.merge(trials[config_cols], on="trial_id", how="left")
    return trials, metrics


def epoch_report(metrics: pd.DataFrame, epoch: int) -> dict:
    """The per-epoch summary a trial reports to Ray Tune: {"epoch": e, "<split>_<metric>": value, ...}.

    Built from the epoch-level rows (step-level metrics end in `_step` and are left out), so the local
    backend and the SLURM poller report exactly the same thing.
    """
    rows = metrics[(metrics["epoch"] == epoch) & ~metrics["metric"].str.endswith("_step")]
    report = {f"{r.split}_{r.metric}": float(r.value) for r in rows.itertuples()}
    report["epoch"] = int(epoch)
    return report
