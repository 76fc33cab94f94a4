"""A denoising diffusion model (Ho et al. 2020) with diffusers' U-Net, EMA weights and a few-step sampler.

Images in [0, 1] are mapped to x0 in [-1, 1]. Training noises them in closed form,
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, at a uniform t of T = 1000 steps of the cosine schedule
(Nichol & Dhariwal 2021; better than the linear one at small image sizes), and the U-Net predicts eps.
Samples start from x_T ~ N(0, I) and take `sample_steps` steps of DPM-Solver++(2M) (Lu et al. 2022), an
ODE solver that needs 10-20 steps where ancestral DDPM sampling needs 1000, with the EMA weights.

U-Net (diffusers' UNet2DModel, built from a config, nothing downloaded), at 64 px and width w:

    level   64 px: w    32 px: 2w    16 px: 2w    8 px: 4w     mid block at 8 px
    each level: `depth` ResNet blocks down, depth + 1 up (with skip connections), timestep-conditioned

Levels go down to 8 px whatever the image size (fewer levels for smaller images): the deep levels cost
little (channels x2, pixels /4 per level) and give the receptive field that a galaxy's global shape needs;
the full-resolution level dominates the cost. Self-attention sits in the levels (and the mid block) at
`attention_res` px and below; 0 (the default) turns it off, which CPUs prefer at this size.

The EMA copy of the U-Net (decay 0.999 after a warm-up, as in DDPM) is what samples, what the held-out
denoising loss is measured on and what is checkpointed beside the trained weights.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from galaxygen.models.registry import Family, autocast_args, register

TRAIN_STEPS = 1000  # T: timesteps of the forward process
SCHEDULE = "squaredcos_cap_v2"  # diffusers' name of the cosine schedule
BOTTOM = 8  # resolution of the deepest level
MULTIPLIERS = (1, 2, 2, 4, 4, 4)  # channels per level in units of the width, from full resolution down
EMA_DECAY = 0.999
VAL_SEED = 0  # noise and timesteps of the held-out denoising loss: the same draws every epoch


def levels(image_size: int) -> int:
    """Number of U-Net levels from `image_size` down to 8 px; sizes must be 8 x a power of two."""
    n = round(math.log2(image_size / BOTTOM)) if image_size >= BOTTOM else -1
    if n < 0 or BOTTOM * 2**n != image_size or n + 1 > len(MULTIPLIERS):
        raise ValueError(f"diffusion takes 8 px times a power of two up to {BOTTOM * 2 ** (len(MULTIPLIERS) - 1)} "
                         f"px (8, 16, 32, 64, ...), not {image_size}")
    return n + 1


def unet_config(image_size: int, width: int, depth: int, dropout: float, attention_res: int) -> dict:
    """The UNet2DModel keyword arguments of the design in the module docstring."""
    channels = [width * m for m in MULTIPLIERS[: levels(image_size)]]
    resolutions = [image_size >> i for i in range(len(channels))]
    attend = [r <= attention_res for r in resolutions]
    groups = math.gcd(width, 32, max(1, width // 4))  # GroupNorm: divides every level, >= 4 channels a group
    return dict(
        sample_size=image_size, in_channels=3, out_channels=3, block_out_channels=tuple(channels),
        layers_per_block=depth, dropout=dropout, norm_num_groups=groups, attention_head_dim=min(width, 64),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attend),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attend)),
        add_attention=attend[-1],
    )


def noise_schedule():
    """The training schedule (diffusers' DDPMScheduler: betas, alphas_cumprod, add_noise)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=TRAIN_STEPS, beta_schedule=SCHEDULE, prediction_type="epsilon",
                         clip_sample=False)


def ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
    """One EMA step (AveragedModel's multi_avg_fn): decay min(0.999, (1 + n) / (10 + n)), so early averages
    are not dominated by the random initial weights."""
    n = float(n_averaged)
    decay = min(EMA_DECAY, (1 + n) / (10 + n))
    torch._foreach_lerp_(ema_params, params, 1 - decay)


