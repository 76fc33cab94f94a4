"""The packed image cache: images.npy (N, S, S, 3) uint8, catalog.parquet, manifest.json.

A cache is a folder. It is written into a hidden temporary sibling folder and renamed into place,
so a reader never sees a half-written cache. The temporary's name holds the writer's host and pid
(`galaxygen.staging`): a writer killed outright (kill -9, out of memory) cannot clean up, so every
writer first removes the temporaries of dead processes of its host (`galaxygen.staging.remove_stale`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pyarrow.lib import ArrowException

from galaxygen.staging import remove_stale, temporary

IMAGES = "images.npy"
CATALOG = "catalog.parquet"
MANIFEST = "manifest.json"
REQUIRED_COLUMNS = ("id", "source", "split")
IN_MEMORY_LIMIT_BYTES = 4 * 2**30

log = logging.getLogger(__name__)


class CacheError(ValueError):
    """A cache folder is missing, incomplete or inconsistent."""


@dataclass
class Cache:
    """An opened cache: its images (a read-only memory map), its catalog and its manifest."""

    path: Path
    images: np.ndarray
    catalog: pd.DataFrame
    manifest: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | os.PathLike, in_memory: bool | None = None) -> Cache:
        """Open a cache; its images are a read-only memory map of images.npy.

        in_memory=True (None: when the images are smaller than 4 GiB) starts reading the whole file into the
        page cache at once. The page cache is the node's one copy of the file: every process that maps the
        cache (DDP ranks, trials side by side) reads those same pages, where loading into a private array
        would cost each process the cache's size in memory.
        """
        path = cls.require(path)
        images = read_images(path / IMAGES)
        if in_memory is None:
            in_memory = images.nbytes <= IN_MEMORY_LIMIT_BYTES
        if in_memory:
            read_ahead(path / IMAGES)
        catalog = read_catalog(path / CATALOG)
        manifest = read_manifest(path / MANIFEST)
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
            raise CacheError(f"{path / IMAGES} must be uint8 (N, S, S, 3), got {images.dtype} {images.shape}")
        if len(catalog) != len(images):
            raise CacheError(f"{path}: catalog has {len(catalog)} rows but there are {len(images)} images")
        missing = [c for c in REQUIRED_COLUMNS if c not in catalog.columns]
        if missing:
            raise CacheError(f"{path / CATALOG} lacks column(s) {missing}")
        return cls(path, images, catalog, manifest)

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        """True when `path` holds a finished cache (the manifest is written last)."""
        return (Path(path) / MANIFEST).is_file()

    @staticmethod
    def require(path: str | os.PathLike) -> Path:
        """`path` as a Path if it has every file of a cache, else one CacheError naming what is missing."""
        path = Path(path)
        for name in (IMAGES, CATALOG, MANIFEST):
            if not (path / name).is_file():
                raise CacheError(f"{path} is not a galaxygen cache: {name} is missing (make one with "
                                 "`python -m galaxygen.data pack` or `synth`)")
        return path

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return len(self.images)

    def indices(self, split: str) -> np.ndarray:
        """Row indices of one split (train, val or test), in catalog order."""
        return np.flatnonzero(self.catalog["split"].to_numpy() == split)


class CacheWriter:
    """Write a cache of n images of size x size pixels; `finish` makes it appear atomically."""

    def __init__(self, out: str | os.PathLike, n: int, size: int):
        self.out = Path(out)
        if self.out.exists() and any(self.out.iterdir()) and not Cache.exists(self.out):
            raise CacheError(f"{self.out} exists and is not a galaxygen cache: refusing to replace it (choose another --out)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.out.parent, self.out.name)
        self.tmp = temporary(self.out)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.images = np.lib.format.open_memmap(self.tmp / IMAGES, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))

    def finish(self, catalog: pd.DataFrame, manifest: dict, keep: np.ndarray | None = None) -> Path:
        """Write catalog and manifest, then rename into place. `keep` selects rows (drop skipped files)."""
        images = self.images
        if keep is not None and not keep.all():
            kept = np.lib.format.open_memmap(self.tmp / "kept.npy", mode="w+", dtype=np.uint8, shape=(int(keep.sum()), *images.shape[1:]))
            kept[:] = images[keep]
            kept.flush()
            del images, self.images, kept
            os.replace(self.tmp / "kept.npy", self.tmp / IMAGES)
            images = np.load(self.tmp / IMAGES, mmap_mode="r")
        else:
            images.flush()
        catalog = catalog.reset_index(drop=True)
        if len(catalog) != len(images):
            raise CacheError(f"catalog has {len(catalog)} rows for {len(images)} images")
        catalog.to_parquet(self.tmp / CATALOG, index=False)
        manifest = dict(manifest)
        manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        manifest["shape"] = list(images.shape)
        manifest["split_counts"] = {str(k): int(v) for k, v in catalog["split"].value_counts().sort_index().items()}
        manifest["content_hash"] = content_hash(images, catalog)
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        del images
        self.images = None
        replace_dir(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        self.images = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_images(path: Path) -> np.ndarray:
    """The memory-mapped image array, or one CacheError naming the file and what is wrong with it."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise CacheError(f"{path} is not a readable .npy array (truncated or corrupt: {_first_line(err)}); "
                         "rebuild the cache with `python -m galaxygen.data pack` or `synth`") from None


def read_catalog(path: Path) -> pd.DataFrame:
    """The catalog table, or one CacheError naming the file and what is wrong with it."""
    try:
        return pd.read_parquet(path)
    except (ValueError, OSError, ArrowException) as err:
        raise CacheError(f"{path} is not a readable Parquet table (truncated or corrupt: {_first_line(err)}); "
                         "rebuild the cache with `python -m galaxygen.data pack` or `synth`") from None


def read_manifest(path: Path) -> dict:
    """The manifest, or one CacheError naming the file and what is wrong with it."""
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CacheError(f"{path} is not valid JSON ({_first_line(err)}); rebuild the cache with "
                         "`python -m galaxygen.data pack` or `synth`") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{path} must hold a JSON object, got {type(manifest).__name__}; rebuild the cache")
    return manifest


def read_ahead(path: Path) -> None:
    """Ask the kernel to read a whole file into the page cache now, in the background (a hint)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def content_hash(images: np.ndarray, catalog: pd.DataFrame) -> str:
    """sha256 over the pixels and the catalog ids/splits: equal hashes mean equal caches."""
    h = hashlib.sha256()
    step = 1024
    for i in range(0, len(images), step):
        h.update(np.ascontiguousarray(images[i : i + step]).tobytes())
    h.update("\n".join(catalog["id"].astype(str)).encode())
    h.update("\n".join(catalog["split"].astype(str)).encode())
    return h.hexdigest()


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder src to dst, replacing dst; the old dst is removed only after the new one is in place."""
    if dst.exists():
        old = temporary(dst, "old")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
