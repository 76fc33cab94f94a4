"""Galaxy image data: synthetic galaxies, packing real sources into a cache, and loading batches."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from galaxygen import home
from galaxygen.data.cache import Cache, CacheError, CacheWriter
from galaxygen.data.synth_model import GENERATOR_VERSION as SYNTH_VERSION

__all__ = ["Cache", "CacheError", "CacheWriter", "default_cache", "resolve_cache", "DEFAULT_SYNTH_N"]

log = logging.getLogger(__name__)

DEFAULT_SYNTH_N = 4000


def default_cache(n: int = DEFAULT_SYNTH_N, seed: int = 0, size: int = 64, workers: int | None = None,
                  create: bool = True) -> Path:
    """The built-in synthetic galaxies as a cache, rendered once and reused (safe under concurrent callers).

    With create=False only the path is returned, whether or not it has been rendered yet.
    """
    root = home() / "data"
    out = root / f"synth-v{SYNTH_VERSION}-n{n}-s{seed}-{size}px"
    if Cache.exists(out) or not create:
        return out
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not Cache.exists(out):
            from galaxygen.data.synth import synthesize  # GalSim and astropy: 1 s to import, only to render

            log.info("rendering %d synthetic galaxies into %s (once)", n, out)
            synthesize(out, n=n, seed=seed, layout="cache", size=size, workers=workers)
    return out


def resolve_cache(data: str | os.PathLike | None = None, create: bool = True) -> Path:
    """The cache a command uses: `data` when given, else the built-in synthetic galaxies (the one place that
    says "no --data means the synthetic cache"); create=False never renders it, only names its path."""
    if data:
        return Path(data)
    return default_cache(create=create)
