"""The report's MLP VAEs (Tables I and II)."""

from __future__ import annotations

import torch
from torch import nn

from galaxygen.models import register
from galaxygen.models.vae import VAE


class MLPVAE(VAE):
    """input -> width -> width/2 -> (mu, logvar) -> width/2 -> width -> input, with optional input dropout."""

    def __init__(self, image_size: int, latent_dim: int, width: int, dropout: float):
        super().__init__()
        self.image_size = image_size
        self.latent_dim = latent_dim
        d_in = 3 * image_size * image_size
        half = max(1, width // 2)
        self.input_dropout = nn.Dropout(dropout)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, half))
        self.to_mu = nn.Linear(half, latent_dim)
        self.to_logvar = nn.Linear(half, latent_dim)
        self.latent_mapping = nn.Linear(latent_dim, half)
        self.decoder = nn.Sequential(nn.Linear(half, width), nn.ReLU(), nn.Linear(width, d_in))

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.input_dropout(x))

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.latent_mapping(z))
        return out.view(-1, 3, self.image_size, self.image_size)


@register("mlp1", "MLP VAE 1 (Table I): input-10-5, latent 2, no dropout", latent_dim=2, width=10, dropout=0.0)
def mlp1(image_size: int, latent_dim: int, width: int, dropout: float) -> nn.Module:
    return MLPVAE(image_size, latent_dim, width, dropout)


@register("mlp2", "MLP VAE 2 (Table II): input dropout 0.2, input-40-20, latent 10", latent_dim=10, width=40, dropout=0.2)
def mlp2(image_size: int, latent_dim: int, width: int, dropout: float) -> nn.Module:
    return MLPVAE(image_size, latent_dim, width, dropout)
