"""Sweep overhead of the local backend: sweep wall time over the sum of the trials' own training times.

    python bench/bench_sweep.py [--trials 6] [--epochs 1] [--data CACHE]

Runs `python -m sweeps.launch` as a user would (one trial at a time, so the trials' times add up to
the wall time of an overhead-free sweep; and then two at a time on 2 cores), and times Ray's start-up
alone in the same run. The one-off evaluation preparation (domain encoder, real statistics, baselines;
`galaxygen.evaluate.prepare`, which the launcher calls before Tune) belongs to no trial: it is done and
timed first, so the launcher's own call finds it cached and the sweeps' wall times leave it out.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from galaxygen.data import resolve_cache
from galaxygen.results import ResultsStore
from sweeps.launch import DEFAULT_EVAL_N


def ray_startup() -> float:
    code = ("import time, ray; t = time.perf_counter(); ray.init(num_cpus=2, include_dashboard=False, "
            "logging_level='ERROR'); ray.shutdown(); print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def prepare_evaluation(data: str, n: int) -> float:
    """Seconds of the launcher's one-off evaluation preparation, done here so the timed sweeps find it cached."""
    from galaxygen.evaluate import prepare

    start = time.perf_counter()
    prepare(data, n, workers=os.cpu_count() or 1, progress=False)
    return time.perf_counter() - start


def sweep(data: str, trials: int, epochs: int, concurrent: int, results: Path) -> tuple[float, float]:
    values = ",".join(f"{0.05 + 0.1 * i:.2f}" for i in range(trials))
    cmd = [sys.executable, "-m", "sweeps.launch", "bench", "--backend", "local", "--data", data, "--epochs",
           str(epochs), "--grid", f"dropout={values}", "--max-concurrent", str(concurrent), "--no-figures",
           "--results", str(results)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - start
    rows = ResultsStore(results, "bench").trials()
    return wall, float((rows.end_time - rows.start_time).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--data", default="")
    args = p.parse_args()
    data = str(resolve_cache(args.data))
    print(f"one-off evaluation preparation: {prepare_evaluation(data, DEFAULT_EVAL_N):.1f} s")
    print(f"Ray start-up + shutdown: {ray_startup():.1f} s")
    for concurrent in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            wall, own = sweep(data, args.trials, args.epochs, concurrent, Path(tmp))
        print(f"{args.trials} trials x {args.epochs} epoch, {concurrent} at a time: wall {wall:.1f} s, "
              f"sum of trial times {own:.1f} s, ratio {wall / own:.2f}")


if __name__ == "__main__":
    main()
