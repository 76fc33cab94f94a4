"""Benchmark: decode-once `pack` against the report's per-epoch JPEG pipeline, in the same run.

    python bench/bench_pack.py --n 2000

Generates N galaxy-like 424x424 JPEGs (quality 90, smooth profiles plus noise) in a temporary
folder, then measures images/s of

  (a) the naive per-epoch path of the report: full JPEG decode at 424 px -> float tensor ->
      CenterCrop(207) -> Resize(64), in one loop (a DataLoader with 0 workers), with PIL and with
      torchvision.io.decode_jpeg, and the PIL path through a DataLoader with 2 workers;
  (b) `galaxygen.data.pack.pack` with 2 workers (reduced-scale decode, crop, resize, write cache);
  (c) one epoch read from the packed cache as float tensors (what training pays afterwards).

The naive figures are paid every epoch; (b) is paid once.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import decode_jpeg, read_file
from torchvision.transforms import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from galaxygen.data.cache import Cache  # noqa: E402
from galaxygen.data.pack import pack  # noqa: E402

FRAME, CROP, SIZE = 424, 207, 64


def galaxy_template(rng: np.random.Generator) -> np.ndarray:
    """A smooth galaxy-like float image: Sersic-ish bulge + inclined exponential disk + a neighbour."""
    y, x = np.mgrid[:FRAME, :FRAME].astype(np.float32) - FRAME / 2
    angle, axis = rng.uniform(0, np.pi), rng.uniform(0.3, 1.0)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = (-x * np.sin(angle) + y * np.cos(angle)) / axis
    r = np.hypot(u, v)
    bulge = np.exp(-((r / rng.uniform(4, 10)) ** 0.5) * 3)
    disk = 0.5 * np.exp(-r / rng.uniform(15, 40))
    nx, ny = rng.uniform(-150, 150, 2)
    neighbour = 0.4 * np.exp(-np.hypot(x - nx, y - ny) / rng.uniform(2, 6))
    colour = rng.uniform(0.6, 1.0, 3).astype(np.float32)
    return (bulge + disk + neighbour)[:, :, None] * colour * 230


def write_jpeg(task: tuple[Path, int, int]) -> int:
    """Write JPEG number i: template i % 16 plus its own sky noise (mean 6, sigma 3), quality 90."""
    folder, i, seed = task
    templates = galaxy_templates(seed)
    rng = np.random.default_rng((seed, i))
    noise = rng.standard_normal((FRAME, FRAME, 3), dtype=np.float32) * 3 + 6
    frame = np.clip(templates[i % len(templates)] + noise, 0, 255).astype(np.uint8)
    path = folder / f"{100000 + i}.jpg"
    Image.fromarray(frame).save(path, quality=90)
    return path.stat().st_size


@functools.cache
def galaxy_templates(seed: int) -> list[np.ndarray]:
    """16 smooth galaxy templates, the same in every process for one seed."""
    rng = np.random.default_rng(seed)
    return [galaxy_template(rng) for _ in range(16)]


def make_jpegs(folder: Path, n: int, workers: int, seed: int = 0) -> tuple[list[Path], float]:
    """Write n noisy galaxy JPEGs in parallel; returns their paths and mean size in KiB."""
    folder.mkdir(parents=True, exist_ok=True)
    with multiprocessing.Pool(workers) as pool:
        sizes = pool.map(write_jpeg, [(folder, i, seed) for i in range(n)], chunksize=32)
    return [folder / f"{100000 + i}.jpg" for i in range(n)], sum(sizes) / n / 1024


def naive_pil(path: Path) -> torch.Tensor:
    """The report's per-epoch transform with PIL: decode 424 px, ToTensor, CenterCrop, Resize."""
    tensor = F.to_tensor(Image.open(path).convert("RGB"))
    return F.resize(F.center_crop(tensor, [CROP]), [SIZE], antialias=True)


def naive_torchvision(path: Path) -> torch.Tensor:
    """The same with torchvision.io.decode_jpeg."""
    tensor = decode_jpeg(read_file(str(path))).float() / 255
    return F.resize(F.center_crop(tensor, [CROP]), [SIZE], antialias=True)


