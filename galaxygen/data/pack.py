"""Pack a real image source into a cache: decode every image once, in parallel, robust to bad files.

`pack(source, out)` reads a Galaxy Zoo 2 folder, a Kaggle Galaxy Challenge folder, a Galaxy10
.h5 file or a plain folder of images (see galaxygen.data.sources), decodes each image once
(central crop of crop/424 of the frame, resized to size x size, see galaxygen.data.decode) in
worker processes, and writes a cache with galaxygen.data.cache.CacheWriter:

- images.npy (N, size, size, 3) uint8, one row per packed image;
- catalog.parquet: id, source (file relative to the source), split (galaxygen.splits.split_of),
  src_width, src_height (the frame), note (adjustments: non-square, upscaled, format mismatch,
  multi-frame), then the source's labels (NaN for images without a catalog row);
- manifest.json: source, format, options, input fingerprint, counts (found = packed + skipped,
  unlabelled, adjusted, skipped by reason), every skipped file with its reason, every adjusted
  file with its note, and the duplicates found (kept id -> ids of the same image).

A bad file never stops a pack: it is skipped and listed. Duplicates are found by a content hash
(blake2b) of the packed pixels, the size x size image each entry would add: an image stored
under several names (byte-identical copies, the same pixels in another file format, frames that
differ only outside the crop) is packed once, as its first entry in source order, and the others
are skipped as "duplicate image", so no image of the cache is in two splits, which is what
matters for held-out evaluation. (A hash of the file bytes would miss the same pixels re-saved
with other compression settings or metadata, and means nothing for Galaxy10 frames.) Re-running with the same source and
options gives the same content hash; when the existing manifest's fingerprint (format, options,
decoder version, every file's size and mtime) matches, the pack is not redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from galaxygen.cli import progress_bar
from galaxygen.data.cache import (
    MANIFEST,
    REQUIRED_COLUMNS,
    Cache,
    CacheError,
    CacheWriter,
)
from galaxygen.data.decode import (
    DECODER_VERSION,
    RESAMPLE_NAME,
    Decoded,
    crop_fraction_of,
    decode_array,
    decode_file,
)
from galaxygen.data.sources import Source, open_source, unreadable_reason
from galaxygen.data.workers import pool as worker_pool
from galaxygen.splits import DEFAULT_FRACTIONS, check_fractions, split_of
from galaxygen.staging import remove_stale

log = logging.getLogger(__name__)

H5_CHUNK = 64
H5_CHUNK_BYTES = 64 * 2**20  # at most this many bytes of frames read at once (fewer frames if they are large)
META_COLUMNS = (*REQUIRED_COLUMNS, "src_width", "src_height", "note")

_h5_handles: dict[str, object] = {}


def pack(
    source: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "auto",
    crop: int = 207,
    size: int = 64,
    workers: int | None = None,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    force: bool = False,
) -> Path:
    """Decode a source once into a cache at `out`; returns `out`. force=True repacks even if up to date."""
    crop_fraction = crop_fraction_of(crop)
    if size <= 0:
        raise ValueError(f"--size must be a positive number of pixels, got {size}")
    fractions = check_fractions(tuple(fractions))
    src = open_source(source, fmt)
    if not len(src):
        raise ValueError(f"{src.path} ({src.format}) holds no images")
    options = {"crop": crop, "crop_fraction": crop_fraction, "size": size, "splits": list(fractions),
               "resample": RESAMPLE_NAME, "decoder_version": DECODER_VERSION}
    stats = stat_entries(src)
    fp = fingerprint(src, options, stats)
    out = Path(out)
    check_out(out, src.path)
    remove_stale(out.parent, out.name)  # also when the cache is up to date and no CacheWriter runs
    if not force and up_to_date(out, fp):
        log.info("%s is up to date with %s (same files and options): not repacking", out, src.path)
        return out
    return write_cache(src, out, options, fp, workers)


def check_out(out: Path, source: Path) -> None:
    """Refuse an output folder whose replacement would destroy the source or a folder that is not a cache."""
    resolved = out.expanduser().resolve()
    if resolved == source or resolved in source.parents:
        raise ValueError(f"--out {out} is the source or contains it: choose a folder outside {source}")
    if resolved.exists() and not (resolved / MANIFEST).is_file() and (resolved.is_file() or any(resolved.iterdir())):
        raise ValueError(f"--out {out} exists and is not a galaxygen cache (no {MANIFEST}): "
                         "choose a new folder, or remove it first (it would be replaced)")


def stat_entries(src: Source) -> list[tuple[int, int] | None]:
    """(size, mtime_ns) of each entry's file; marks missing files as skipped. Galaxy10 entries get None."""
    stats: list[tuple[int, int] | None] = []
    for k, rel in enumerate(src.files):
        if src.is_h5 or src.skip[k]:
            stats.append(None)
            continue
        try:
            st = os.stat(src.path / rel)
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError as err:
            src.skip[k] = unreadable_reason(src.path / rel, rel, err)
            stats.append(None)
    return stats


