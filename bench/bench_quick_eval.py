"""Noise of the per-epoch fid_domain estimate (config quick_eval_n) against the signal it must rank.

    python bench/bench_quick_eval.py [--data CACHE] [--n 64] [--seeds 5] [--epochs 1 4] [--model cnn]

Trains one run (the built-in synthetic galaxies without --data) and keeps its checkpoints after the first
and the last of --epochs (two checkpoints of different quality). For each, the quick estimate is taken with
--seeds sampling seeds; it prints the mean and standard deviation over seeds, the difference between the
checkpoints, and their ratio (how many seed-standard-deviations apart the checkpoints are), plus the seconds
one estimate takes beside the seconds of one training epoch, and what it adds to an epoch in training (the same
run trained again with quick_eval_n, which also fits the model's sampling parts every epoch), all from this one
run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="cache folder (default: the built-in synthetic galaxies)")
    p.add_argument("--n", type=int, default=64, help="samples per estimate (quick_eval_n, default 64)")
    p.add_argument("--seeds", type=int, default=5, help="sampling seeds per checkpoint (default 5)")
    p.add_argument("--epochs", type=int, nargs=2, default=[1, 4], metavar=("EARLY", "LATE"),
                   help="the two checkpoints compared (default 1 4)")
    p.add_argument("--model", default="cnn", help="model (default cnn)")
    args = p.parse_args(argv)

    import torch

    from galaxygen import checkpoint
    from galaxygen.config import TrainConfig
    from galaxygen.data import resolve_cache
    from galaxygen.evaluate.quick import QuickEstimate
    from galaxygen.results import ResultsStore
    from galaxygen.train import run

    torch.set_num_threads(1)
    data = str(resolve_cache(args.data or None).resolve())
    out = Path(tempfile.mkdtemp(prefix="bench-quick-"))
    try:
        estimate = QuickEstimate(data, args.n)
        store = ResultsStore(out, "bench")
        scores, epoch_s = {}, []
        for epochs in args.epochs:
            config = TrainConfig(model=args.model, epochs=epochs, data=data)
            run(config, out, "bench", "trial")
            epoch_s.append(store.read_trial("trial")["train_seconds"])
            model, config = checkpoint.load_model(store.checkpoint("trial", "last"))
            start = time.perf_counter()
            scores[epochs] = np.array([estimate(model, config, seed) for seed in range(args.seeds)])
            estimate_s = (time.perf_counter() - start) / args.seeds
        # what the estimate costs inside training: the same run with it on (each epoch fits what sampling needs,
        # e.g. a VAE's latent prior and pixel noise, then samples and scores), against the run above
        late = args.epochs[-1]
        run(TrainConfig(model=args.model, epochs=late, data=data, quick_eval_n=args.n), out, "bench", "scored")
        in_training_s = (store.read_trial("scored")["train_seconds"] - epoch_s[-1]) / late
        early, late = (scores[e] for e in args.epochs)
        spread = float(np.sqrt((early.var(ddof=1) + late.var(ddof=1)) / 2))
        print(f"fid_domain_quick, n={estimate.n}, {args.seeds} seeds, model {args.model}")
        for e in args.epochs:
            print(f"  epoch {e:3d}: mean {scores[e].mean():8.3f}  std over seeds {scores[e].std(ddof=1):7.3f}  "
                  f"values {np.round(scores[e], 2).tolist()}")
        print(f"  difference between checkpoints {early.mean() - late.mean():.3f} = "
              f"{(early.mean() - late.mean()) / spread:.1f} seed standard deviations (pooled std {spread:.3f})")
        print(f"  one estimate {estimate_s:.2f} s; one training epoch {epoch_s[-1] / args.epochs[-1]:.2f} s "
              f"({estimate_s / (epoch_s[-1] / args.epochs[-1]):.2f} of an epoch)")
        print(f"  in training, with the fit of what sampling needs: {in_training_s:.2f} s per epoch "
              f"({in_training_s / (epoch_s[-1] / args.epochs[-1]):.2f} of an epoch)")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
