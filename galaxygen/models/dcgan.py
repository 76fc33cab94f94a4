"""A DCGAN (Radford et al. 2016) stabilised by spectral normalisation and the hinge loss (Miyato et al. 2018).

Layout for 64 px, width w (DCGAN's channel plan: 8w at 4x4, halving per doubling of the resolution):

    generator      z --linear--> 8w x 4 --up--> 4w x 8 --up--> 2w x 16 --up--> w x 32 --up--> 3 x 64, sigmoid
                   (each "up" is BatchNorm, ReLU, 4x4 stride-2 transposed conv)
    discriminator  x in [0,1] -> 2x-1 --down--> w x 32 --down--> 2w x 16 --down--> 4w x 8 --down--> 8w x 4
                   --linear--> one logit (each "down": spectrally normalised 4x4 stride-2 conv, LeakyReLU)

Why these stabilisers:
- Spectral normalisation of every discriminator layer bounds D's Lipschitz constant, so its gradients to the
  generator neither explode nor vanish when D gets ahead: the failure mode of the report's GAN. It needs no
  batch statistics, hence no BatchNorm in D, and it works the same on one process or under DDP.
- The hinge loss (D: relu(1 - D(real)) + relu(1 + D(fake)); G: -D(fake)) is the loss spectral normalisation
  was tuned with; it stops pushing D on examples it already separates by a margin, which keeps D from
  saturating. The generator's loss never saturates either.
- BatchNorm in the generator, as in DCGAN and SNGAN: on a toy distribution per-sample normalisations
  (GroupNorm, PixelNorm) or none left the generator collapsed to one image for longer. Under DDP each rank
  normalises with its own batch statistics, and so does `sample`, in either mode: running statistics
  (track_running_stats) lag the generator and turned eval-mode samples into noise.
The discriminator sees real images and generator outputs in one concatenated batch (one power iteration,
one forward), never noise images.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from galaxygen.models.registry import Family, autocast_args, register
from galaxygen.models.resvae import BOTTLENECK, check_size


def channels_at(resolution: int, width: int) -> int:
    """Feature channels at a resolution: 8w at 4 px, halving per doubling down to w (at 32 px and above)."""
    return width * min(8, max(1, 32 // resolution))


class Generator(nn.Module):
    """z (B, latent) -> images (B, 3, S, S) in [0, 1] through x2 transposed convolutions."""

    def __init__(self, image_size: int, latent_dim: int, width: int):
        super().__init__()
        stages = check_size(image_size)
        sizes = [BOTTLENECK * 2**i for i in range(stages + 1)]  # e.g. 4, 8, 16, 32, 64
        deepest = channels_at(BOTTLENECK, width)
        self.shape = (deepest, BOTTLENECK, BOTTLENECK)
        self.latent_mapping = nn.Linear(latent_dim, deepest * BOTTLENECK * BOTTLENECK)
        layers: list[nn.Module] = []
        for small, big in zip(sizes[:-1], sizes[1:]):
            c_in = channels_at(small, width)
            c_out = 3 if big == image_size else channels_at(big, width)
            layers += [nn.BatchNorm2d(c_in, track_running_stats=False), nn.ReLU(),
                       nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(self.latent_mapping(z).view(-1, *self.shape)))


class Discriminator(nn.Module):
    """Images (B, 3, S, S) in [0, 1] -> logits (B,): spectrally normalised strided convs, LeakyReLU(0.2)."""

    def __init__(self, image_size: int, width: int, dropout: float):
        super().__init__()
        stages = check_size(image_size)
        sizes = [image_size // 2**i for i in range(stages + 1)]  # e.g. 64, 32, 16, 8, 4
        layers: list[nn.Module] = []
        c_in = 3
        for small in sizes[1:]:
            c_out = channels_at(small, width)
            layers += [spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            c_in = c_out
        layers += [nn.Flatten(), spectral_norm(nn.Linear(c_in * BOTTLENECK * BOTTLENECK, 1))]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(2 * x - 1).squeeze(1)


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Within the block the module's parameters record no gradients (inputs still get theirs)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class DCGAN(nn.Module):
    """Generator + spectrally normalised discriminator trained with the hinge loss (see module docstring)."""

    def __init__(self, image_size: int, latent_dim: int, width: int, dropout: float):
        super().__init__()
        self.image_size = image_size
        self.latent_dim = latent_dim
        self.generator = Generator(image_size, latent_dim, width)
        self.discriminator = Discriminator(image_size, width, dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, latent: str = "prior") -> torch.Tensor:
        """n generated images (n, 3, S, S) in [0, 1] from z ~ N(0, I), the generator's input distribution."""
        if latent not in FAMILY.latents:
            raise ValueError(f"a GAN samples only from its input distribution (latent 'prior'), got {latent!r}")
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        return self.generator(z)

    def d_loss(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge loss of D on real images and (detached) generator outputs, scored in one batch."""
        logits = self.discriminator(torch.cat([real, fake.to(real.dtype)]))
        d_real, d_fake = logits.float().split([len(real), len(fake)])
        loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        return loss, {"loss_d": float(loss.detach()), "d_real": float(d_real.detach().mean()),
                      "d_fake": float(d_fake.detach().mean())}

    def g_loss(self, fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Generator hinge loss -D(fake); D's parameters are frozen so its backward only reaches G."""
        with frozen(self.discriminator):
            d_fake = self.discriminator(fake).float()
        loss = -d_fake.mean()
        return loss, {"loss_g": float(loss.detach()), "d_fake": float(d_fake.detach().mean())}


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average gradients over ranks with one all-reduce of the flattened gradients (no-op in one process)."""
    if not torch.distributed.is_initialized():
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class GANObjective:
    """One discriminator step and one generator step of a GAN (gradients averaged across ranks).

    A GAN has no held-out likelihood, and its losses measure the generator only against the discriminator
    of the moment, so they do not rank epochs: the best checkpoint is the latest.
    """

    def __init__(self, model: DCGAN, config, env, device: torch.device):
        self.model = model
        self.config = config
        betas = (0.5, 0.999)
        self.opt_d = torch.optim.AdamW(model.discriminator.parameters(), lr=config.lr, betas=betas,
                                       weight_decay=config.weight_decay)
        self.opt_g = torch.optim.AdamW(model.generator.parameters(), lr=config.lr, betas=betas,
                                       weight_decay=config.weight_decay)
        self.optimizers = [self.opt_d, self.opt_g]
        self.autocast = autocast_args(config, device)

    def _step(self, loss: torch.Tensor, opt, params) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        opt.step()

    def train_step(self, x: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        z = torch.randn(len(x), self.model.latent_dim, device=x.device)
        with torch.autocast(**self.autocast):
            fake = self.model.generator(z)
            loss_d, parts_d = self.model.d_loss(x, fake.detach())
        self._step(loss_d, self.opt_d, list(self.model.discriminator.parameters()))
        with torch.autocast(**self.autocast):
            loss_g, parts_g = self.model.g_loss(fake)
        self._step(loss_g, self.opt_g, list(self.model.generator.parameters()))
        out = {k: torch.as_tensor(float(v)) for k, v in {**parts_d, **parts_g}.items()}
        out["loss_d"], out["loss_g"] = loss_d.detach(), loss_g.detach()
        out["loss"] = out["loss_d"] + out["loss_g"]
        return out

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fake = self.model.sample(len(x))
        loss_d, parts_d = self.model.d_loss(x, fake)
        loss_g, parts_g = self.model.g_loss(fake)
        out = {k: torch.as_tensor(float(v)) for k, v in {**parts_d, **parts_g}.items()}
        out["loss_d"], out["loss_g"] = loss_d, loss_g
        out["loss"] = loss_d + loss_g
        return out

    def score(self, summary: dict) -> float:
        """Lower is better: minus the epoch, so the latest checkpoint is the best."""
        return -float(summary["epoch"])


FAMILY = Family("gan", GANObjective, ("prior",))


@register("dcgan", "DCGAN (BatchNorm G, spectral-norm D) with the hinge loss: the report's GAN, fixed", FAMILY,
          fixed_depth=True, latent_dim=64, width=32, depth=1, dropout=0.0, lr=2e-4)
def dcgan(image_size: int, latent_dim: int, width: int, depth: int, dropout: float) -> nn.Module:
    return DCGAN(image_size, latent_dim, width, dropout)