def fingerprint(src: Source, options: dict, stats: list[tuple[int, int] | None]) -> str:
    """sha256 over format, options, input files and every entry (id, file, size, mtime, skip reason)."""
    h = hashlib.sha256()
    head = {"format": src.format, "source": str(src.path), "options": options}
    h.update(json.dumps(head, sort_keys=True).encode())
    for path in src.inputs:
        st = os.stat(path)
        h.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    for galaxy_id, rel, stat, skip in zip(src.ids, src.files, stats, src.skip):
        h.update(f"{galaxy_id}\t{rel}\t{stat}\t{skip}\n".encode())
    return h.hexdigest()


def up_to_date(out: Path, fp: str) -> bool:
    """Whether `out` is a complete cache made from the same inputs and options."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("fingerprint") != fp:
            return False
        cache = Cache.open(out, in_memory=False)
    except (OSError, ValueError, CacheError):
        return False
    return len(cache) == manifest.get("counts", {}).get("packed")


def decode_file_task(task: tuple[int, str], crop_fraction: float, size: int) -> tuple[int, Decoded]:
    """Worker: decode one image file."""
    index, path = task
    return index, decode_file(path, crop_fraction, size)


def h5_dataset(path: str):
    """Worker: the 'images' dataset of an h5 file, opened once per process."""
    import h5py

    if path not in _h5_handles:
        _h5_handles[path] = h5py.File(path, "r")
    return _h5_handles[path]["images"]


def close_h5() -> None:
    """Close the h5 files this process opened (before a pool forks it, and when done)."""
    while _h5_handles:
        _h5_handles.popitem()[1].close()


def decode_h5_task(task: tuple[str, int, int], crop_fraction: float, size: int) -> list[tuple[int, Decoded]]:
    """Worker: crop and resize frames start:stop of a Galaxy10 file, read as one chunk."""
    path, start, stop = task
    frames = h5_dataset(path)[start:stop]
    return [(start + k, decode_array(frame, crop_fraction, size)) for k, frame in enumerate(frames)]


def tasks_for(src: Source) -> tuple[list, bool]:
    """Work items for the decoders and whether each item yields a list (h5 chunks) or one result."""
    if src.is_h5:
        n = len(src)
        height, width = src.extra["frame"]
        chunk = max(1, min(H5_CHUNK, H5_CHUNK_BYTES // (height * width * 3)))
        return [(str(src.path), start, min(start + chunk, n)) for start in range(0, n, chunk)
                if not all(src.skip[start : start + chunk])], True  # all frames share a size: all or none
    return [(k, str(src.path / rel)) for k, rel in enumerate(src.files) if not src.skip[k]], False


def decode_all(
    src: Source, crop_fraction: float, size: int, workers: int | None
) -> Iterator[tuple[int, Decoded]]:
    """Decode every entry not already skipped, in worker processes; yields (index, result) in order."""
    tasks, chunked = tasks_for(src)
    fn = partial(decode_h5_task if chunked else decode_file_task, crop_fraction=crop_fraction, size=size)
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    if workers == 1:
        try:
            yield from flatten(map(fn, tasks), chunked)
        finally:
            close_h5()
        return
    chunksize = 1 if chunked else max(1, min(32, len(tasks) // (workers * 8)))
    with worker_pool(workers) as pool:
        yield from flatten(pool.imap(fn, tasks, chunksize=chunksize), chunked)


def flatten(results, chunked: bool) -> Iterator[tuple[int, Decoded]]:
    """Yield single results from a stream that may hold lists of them."""
    for item in results:
        if chunked:
            yield from item
        else:
            yield item


def write_cache(src: Source, out: Path, options: dict, fp: str, workers: int | None) -> Path:
    """Decode the source into a CacheWriter and finish it with catalog and manifest."""
    n, size = len(src), options["size"]
    keep = np.zeros(n, dtype=bool)
    widths, heights = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    notes = [""] * n
    first_of: dict[bytes, int] = {}  # content hash of the packed pixels -> the entry packed with them
    duplicates: dict[str, list[str]] = {}
    writer = CacheWriter(out, n, size)
    try:
        todo = n - sum(1 for s in src.skip if s)
        with progress_bar(total=todo, unit="img", desc=f"pack {src.format}") as bar:
            for index, result in decode_all(src, options["crop_fraction"], size, workers):
                widths[index], heights[index] = result.width, result.height
                bar.update(1)
                if result.pixels is None:
                    src.skip[index] = result.reason
                    continue
                digest = hashlib.blake2b(result.pixels.tobytes()).digest()
                if digest in first_of:  # results arrive in source order: the first one is kept
                    kept = first_of[digest]
                    src.skip[index] = (f"duplicate image: the same pixels as {src.ids[kept]} ({src.files[kept]}), "
                                       "packed once")
                    duplicates.setdefault(src.ids[kept], []).append(src.ids[index])
                    continue
                first_of[digest] = index
                writer.images[index] = result.pixels
                keep[index] = True
                notes[index] = result.note
        if not keep.any():
            examples = {reason_kind(r): r for r in reversed(src.skip) if r}  # the first reason of each kind
            reasons = "; ".join(f"{c}x {examples[kind]}" for kind, c in reason_counts(src.skip).most_common(3))
            raise ValueError(f"none of the {n} images in {src.path} could be packed: {reasons}")
        catalog = build_catalog(src, options["splits"], widths, heights, notes)[keep]
        manifest = build_manifest(src, options, fp, keep, catalog, duplicates)
        path = writer.finish(catalog, manifest, keep=keep)
    except BaseException:
        writer.abort()
        raise
    log_summary(src, out, keep)
    return path


def build_catalog(src: Source, fractions: list[float], widths: np.ndarray, heights: np.ndarray,
                  notes: list[str]) -> pd.DataFrame:
    """One row per entry: id, source, split, frame size, note, then the labels."""
    meta = pd.DataFrame({
        "id": pd.Series(src.ids, dtype=str),
        "source": pd.Series(src.files, dtype=str),
        "split": [split_of(galaxy_id, tuple(fractions)) for galaxy_id in src.ids],
        "src_width": widths,
        "src_height": heights,
        "note": pd.Series(notes, dtype=str),
    })
    labels = src.labels.reset_index(drop=True)
    labels = labels.rename(columns={c: f"label_{c}" for c in labels.columns if c in META_COLUMNS})
    return pd.concat([meta, labels], axis=1)


def reason_kind(reason: str) -> str:
    """The kind of a skip reason: the text before the first colon."""
    return reason.split(":", 1)[0]


def reason_counts(skip: list[str]) -> Counter:
    """How many entries were skipped for each kind of reason."""
    return Counter(reason_kind(s) for s in skip if s)


def build_manifest(src: Source, options: dict, fp: str, keep: np.ndarray, catalog: pd.DataFrame,
                   duplicates: dict[str, list[str]]) -> dict:
    """The manifest: source, format, options, fingerprint, counts, skipped and adjusted files, duplicates."""
    label_cols = [c for c in catalog.columns if c not in META_COLUMNS]
    unlabelled = int(catalog[label_cols].isna().all(axis=1).sum()) if label_cols else None
    skipped = [{"id": src.ids[k], "file": src.files[k], "reason": src.skip[k]}
               for k in range(len(src)) if not keep[k]]
    return {
        "kind": "pack",
        "source": str(src.path),
        "format": src.format,
        "options": options,
        "inputs": [str(p) for p in src.inputs],
        "fingerprint": fp,
        "counts": {
            "found": len(src),
            "packed": int(keep.sum()),
            "skipped": len(skipped),
            "unlabelled": unlabelled,
            "adjusted": int((catalog["note"] != "").sum()),
            "skipped_by_reason": dict(sorted(reason_counts([s["reason"] for s in skipped]).items())),
        },
        "labels": label_cols,
        **src.extra,
        "duplicates": duplicates,
        "skipped_files": skipped,
        "adjusted_files": [{"id": row.id, "file": row.source, "note": row.note}
                           for row in catalog.itertuples() if row.note],
    }


def log_summary(src: Source, out: Path, keep: np.ndarray) -> None:
    """Log what was packed and why anything was skipped."""
    log.info("packed %d of %d images from %s (%s) into %s",
             int(keep.sum()), len(src), src.path, src.format, out)
    counts = reason_counts([s for k, s in enumerate(src.skip) if not keep[k]])
    if counts:
        log.warning("skipped %d: %s (every file is listed in %s)", sum(counts.values()),
                    ", ".join(f"{kind} {c}" for kind, c in counts.most_common()), out / MANIFEST)
