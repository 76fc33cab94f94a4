"""The VAE family: the Gaussian reparameterisation, sampling from N(0, I) or a fitted latent prior (with or
without a fitted pixel-noise model around the decoder's mean), and the
objective (the ELBO of galaxygen.losses under the config's reconstruction loss; the best checkpoint has the
lowest held-out negative ELBO)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from galaxygen import distributed
from galaxygen.data.loader import to_float
from galaxygen.losses import elbo_loss, mean_image, optimal_variance, warmup_factor
from galaxygen.models.latent_prior import LatentPrior, fit_rows
from galaxygen.models.pixel_noise import PixelNoise
from galaxygen.models.registry import Family, TrainingData, autocast_args, evaluating

VARIANCE_MOMENTUM = 0.1  # weight of each training batch in the gaussian likelihood's running variance


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I) (normal noise, not uniform)."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


class VAE(nn.Module):
    """Base class: subclasses define `encoder_features`, `to_mu`, `to_logvar` and `decode_logits` (the decoder's
    raw output: logits, or the image itself under the gaussian likelihood; see galaxygen.losses.mean_image).

    `likelihood` is the config's recon_loss (set by `build_model`). `latent_prior` (a LatentPrior fitted to the
    aggregate posterior, or None), `pixel_noise` (a PixelNoise fitted to the training residuals, or None) and
    `recon_variance` (the gaussian likelihood's per-channel variance, a running mean of its training batches'
    optimum, or None) are part of the model's state (its extra state), so they are checkpointed and loaded with
    the weights they belong to. Training drops the fitted parts at every step (the weights move) and fits them
    where the model is sampled (`fit_sampling`).

    Latents (`sample`): "fitted" draws z from the latent prior and x from the pixel-noise model around the
    decoder's mean (an image like an observed galaxy, sky noise included: the family's default); "noiseless"
    the same z decoded to the mean (the galaxy without its noise); "prior" z ~ N(0, I) decoded to the mean (the
    textbook VAE sample, which needs nothing fitted). The evaluation scores all three, so what each fitted part
    does is measured.
    """

    latent_dim: int
    likelihood: str = "bce"
    latent_prior: LatentPrior | None = None
    pixel_noise: PixelNoise | None = None
    recon_variance: torch.Tensor | None = None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder_features(x)
        return self.to_mu(h), self.to_logvar(h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar) if self.training else mu
        return self.decode_logits(z), mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1]: the mean of p(x | z) (clamped, for a linear output)."""
        return mean_image(self.decode_logits(z), self.likelihood).clamp(0, 1)

    @torch.no_grad()
    def track_variance(self, variance: torch.Tensor) -> None:
        """Fold a training batch's optimal variance (3,) into `recon_variance` (its first value, then a running
        mean with weight VARIANCE_MOMENTUM, as batch normalisation tracks its statistics)."""
        variance = variance.detach().float()
        previous = self.recon_variance
        self.recon_variance = variance if previous is None else previous.lerp(variance, VARIANCE_MOMENTUM)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, latent: str = "prior") -> torch.Tensor:
        """n images in [0, 1] from `latent` (see the class): "fitted", "noiseless" or "prior"."""
        device = next(self.parameters()).device
        if latent not in FAMILY.latents:
            raise ValueError(f"latent must be one of {', '.join(FAMILY.latents)}, got {latent!r}")
        if latent == "prior":
            return self.decode(torch.randn(n, self.latent_dim, generator=generator, device=device))
        if self.latent_prior is None or self.pixel_noise is None:
            raise ValueError(f"this VAE has no fitted latent prior and pixel noise for latent {latent!r} "
                             "(checkpoint.load_model fits them from the run's data, vae.fit_sampling from any): "
                             "sample with latent 'prior' instead")
        image = self.decode(self.latent_prior.sample(n, generator, device))
        if latent == "noiseless":
            return image
        return (image + self.pixel_noise.sample(n, generator, device)).clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        mu, _ = self.encode(x)
        return self.decode(mu)

    def get_extra_state(self) -> dict:
        state = {"latent_prior": self.latent_prior.state()} if self.latent_prior is not None else {}
        if self.pixel_noise is not None:
            state["pixel_noise"] = self.pixel_noise.state()
        if self.recon_variance is not None:
            state["recon_variance"] = self.recon_variance
        return state

    def set_extra_state(self, state: dict) -> None:
        self.latent_prior = LatentPrior.from_state(state["latent_prior"]) if state.get("latent_prior") else None
        self.pixel_noise = PixelNoise.from_state(state["pixel_noise"]) if state.get("pixel_noise") else None
        self.recon_variance = state.get("recon_variance")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if "_extra_state" not in state_dict:  # written before VAEs had a fitted prior
            state_dict = {**state_dict, "_extra_state": {}}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


