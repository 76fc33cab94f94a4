"""A cheap per-epoch estimate of fid_domain, so a sweep can rank and stop trials by sample quality.

`QuickEstimate(cache, n)` loads the dataset's domain encoder and the whitened features of its held-out real
galaxies once (the same real side as the full evaluation's fid_domain, see `reference.Reference`); each call
then only draws n samples (seeded), embeds them and takes one Frechet distance: 0.5 s for a `cnn` at n = 64
on one CPU core (a diffusion model pays its sampler's steps, about 35 s). It is logged every epoch as the val metric `fid_domain_quick` (config `quick_eval_n`) and is what
`python -m sweeps.launch search --metric fid_domain` ranks and stops trials by. At small n the estimate is
biased upwards and noisy; `bench/bench_quick_eval.py` measures its spread over sampling seeds against the
difference between checkpoints. Every epoch uses the same sampling seed, so epochs are compared on the same
latent draws.
"""

from __future__ import annotations

import numpy as np
import torch

from galaxygen.evaluate import features, open_cache, sample_images
from galaxygen.models import MODELS

METRIC = "fid_domain_quick"  # logged with split "val"; the Tune metric is val_fid_domain_quick
DEFAULT_N = 64


class QuickEstimate:
    """fid_domain of n generated galaxies against a fixed held-out real set, reusing one encoder per run."""

    def __init__(self, cache=None, n: int = DEFAULT_N):
        from galaxygen.evaluate.reference import Reference

        with torch.random.fork_rng(devices=[]):  # training the encoder on first use must not move the run's RNG
            self.ref = Reference(open_cache(cache), n, workers=1, progress=False)
        self.n = self.ref.n
        self.real = self.ref.pool_features(self.ref.rows_features)

    def score_images(self, images: np.ndarray) -> float:
        """fid_domain of uint8 images (N, S, S, 3) against the held-out real features."""
        return features.frechet_distance(self.ref.embed(np.asarray(images)), self.real)

    def __call__(self, model: torch.nn.Module, config, seed: int = 0) -> float:
        """fid_domain of n samples of `model` (a `config.model`) from its family's default latent, seeded."""
        latent = MODELS[config.model].family.latents[0]
        with torch.random.fork_rng(devices=[]):  # a sampler that draws from the global RNG must not move the run's
            return self.score_images(sample_images(model, self.n, latent, seed))
