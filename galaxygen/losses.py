"""The VAE objective, with its reductions defined once: sum over pixels and latent dims, mean over images.

Per image x with D = 3*S*S values in [0, 1]:
    recon = sum over pixels of the chosen reconstruction loss (the config's `recon_loss`, RECON_LOSSES)
    kl    = KL(N(mu, sigma^2) || N(0, I)) summed over latent dims, in nats
    loss  = recon + alpha * warmup * kl_free_bits + tv_weight * tv      (what is minimised)
    nelbo = recon + kl                                                   (negative ELBO, alpha = 1)
    bits_per_dim = nelbo / (D ln 2)
Each term is averaged over the images of the batch.

The reconstruction losses and what the decoder's output means under each (`mean_image`):
    bce       Bernoulli cross-entropy of the pixel values with the sigmoid of the output (the report's loss);
              with grey levels as targets this is not a normalised likelihood of images, so its nelbo is
              a loss in nats, not a negative log-likelihood bound
    l1, mse   absolute / squared error of the sigmoid of the output (losses, not likelihoods)
    gaussian  x ~ N(mean, diag(sigma_c^2)) per pixel, the output itself the mean (a linear output layer) and
              one variance per colour channel c, set to its maximum-likelihood value (Rybkin et al. 2021's
              optimal-sigma VAE; `optimal_variance`): a calibrated likelihood. recon is the exact negative
              log-density in nats per image, normalising constant included, of the pixel values scaled to
              [0, 1]: a density, so it can be negative; 8-bit images in bins of width 1/256 add D ln 256
              nats (8 bits per dim) for their discrete likelihood.
The nelbo (and bits_per_dim) of different reconstruction losses are not comparable with each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from galaxygen.config import RECON_LOSSES

# the variance of the rounding error of 8-bit pixels, (1/255)^2 / 12: no 8-bit image is known more precisely
VARIANCE_FLOOR = 1.0 / (12 * 255**2)


@dataclass
class LossParts:
    """The terms of the objective for one batch, each a mean over images."""

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    nelbo: torch.Tensor
    bits_per_dim: torch.Tensor


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per image and latent dim (closed form), shape (B, latent)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def mean_image(output: torch.Tensor, kind: str) -> torch.Tensor:
    """The image (B, 3, S, S) a decoder's output stands for under reconstruction loss `kind`: the sigmoid of the
    output (logits) for bce, l1 and mse, the output itself (a linear output layer) for gaussian."""
    return output if kind == "gaussian" else torch.sigmoid(output)


def optimal_variance(mean: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The maximum-likelihood variance of each colour channel of the gaussian likelihood for a batch, shape (3,):
    the closed form sigma_c^2 = mean over images and pixels of (x - mean)^2 in channel c, floored at
    VARIANCE_FLOOR. Detached: at this optimum the loss's derivative in the variance is zero, so the gradient
    the mean receives is the same as with the variance left in the graph."""
    return (x - mean.detach()).pow(2).mean((0, 2, 3)).clamp(min=VARIANCE_FLOOR)


def reconstruction(output: torch.Tensor, x: torch.Tensor, kind: str,
                   variance: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image reconstruction loss summed over pixels, shape (B,), of the decoder's output (see `mean_image`).

    variance: the gaussian likelihood's per-channel variance (3,); None takes the batch's own optimum."""
    if kind not in RECON_LOSSES:
        raise ValueError(f"reconstruction loss must be one of {', '.join(RECON_LOSSES)}, got {kind!r}")
    if kind == "bce":
        per_pixel = F.binary_cross_entropy_with_logits(output, x, reduction="none")
    elif kind == "gaussian":
        var = (optimal_variance(output, x) if variance is None else variance).view(1, -1, 1, 1)
        per_pixel = 0.5 * ((x - output).pow(2) / var + torch.log(2 * math.pi * var))
    else:
        error = mean_image(output, kind) - x
        per_pixel = error.abs() if kind == "l1" else error.pow(2)
    return per_pixel.flatten(1).sum(1)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation per image, shape (B,): penalises high-frequency artefacts."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).sum(1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).sum(1)
    return dx + dy


def elbo_loss(
    output: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    recon_loss: str = "bce",
    alpha: float = 1.0,
    free_bits: float = 0.0,
    tv_weight: float = 0.0,
    variance: torch.Tensor | None = None,
) -> LossParts:
    """The objective and its parts for one batch (see the module docstring for the reductions); `output` is the
    decoder's (see `mean_image`), `variance` the gaussian likelihood's (None: the batch's optimum)."""
    output = output.float()
    recon = reconstruction(output, x, recon_loss, variance).mean()
    kl_dims = kl_per_dim(mu.float(), logvar.float())
    kl = kl_dims.sum(1).mean()
    kl_term = kl_dims.mean(0).clamp(min=free_bits).sum() if free_bits > 0 else kl
    loss = recon + alpha * kl_term
    if tv_weight > 0:
        loss = loss + tv_weight * total_variation(mean_image(output, recon_loss)).mean()
    nelbo = recon + kl
    bits = nelbo / (x[0].numel() * math.log(2))
    return LossParts(loss, recon, kl, nelbo, bits)


def warmup_factor(epoch_progress: float, warmup_epochs: int) -> float:
    """KL warm-up: the KL weight ramps linearly from 0 to 1 over the first `warmup_epochs` epochs."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, epoch_progress / warmup_epochs)
