"""The report's MLP VAEs (Tables I and II)."""

from __future__ import annotations

import torch
from torch import nn

from galaxygen.models.registry import register
from galaxygen.models.vae import FAMILY, VAE


def hidden_sizes(width: int, depth: int) -> list[int]:
    """The encoder's hidden layers: width, halving per layer (never below 1); the decoder mirrors them."""
    return [max(1, width // 2**i) for i in range(depth)]


def dense(sizes: list[int]) -> list[nn.Module]:
    """Linear layers through `sizes`, with a ReLU between two (none after the last)."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return layers[:-1]


class MLPVAE(VAE):
    """input -> width -> width/2 ... (depth layers) -> (mu, logvar) and the mirror image back, with optional
    input dropout. Depth 2 is the report's design: input-w-w/2 (Tables I and II)."""

    def __init__(self, image_size: int, latent_dim: int, width: int, dropout: float, depth: int = 2):
        super().__init__()
        self.image_size = image_size
        self.latent_dim = latent_dim
        d_in = 3 * image_size * image_size
        hidden = hidden_sizes(width, depth)
        self.input_dropout = nn.Dropout(dropout)
        self.encoder = nn.Sequential(nn.Flatten(), *dense([d_in, *hidden]))
        self.to_mu = nn.Linear(hidden[-1], latent_dim)
        self.to_logvar = nn.Linear(hidden[-1], latent_dim)
        self.latent_mapping = nn.Linear(latent_dim, hidden[-1])
        self.decoder = nn.Sequential(*dense([*hidden[::-1], d_in]))

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.input_dropout(x))

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.latent_mapping(z))
        return out.view(-1, 3, self.image_size, self.image_size)


@register("mlp1", "MLP VAE 1 (Table I): input-10-5, latent 2, no dropout", FAMILY,
          latent_dim=2, width=10, depth=2, dropout=0.0)
def mlp1(image_size: int, latent_dim: int, width: int, depth: int, dropout: float) -> nn.Module:
    return MLPVAE(image_size, latent_dim, width, dropout, depth)


@register("mlp2", "MLP VAE 2 (Table II): input dropout 0.2, input-40-20, latent 10", FAMILY,
          latent_dim=10, width=40, depth=2, dropout=0.2)
def mlp2(image_size: int, latent_dim: int, width: int, depth: int, dropout: float) -> nn.Module:
    return MLPVAE(image_size, latent_dim, width, dropout, depth)
