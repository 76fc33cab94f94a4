"""The objective's options against direct formulas: reconstruction losses (the gaussian likelihood against
torch.distributions and its closed-form optimal variance), alpha, free bits, total variation, KL warm-up, bits
per dim, and gradient clipping in a training step."""

from __future__ import annotations

import math

import pytest
import torch

from galaxygen import distributed
from galaxygen.config import TrainConfig
from galaxygen.losses import (
    VARIANCE_FLOOR,
    elbo_loss,
    kl_per_dim,
    optimal_variance,
    reconstruction,
    warmup_factor,
)
from galaxygen.models import build_model
from galaxygen.models.vae import VAEObjective


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=g)
    logits = torch.randn(4, 3, 8, 8, generator=g)
    mu = torch.randn(4, 5, generator=g)
    logvar = torch.randn(4, 5, generator=g) * 0.5
    return logits, x, mu, logvar


def kl_sum(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent dims, mean over images (closed form)."""
    return (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).sum(1).mean()


@pytest.mark.parametrize("kind", ["bce", "l1", "mse"])
def test_reconstruction_losses_sum_over_pixels_and_average_over_images(batch, kind):
    logits, x, mu, logvar = batch
    p = torch.sigmoid(logits)
    per_pixel = {"bce": -(x * torch.log(p) + (1 - x) * torch.log(1 - p)), "l1": (p - x).abs(), "mse": (p - x) ** 2}[kind]
    parts = elbo_loss(logits, x, mu, logvar, recon_loss=kind)
    torch.testing.assert_close(parts.recon, per_pixel.sum((1, 2, 3)).mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts.kl, kl_sum(mu, logvar))
    torch.testing.assert_close(parts.loss, parts.recon + parts.kl)


def test_gaussian_reconstruction_is_the_normal_negative_log_density_summed_over_pixels(batch):
    output, x, mu, logvar = batch  # under the gaussian likelihood the output is the mean itself
    variance = torch.tensor([0.01, 0.04, 0.09])
    normal = torch.distributions.Normal(output, variance.sqrt().view(1, 3, 1, 1))
    expected = -normal.log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(reconstruction(output, x, "gaussian", variance), expected)
    parts = elbo_loss(output, x, mu, logvar, recon_loss="gaussian", variance=variance)
    torch.testing.assert_close(parts.recon, expected.mean())
    torch.testing.assert_close(parts.nelbo, expected.mean() + kl_sum(mu, logvar))


def test_optimal_variance_is_the_closed_form_maximum_likelihood_per_channel(batch):
    output, x, _, _ = batch
    b, c, h, w = x.shape
    variance = optimal_variance(output, x)
    torch.testing.assert_close(variance, torch.stack([((x[:, i] - output[:, i]) ** 2).mean() for i in range(c)]))
    # at the optimum the batch's mean negative log-density is sum_c (h w / 2) (1 + log(2 pi sigma_c^2)) ...
    closed = (h * w / 2 * (1 + torch.log(2 * math.pi * variance))).sum()
    batch_nll = reconstruction(output, x, "gaussian").mean()  # no variance: the batch's own optimum
    torch.testing.assert_close(batch_nll, closed)
    # ... and any other variance of a channel gives a larger one
    for i in range(c):
        for factor in (0.8, 1.25):
            other = variance.clone()
            other[i] *= factor
            assert reconstruction(output, x, "gaussian", other).mean() > batch_nll
    # the mean's gradient with the optimal variance detached equals that of the closed form with it in the graph
    mean = output.clone().requires_grad_(True)
    reconstruction(mean, x, "gaussian").mean().backward()
    attached = output.clone().requires_grad_(True)
    mse = (x - attached).pow(2).mean((0, 2, 3))
    (h * w / 2 * (1 + torch.log(2 * math.pi * mse))).sum().backward()
    torch.testing.assert_close(mean.grad, attached.grad)
    # a perfect reconstruction is known to the 8-bit rounding error, not infinitely well
    assert torch.equal(optimal_variance(x, x), torch.full((c,), VARIANCE_FLOOR))


def test_gaussian_vae_decodes_linearly_tracks_its_variance_and_scores_held_out_data_with_it():
    torch.manual_seed(0)
    config = TrainConfig(model="mlp1", image_size=8, recon_loss="gaussian").resolved()
    model = build_model(config)
    assert model.likelihood == "gaussian" and build_model(config.replace(recon_loss="bce")).likelihood == "bce"
    z = torch.randn(64, model.latent_dim)
    out = model.decode_logits(z)
    torch.testing.assert_close(model.decode(z), out.clamp(0, 1))  # the mean itself, not a sigmoid
    objective = VAEObjective(model, config, distributed.read_env(), torch.device("cpu"))
    x = torch.rand(4, 3, 8, 8)
    with pytest.raises(RuntimeError, match="variance is estimated in training"):
        objective.eval_step(x)
    first = objective.train_step(x, progress=1.0)
    variance = model.recon_variance.clone()
    assert variance.shape == (3,) and (variance > 0).all()
    torch.manual_seed(1)
    with torch.no_grad():
        output, _, _ = model(x)  # the second step's forward pass (same weights, same z draw) ...
    second_optimum = optimal_variance(output, x)
    torch.manual_seed(1)
    objective.train_step(x, progress=1.0)  # ... whose optimum is folded into the running variance
    torch.testing.assert_close(model.recon_variance, variance.lerp(second_optimum, 0.1), rtol=1e-5, atol=1e-7)
    model.eval()
    held_out = objective.eval_step(x)
    with torch.no_grad():
        mu, logvar = model.encode(x)
    assert torch.isfinite(first["nelbo"]) and torch.isfinite(held_out["nelbo"])
    assert held_out["kl"] == pytest.approx(float(kl_sum(mu, logvar)), rel=1e-5)
    # the running variance is part of the model's state: a reloaded model scores the same
    clone = build_model(config)
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone.recon_variance, model.recon_variance)
    assert clone.likelihood == "gaussian"


def test_alpha_weighs_only_the_kl_in_the_loss_and_the_nelbo_stays_the_elbo(batch):
    logits, x, mu, logvar = batch
    one = elbo_loss(logits, x, mu, logvar)
    tenth = elbo_loss(logits, x, mu, logvar, alpha=0.1)
    torch.testing.assert_close(tenth.loss, one.recon + 0.1 * one.kl)
    torch.testing.assert_close(tenth.nelbo, one.nelbo)
    torch.testing.assert_close(one.bits_per_dim, one.nelbo / (3 * 8 * 8 * math.log(2)))


def test_free_bits_floor_each_latent_dims_batch_mean_kl(batch):
    logits, x, mu, logvar = batch
    mu = mu.clone()
    mu[:, 0] = 0.0
    logvar = logvar.clone()
    logvar[:, 0] = 0.0  # dim 0 carries no information: its KL is 0, below any floor
    per_dim = kl_per_dim(mu, logvar).mean(0)
    floor = 0.3
    parts = elbo_loss(logits, x, mu, logvar, free_bits=floor)
    torch.testing.assert_close(parts.loss, parts.recon + per_dim.clamp(min=floor).sum())
    torch.testing.assert_close(parts.kl, per_dim.sum())  # the reported KL is the true one
    # the floored dim gets no gradient from the KL term
    mu_g = mu.clone().requires_grad_(True)
    elbo_loss(logits, x, mu_g, logvar, free_bits=floor).loss.backward()
    assert float(mu_g.grad[:, 0].abs().max()) == 0.0 and float(mu_g.grad[:, 1:].abs().max()) > 0


def test_total_variation_adds_the_mean_absolute_neighbour_differences(batch):
    logits, x, mu, logvar = batch
    p = torch.sigmoid(logits)
    tv = ((p[..., :, 1:] - p[..., :, :-1]).abs().sum((1, 2, 3)) + (p[..., 1:, :] - p[..., :-1, :]).abs().sum((1, 2, 3))).mean()
    plain = elbo_loss(logits, x, mu, logvar)
    with_tv = elbo_loss(logits, x, mu, logvar, tv_weight=0.5)
    torch.testing.assert_close(with_tv.loss, plain.loss + 0.5 * tv)
    torch.testing.assert_close(with_tv.nelbo, plain.nelbo)


def test_kl_warmup_ramps_linearly_over_the_first_epochs():
    assert warmup_factor(0.0, 0) == 1.0
    assert [warmup_factor(e, 2) for e in (0.0, 0.5, 1.0, 2.0, 3.5)] == [0.0, 0.25, 0.5, 1.0, 1.0]


def test_training_step_applies_warmup_and_clips_the_gradient_norm():
    torch.manual_seed(0)
    config = TrainConfig(model="mlp1", image_size=8, kl_warmup_epochs=2, grad_clip=1e-3, lr=1.0).resolved()
    model = build_model(config)
    objective = VAEObjective(model, config, distributed.read_env(), torch.device("cpu"))
    x = torch.rand(4, 3, 8, 8)
    before = [p.detach().clone() for p in model.parameters()]
    grads = {}
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: grads.__setitem__(id(p), p.grad.detach().clone()))
    out = objective.train_step(x, progress=0.5)  # a quarter of the KL weight
    torch.testing.assert_close(out["loss"], out["recon"] + 0.25 * out["kl"])
    # AdamW's first step moves each parameter by about lr whatever the gradient's scale, so check the clip on
    # the gradients the optimiser saw: clipped to norm grad_clip
    clipped = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    raw = torch.cat([grads[id(p)].flatten() for p in model.parameters() if id(p) in grads])
    assert float(raw.norm()) > 1e-3
    assert float(clipped.norm()) == pytest.approx(1e-3, rel=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
