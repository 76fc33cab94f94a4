"""A residual convolutional VAE in the spirit of Lanusse et al. (2021): ResNet blocks around a small latent.

Channels depend only on the resolution: w at 16 px, doubling per halving (4w at the 4x4 bottleneck) and
halving per doubling (never below min(w, 8)), so a 32 px model is the 64 px one minus its outermost
stage. At 64 px:

    encoder  3x64 -conv-> w/4x64 -down-> w/2x32 -down-> w x16 -down-> 2w x8 -down-> 4w x4 -> linear mu, logvar
             ("down" = stride-2 3x3 conv, then a residual block)
    decoder  z -linear-> 4w x4 -res-> -up-> 2w x8 -up-> w x16 -up-> w/2 x32 -up-> w/4 x64 -conv-> 3x64
             ("up" = nearest-neighbour x2 + 3x3 conv, then a residual block except at full resolution;
             VAE.decode maps the output to the image: a sigmoid, or the identity under the gaussian likelihood)

Thin high-resolution stages keep it CPU-affordable: with w = 32 a training step on 32 images of 64 px
takes about 0.25 s on one core. GroupNorm rather than BatchNorm: no batch statistics, so tiny per-rank
batches under DDP and eval mode behave like training. The config's dropout sits inside every residual
block when > 0. The config's depth is the number of residual blocks per stage (1 above).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from galaxygen.models.registry import register
from galaxygen.models.vae import FAMILY, VAE

BOTTLENECK = 4  # spatial size of the deepest feature map


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups (the largest power of two <= 8 dividing the channel count)."""
    return nn.GroupNorm(math.gcd(channels, 8), channels)


def channels_at(resolution: int, width: int) -> int:
    """Feature channels at a resolution: w at 16 px, x2 per halving (4w at 4 px), never below min(w, 8)."""
    return max(width * 16 // resolution, min(width, 8))


def check_size(image_size: int) -> int:
    """Number of x2 resampling stages between the image and the 4x4 bottleneck; the size must be 2^k >= 8."""
    stages = int(math.log2(image_size // BOTTLENECK)) if image_size >= 2 * BOTTLENECK else 0
    if stages < 1 or BOTTLENECK * 2**stages != image_size:
        raise ValueError(f"this model needs a power-of-two image size >= 8 (e.g. 32, 64, 128), got {image_size}")
    return stages


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(dropout(act(norm(conv(act(norm(x))))))), 3x3 convs."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            norm(channels), nn.SiLU(), nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def blocks(channels: int, dropout: float, depth: int) -> list[nn.Module]:
    return [ResBlock(channels, dropout) for _ in range(depth)]


class ResVAE(VAE):
    """Strided-conv + residual-block encoder, linear Gaussian heads, upsample + residual-block decoder."""

    def __init__(self, image_size: int, latent_dim: int, width: int, dropout: float, depth: int = 1):
        super().__init__()
        stages = check_size(image_size)
        self.latent_dim = latent_dim
        sizes = [image_size // 2**i for i in range(stages + 1)]  # e.g. 64, 32, 16, 8, 4
        deepest = channels_at(BOTTLENECK, width)
        self.shape = (deepest, BOTTLENECK, BOTTLENECK)
        flat = deepest * BOTTLENECK * BOTTLENECK

        encoder: list[nn.Module] = [nn.Conv2d(3, channels_at(image_size, width), 3, padding=1)]
        for big, small in zip(sizes[:-1], sizes[1:]):
            c_in, c_out = channels_at(big, width), channels_at(small, width)
            encoder += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), *blocks(c_out, dropout, depth)]
        encoder += [norm(deepest), nn.SiLU(), nn.Flatten()]
        self.encoder = nn.Sequential(*encoder)
        self.to_mu = nn.Linear(flat, latent_dim)
        self.to_logvar = nn.Linear(flat, latent_dim)

        self.latent_mapping = nn.Linear(latent_dim, flat)
        decoder: list[nn.Module] = blocks(deepest, dropout, depth)
        for small, big in zip(sizes[:0:-1], sizes[-2::-1]):
            c_in, c_out = channels_at(small, width), channels_at(big, width)
            decoder += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1)]
            if big < image_size:  # no residual block at full resolution: it would double the cost
                decoder += blocks(c_out, dropout, depth)
        top = channels_at(image_size, width)
        decoder += [norm(top), nn.SiLU(), nn.Conv2d(top, 3, 3, padding=1)]
        self.decoder = nn.Sequential(*decoder)

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.latent_mapping(z).view(-1, *self.shape))


@register("resvae", "residual conv VAE after Lanusse et al. 2021: GroupNorm+SiLU ResNet blocks, 4x4 bottleneck",
          FAMILY, latent_dim=32, width=32, depth=1, dropout=0.0, lr=1e-3)
def resvae(image_size: int, latent_dim: int, width: int, depth: int, dropout: float) -> nn.Module:
    return ResVAE(image_size, latent_dim, width, dropout, depth)
