"""Held-out splits assigned by a stable hash of the galaxy id (never by shuffling)."""

from __future__ import annotations

import hashlib

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def unit_hash(galaxy_id: str) -> float:
    """Map an id to a number in [0, 1) that depends on the id alone."""
    digest = hashlib.blake2b(str(galaxy_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def check_fractions(fractions: tuple[float, float, float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers (train, val, test) summing to 1, got {fractions}")
    return tuple(float(f) for f in fractions)


def split_of(galaxy_id: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """The split of one galaxy: the same id always lands in the same split, whatever else is packed."""
    u = unit_hash(galaxy_id)
    train, val, _ = check_fractions(fractions)
    if u < train:
        return "train"
    if u < train + val:
        return "val"
    return "test"
