"""Built-in synthetic Galaxy-Zoo-like galaxies, rendered with GalSim, as a cache or in the GZ2 layout.

Each galaxy is drawn from (seed, index) alone (see `synth_model`), rendered in g, r, i with a
PSF and sky noise (see `synth_render`) and combined to RGB with an SDSS-like asinh stretch.

- layout="cache": a packed cache (galaxygen.data.cache) of `size` px images framed like a packed
  Galaxy Zoo 2 image (the central 207 of 424 px, resized), rendered directly at that size.
- layout="gz2": the Galaxy Zoo 2 layout (424 px JPEGs under images_gz2/images/<asset_id>.jpg,
  gz2_filename_mapping.csv, a Hart16-like gz2_hart16.csv) plus truth.parquet.

The truth catalog has one row per galaxy: id, source, split, class, bulge_frac, hlr_px (in pixels
of a 64 px cache image), hlr_arcsec, ellipticity (1 - b/a of the dominant component),
position_angle (degrees counter-clockwise from the image's +x axis, y up as displayed),
sersic_n, mag_r, color_gr, n_arms, has_bar, n_neighbours and n_stars (inside the cached field),
and more (axis_ratio, inclination_deg, pitch_deg, dust_lane, merger, r90_arcsec, frame_scale,
psf_fwhm_arcsec).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from galaxygen.cli import progress_bar
from galaxygen.data.cache import CacheWriter, replace_dir
from galaxygen.data.synth_gz2 import asset_id, dr7objid, gz2_tables
from galaxygen.data.synth_model import (
    CLASSES,
    GENERATOR_VERSION,
    GZ2_CROP_PX,
    GZ2_FRAME_PX,
    Galaxy,
    sample_galaxy,
)
from galaxygen.data.synth_render import render, to_rgb
from galaxygen.data.workers import pool as worker_pool
from galaxygen.splits import DEFAULT_FRACTIONS, check_fractions
from galaxygen.staging import remove_stale, temporary

__all__ = ["synthesize", "render_cache_image", "render_gz2_image", "sample_galaxy", "preview_grid", "LAYOUTS"]

log = logging.getLogger(__name__)

LAYOUTS = ("cache", "gz2")
JPEG_QUALITY = 90
IMAGE_DIR = Path("images_gz2") / "images"


def render_cache_image(gal: Galaxy, size: int = 64) -> np.ndarray:
    """(size, size, 3) uint8 image covering the central 207/424 of the galaxy's GZ2 frame."""
    scale = gal.frame_scale * GZ2_CROP_PX / size
    oversample = 2 if size <= 128 else 1
    return to_rgb(render(gal, size, scale, oversample=oversample, margin=max(4, size // 16)))


def render_gz2_image(gal: Galaxy) -> np.ndarray:
    """(424, 424, 3) uint8 image of the galaxy's whole Galaxy Zoo 2 frame."""
    return to_rgb(render(gal, GZ2_FRAME_PX, gal.frame_scale, oversample=1, margin=16))


def render_range(task: tuple) -> tuple[int, np.ndarray | None, list[dict]]:
    """Worker: render galaxies start..stop-1; cache images are returned, GZ2 JPEGs are written to image_dir."""
    seed, start, stop, layout, size, fractions, image_dir = task
    images = np.empty((stop - start, size, size, 3), dtype=np.uint8) if layout == "cache" else None
    rows = []
    for i in range(start, stop):
        gal = sample_galaxy(seed, i, fractions)
        if layout == "cache":
            images[i - start] = render_cache_image(gal, size)
        else:
            Image.fromarray(render_gz2_image(gal)).save(Path(image_dir) / f"{asset_id(i)}.jpg", quality=JPEG_QUALITY)
        rows.append(gal.truth)
    return start, images, rows


def run_tasks(tasks: list[tuple], workers: int, total: int) -> Iterator[tuple[int, np.ndarray | None, list[dict]]]:
    """Run render tasks in a process pool (or in-process for one worker) with a progress bar."""
    with progress_bar(total=total, unit="gal", desc="synth") as bar:
        if workers == 1:
            for task in tasks:
                result = render_range(task)
                bar.update(len(result[2]))
                yield result
            return
        with worker_pool(workers) as pool:
            for result in pool.imap_unordered(render_range, tasks):
                bar.update(len(result[2]))
                yield result


def make_tasks(seed: int, n: int, layout: str, size: int, fractions: tuple, image_dir: str, workers: int) -> list[tuple]:
    """Split 0..n-1 into chunks; results do not depend on the chunking."""
    chunk = max(1, min(128, math.ceil(n / (workers * 8))))
    return [(seed, a, min(a + chunk, n), layout, size, fractions, image_dir) for a in range(0, n, chunk)]


def check_args(n: int, seed: int, layout: str, size: int, workers: int | None) -> int:
    """Validate synthesize's arguments; returns the worker count."""
    if not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be a positive integer (number of galaxies), got {n!r}")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not isinstance(size, int | np.integer) or size < 8:
        raise ValueError(f"size must be an integer of at least 8 pixels, got {size!r}")
    if workers is None:
        workers = os.cpu_count() or 1
    if not isinstance(workers, int | np.integer) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    return int(min(workers, n))


def manifest(n: int, seed: int, layout: str, size: int, fractions: tuple, catalog: pd.DataFrame) -> dict:
    """The manifest of a synthetic set: source, options, counts and (no) skipped files."""
    return {
        "source": "synthetic",
        "options": {"n": n, "seed": seed, "size": size if layout == "cache" else GZ2_FRAME_PX, "layout": layout,
                    "fractions": list(fractions), "generator_version": GENERATOR_VERSION},
        "counts": {"total": int(len(catalog)),
                   "classes": {c: int((catalog["class"] == c).sum()) for c in CLASSES}},
        "skipped": [],
    }


def synthesize(out: str | os.PathLike, n: int, seed: int = 0, layout: str = "cache", size: int = 64,
               workers: int | None = None, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> Path:
    """Render n synthetic galaxies into `out` (a cache folder, or a GZ2-layout folder); returns out."""
    workers = check_args(n, seed, layout, size, workers)
    fractions = check_fractions(tuple(fractions))
    n, seed, size = int(n), int(seed), int(size)
    out = Path(out)
    log.info("rendering %d synthetic galaxies (seed %d, layout %s) with %d worker(s) into %s", n, seed, layout,
             workers, out)
    if layout == "cache":
        return write_cache(out, n, seed, size, workers, fractions)
    return write_gz2(out, n, seed, workers, fractions)


def write_cache(out: Path, n: int, seed: int, size: int, workers: int, fractions: tuple) -> Path:
    """Render into a cache folder through CacheWriter (appears atomically)."""
    writer = CacheWriter(out, n, size)
    rows: list[dict | None] = [None] * n
    try:
        for start, images, chunk_rows in run_tasks(make_tasks(seed, n, "cache", size, fractions, "", workers),
                                                   workers, n):
            writer.images[start : start + len(chunk_rows)] = images
            rows[start : start + len(chunk_rows)] = chunk_rows
        catalog = pd.DataFrame(rows)
        return writer.finish(catalog, manifest(n, seed, "cache", size, fractions, catalog))
    except BaseException:
        writer.abort()
        raise


def write_gz2(out: Path, n: int, seed: int, workers: int, fractions: tuple) -> Path:
    """Render 424 px JPEGs and the GZ2 tables into a temporary folder, then move it to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, out.name)
    tmp = temporary(out)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / IMAGE_DIR).mkdir(parents=True)
    try:
        rows: list[dict | None] = [None] * n
        tasks = make_tasks(seed, n, "gz2", GZ2_FRAME_PX, fractions, str(tmp / IMAGE_DIR), workers)
        for start, _, chunk_rows in run_tasks(tasks, workers, n):
            rows[start : start + len(chunk_rows)] = chunk_rows
        truth = pd.DataFrame(rows)
        hart, mapping = gz2_tables(truth, seed)
        truth.insert(1, "dr7objid", [dr7objid(seed, i) for i in range(n)])
        truth.insert(2, "asset_id", [asset_id(i) for i in range(n)])
        truth.to_parquet(tmp / "truth.parquet", index=False)
        hart.to_csv(tmp / "gz2_hart16.csv", index=False)
        mapping.to_csv(tmp / "gz2_filename_mapping.csv", index=False)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def preview_grid(path: str | os.PathLike, n: int = 48, seed: int = 0, size: int = 64, cols: int = 8,
                 zoom: int = 1, layout: str = "cache") -> Path:
    """Save a PNG grid of the first n galaxies of a seed (cache framing, or whole GZ2 frames)."""
    tiles = []
    for i in range(n):
        gal = sample_galaxy(seed, i)
        tiles.append(render_cache_image(gal, size) if layout == "cache" else render_gz2_image(gal))
    blank = np.zeros_like(tiles[0])
    tiles += [blank] * (-len(tiles) % cols)
    grid = np.concatenate([np.concatenate(tiles[r : r + cols], axis=1) for r in range(0, len(tiles), cols)], axis=0)
    img = Image.fromarray(grid)
    if zoom != 1:
        img = img.resize((img.width * zoom, img.height * zoom), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Save a preview grid of synthetic galaxies as a PNG.")
    parser.add_argument("path", help="output PNG")
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--cols", type=int, default=8)
    parser.add_argument("--zoom", type=int, default=1)
    parser.add_argument("--layout", choices=LAYOUTS, default="cache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    log.info("wrote %s", preview_grid(args.path, args.n, args.seed, args.size, args.cols, args.zoom, args.layout))
