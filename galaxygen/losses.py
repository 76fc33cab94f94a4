"""The VAE objective, with its reductions defined once: sum over pixels and latent dims, mean over images.

Per image x with D = 3*S*S values:
    recon = sum over pixels of the chosen reconstruction loss (bce: Bernoulli NLL in nats)
    kl    = KL(N(mu, sigma^2) || N(0, I)) summed over latent dims, in nats
    loss  = recon + alpha * warmup * kl_free_bits + tv_weight * tv      (what is minimised)
    nelbo = recon + kl                                                   (negative ELBO, alpha = 1)
    bits_per_dim = nelbo / (D ln 2)
Each term is averaged over the images of the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def reconstruction(logits: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-image reconstruction loss summed over pixels, shape (B,). Decoder outputs are logits."""
    if kind == "bce":
        per_pixel = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    elif kind == "l1":
        per_pixel = (torch.sigmoid(logits) - x).abs()
    elif kind == "mse":
        per_pixel = (torch.sigmoid(logits) - x).pow(2)
    else:
        raise ValueError(f"reconstruction loss must be bce, l1 or mse, got {kind!r}")
    return per_pixel.flatten(1).sum(1)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation per image, shape (B,): penalises high-frequency artefacts."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).sum(1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).sum(1)
    return dx + dy


def elbo_loss(
    logits: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    recon_loss: str = "bce",
    alpha: float = 1.0,
    free_bits: float = 0.0,
    tv_weight: float = 0.0,
) -> LossParts:
    """The objective and its parts for one batch (see the module docstring for the reductions)."""
    logits = logits.float()
    recon = reconstruction(logits, x, recon_loss).mean()
    kl_dims = kl_per_dim(mu.float(), logvar.float())
    kl = kl_dims.sum(1).mean()
    kl_term = kl_dims.mean(0).clamp(min=free_bits).sum() if free_bits > 0 else kl
    loss = recon + alpha * kl_term
    if tv_weight > 0:
        loss = loss + tv_weight * total_variation(torch.sigmoid(logits)).mean()
    nelbo = recon + kl
    bits = nelbo / (x[0].numel() * math.log(2))
    return LossParts(loss, recon, kl, nelbo, bits)


def warmup_factor(epoch_progress: float, warmup_epochs: int) -> float:
    """KL warm-up: the KL weight ramps linearly from 0 to 1 over the first `warmup_epochs` epochs."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, epoch_progress / warmup_epochs)
