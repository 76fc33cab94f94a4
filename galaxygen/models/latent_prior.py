"""A density fitted to a VAE's aggregate posterior, to sample its latent space where the encoder put the data.

A VAE trained for a few epochs leaves holes in N(0, I): decoding z ~ N(0, I) lands between the galaxies it
learnt (grey blurs). Sampling instead from a Gaussian mixture fitted to the posterior means of training
galaxies (the "aggregate posterior", as in the two-stage VAE of Dai & Wipf 2019 and the learned latent prior
of Lanusse et al. 2021) decodes to galaxies like the training set. The fit is scikit-learn's GaussianMixture
(full covariances, fixed seed: deterministic); sampling uses torch with the caller's generator, and the
mixture is stored as plain tensors, so checkpoints still load with weights_only=True.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

COMPONENTS = 10
MAX_FIT = 2000  # posterior means the mixture is fitted to (a fixed sample of the train split)
SEED = 0


@dataclass
class LatentPrior:
    """A Gaussian mixture over the latent space: weights (K,), means (K, D), Cholesky factors (K, D, D)."""

    weights: torch.Tensor
    means: torch.Tensor
    scale_tril: torch.Tensor

    @classmethod
    def fit(cls, z: np.ndarray, components: int = COMPONENTS, seed: int = SEED) -> LatentPrior:
        """Fit to latent vectors z (N, D) (at least 2 per component; fewer components for fewer vectors)."""
        from sklearn.mixture import GaussianMixture

        z = np.asarray(z, np.float64)
        k = max(1, min(components, len(z) // 2))
        gm = GaussianMixture(k, covariance_type="full", reg_covar=1e-4, random_state=seed, max_iter=200).fit(z)
        cholesky = np.linalg.cholesky(gm.covariances_)
        return cls(*(torch.as_tensor(a, dtype=torch.float32) for a in (gm.weights_, gm.means_, cholesky)))

    def sample(self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """n latent vectors (n, D) drawn from the mixture with `generator` (on its device)."""
        device = generator.device if generator is not None else torch.device(device)
        weights, means, tril = (t.to(device) for t in (self.weights, self.means, self.scale_tril))
        component = torch.multinomial(weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, means.shape[1], 1, generator=generator, device=device)
        return means[component] + (tril[component] @ eps).squeeze(-1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density of latent vectors z (N, D) under the mixture, shape (N,)."""
        mix = torch.distributions.Categorical(probs=self.weights)
        comp = torch.distributions.MultivariateNormal(self.means, scale_tril=self.scale_tril)
        return torch.distributions.MixtureSameFamily(mix, comp).log_prob(z.float())

    def state(self) -> dict[str, torch.Tensor]:
        return {"weights": self.weights, "means": self.means, "scale_tril": self.scale_tril}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> LatentPrior:
        return cls(state["weights"], state["means"], state["scale_tril"])


def fit_rows(train_rows: np.ndarray, limit: int = MAX_FIT, seed: int = SEED) -> np.ndarray:
    """The (sorted) train rows whose posterior means the prior is fitted to: all, or a seeded sample of `limit`."""
    if len(train_rows) <= limit:
        return np.sort(train_rows)
    return np.sort(np.random.default_rng(seed).choice(train_rows, limit, replace=False))
