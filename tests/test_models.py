"""Every registered model: shapes, that it learns a toy distribution, and the VAE maths (KL, reparameterisation,
prior sampling). Models are taken from the registry, so a newly registered model is covered automatically."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from galaxygen.config import ConfigError, TrainConfig
from galaxygen.losses import elbo_loss, kl_per_dim
from galaxygen.models import MODELS, build_model, generate, memory_format
from galaxygen.models.latent_prior import LatentPrior
from galaxygen.models.vae import fit_sampling, posterior_means, reparameterize


def build(name: str, image_size: int = 32, **overrides) -> torch.nn.Module:
    """A registered model with its own defaults, some of them overridden."""
    spec = MODELS[name]
    hyper = {k: v for k, v in spec.defaults.items() if k != "lr"} | overrides
    return spec.build(image_size=image_size, **hyper)


def blobs(n: int, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Toy galaxies: centred grey Gaussian blobs of random radius and brightness on black, (n, 3, S, S)."""
    axis = torch.arange(size) - (size - 1) / 2
    r2 = axis[:, None] ** 2 + axis[None, :] ** 2
    sigma = size * (0.06 + 0.12 * torch.rand(n, 1, 1, generator=generator))
    brightness = 0.5 + 0.5 * torch.rand(n, 1, 1, generator=generator)
    images = brightness * torch.exp(-r2 / (2 * sigma**2))
    return images[:, None].expand(n, 3, size, size).contiguous()


def centre_minus_corners(images: torch.Tensor) -> float:
    """Mean brightness of the central 4x4 pixels minus that of the four 4x4 corners."""
    c = images.shape[-1] // 2
    centre = images[..., c - 2:c + 2, c - 2:c + 2].mean()
    corners = torch.stack([images[..., :4, :4], images[..., :4, -4:], images[..., -4:, :4],
                           images[..., -4:, -4:]]).mean()
    return float(centre - corners)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run on one thread: the tests are small and the machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ALL = sorted(MODELS)
VAES = [name for name in ALL if MODELS[name].kind == "vae"]
GANS = [name for name in ALL if MODELS[name].kind == "gan"]


# --- the registry -------------------------------------------------------------------------------------------


def test_registry_holds_the_report_models_and_the_stronger_ones():
    assert {"mlp1", "mlp2", "cnn", "cnn3", "resvae", "dcgan"} <= set(MODELS)
    assert set(VAES) >= {"mlp1", "mlp2", "cnn", "cnn3", "resvae"} and set(GANS) >= {"dcgan"}


@pytest.mark.parametrize("name", ALL)
def test_config_resolves_and_builds_every_model(name: str):
    config = TrainConfig(model=name, image_size=32).resolved()
    assert None not in [getattr(config, key) for key in MODELS[name].defaults] and config.lr is not None
    model = build_model(config)
    assert getattr(model, "latent_dim", None) == config.latent_dim