class Diffusion(nn.Module):
    """An eps-predicting U-Net, its EMA copy and the noise schedule (see the module docstring)."""

    kind = "diffusion"

    def __init__(self, image_size: int, width: int, depth: int, dropout: float, attention_res: int,
                 sample_steps: int):
        super().__init__()
        from diffusers import UNet2DModel
        from torch.optim.swa_utils import AveragedModel

        self.image_size, self.sample_steps = image_size, sample_steps
        self.unet = UNet2DModel(**unet_config(image_size, width, depth, dropout, attention_res))
        self.ema = AveragedModel(self.unet, multi_avg_fn=ema_update)
        self.ema.module.requires_grad_(False)
        self.schedule = noise_schedule()
        self.register_buffer("alphas_cumprod", self.schedule.alphas_cumprod.clone(), persistent=False)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The trained U-Net's noise prediction for noisy images x_t (in [-1, 1] units) at timesteps t."""
        return self.unet(x_t, t, return_dict=False)[0]

    def noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, the forward process in closed form."""
        abar = self.alphas_cumprod[t].to(x0.dtype).view(-1, 1, 1, 1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    def denoising_loss(self, net: nn.Module, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-image mean squared error of net's noise prediction for images x in [0, 1]: shape (B,)."""
        pred = net(self.noise(2 * x - 1, eps, t), t, return_dict=False)[0]
        return F.mse_loss(pred.float(), eps.float(), reduction="none").flatten(1).mean(1)

    def update_ema(self) -> None:
        self.ema.update_parameters(self.unet)

    def sampler(self):
        """A fresh DPM-Solver++(2M) over the training schedule, set to `sample_steps` steps from t = T - 1.

        Its clean-image estimates are clipped to [-1, 1] (as DDPM's sampler clips them): at t = T - 1 the
        cosine schedule's sqrt(abar) is 5e-5, so without the clip an eps error of 0.01 becomes a pixel
        error of 200 that the next steps carry into the sample (measured: noise that saturates every pixel
        of an early checkpoint's samples)."""
        from diffusers import DPMSolverMultistepScheduler

        sampler = DPMSolverMultistepScheduler.from_config(self.schedule.config, algorithm_type="dpmsolver++",
                                                          solver_order=2, timestep_spacing="trailing",
                                                          thresholding=True, sample_max_value=1.0)
        with warnings.catch_warnings():  # diffusers 0.42 calls np.array on a tensor the NumPy 2 way it deprecates
            warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy", DeprecationWarning)
            sampler.set_timesteps(self.sample_steps, device=self.alphas_cumprod.device)
        return sampler

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, latent: str = "prior") -> torch.Tensor:
        """n images (n, 3, S, S) in [0, 1] from x_T ~ N(0, I) by the few-step sampler with the EMA weights."""
        if latent not in FAMILY.latents:
            raise ValueError(f"a diffusion model samples only from x_T ~ N(0, I) (latent 'prior'), got {latent!r}")
        device = self.alphas_cumprod.device
        x = torch.randn(n, 3, self.image_size, self.image_size, generator=generator, device=device)
        sampler = self.sampler()
        net = self.ema.module
        for t in sampler.timesteps:
            eps = net(x, t.expand(n), return_dict=False)[0]
            x = sampler.step(eps, t, x, return_dict=False)[0]
        return ((x.float() + 1) / 2).clamp(0, 1)


class DiffusionObjective:
    """One optimisation step of the eps-prediction loss, then an EMA update; the held-out denoising loss.

    The held-out loss is the same per-image MSE, measured with the EMA weights at stratified timesteps
    (image i of a batch of B at t = floor((i + 1/2) T / B)) and noise drawn from a generator seeded with
    VAL_SEED at every batch, so every epoch (and a resumed run) scores each image with the same draws.
    """

    def __init__(self, model: Diffusion, config, env, device: torch.device):
        from torch.nn.parallel import DistributedDataParallel

        self.model, self.config, self.device = model, config, device
        self.net = DistributedDataParallel(model.unet) if env.enabled else model.unet
        self.optimizers = [torch.optim.AdamW(model.unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)]
        self.autocast = autocast_args(config, device)

    def train_step(self, x: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        eps = torch.randn_like(x)
        t = torch.randint(0, TRAIN_STEPS, (len(x),), device=x.device)
        with torch.autocast(**self.autocast):
            loss = self.model.denoising_loss(self.net, x, eps, t).mean()
        opt = self.optimizers[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.unet.parameters(), self.config.grad_clip)
        opt.step()
        self.model.update_ema()
        return {"loss": loss.detach()}

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        generator = torch.Generator(device=x.device).manual_seed(VAL_SEED)
        eps = torch.randn(x.shape, generator=generator, device=x.device)
        t = ((torch.arange(len(x), device=x.device) + 0.5) * TRAIN_STEPS / len(x)).long()
        with torch.autocast(**self.autocast):
            loss = self.model.denoising_loss(self.model.ema.module, x, eps, t).mean()
        return {"loss": loss}

    def score(self, summary: dict) -> float:
        """Lower is better: the held-out denoising loss of the EMA weights."""
        return summary["val_loss"]


FAMILY = Family("diffusion", DiffusionObjective, ("prior",))


@register("diffusion", "denoising diffusion: diffusers U-Net, cosine schedule, EMA, DPM-Solver++ sampler", FAMILY,
          width=16, depth=1, dropout=0.0, lr=1e-3, attention_res=0, sample_steps=20)
def diffusion(image_size: int, width: int, depth: int, dropout: float, attention_res: int,
              sample_steps: int) -> nn.Module:
    return Diffusion(image_size, width, depth, dropout, attention_res, sample_steps)