@torch.no_grad()
def posterior_means(model: VAE, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """mu of encode(x) for uint8 (N, S, S, 3) images, as float64 (N, latent_dim), in eval mode."""
    with evaluating(model) as device:
        out = [model.encode(to_float(images[i : i + batch_size]).to(device))[0].double().cpu().numpy()
               for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def residuals(model: VAE, images: np.ndarray, means: np.ndarray, batch_size: int = 256):
    """Batches of x - mean(x | mu) for uint8 images (N, S, S, 3) and their posterior means mu (N, latent_dim) (see
    `posterior_means`), decoded in eval mode: a generator of (B, 3, S, S) on the CPU."""
    with evaluating(model) as device:
        for i in range(0, len(images), batch_size):
            x = to_float(images[i : i + batch_size])
            mu = torch.as_tensor(means[i : i + batch_size], dtype=torch.float32, device=device)
            with torch.no_grad():
                residual = x - model.decode(mu).float().cpu()
            yield residual  # outside no_grad: the caller's grad mode holds between batches


def fit_sampling(model: VAE, data: TrainingData) -> bool:
    """The family's `fit_sampling`: what `model` lacks of its latent prior (fitted to the posterior means) and its
    pixel-noise model (fitted to the residuals), from (a fixed sample of) the training galaxies `data()` gives;
    deterministic, a few seconds on a CPU."""
    if model.latent_prior is not None and model.pixel_noise is not None:
        return False
    images, train_rows = data()
    fit = images[fit_rows(train_rows)]
    means = posterior_means(model, fit)
    if model.latent_prior is None:
        model.latent_prior = LatentPrior.fit(means)
    if model.pixel_noise is None:
        model.pixel_noise = PixelNoise.fit(residuals(model, fit, means))
    return True


class VAEObjective:
    """One optimisation step and one held-out evaluation of a VAE under the ELBO.

    The best checkpoint has the lowest held-out negative ELBO (alpha = 1, so comparable across KL weights).
    """

    def __init__(self, model, config, env, device: torch.device):
        self.model = model
        self.config = config
        self.net = DistributedDataParallel(model) if env.enabled else model
        self.optimizers = [torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)]
        self.autocast = autocast_args(config, device)

    def loss(self, x: torch.Tensor, alpha: float):
        """The training objective of a batch; the gaussian likelihood takes the optimal variance of the global
        batch (the mean over ranks of each rank's optimum) and folds it into the model's running variance."""
        with torch.autocast(**self.autocast):
            output, mu, logvar = self.net(x)
        variance = None
        if self.config.recon_loss == "gaussian":
            variance = distributed.all_mean(optimal_variance(output.float(), x))
            self.model.track_variance(variance)
        return elbo_loss(output, x, mu, logvar, recon_loss=self.config.recon_loss, alpha=alpha,
                         free_bits=self.config.free_bits, tv_weight=self.config.tv_weight, variance=variance)

    def train_step(self, x: torch.Tensor, progress: float) -> dict[str, torch.Tensor]:
        self.model.latent_prior = self.model.pixel_noise = None  # fitted to the weights this step moves: stale
        alpha = self.config.alpha * warmup_factor(progress, self.config.kl_warmup_epochs)
        parts = self.loss(x, alpha)
        opt = self.optimizers[0]
        opt.zero_grad(set_to_none=True)
        parts.loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        opt.step()
        return {k: v.detach() for k, v in vars(parts).items()}

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Held-out parts with z sampled from q(z|x) (the ELBO is an expectation over q), dropout off; the
        gaussian likelihood with the model's running variance (learnt from training batches only), so the
        held-out nelbo is the negative ELBO of one fixed model."""
        variance = None
        if self.config.recon_loss == "gaussian":
            if self.model.recon_variance is None:
                raise RuntimeError("the gaussian likelihood's variance is estimated in training: train a step first")
            variance = self.model.recon_variance.to(x.device)
        mu, logvar = self.model.encode(x)
        parts = elbo_loss(self.model.decode_logits(reparameterize(mu, logvar)), x, mu, logvar,
                          recon_loss=self.config.recon_loss, alpha=self.config.alpha,
                          free_bits=self.config.free_bits, tv_weight=self.config.tv_weight, variance=variance)
        return dict(vars(parts))

    def score(self, summary: dict) -> float:
        """Lower is better: the held-out negative ELBO in nats/image."""
        return summary["val_nelbo"]


def use_likelihood(model: VAE, config) -> None:
    """A VAE decodes under its config's reconstruction loss (Family.configure)."""
    model.likelihood = config.recon_loss


FAMILY = Family("vae", VAEObjective, ("fitted", "noiseless", "prior"), fit_sampling, use_likelihood)