def count(model: torch.nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_width_and_depth_come_from_the_config():
    from galaxygen.models.resvae import ResBlock

    def built(**kw) -> torch.nn.Module:
        return build_model(TrainConfig(image_size=32, **kw).resolved())

    # MLP: depth hidden layers per side, halving from the width (depth 2 is the report's input-w-w/2)
    assert count(built(model="mlp2"), torch.nn.Linear) == 2 * 2 + 3  # + mu, logvar, latent mapping
    deep = built(model="mlp2", depth=4, width=64)
    assert count(deep, torch.nn.Linear) == 2 * 4 + 3
    assert [m.out_features for m in deep.encoder if isinstance(m, torch.nn.Linear)] == [64, 32, 16, 8]
    # resvae: depth residual blocks per stage
    assert count(built(model="resvae", depth=3), ResBlock) == 3 * count(built(model="resvae"), ResBlock)
    x = blobs(2, 32)
    assert built(model="resvae", depth=2)(x)[0].shape == x.shape
    widths = [m.out_channels for m in built(model="cnn", width=4).encoder if isinstance(m, torch.nn.Conv2d)]
    assert widths == [4, 8]


@pytest.mark.parametrize("name", [n for n in ALL if MODELS[n].fixed_depth])
def test_fixed_depth_designs_reject_another_depth_naming_the_models_that_vary(name: str):
    assert TrainConfig(model=name, depth=MODELS[name].defaults["depth"]).resolved().depth == MODELS[name].defaults["depth"]
    with pytest.raises(ConfigError, match=r"invalid config depth=5: allowed only \d+ for .*depth can vary for .*resvae"):
        TrainConfig(model=name, depth=5)


# --- shapes at 64 and 32 px ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 32])
@pytest.mark.parametrize("name", VAES)
def test_vae_shapes(name: str, size: int):
    model = build(name, size)
    x = torch.rand(4, 3, size, size)
    for training in (True, False):
        model.train(training)
        logits, mu, logvar = model(x)
        assert logits.shape == (4, 3, size, size)
        assert mu.shape == logvar.shape == (4, model.latent_dim)
        assert torch.isfinite(logits).all()
    samples = model.sample(5)
    assert samples.shape == (5, 3, size, size) and samples.min() >= 0 and samples.max() <= 1
    assert model.reconstruct(x).shape == x.shape


@pytest.mark.parametrize("size", [64, 32])
@pytest.mark.parametrize("name", GANS)
def test_gan_shapes(name: str, size: int):
    model = build(name, size)
    z = torch.randn(4, model.latent_dim)
    images = model.generator(z)
    assert images.shape == (4, 3, size, size) and images.min() >= 0 and images.max() <= 1
    assert model.discriminator(images).shape == (4,)
    assert model(z).shape == images.shape
    for training in (True, False):
        model.train(training)
        samples = model.sample(5)
        assert samples.shape == (5, 3, size, size) and samples.min() >= 0 and samples.max() <= 1


@pytest.mark.parametrize("name", ALL)
def test_generate_is_the_seeded_way_to_sample_every_latent_of_a_family(name: str):
    model = build(name).train()
    if MODELS[name].kind == "vae":
        fit_sampling(model, lambda: ((blobs(64, 32) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(),
                                     np.arange(64)))
    for latent in MODELS[name].family.latents:
        first = generate(model, 5, latent, seed=7, batch_size=2)  # in batches: still one seeded stream
        assert first.shape == (5, 3, 32, 32) and first.dtype == torch.float32 and 0 <= first.min() <= first.max() <= 1
        assert torch.equal(first, generate(model, 5, latent, seed=7, batch_size=2))
        assert not torch.equal(first, generate(model, 5, latent, seed=8, batch_size=2))
        assert model.training  # sampled in eval mode, then the mode is given back
    with pytest.raises(ValueError, match="latent"):
        generate(model, 2, "no-such-latent")


@pytest.mark.parametrize("name", ALL)
def test_the_family_on_the_registry_entry_declares_objective_latents_and_best_checkpoint(name: str):
    from galaxygen import distributed

    family = MODELS[name].family
    config = TrainConfig(model=name, image_size=32).resolved()
    objective = family.objective(build_model(config), config, distributed.read_env(), torch.device("cpu"))
    assert family.kind in ("vae", "gan", "diffusion") and family.latents[-1] == "prior" and objective.optimizers
    epochs = [{"epoch": 1, "val_nelbo": 900.0, "val_loss": 800.0}, {"epoch": 2, "val_nelbo": 950.0, "val_loss": 700.0}]
    first, second = (objective.score(e) for e in epochs)
    if family.kind == "vae":  # the lowest held-out negative ELBO, not the alpha-weighted loss
        assert first < second
    elif family.kind == "diffusion":  # the lowest held-out denoising loss, not the latest
        assert second < first < objective.score({"epoch": 3, "val_loss": 900.0})
    else:  # a GAN's losses do not rank epochs: the latest is the best
        assert second < first


@pytest.mark.parametrize("name", ["resvae", "dcgan"])
def test_stronger_models_reject_sizes_that_are_not_powers_of_two(name: str):
    with pytest.raises(ValueError, match="power-of-two"):
        build(name, 48)


# --- the VAE maths ------------------------------------------------------------------------------------------


def test_kl_matches_torch_closed_form_and_a_monte_carlo_estimate():
    torch.manual_seed(0)
    mu, logvar = torch.randn(2, 3), torch.randn(2, 3)
    q, p = Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)
    assert torch.allclose(kl_per_dim(mu, logvar), kl_divergence(q, p), atol=1e-6)
    z = q.sample((200_000,))
    log_ratio = q.log_prob(z) - p.log_prob(z)
    monte_carlo, stderr = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(len(z))
    assert ((monte_carlo - kl_per_dim(mu, logvar)).abs() < 5 * stderr + 1e-3).all()
    assert torch.equal(kl_per_dim(torch.zeros(3), torch.zeros(3)), torch.zeros(3))


def test_reparameterize_draws_normal_samples_with_mean_mu_and_std_exp_half_logvar():
    torch.manual_seed(0)
    n = 400_000
    mu, logvar = torch.full((n,), 1.5), torch.full((n,), math.log(0.25), requires_grad=True)
    z = reparameterize(mu, logvar)
    eps = ((z - 1.5) / 0.5).detach()
    assert abs(float(z.detach().mean()) - 1.5) < 0.005 and abs(float(z.detach().std()) - 0.5) < 0.005
    assert abs(float(eps.pow(4).mean()) - 3.0) < 0.1  # kurtosis: 3 for a normal, 1.8 for a uniform
    assert abs(float((eps.abs() > 2).float().mean()) - 0.0455) < 0.002  # a uniform has none beyond 2 sigma
    z.sum().backward()  # pathwise gradient: dz/dlogvar = eps * sigma / 2
    assert torch.allclose(logvar.grad, eps * 0.25, atol=1e-5)


@pytest.mark.parametrize("name", VAES)
def test_vae_sample_decodes_z_from_the_standard_normal_prior(name: str, monkeypatch: pytest.MonkeyPatch):
    model = build(name).eval()
    seen: list[torch.Tensor] = []

    def record(z: torch.Tensor) -> torch.Tensor:
        seen.append(z)
        return torch.zeros(len(z), 3, 32, 32)

    monkeypatch.setattr(model, "decode_logits", record)
    images = model.sample(4000)
    (z,) = seen
    assert z.shape == (4000, model.latent_dim)
    assert z.mean(0).abs().max() < 0.08 and (z.std(0) - 1).abs().max() < 0.06
    assert torch.equal(images, torch.full_like(images, 0.5))  # decode applies the sigmoid to the logits


@pytest.mark.parametrize("name", VAES)
def test_vae_forward_samples_z_in_training_and_uses_mu_in_eval(name: str, monkeypatch: pytest.MonkeyPatch):
    torch.manual_seed(0)
    model = build(name)
    seen: list[torch.Tensor] = []
    decode = model.decode_logits
    monkeypatch.setattr(model, "decode_logits", lambda z: seen.append(z) or decode(z))
    x = blobs(16, 32)

    with torch.no_grad():
        _, mu, logvar = model.train()(x)
    eps = (seen[-1] - mu) / torch.exp(0.5 * logvar)
    assert (eps != 0).all() and eps.abs().max() < 6 and abs(float(eps.std()) - 1) < 0.5

    _, mu, _ = model.eval()(x)
    assert torch.equal(seen[-1], mu)
    again, _, _ = model(x)
    assert torch.equal(model(x)[0], again)  # eval forward is deterministic


@pytest.mark.parametrize("name", ALL)
def test_training_layout_gives_the_same_outputs_and_gradients(name: str):
    """Trainer moves conv models and their batches to channels-last (faster); the maths must not change."""
    torch.manual_seed(0)
    reference = build(name)
    fast = build(name)
    fast.load_state_dict(reference.state_dict())
    layout = memory_format(fast)
    assert (layout == torch.channels_last) == any(isinstance(m, torch.nn.Conv2d) for m in fast.modules())
    fast.to(memory_format=layout)
    x = blobs(4, 32, torch.Generator().manual_seed(1))
    outputs = []
    for model, batch in ((reference, x), (fast, x.contiguous(memory_format=layout))):
        model.eval()
        if MODELS[name].kind == "diffusion":
            out = model(batch, torch.tensor([10, 300, 600, 999]))
        else:
            out = model(batch)[0] if MODELS[name].kind == "vae" else model.discriminator(batch)
        out.sum().backward()
        outputs.append((out, [p.grad for p in model.parameters() if p.grad is not None]))
    (out_a, grads_a), (out_b, grads_b) = outputs
    torch.testing.assert_close(out_b, out_a, rtol=1e-4, atol=1e-5)
    assert len(grads_a) == len(grads_b) > 0
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-3, atol=1e-4 * float(ga.abs().max()))  # summation order differs


