"""Cost of the sample-quality metrics: statmorph with 1 and 2 workers, and the feature metrics per 1,000 images.

    python bench/bench_evaluate.py [--data CACHE] [--images 64]

Figures printed, all from this one run (the machine may be shared: compare the ratios):
- statmorph (morphology.measure): images/s with 1 worker and with 2 workers, the speed-up, and
  CPU ms per image of each run (all processes: the parallel overhead, independent of machine load);
- feature metrics per 1,000 images: domain-encoder embedding, Frechet distance + KID, k-means
  diversity metrics and the memorisation nearest-neighbour search (8 flips/rotations against the
  train split), each in seconds per 1,000 sample images;
- the one-off cost per dataset: domain-encoder training time.
Without --data, a 2,000-galaxy toy cache (numpy bulge + disk + knots) is rendered in a temp folder.
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

import numpy as np  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the statmorph workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def morph_rate(images: np.ndarray, workers: int) -> tuple[float, float]:
    """(images/s wall, CPU ms per image in all processes) of morphology.measure."""
    from galaxygen.evaluate import morphology

    cpu, start = cpu_seconds(), time.perf_counter()
    morphology.measure(images, workers=workers, progress=False)
    wall = time.perf_counter() - start
    return len(images) / wall, (cpu_seconds() - cpu) / len(images) * 1e3


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="cache folder (default: a 2,000-galaxy toy cache in a temp folder)")
    p.add_argument("--images", type=int, default=64, help="images measured by statmorph per run (default 64)")
    p.add_argument("--features", type=int, default=1000, help="sample images for the feature metrics (default 1000)")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory()
    os.environ["GALAXYGEN_HOME"] = str(Path(tmp.name) / "home")

    import torch

    from galaxygen.data import Cache
    from galaxygen.evaluate import diversity, encoder, features, memorisation
    from galaxygen.evaluate.toy import write_toy_cache

    torch.set_num_threads(2)
    path = args.data or write_toy_cache(Path(tmp.name) / "toy", n=2000, seed=0)
    cache = Cache.open(path)
    images = cache.images[cache.indices("train")[: args.images]]
    morph_rate(images[:8], 1)  # warm-up: imports
    print(f"load average before the run: {os.getloadavg()[0]:.2f} (other processes compete for the cores)")
    one, cpu_one = morph_rate(images, 1)
    two, cpu_two = morph_rate(images, 2)
    print(f"statmorph, 1 worker : {one:7.2f} images/s   ({cpu_one:.0f} CPU ms per image)")
    print(f"statmorph, 2 workers: {two:7.2f} images/s   ({cpu_two:.0f} CPU ms per image, all processes)"
          f"   speed-up x{two / one:.2f}")

    start = time.perf_counter()
    enc, meta = encoder.load_or_train(cache, progress=False)
    print(f"domain encoder training (once per dataset, {meta['n_train']} train images): "
          f"{time.perf_counter() - start:6.1f} s")

    rows = np.resize(np.concatenate([cache.indices("val"), cache.indices("test"), cache.indices("train")]),
                     args.features)
    sample = cache.images[rows]
    real = cache.images[np.concatenate([cache.indices("val"), cache.indices("test")])]
    per_k = 1000 / len(sample)
    t_embed = timed(encoder.embed, enc, sample)
    f_sample, f_real = encoder.embed(enc, sample), encoder.embed(enc, real)
    f_train = encoder.embed(enc, cache.images[cache.indices("train")])
    mean, proj = features.whitener(f_train)
    f_sample, f_real, f_train = (features.squash((f - mean) @ proj) for f in (f_sample, f_real, f_train))
    t_fid = timed(lambda: (features.frechet_distance(f_sample, f_real), features.kernel_inception_distance(f_sample, f_real)))
    centroids = diversity.kmeans(f_train)
    t_div = timed(diversity.diversity_metrics, f_sample, f_real, centroids)
    train_bank = memorisation.pixel_vectors(cache.images[cache.indices("train")])
    real_bank = memorisation.pixel_vectors(real)
    t_memo = timed(lambda: memorisation.ratios(memorisation.pixel_vectors(sample), train_bank, real_bank))
    print(f"feature metrics per 1,000 images (train bank {len(train_bank)}, real reference {len(real)}):")
    for name, t in (("encoder embedding", t_embed), ("FID + KID", t_fid), ("k-means diversity", t_div),
                    ("memorisation NN search", t_memo)):
        print(f"  {name:24s} {t * per_k:7.2f} s")
    total = (t_embed + t_fid + t_div + t_memo) * per_k
    print(f"  {'total':24s} {total:7.2f} s   (statmorph, 1 worker, would take {1000 / one:6.1f} s)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
