"""Offline, galaxy-aware sample-quality metrics of a generative model (issue 7).

`evaluate_model(model, config, cache, n, workers, seed)` draws n samples from each latent distribution of
the model's family and returns flat metrics (see `METRICS` for names and directions): the family's default
latent (a VAE's fitted latent prior, a GAN's input distribution) under the plain names, the others with the
suffix `_<latent>` (a VAE's `fid_domain_prior`: decoded from N(0, I)). `baseline_metrics(cache, n)` gives the
same metrics for real-vs-real and a one-image generator. Real-side statistics and the domain encoder are cached
per dataset under `galaxygen.home()/encoders/`, so each call pays only for its own samples.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from galaxygen.models import MODELS, all_latents, generate

log = logging.getLogger(__name__)

__all__ = ["METRICS", "MORPH_STATS", "evaluate_model", "evaluate_images", "baseline_metrics", "metric_rows",
           "sample_images", "open_cache", "prepare", "direction", "base_metric", "latent_probes"]

MORPH_STATS = ("concentration", "asymmetry", "smoothness", "gini", "m20", "ellipticity", "sersic_n", "r_half")
# name -> "lower" (lower is better), "higher" (higher is better), "one" (1 is ideal) or "info"
METRICS: dict[str, str] = {
    **{f"morph_w_{s}": "lower" for s in MORPH_STATS},
    "morph_score": "lower",
    "morph_kept_frac": "higher",
    "morph_kept_frac_gap": "lower",
    "colour_w": "lower",
    "fid_domain": "lower",
    "kid_domain": "lower",
    "fid_inception": "lower",
    "kid_inception": "lower",
    "kmeans_occupancy_error": "lower",
    "kmeans_centroid_dist": "lower",
    "kmeans_centroid_dist_ratio": "one",
    "memorisation_ratio": "higher",
    "memorisation_copy_frac": "lower",
    "probe_r2_*": "higher",
    "eval_n": "info",
}
DEFAULT_N = 100


LATENTS = all_latents()


def base_metric(metric: str) -> tuple[str, str]:
    """(metric name without its latent suffix, the latent or "" for the family's default): fid_domain_prior ->
    (fid_domain, prior)."""
    for latent in LATENTS:
        if metric.endswith(f"_{latent}") and direction(metric.removesuffix(f"_{latent}")) != "info":
            return metric.removesuffix(f"_{latent}"), latent
    return metric, ""


def direction(metric: str) -> str:
    """'lower', 'higher', 'one' or 'info' for a metric name (with or without a latent suffix)."""
    if metric.startswith("probe_r2_"):
        return "higher"
    if metric in METRICS:
        return METRICS[metric]
    name, latent = base_metric(metric)
    return METRICS.get(name, "info") if latent else "info"


def open_cache(cache=None, config=None):
    """A Cache from a Cache, a path, the config's `data`, or the built-in synthetic galaxies."""
    from galaxygen.data import Cache, resolve_cache

    if isinstance(cache, Cache):
        return cache
    return Cache.open(resolve_cache(cache or getattr(config, "data", "")))


def sample_images(model: torch.nn.Module, n: int, latent: str, seed: int = 0) -> np.ndarray:
    """n samples of the model from `latent` as uint8 (n, S, S, 3), deterministic for a seed (see models.generate)."""
    images = generate(model, n, latent, seed)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def prepare(cache=None, n: int = DEFAULT_N, workers: int = 1, progress: bool = True, inception=None):
    """Train the encoder and compute the real-side statistics and baselines for n (call before a sweep)."""
    from galaxygen.evaluate import baselines as base
    from galaxygen.evaluate.reference import Reference

    ref = Reference(open_cache(cache), n, workers, progress, inception)
    ref.real_morphology(np.concatenate([ref.rows_a, ref.rows_b]))
    ref.real_ratios()
    base.load_or_compute(ref)
    return ref


def baseline_metrics(cache=None, n: int = DEFAULT_N, workers: int = 1, progress: bool = True,
                     inception=None) -> dict[str, dict[str, float]]:
    """{"real_vs_real": metrics, "one_image": metrics} for this dataset and n (cached)."""
    from galaxygen.evaluate import baselines as base

    stored = base.load_or_compute(prepare(cache, n, workers, progress, inception))
    return {name: stored[name] for name in base.NAMES}


def evaluate_images(images: np.ndarray, cache=None, workers: int = 1, progress: bool = True,
                    inception=None, morph=None) -> dict[str, float]:
    """Metrics of uint8 (N, S, S, 3) images against the dataset's held-out galaxies (N is capped as n)."""
    from galaxygen.evaluate.reference import Reference

    ref = Reference(open_cache(cache), len(images), workers, progress, inception)
    return _compare(ref, np.asarray(images)[: ref.n], morph)


def _compare(ref, images: np.ndarray, morph=None) -> dict[str, float]:
    out = ref.compare(images, morph=None if morph is None else morph.iloc[: ref.n].reset_index(drop=True))
    out["eval_n"] = float(ref.n)
    return out


def latent_probes(model: torch.nn.Module, ref) -> dict[str, float]:
    """probe_r2_<param>: held-out R^2 of linear probes from the posterior mean (VAEs, datasets with labels)."""
    from galaxygen.evaluate import baselines as base
    from galaxygen.evaluate import probes
    from galaxygen.models.vae import posterior_means

    if not hasattr(model, "encode") or not ref.meta["labels"]:
        return {}
    train_rows, test_rows = base.probe_rows(ref)
    mu_train = posterior_means(model, ref.cache.images[train_rows])
    mu_test = posterior_means(model, ref.cache.images[test_rows])
    return probes.probe_r2(mu_train, base.truth(ref, train_rows), mu_test, base.truth(ref, test_rows))


def evaluate_model(model: torch.nn.Module, config, cache=None, n: int = DEFAULT_N, workers: int = 1,
                   seed: int = 0, progress: bool = True, inception: str | os.PathLike | None = None,
                   morph=None, latents: tuple[str, ...] | None = None) -> dict[str, float]:
    """Sample n galaxies (seeded) from each of `latents` (default: every latent of the model's family) and
    return every metric as a flat {name: value} dict: the family's default latent under the plain names,
    the others with the suffix _<latent>.

    config: the model's TrainConfig. cache: a Cache, a cache path, or None for `config.data` / the built-in
    synthetic galaxies. n is capped at half the held-out pool (val + test). `morph` (optional) is a
    precomputed morphology.measure table of the first latent's samples (the sharded SLURM path).
    """
    from galaxygen.evaluate.reference import Reference

    start = time.time()
    family = MODELS[config.model].family
    ref = Reference(open_cache(cache, config), n, workers, progress, inception)
    out: dict[str, float] = {}
    for i, latent in enumerate(latents or family.latents):
        metrics = _compare(ref, sample_images(model, ref.n, latent, seed), morph if i == 0 else None)
        suffix = "" if latent == family.latents[0] else f"_{latent}"
        out.update({f"{k}{suffix}" if k != "eval_n" else k: v for k, v in metrics.items()})
    out.update(latent_probes(model, ref))
    log.info("evaluated %d samples per latent in %.1f s", ref.n, time.time() - start)
    return out


def metric_rows(metrics: dict[str, float], base: dict[str, dict[str, float]] | None = None, step: int = 0,
                epoch: int = 0) -> list[dict]:
    """Rows for ResultsStore.write_metrics: split "eval", and "eval_real_vs_real" / "eval_one_image" for baselines."""
    now = time.time()
    rows = [dict(step=step, epoch=epoch, split="eval", metric=k, value=float(v), wall_time=now)
            for k, v in metrics.items()]
    for name, values in (base or {}).items():
        rows += [dict(step=step, epoch=epoch, split=f"eval_{name}", metric=k, value=float(v), wall_time=now)
                 for k, v in values.items() if k in metrics]
    return rows