# --- learning -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VAES)
def test_vae_elbo_goes_down_on_a_fixed_batch(name: str):
    torch.manual_seed(0)
    model = build(name)
    x = blobs(8, 32, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)  # brisker than the defaults: only 30 steps

    def nelbo() -> float:
        """The negative ELBO of the batch in eval mode (z = mu, no dropout): deterministic."""
        model.eval()
        with torch.no_grad():
            logits, mu, logvar = model(x)
            return float(elbo_loss(logits, x, mu, logvar).nelbo)

    before = nelbo()
    for _ in range(30):
        model.train()
        logits, mu, logvar = model(x)
        loss = elbo_loss(logits, x, mu, logvar).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = nelbo()
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("name", GANS)
def test_gan_discriminator_scores_real_images_and_generator_outputs(name: str):
    torch.manual_seed(0)
    model = build(name, latent_dim=8, width=4)
    real, fake = blobs(6, 32), model.generator(torch.randn(5, 8))
    shown: list[torch.Tensor] = []
    model.discriminator.register_forward_pre_hook(lambda module, args: shown.append(args[0]))

    loss_d, parts = model.d_loss(real, fake.detach())
    assert torch.equal(shown[-1], torch.cat([real, fake.detach()]))  # the generator's images, not noise
    assert {"loss_d", "d_real", "d_fake"} <= set(parts) and math.isclose(parts["loss_d"], loss_d.item())
    loss_d.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.discriminator.parameters())
    assert all(p.grad is None for p in model.generator.parameters())

    model.discriminator.zero_grad(set_to_none=True)
    loss_g, parts = model.g_loss(fake)
    assert shown[-1] is fake and "loss_g" in parts
    loss_g.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.parameters())
    assert all(p.grad is None for p in model.discriminator.parameters())  # the G step leaves D alone
    assert all(p.requires_grad for p in model.discriminator.parameters())


