"""`python -m galaxygen.data {synth,pack}`: make a cache of galaxy images."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from galaxygen.cli import positive
from galaxygen.splits import DEFAULT_FRACTIONS


def fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or abs(sum(parts) - 1) > 1e-6 or min(parts) < 0:
        raise argparse.ArgumentTypeError(f"--splits must be three fractions train,val,test summing to 1 (e.g. 0.8,0.1,0.1), got {text!r}")
    return parts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m galaxygen.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="render Galaxy-Zoo-like synthetic galaxies with GalSim")
    s.add_argument("--n", type=positive, default=4000, help="number of galaxies (default 4000)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same galaxies)")
    s.add_argument("--layout", choices=("cache", "gz2"), default="cache",
                   help="cache: a packed cache at --size; gz2: 424 px JPEGs in the Galaxy Zoo 2 layout")
    s.add_argument("--size", type=positive, default=64, help="image size of the cache layout (default 64)")
    s.add_argument("--workers", type=positive, default=os.cpu_count(), help="worker processes (default: all cores)")
    s.add_argument("--splits", type=fractions, default=DEFAULT_FRACTIONS, help="train,val,test fractions (default 0.8,0.1,0.1)")

    p = sub.add_parser("pack", help="decode a real image source once into a cache")
    p.add_argument("source", help="Galaxy Zoo 2 folder, Kaggle Galaxy Challenge folder, Galaxy10 .h5 file or a folder of images")
    p.add_argument("--out", required=True, help="output cache folder")
    p.add_argument("--format", choices=("auto", "gz2", "kaggle", "galaxy10", "folder"), default="auto")
    p.add_argument("--crop", type=positive, default=207,
                   help="central crop in pixels of a 424 px frame before resizing (default 207); other frame sizes crop the same fraction")
    p.add_argument("--size", type=positive, default=64, help="output size in pixels (default 64)")
    p.add_argument("--workers", type=positive, default=os.cpu_count(), help="decoder processes (default: all cores)")
    p.add_argument("--splits", type=fractions, default=DEFAULT_FRACTIONS, help="train,val,test fractions (default 0.8,0.1,0.1)")
    p.add_argument("--force", action="store_true", help="re-pack even when the existing cache matches source and options")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "synth":
            from galaxygen.data.synth import synthesize

            out = synthesize(args.out, n=args.n, seed=args.seed, layout=args.layout, size=args.size,
                             workers=args.workers, fractions=args.splits)
        else:
            from galaxygen.data.pack import pack

            out = pack(args.source, args.out, fmt=args.format, crop=args.crop, size=args.size,
                       workers=args.workers, fractions=args.splits, force=args.force)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
