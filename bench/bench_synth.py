"""Benchmark the synthetic galaxy renderer: throughput of a 64 px cache and the projected 20k time.

    python bench/bench_synth.py              # 2000 galaxies on 2 workers, then extrapolate
    python bench/bench_synth.py --n 20000    # the real thing

Figures printed, all from this one run:
- reference: one plain GalSim bulge + disk convolved with a Moffat PSF, drawn by FFT at 64 px
  (what a naive renderer does per galaxy and per band), ms per galaxy on one core;
- synth, one process: ms per galaxy per core (CPU time, after warm-up) and its ratio to the reference;
- synth, `--workers` processes: wall time, galaxies/s, CPU ms per galaxy (all processes),
  the projected time for 20,000 galaxies at this wall rate, and on 2 otherwise idle cores.
The machine may be shared: the CPU-time figures are the ones to compare across runs.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import galsim  # noqa: E402
import numpy as np  # noqa: E402

from galaxygen.data.synth import render_cache_image, synthesize  # noqa: E402
from galaxygen.data.synth_model import GZ2_CROP_PX, sample_galaxy  # noqa: E402

TARGET = 20_000


def reference_ms(count: int = 100) -> float:
    """CPU ms per galaxy of a plain GalSim bulge + disk + Moffat PSF FFT draw at 64 px (one band)."""
    rng = np.random.default_rng(0)
    psf = galsim.Moffat(3.0, fwhm=1.4)
    start = time.process_time()
    for _ in range(count):
        hlr = rng.uniform(2, 5)
        bulge = galsim.DeVaucouleurs(half_light_radius=0.3 * hlr, flux=0.3)
        disk = galsim.Exponential(half_light_radius=hlr, flux=0.7).shear(q=rng.uniform(0.3, 1),
                                                                         beta=rng.uniform(0, 180) * galsim.degrees)
        galsim.Convolve(bulge + disk, psf).drawImage(nx=64, ny=64, scale=0.0647 * 2.5 * hlr)
    return (time.process_time() - start) / count * 1e3


def single_process_ms(count: int, size: int, warmup: int = 50) -> float:
    """CPU ms per galaxy of sample_galaxy + render_cache_image in this process, after a warm-up."""
    for i in range(warmup):
        render_cache_image(sample_galaxy(1, i), size)
    start = time.process_time()
    for i in range(warmup, warmup + count):
        render_cache_image(sample_galaxy(1, i), size)
    return (time.process_time() - start) / count * 1e3


def children_cpu() -> float:
    """CPU seconds used by finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="galaxies to render (default 2000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--size", type=int, default=64, help="cache image size (default 64)")
    parser.add_argument("--single", type=int, default=300, help="galaxies for the one-process figure")
    args = parser.parse_args(argv)

    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (shared machines: see CPU figures)")
    ref = reference_ms()
    print(f"reference  plain GalSim bulge+disk+Moffat FFT, 64 px, one band: {ref:.2f} ms/galaxy/core")
    one = single_process_ms(args.single, args.size)
    print(f"synth      one process, g+r+i+RGB, {args.size} px: {one:.2f} ms/galaxy/core "
          f"(x{one / ref:.2f} the reference) -> {TARGET * one / 2e3:.0f} s for 20k on 2 idle cores")

    with tempfile.TemporaryDirectory() as tmp:
        cpu0, wall0 = children_cpu() + time.process_time(), time.perf_counter()
        synthesize(Path(tmp) / "cache", n=args.n, seed=0, size=args.size, workers=args.workers)
        wall = time.perf_counter() - wall0
        cpu = children_cpu() + time.process_time() - cpu0
    rate = args.n / wall
    cpu_ms = cpu / args.n * 1e3
    print(f"synth      {args.n} galaxies, {args.workers} workers: {wall:.1f} s wall, {rate:.0f} galaxies/s, "
          f"{cpu_ms:.2f} CPU ms/galaxy (incl. start-up and writing)")
    print(f"projected  20,000 galaxies: {TARGET / rate:.0f} s at this wall rate; "
          f"{TARGET * cpu_ms / 2e3:.0f} s on 2 idle cores (target < 120 s)")
    print(f"framing    one 64 px pixel = {GZ2_CROP_PX / 64:.2f} GZ2 pixels (central 207 of 424 px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