@pytest.mark.parametrize("name", GANS)
def test_gan_learns_centred_blobs(name: str):
    torch.manual_seed(0)
    model = build(name, latent_dim=16, width=8)
    real_mean = blobs(2048, 32, torch.Generator().manual_seed(1)).mean(0)

    def gap() -> tuple[float, float]:
        """Mean absolute distance of the mean sample to the mean real image, and the sample's contrast."""
        fake_mean = model.sample(512, generator=torch.Generator().manual_seed(2)).mean(0)
        return float((fake_mean - real_mean).abs().mean()), centre_minus_corners(fake_mean)

    distance_before, contrast_before = gap()
    lr = 1e-3
    opt_g = torch.optim.AdamW(model.generator.parameters(), lr, betas=(0.5, 0.999))
    opt_d = torch.optim.AdamW(model.discriminator.parameters(), lr, betas=(0.5, 0.999))
    losses_d = []
    for _ in range(150):  # the lead's training step, at a toy-sized learning rate and batch
        real = blobs(16, 32)
        fake = model.generator(torch.randn(16, model.latent_dim))
        loss_d, parts = model.d_loss(real, fake.detach())
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        losses_d.append(parts["loss_d"])
        loss_g, _ = model.g_loss(fake)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
    distance_after, contrast_after = gap()

    assert abs(losses_d[0] - 2) < 0.5 and min(losses_d) < 1.0  # hinge loss starts at ~2, D learns to separate
    assert abs(contrast_before) < 0.1 and contrast_after > 0.25, (contrast_before, contrast_after)  # real: 0.67
    assert distance_after < 0.3 * distance_before, (distance_before, distance_after)
    model.eval()  # figures and evaluation sample in eval mode: the samples must be the same galaxies, not noise
    assert gap()[1] > 0.25 and gap()[0] < 0.3 * distance_before


# --- the fitted latent prior ----------------------------------------------------------------------------------


def test_fitted_prior_matches_the_aggregate_posterior_better_than_the_standard_normal():
    """A trained VAE's posterior means are not N(0, I): the mixture fitted to them (on other galaxies) gives a
    held-out set of them a higher likelihood, and its samples are closer to them in a two-sample statistic."""
    torch.manual_seed(0)
    model = build("cnn", latent_dim=4, width=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = blobs(256, 32, torch.Generator().manual_seed(0))
    for step in range(60):
        x = data[(step % 8) * 32:(step % 8 + 1) * 32]
        logits, mu, logvar = model(x)
        loss = elbo_loss(logits, x, mu, logvar).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    images = (data.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    mu = posterior_means(model, images)
    fit, held = mu[:192], torch.as_tensor(mu[192:], dtype=torch.float32)
    prior = LatentPrior.fit(fit)
    again = LatentPrior.fit(fit)
    assert all(torch.equal(a, b) for a, b in zip(prior.state().values(), again.state().values()))  # deterministic
    standard = torch.distributions.Normal(0.0, 1.0)
    assert float(prior.log_prob(held).mean()) > float(standard.log_prob(held).sum(1).mean()) + 1.0

    def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())

    generator = torch.Generator().manual_seed(1)
    fitted = prior.sample(2000, generator)
    normal = torch.randn(2000, held.shape[1], generator=generator)
    assert energy_distance(fitted, held) < 0.5 * energy_distance(normal, held)
    model.latent_prior = prior  # stored with the weights: a state dict round trip keeps it (with the pixel noise)
    fit_sampling(model, lambda: (images, np.arange(192)))
    copy = build("cnn", latent_dim=4, width=4)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    copy.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(generate(copy, 4, "fitted", seed=3), generate(model, 4, "fitted", seed=3))
