"""The report's convolutional VAEs: Table III (`cnn`) and its first three-layer design (`cnn3`)."""

from __future__ import annotations

import torch
from torch import nn

from galaxygen.models.registry import register
from galaxygen.models.vae import FAMILY, VAE


def conv_out(size: int, kernel: int = 5) -> int:
    return size - kernel + 1


class TableIIIVAE(VAE):
    """conv5-pool-conv5-pool encoder, linear mu/logvar, upsample + transposed-conv decoder (its output is the
    image through a sigmoid, or itself under the gaussian likelihood: VAE.decode)."""

    def __init__(self, image_size: int, latent_dim: int, width: int, dropout: float):
        super().__init__()
        self.latent_dim = latent_dim
        s1 = conv_out(image_size) // 2
        s2 = conv_out(s1) // 2
        if s2 < 1 or 2 * s2 + 4 != s1 or 2 * s1 + 4 != image_size:
            raise ValueError(f"model cnn needs an image size S with S-4 and (S-4)/2-4 even (e.g. 32, 64, 128), got {image_size}")
        c1, c2 = width, 2 * width
        self.shape = (c2, s2, s2)
        flat = c2 * s2 * s2
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.MaxPool2d(2), nn.ReLU(),
            nn.Flatten(), nn.Dropout(dropout),
        )
        self.to_mu = nn.Linear(flat, latent_dim)
        self.to_logvar = nn.Linear(flat, latent_dim)
        self.latent_mapping = nn.Linear(latent_dim, flat)
        self.decoder = nn.Sequential(
            nn.ReLU(), nn.Upsample(scale_factor=2), nn.ConvTranspose2d(c2, c1, 5),
            nn.ReLU(), nn.Upsample(scale_factor=2), nn.ConvTranspose2d(c1, 3, 5),
        )

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.latent_mapping(z).view(-1, *self.shape))


class ThreeConvVAE(VAE):
    """Three unpooled 5x5 convolutions (width, 2 width, 4 width channels) and their transposes."""

    def __init__(self, image_size: int, latent_dim: int, width: int, dropout: float):
        super().__init__()
        self.latent_dim = latent_dim
        s = image_size - 12
        c1, c2, c3 = width, 2 * width, 4 * width
        self.shape = (c3, s, s)
        flat = c3 * s * s
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c1, 5), nn.ReLU(), nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.Conv2d(c2, c3, 5), nn.ReLU(),
            nn.Flatten(), nn.Dropout(dropout),
        )
        self.to_mu = nn.Linear(flat, latent_dim)
        self.to_logvar = nn.Linear(flat, latent_dim)
        self.latent_mapping = nn.Linear(latent_dim, flat)
        self.decoder = nn.Sequential(
            nn.ReLU(), nn.ConvTranspose2d(c3, c2, 5), nn.ReLU(), nn.ConvTranspose2d(c2, c1, 5),
            nn.ReLU(), nn.ConvTranspose2d(c1, 3, 5),
        )

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.latent_mapping(z).view(-1, *self.shape))


@register("cnn", "Table III convolutional VAE: conv 3-16-32 k5 with max-pool, latent 12, dropout 0.2", FAMILY,
          fixed_depth=True, latent_dim=12, width=16, depth=2, dropout=0.2)
def cnn(image_size: int, latent_dim: int, width: int, depth: int, dropout: float) -> nn.Module:
    return TableIIIVAE(image_size, latent_dim, width, dropout)


@register("cnn3", "the report's first convolutional VAE: conv 3-8-16-32 k5, no pooling", FAMILY,
          fixed_depth=True, latent_dim=12, width=8, depth=3, dropout=0.2)
def cnn3(image_size: int, latent_dim: int, width: int, depth: int, dropout: float) -> nn.Module:
    return ThreeConvVAE(image_size, latent_dim, width, dropout)