class NaiveDataset(Dataset):
    """The naive PIL path as a map-style dataset for a multi-worker DataLoader."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return naive_pil(self.paths[i])


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def rate(n: int, fn) -> tuple[float, float]:
    """Wall-clock images per second of fn() processing n images, and CPU milliseconds per image."""
    start, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return n / (time.perf_counter() - start), (cpu_seconds() - cpu) * 1000 / n


def loop(paths: list[Path], transform) -> None:
    """Run a transform over every path in one process."""
    for path in paths:
        transform(path)


def loader(paths: list[Path], workers: int) -> None:
    """Iterate a DataLoader over the naive dataset."""
    for _ in DataLoader(NaiveDataset(paths), batch_size=64, num_workers=workers):
        pass


def read_epoch(cache: Path) -> None:
    """One epoch over a packed cache as float tensors in batches of 256."""
    images = Cache.open(cache).images
    for i in range(0, len(images), 256):
        torch.from_numpy(np.array(images[i : i + 256])).permute(0, 3, 1, 2).float().div_(255)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="number of JPEGs (default 2000)")
    parser.add_argument("--workers", type=int, default=2, help="pack workers and DataLoader workers (default 2)")
    parser.add_argument("--naive-n", type=int, default=None, help="images timed on the naive paths (default all)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads for the naive paths (default 1: fair on a shared machine)")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved rounds, best kept (default 2)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs for the total-time comparison (default 10)")
    args = parser.parse_args()

    torch.set_num_threads(args.torch_threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_pack-"))
    try:
        start = time.perf_counter()
        paths, size_kb = make_jpegs(tmp / "jpegs", args.n, args.workers)
        print(f"generated {args.n} JPEGs 424x424 q90 (mean {size_kb:.0f} KiB) in {time.perf_counter() - start:.1f} s; "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}")
        naive = paths[: args.naive_n or len(paths)]
        loader_name = f"naive PIL, DataLoader {args.workers} workers"
        pack_name = f"pack, {args.workers} workers"
        out = tmp / "cache"
        runs = {
            "naive PIL, 1 loop": (len(naive), lambda: loop(naive, naive_pil)),
            "naive decode_jpeg, 1 loop": (len(naive), lambda: loop(naive, naive_torchvision)),
            loader_name: (len(naive), lambda: loader(naive, args.workers)),
            pack_name: (len(paths), lambda: pack(tmp / "jpegs", out, fmt="folder", crop=CROP, size=SIZE,
                                                 workers=args.workers, force=True)),
            "epoch from packed cache": (len(paths), lambda: read_epoch(out)),
        }
        figures = dict.fromkeys(runs, 0.0)
        cpu_ms = dict.fromkeys(runs, float("inf"))
        for _ in range(args.repeat):  # interleaved rounds, best of each: robust to load from other jobs
            for name, (n, fn) in runs.items():
                wall, cpu = rate(n, fn)
                figures[name], cpu_ms[name] = max(figures[name], wall), min(cpu_ms[name], cpu)
        assert len(Cache.open(out)) == len(paths)
        print(f"\n{'':34s} {'wall images/s':>14s} {'CPU ms/image':>13s}")
        for name, value in figures.items():
            print(f"{name:<34s} {value:14.0f} {cpu_ms[name]:13.3f}")
        best_loop = max(figures["naive PIL, 1 loop"], figures["naive decode_jpeg, 1 loop"])
        best_cpu = min(cpu_ms["naive PIL, 1 loop"], cpu_ms["naive decode_jpeg, 1 loop"])
        print()
        print(f"pack / best naive single loop, wall        {figures[pack_name] / best_loop:6.1f}x  (target >= 10x)")
        print(f"pack / {loader_name + ', wall':<35s} {figures[pack_name] / figures[loader_name]:6.1f}x")
        print(f"naive / pack CPU per image                 {best_cpu / cpu_ms[pack_name]:6.1f}x  "
              f"(idle machine: pack on {args.workers} cores ~ {args.workers * best_cpu / cpu_ms[pack_name]:.1f}x "
              "a single naive loop)")
        epochs = args.epochs
        naive_time = epochs / best_loop
        packed_time = 1 / figures[pack_name] + epochs / figures["epoch from packed cache"]
        print(f"{epochs} epochs, wall: naive single loop / (pack once + {epochs} epochs from cache)"
              f" {naive_time / packed_time:6.1f}x")
        print(f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
