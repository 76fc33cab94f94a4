"""A stationary Gaussian pixel-noise model fitted to a VAE's training residuals, to sample images, not their mean.

A VAE's decoder gives the mean of p(x | z): a smooth galaxy without the sky noise every observed galaxy carries
(the synthetic galaxies' noise is correlated between neighbouring pixels, as resampled survey noise is). Decoding
that mean and calling it a sample drops the noise, which the domain encoder's sharpness and spatial-frequency
descriptors see at once. Astronomical generative models add noise from a noise model of the survey to the
noiseless light profile they generate (Lanusse et al. 2021 draw it from the survey's noise power spectrum);
here the noise model is fitted after training, like the latent prior, to the residuals x - mean(mu(x)) of
training galaxies: a zero-mean Gaussian per colour channel whose covariance is stationary (circulant), i.e.
diagonal in the Fourier basis. Its maximum-likelihood fit is the mean power spectrum of the residuals, so
the fit is exact, deterministic and cheap; it generalises the gaussian likelihood's one variance per channel
(recon_loss=gaussian, whose optimum is the mean squared residual: the spectrum's mean, by Parseval) to correlated noise.

Sampling draws white noise with the caller's generator and colours it with the spectrum's square root
(n, C, S, S); the spectrum is a plain tensor, so checkpoints still load with weights_only=True.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass
class PixelNoise:
    """Zero-mean stationary Gaussian noise per channel, given by its power spectrum (C, S, S): the expected
    |FFT|^2 of one noise image's channel (unnormalised FFT, so its mean over frequencies is S*S times the
    per-pixel variance)."""

    power: torch.Tensor

    @classmethod
    def fit(cls, residuals: Iterable[torch.Tensor]) -> PixelNoise:
        """The maximum-likelihood stationary Gaussian for batches of residual images (B, C, S, S): the mean
        power spectrum over all images (accumulated in float64, so the order of the batches does not matter)."""
        total, count = None, 0
        for batch in residuals:
            power = torch.fft.fft2(batch.double()).abs().square().sum(0)
            total = power if total is None else total + power
            count += len(batch)
        if not count:
            raise ValueError("fitting a pixel-noise model needs at least one residual image")
        return cls((total / count).float())

    def variance(self) -> torch.Tensor:
        """The per-pixel variance of each channel (C,) (Parseval: the power spectrum's mean over the S*S pixels)."""
        return self.power.mean((-2, -1)) / (self.power.shape[-2] * self.power.shape[-1])

    def sample(self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """n noise images (n, C, S, S) drawn with `generator` (on its device)."""
        device = generator.device if generator is not None else torch.device(device)
        power = self.power.to(device)
        size = power.shape[-2] * power.shape[-1]
        white = torch.randn(n, *power.shape, generator=generator, device=device)
        # |FFT(white)|^2 has expectation S*S at every frequency; scaling by sqrt(power / (S*S)) gives `power`.
        # The spectrum of a real image is symmetric (P(k) = P(-k)), so the coloured field stays real.
        return torch.fft.ifft2(torch.fft.fft2(white) * (power / size).sqrt()).real

    def state(self) -> dict[str, torch.Tensor]:
        return {"power": self.power}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> PixelNoise:
        return cls(state["power"])
