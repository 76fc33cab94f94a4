"""The VAE's fitted pixel-noise model: the maximum-likelihood stationary Gaussian of its training residuals,
and the samples that carry it."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

from galaxygen.models import generate
from galaxygen.models.pixel_noise import PixelNoise
from galaxygen.models.vae import fit_sampling
from tests.test_models import blobs, build

SIZE = 32
SIGMA = torch.tensor([0.02, 0.05, 0.08])  # per-channel standard deviation of the true noise


def correlated_noise(n: int, generator: torch.Generator) -> torch.Tensor:
    """Stationary noise like resampled sky noise: white noise smoothed by a 3x3 box on a torus (neighbours
    correlate), scaled to SIGMA per channel, (n, 3, SIZE, SIZE)."""
    white = torch.randn(n * 3, 1, SIZE, SIZE, generator=generator)
    smooth = F.conv2d(F.pad(white, (1, 1, 1, 1), mode="circular"), torch.full((1, 1, 3, 3), 1 / 3))
    return smooth.view(n, 3, SIZE, SIZE) * SIGMA.view(1, 3, 1, 1)


def lag_correlation(noise: torch.Tensor, dx: int) -> torch.Tensor:
    """Per-channel correlation of pixels dx apart along rows (on the torus)."""
    shifted = torch.roll(noise, dx, dims=-1)
    return (noise * shifted).mean((0, 2, 3)) / noise.square().mean((0, 2, 3))


def test_the_fit_recovers_the_variance_and_correlation_of_stationary_noise():
    generator = torch.Generator().manual_seed(0)
    truth = correlated_noise(600, generator)
    model = PixelNoise.fit(truth.split(128))  # in batches: the same fit as at once
    torch.testing.assert_close(model.power, PixelNoise.fit([truth]).power, rtol=1e-5, atol=1e-7)
    drawn = model.sample(600, torch.Generator().manual_seed(1))
    assert drawn.shape == truth.shape and drawn.dtype == torch.float32
    torch.testing.assert_close(drawn.std((0, 2, 3)), SIGMA, rtol=0.03, atol=0)
    torch.testing.assert_close(model.variance().sqrt(), SIGMA, rtol=0.03, atol=0)
    # a 3-wide box makes neighbours correlate 2/3 and pixels 2 apart 1/3; white noise of the same variance
    # (the gaussian likelihood's one variance per channel) would give 0 for both
    for dx, expected in ((1, 2 / 3), (2, 1 / 3), (3, 0.0)):
        torch.testing.assert_close(lag_correlation(drawn, dx), torch.full((3,), expected), rtol=0, atol=0.03)
    assert drawn.mean().abs() < 0.002  # zero mean


def test_sampling_is_seeded_and_the_model_round_trips_through_a_weights_only_load():
    model = PixelNoise.fit([correlated_noise(16, torch.Generator().manual_seed(0))])
    first = model.sample(4, torch.Generator().manual_seed(5))
    assert torch.equal(first, model.sample(4, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, model.sample(4, torch.Generator().manual_seed(6)))
    buffer = io.BytesIO()
    torch.save(model.state(), buffer)
    buffer.seek(0)
    again = PixelNoise.from_state(torch.load(buffer, weights_only=True))
    assert torch.equal(again.sample(4, torch.Generator().manual_seed(5)), first)


def test_a_vae_samples_its_decoder_mean_plus_noise_fitted_to_its_own_residuals():
    model = build("cnn", image_size=SIZE, latent_dim=4, width=4)
    data = blobs(96, SIZE, torch.Generator().manual_seed(0))
    noisy = (data + correlated_noise(96, torch.Generator().manual_seed(1))).clamp(0, 1)
    images = (noisy.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    calls = []

    def training_data():
        calls.append(1)
        return images, np.arange(64)

    assert fit_sampling(model, training_data) and not fit_sampling(model, training_data) and len(calls) == 1
    # Parseval: the fitted per-pixel variance is the residuals' mean square per channel
    with torch.no_grad():
        x = torch.as_tensor(images[:64]).permute(0, 3, 1, 2).float() / 255
        model.eval()
        residual = x - model.decode(model.encode(x)[0])
    torch.testing.assert_close(model.pixel_noise.variance(), residual.square().mean((0, 2, 3)), rtol=1e-4, atol=1e-7)
    # "fitted" is "noiseless" (the same latents' decoder mean) plus a draw of the fitted noise, quantised to [0, 1]
    fitted, mean = generate(model, 200, "fitted", seed=3), generate(model, 200, "noiseless", seed=3)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        expected_mean = model.decode(model.latent_prior.sample(200, generator))
        noise = model.pixel_noise.sample(200, generator)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(fitted, (expected_mean + noise).clamp(0, 1))
    assert not torch.equal(fitted, mean)
    assert torch.equal(fitted, generate(model, 200, "fitted", seed=3))
    # the checkpointed state keeps both fitted parts with the weights
    state = model.state_dict()["_extra_state"]
    assert set(state) >= {"latent_prior", "pixel_noise"}
    copy = build("cnn", image_size=SIZE, latent_dim=4, width=4)
    copy.load_state_dict(model.state_dict())
    assert torch.equal(generate(copy, 8, "fitted", seed=3), generate(model, 8, "fitted", seed=3))
