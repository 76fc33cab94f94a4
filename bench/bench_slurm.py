"""Benchmark: dispatch overhead of the SLURM backend on the local cluster, against its own training time.

    sudo slurm/local-cluster.sh start
    python bench/bench_slurm.py --trials 4 --epochs 2

Runs one K-trial sweep (`python -m sweeps.launch --backend slurm`, a grid over dropout, tiny blob
data, the report's cnn) and, as the reference in the same run, the same sweep on the local backend.
Reports

  * submit-to-first-metric latency per trial: sbatch -> job's training starts (python start, imports,
    data and model set-up) -> first epoch's metrics written -> first metric reported to Ray Tune;
  * wall time of the SLURM sweep / sum of the trials' training times (train.run's start to end), and
    the same over the ideal wall time sum / concurrency (concurrency = trial jobs the node runs at once);
  * the same sweep's wall time on the local backend, and the SLURM / local ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from galaxygen.data.cache import CacheWriter  # noqa: E402
from galaxygen.results import ResultsStore  # noqa: E402
from galaxygen.splits import split_of  # noqa: E402


def blob_cache(out: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """n soft coloured ellipses on a noisy sky: enough for the loop to train, instant to make."""
    rng = np.random.default_rng(seed)
    writer = CacheWriter(out, n, size)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    for i in range(n):
        q, angle, scale = rng.uniform(0.3, 1), rng.uniform(0, np.pi), rng.uniform(2, 9)
        u = xx * np.cos(angle) + yy * np.sin(angle)
        v = (-xx * np.sin(angle) + yy * np.cos(angle)) / q
        light = np.exp(-np.hypot(u, v) / scale)[..., None] * rng.uniform(0.4, 1, 3) * 240
        writer.images[i] = np.clip(light + rng.normal(6, 3, (size, size, 3)), 0, 255).astype(np.uint8)
    ids = [f"bench-{i:05d}" for i in range(n)]
    catalog = pd.DataFrame({"id": ids, "source": "bench", "split": [split_of(i) for i in ids]})
    return writer.finish(catalog, {"source": "bench blobs", "n": n})


def work_dir(keep: str | None, prefix: str) -> Path | None:
    """The folder for a SLURM benchmark's data and results (`keep`, else a new temporary one), or None (with the
    reason printed) when no SLURM controller answers."""
    if subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
        print("no SLURM controller answers: run `sudo slurm/local-cluster.sh start` first", file=sys.stderr)
        return None
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work


def node_cpus() -> int:
    out = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, check=True)
    return sum(int(c.rstrip("+")) for c in out.stdout.split())


def run_sweep(backend: str, results: Path, cache: Path, args) -> float:
    """Run the launcher; returns its wall time in seconds."""
    values = ",".join(f"{0.05 + 0.4 * i / max(1, args.trials - 1):.3f}" for i in range(args.trials))
    cmd = [sys.executable, "-m", "sweeps.launch", "bench", "--backend", backend, "--data", str(cache),
           "--epochs", str(args.epochs), "--grid", f"dropout={values}", "--set", f"batch_size={args.batch_size}",
           "--set", "log_every=8", "--results", str(results), "--no-figures"]
    if backend == "slurm":
        cmd += ["--slurm-poll-s", str(args.poll_s), "--slurm-squeue-s", "5"]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"the {backend} sweep failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return wall


def latencies(store: ResultsStore) -> pd.DataFrame:
    """Per trial: sbatch time, training start, first metric written and first metric reported."""
    trials = store.trials().set_index("trial_id")
    rows = []
    for path in store.job_records():
        job = json.loads(path.read_text())
        tid = job["trial_id"]
        first = store.metrics(tid)
        first_written = first.loc[first["epoch"] == first["epoch"].min(), "wall_time"].max()
        rows.append({"trial_id": tid, "job_id": job["job_id"], "submitted": job["submitted"],
                     "train_start": trials.loc[tid, "start_time"], "first_written": first_written,
                     "first_reported": job.get("first_report"), "train_end": trials.loc[tid, "end_time"]})
    df = pd.DataFrame(rows).sort_values("submitted")
    df["to_start_s"] = df["train_start"] - df["submitted"]
    df["to_first_metric_s"] = df["first_written"] - df["submitted"]
    df["to_first_report_s"] = df["first_reported"] - df["submitted"]
    df["train_s"] = df["train_end"] - df["train_start"]
    return df


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4, help="K, trials in the sweep (default 4)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial (default 2)")
    p.add_argument("--n", type=int, default=400, help="images in the blob cache (default 400)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--poll-s", type=float, default=1.0, help="the pollers' metric interval (default 1 s)")
    p.add_argument("--no-local", action="store_true", help="skip the local-backend reference sweep")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--keep", help="keep the results in this folder (default: a temporary one, removed)")
    args = p.parse_args()
    work = work_dir(args.keep, "bench-slurm-")
    if work is None:
        return 2
    try:
        cache = blob_cache(work / "cache", args.n)
        slurm_wall = run_sweep("slurm", work / "slurm", cache, args)
        store = ResultsStore(work / "slurm", "bench")
        lat = latencies(store)
        if set(store.trials()["status"]) != {"completed"}:
            sys.exit(f"not every trial completed:\n{store.trials()[['trial_id', 'status', 'error']]}")
        local_wall = None if args.no_local else run_sweep("local", work / "local", cache, args)
        cpus = node_cpus()
        concurrency = min(args.trials, cpus)
        train_sum = float(lat["train_s"].sum())
        figures = {
            "trials": args.trials, "epochs": args.epochs, "node_cpus": cpus, "concurrency": concurrency,
            "slurm_sweep_wall_s": slurm_wall, "sum_train_s": train_sum,
            "wall_over_sum_train": slurm_wall / train_sum,
            "wall_over_ideal": slurm_wall / (train_sum / concurrency),
            "first_trial_submit_to_first_report_s": float(lat["to_first_report_s"].iloc[0]),
            "median_submit_to_train_start_s": float(lat["to_start_s"].median()),
            "median_submit_to_first_metric_s": float(lat["to_first_metric_s"].median()),
            "median_submit_to_first_report_s": float(lat["to_first_report_s"].median()),
            "median_report_lag_s": float(statistics.median(lat["first_reported"] - lat["first_written"])),
            "local_sweep_wall_s": local_wall,
            "slurm_over_local_wall": slurm_wall / local_wall if local_wall else None,
        }
        pd.set_option("display.width", 160)
        print(lat[["trial_id", "job_id", "to_start_s", "to_first_metric_s", "to_first_report_s", "train_s"]]
              .to_string(index=False, float_format=lambda v: f"{v:.1f}"))
        print()
        width = max(map(len, figures))
        for key, value in figures.items():
            print(f"{key:{width}s}  {value:.3f}" if isinstance(value, float) else f"{key:{width}s}  {value}")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
