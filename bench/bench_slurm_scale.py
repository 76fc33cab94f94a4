"""Benchmark: how hard a sweep's driver hits the SLURM controller, against the number of trials.

    sudo slurm/local-cluster.sh start
    python bench/bench_slurm_scale.py --trials 10 50

For each trial count K, runs one K-trial sweep (`python -m sweeps.launch --backend slurm`, a grid over the
seed, each trial one epoch of the report's smallest model `mlp1` on 160 tiny blob images: the real training
code, just small, so that 50 jobs fit on 2 cores in a few minutes) with `squeue`, `sbatch` and `scancel`
replaced by counting shims first on PATH (each logs its call and runs the real command; the trial jobs inherit
the PATH, so their own calls count too). The pollers use the defaults (metrics every 5 s, squeue every 30 s).

Reports, per K: the sweep's wall time and each command's calls and calls per minute; then the ratio of
squeue calls per minute at the largest K to the smallest (the reference, measured in the same run). Target:
squeue calls per minute do not grow with K (ratio about 1, a few calls per minute), sbatch = K (each trial
submitted once), no sacct.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_slurm import blob_cache, work_dir  # noqa: E402
from galaxygen.results import ResultsStore  # noqa: E402

COMMANDS = ("squeue", "sbatch", "scancel", "sacct")


def shims(folder: Path) -> dict[str, str]:
    """Counting shims for the SLURM commands in folder; the environment that puts them first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    for command in COMMANDS:
        real = shutil.which(command)
        shim = folder / command
        run = f'exec {real} "$@"' if real else "exit 1"
        shim.write_text(f'#!/bin/sh\necho "$(date +%s.%N) $*" >> {folder / command}.calls\n{run}\n')
        shim.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def calls(folder: Path, command: str) -> list[float]:
    path = folder / f"{command}.calls"
    return [float(line.split()[0]) for line in path.read_text().splitlines()] if path.exists() else []


def run_sweep(trials: int, work: Path, cache: Path, max_concurrent: int) -> dict:
    """One K-trial sweep under counting shims; its wall time and each command's call counts."""
    bin_dir = work / f"bin-{trials}"
    env = shims(bin_dir)
    cmd = [sys.executable, "-m", "sweeps.launch", "scale", "--backend", "slurm", "--data", str(cache),
           "--model", "mlp1", "--epochs", "1", "--grid", "seed=" + ",".join(map(str, range(trials))),
           "--set", "batch_size=16", "--set", "log_every=8", "--eval-n", "0", "--no-figures",
           "--max-concurrent", str(max_concurrent), "--results", str(work / f"results-{trials}")]
    start = time.time()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if out.returncode != 0:
        sys.exit(f"the {trials}-trial sweep failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    store = ResultsStore(work / f"results-{trials}", "scale")
    statuses = store.trials()["status"].value_counts().to_dict()
    figures: dict = {"trials": trials, "wall_s": wall, "statuses": statuses}
    for command in COMMANDS:
        stamps = calls(bin_dir, command)
        figures[f"{command}_calls"] = len(stamps)
        figures[f"{command}_per_min"] = len(stamps) / (wall / 60)
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, nargs="+", default=[10, 50], help="trial counts (default 10 50)")
    p.add_argument("--max-concurrent", type=int, default=16, help="trial jobs in flight at once (default 16)")
    p.add_argument("--n", type=int, default=160, help="images in the blob cache (default 160)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--keep", help="keep the results in this folder (default: a temporary one, removed)")
    args = p.parse_args()
    work = work_dir(args.keep, "bench-slurm-scale-")
    if work is None:
        return 2
    try:
        cache = blob_cache(work / "cache", args.n)
        rows = [run_sweep(k, work, cache, args.max_concurrent) for k in args.trials]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'trials':>6s} {'wall_s':>7s} " + " ".join(f"{c + ' (/min)':>17s}" for c in COMMANDS) + "  statuses")
    for row in rows:
        print(f"{row['trials']:6d} {row['wall_s']:7.0f} " + " ".join(
            f"{row[c + '_calls']:6d} ({row[c + '_per_min']:5.1f})   " for c in COMMANDS) + f"  {row['statuses']}")
    ratio = rows[-1]["squeue_per_min"] / max(rows[0]["squeue_per_min"], 1e-9)
    print(f"\nsqueue calls/min at {rows[-1]['trials']} trials / at {rows[0]['trials']} trials: {ratio:.2f} "
          "(target: about 1, not growing with the trial count)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "squeue_per_min_ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
