"""`python -m galaxygen.evaluate CKPT`: sample-quality metrics of a checkpoint beside the baselines.

`--shard I/K --shard-dir DIR` measures one K-th of the statmorph morphology into DIR; `--shard-dir DIR`
alone merges a complete set of shards and evaluates. `python -m sweeps.evaluate CKPT --shards K ...` runs the
shards as a SLURM job array and the merge as a dependent job, shaped by the cluster profile.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from galaxygen.cli import positive
from galaxygen.evaluate import LATENTS
from galaxygen.results import atomic_path

log = logging.getLogger("galaxygen.evaluate")


def shard_spec(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not int(match[1]) < int(match[2]):
        raise argparse.ArgumentTypeError(f"--shard must be I/K with 0 <= I < K (e.g. 0/4), got {text!r}")
    return int(match[1]), int(match[2])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m galaxygen.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint file written by training (.pt)")
    p.add_argument("--data", default="", help="cache folder (default: the checkpoint config's data, "
                   "else the built-in synthetic galaxies)")
    p.add_argument("--n", type=positive, default=2000, help="generated samples, capped at half the held-out "
                   "(val + test) galaxies (default 2000)")
    p.add_argument("--workers", type=positive, default=os.cpu_count() or 1, help="statmorph processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--latent", choices=LATENTS, default=None,
                   help="score only the samples from this latent distribution (default: every one of the model's "
                   "family: a VAE's fitted latent prior with its fitted pixel noise under the plain metric names, without the "
                   "noise as <metric>_noiseless, N(0, I) as <metric>_prior)")
    p.add_argument("--inception", default="", help="torchvision Inception-v3 weights file: also compute the "
                   "standard FID/KID (nothing is downloaded)")
    p.add_argument("--out", default="", help="results store folder RESULTS/SWEEP: also write the metrics there "
                   "(part 'eval', split 'eval'; baselines as splits eval_real_vs_real and eval_one_image)")
    p.add_argument("--trial", default="", help="trial id for --out (default: the checkpoint's trial_id, else "
                   "the runs/<trial>/ folder it is in, else its file name)")
    p.add_argument("--json", default="", help="also write the metrics and baselines to this JSON file")
    p.add_argument("--shard", type=shard_spec, default=None, help="I/K: only measure shard I of K of the "
                   "morphology into --shard-dir (a SLURM array task)")
    p.add_argument("--shard-dir", default="", help="folder of morphology shards; without --shard, merge them")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def trial_id_of(checkpoint: Path) -> str:
    """The trial of a checkpoint inside a sweep's run folder, else the file's name."""
    from galaxygen.results import locate

    found = locate(checkpoint)
    return found[1] if found else checkpoint.stem


def format_table(metrics: dict[str, float], base: dict[str, dict[str, float]]) -> str:
    """metric | model | real-vs-real | one-image | better, one line per metric."""
    from galaxygen.evaluate import direction

    def fmt(v) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"

    rows = [("metric", "model", "real-vs-real", "one-image", "better")]
    for name, value in metrics.items():
        rows.append((name, fmt(value), fmt(base.get("real_vs_real", {}).get(name)),
                     fmt(base.get("one_image", {}).get(name)), direction(name)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def shard_path(folder: Path, n: int, seed: int, index: int, count: int) -> Path:
    return folder / f"morph-n{n}-s{seed}-{index:04d}-of-{count:04d}.parquet"


def run_shard(args, model, ref, latents: tuple[str, ...]) -> int:
    """Measure one shard of the first latent's samples' (and the missing reference galaxies') morphology."""
    from galaxygen.evaluate import morphology, sample_images

    index, count = args.shard
    folder = Path(args.shard_dir)
    folder.mkdir(parents=True, exist_ok=True)
    images = sample_images(model, ref.n, latents[0], args.seed)
    block = np.array_split(np.arange(ref.n), count)[index]
    table = morphology.measure(images[block], args.workers, not args.no_progress)
    table.insert(0, "sample", block)
    path = shard_path(folder, ref.n, args.seed, index, count)
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    real = np.concatenate([ref.rows_a, ref.rows_b])
    ref.real_morphology(np.array_split(real, count)[index], exclusive=False)
    print(path)
    return 0


def merged_shards(folder: Path, n: int, seed: int) -> pd.DataFrame | None:
    """The samples' morphology from a complete set of shards, or None when the folder has none."""
    files = sorted(folder.glob(f"morph-n{n}-s{seed}-*-of-*.parquet"))
    if not files:
        return None
    count = int(files[0].stem.rsplit("-of-", 1)[1])
    missing = [i for i in range(count) if not shard_path(folder, n, seed, i, count).exists()]
    if missing:
        raise FileNotFoundError(f"{folder}: morphology shards {missing} of {count} are missing (n={n}, seed={seed})")
    table = pd.concat([pd.read_parquet(shard_path(folder, n, seed, i, count)) for i in range(count)])
    table = table.sort_values("sample").drop(columns="sample").reset_index(drop=True)
    if len(table) != n:
        raise ValueError(f"{folder}: the shards hold {len(table)} rows, expected {n}")
    return table


def input_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the checkpoint and weights files given, or None."""
    if not Path(args.checkpoint).is_file():
        return f"checkpoint {args.checkpoint} does not exist"
    if args.inception and not Path(args.inception).is_file():
        return f"--inception {args.inception} is not a file"
    if args.out:
        from galaxygen.results import StoreError, check_trial_id

        try:
            check_trial_id(args.trial or trial_id_of(Path(args.checkpoint)))
        except StoreError as err:
            return f"--trial: {err}"
    return None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.shard and not args.shard_dir:
        print("error: --shard needs --shard-dir DIR", file=sys.stderr)
        return 2
    problem = input_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    checkpoint = Path(args.checkpoint)
    from galaxygen import evaluate
    from galaxygen.checkpoint import load, load_model
    from galaxygen.data import CacheError
    from galaxygen.evaluate.reference import Reference
    from galaxygen.models import MODELS

    try:
        model, config = load_model(checkpoint)
        cache = evaluate.open_cache(args.data or None, config)
        latents = MODELS[config.model].family.latents
        if args.latent and args.latent not in latents:
            raise ValueError(f"--latent {args.latent}: a {config.model} samples from {', '.join(latents)}")
        latents = (args.latent,) if args.latent else latents
    except (CacheError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    progress = not args.no_progress
    ref = Reference(cache, args.n, args.workers, progress, args.inception or None)
    if args.shard:
        return run_shard(args, model, ref, latents)
    morph = merged_shards(Path(args.shard_dir), ref.n, args.seed) if args.shard_dir else None
    metrics = evaluate.evaluate_model(model, config, cache, ref.n, args.workers, args.seed, progress,
                                      args.inception or None, morph, latents)
    base = evaluate.baseline_metrics(cache, ref.n, args.workers, progress, args.inception or None)
    print(format_table(metrics, base))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"metrics": metrics, "baselines": base}, indent=2))
    if args.out:
        from galaxygen.results import ResultsStore

        state = load(checkpoint)
        out = Path(args.out)
        store = ResultsStore(out.parent, out.name)
        trial = args.trial or state.get("trial_id") or trial_id_of(checkpoint)
        store.write_eval(trial, evaluate.metric_rows(metrics, base, int(state.get("step", 0) or 0),
                                                   int(state.get("epoch", 0) or 0)))
        log.info("wrote %d eval metrics of trial %s to %s", len(metrics), trial, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
