"""The diffusion family: the forward process, the objective, the EMA, the few-step sampler, training and resume."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # the U-Net is built from a config: nothing may be downloaded

from galaxygen import checkpoint, distributed  # noqa: E402
from galaxygen.config import ConfigError, TrainConfig  # noqa: E402
from galaxygen.models import MODELS, build_model  # noqa: E402
from galaxygen.models.diffusion import TRAIN_STEPS, Diffusion, DiffusionObjective, unet_config  # noqa: E402
from galaxygen.results import ResultsStore  # noqa: E402
from galaxygen.train import run  # noqa: E402
from tests.test_models import blobs, one_thread  # noqa: E402,F401  (one_thread: autouse, the cores are shared)


def tiny(size: int = 16, **kw) -> Diffusion:
    """A U-Net of width 8 at 16 px (two levels, 16 and 8 px)."""
    torch.manual_seed(0)
    values = dict(image_size=size, width=8, depth=1, dropout=0.0, attention_res=0, sample_steps=4) | kw
    return Diffusion(**values)


def cosine_abar(t: torch.Tensor) -> torch.Tensor:
    """Nichol & Dhariwal's alpha-bar at the end of step t (0-based) of T: f((t + 1) / T) / f(0)."""
    def f(u):
        return torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    return f((t.double() + 1) / TRAIN_STEPS) / f(torch.zeros((), dtype=torch.float64))


def test_forward_noising_is_the_cosine_schedule_in_closed_form():
    model = tiny()
    t = torch.tensor([0, 1, 99, 250, 500, 750, 900])
    abar = cosine_abar(t)
    torch.testing.assert_close(model.alphas_cumprod[t].double(), abar, rtol=1e-5, atol=1e-7)
    x0, eps = torch.rand(len(t), 3, 16, 16) * 2 - 1, torch.randn(len(t), 3, 16, 16)
    expected = abar.sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar).sqrt().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(model.noise(x0, eps, t), expected.float(), rtol=1e-5, atol=1e-5)
    # the same as diffusers' own DDPM forward process
    torch.testing.assert_close(model.noise(x0, eps, t), model.schedule.add_noise(x0, eps, t))
    # almost clean at t = 0, almost pure noise at t = T - 1
    assert abar[0] > 0.9999 and float(model.alphas_cumprod[-1]) < 1e-4


def test_the_loss_is_the_per_image_mse_of_the_noise_on_images_mapped_to_minus_one_one():
    model = tiny()
    x = torch.rand(3, 3, 16, 16)
    eps, t = torch.randn_like(x), torch.tensor([10, 400, 990])
    abar = model.alphas_cumprod[t].view(-1, 1, 1, 1)

    def oracle(x_t, timesteps, return_dict=False):
        """Recovers eps exactly when the training images were mapped to x0 = 2x - 1."""
        assert torch.equal(timesteps, t)
        return ((x_t - abar.sqrt() * (2 * x - 1)) / (1 - abar).sqrt(),)

    assert model.denoising_loss(oracle, x, eps, t).abs().max() < 1e-8
    shifted = model.denoising_loss(lambda x_t, ts, return_dict=False: (eps + torch.arange(3.0).view(-1, 1, 1, 1),),
                                   x, eps, t)
    torch.testing.assert_close(shifted, torch.tensor([0.0, 1.0, 4.0]))  # mean over pixels, one value per image


def objective(model: Diffusion, **kw) -> DiffusionObjective:
    config = TrainConfig(model="diffusion", image_size=model.image_size, width=8, amp=False, **kw).resolved()
    return DiffusionObjective(model, config, distributed.DistEnv(), torch.device("cpu"))


def test_training_lowers_the_held_out_denoising_loss_and_updates_the_ema():
    model = tiny()
    obj = objective(model, lr=3e-3)
    x, held_out = blobs(16, 16, torch.Generator().manual_seed(0)), blobs(16, 16, torch.Generator().manual_seed(1))
    ema_before = [p.clone() for p in model.ema.module.parameters()]
    before = float(obj.eval_step(held_out)["loss"])
    assert obj.eval_step(held_out)["loss"] == before, "the held-out draws are fixed"
    for _ in range(40):
        obj.train_step(x, 0.0)
    after = float(obj.eval_step(held_out)["loss"])
    assert after < 0.6 * before, (before, after)
    assert int(model.ema.n_averaged) == 40
    ema, trained = list(model.ema.module.parameters()), list(model.unet.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(ema, ema_before))
    assert not all(torch.equal(a, b) for a, b in zip(ema, trained)), "the EMA lags the trained weights"
    assert all(not p.requires_grad for p in ema) and obj.optimizers[0].param_groups[0]["params"] == trained


def test_ema_averages_with_the_warm_up_decay():
    model = tiny()
    param = next(model.unet.parameters())
    values = [1.0, 3.0, -2.0]
    expected = None
    for n, value in enumerate(values):
        with torch.no_grad():
            param.fill_(value)
        model.update_ema()
        decay = min(0.999, (1 + n) / (10 + n))
        expected = value if expected is None else decay * expected + (1 - decay) * value
    torch.testing.assert_close(next(model.ema.module.parameters()), torch.full_like(param, expected))


def test_held_out_loss_leaves_the_global_random_state_alone():
    model = tiny()
    obj = objective(model)
    x = blobs(4, 16)
    state = torch.get_rng_state()
    obj.eval_step(x)
    assert torch.equal(torch.get_rng_state(), state)


def test_sampler_takes_sample_steps_with_the_ema_weights_and_is_seeded():
    model = tiny(sample_steps=5).eval()
    calls = []
    model.ema.module.register_forward_hook(lambda *args: calls.append(1))
    first = model.sample(3, generator=torch.Generator().manual_seed(7))
    assert len(calls) == 5 and first.shape == (3, 3, 16, 16) and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, model.sample(3, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(first, model.sample(3, generator=torch.Generator().manual_seed(8)))
    with torch.no_grad():  # the trained weights do not sample; the EMA copy does
        for p in model.unet.parameters():
            p.add_(1.0)
    assert torch.equal(first, model.sample(3, generator=torch.Generator().manual_seed(7)))
    with torch.no_grad():
        for p in model.ema.module.parameters():
            p.mul_(1.5)
    assert not torch.equal(first, model.sample(3, generator=torch.Generator().manual_seed(7)))


def test_config_keys_map_to_the_unet():
    config = TrainConfig(model="diffusion", image_size=64, width=16, depth=2, attention_res=16, sample_steps=7)
    model = build_model(config.resolved())
    assert model.unet.config.block_out_channels == (16, 32, 32, 64)  # 64, 32, 16 and 8 px
    assert model.unet.config.layers_per_block == 2 and model.sample_steps == 7
    assert model.unet.config.down_block_types == ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    assert model.unet.config.add_attention
    plain = unet_config(64, 32, 1, 0.0, 0)
    assert "Attn" not in "".join(plain["down_block_types"] + plain["up_block_types"]) and not plain["add_attention"]
    defaults = TrainConfig(model="diffusion").resolved()
    assert (defaults.width, defaults.attention_res, defaults.sample_steps, defaults.latent_dim) == (16, 0, 20, None)


@pytest.mark.parametrize("values,message", [
    (dict(latent_dim=16), r"latent_dim=16: allowed only unset for diffusion, which does not use it"),
    (dict(sample_steps=0), r"sample_steps=0: allowed an integer in \[1, 1000\]"),
    (dict(attention_res=-1), r"attention_res=-1: allowed an integer >= 0"),
])
def test_bad_diffusion_keys_fail_with_one_clear_error(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(model="diffusion", **values)
    with pytest.raises(ConfigError, match=r"sample_steps=5: allowed only unset for cnn.*is for diffusion"):
        TrainConfig(model="cnn", sample_steps=5)
    with pytest.raises(ValueError, match="8 px times a power of two"):
        unet_config(48, 8, 1, 0.0, 0)


def test_one_epoch_trains_checkpoints_and_resumes_like_an_uninterrupted_run(tmp_path, blob_cache_32):
    config = TrainConfig(model="diffusion", image_size=32, width=8, sample_steps=3, batch_size=16, epochs=2,
                         log_every=4, data=str(blob_cache_32))
    straight = run(config, tmp_path / "a", "t", "x")
    run(config.replace(epochs=1), tmp_path / "b", "t", "x")
    store = ResultsStore(tmp_path / "b", "t")
    assert store.read_trial("x")["status"] == "completed"
    first = checkpoint.load(store.run_dir("x") / "checkpoints" / "last.pt")
    assert first["epoch"] == 1 and int(first["model"]["ema.n_averaged"]) == first["step"] > 0
    resumed = run(config, tmp_path / "b", "t", "x")
    def maths(summary: dict) -> dict:  # leave out timings (images_per_s, epoch_time_s, ...)
        return {k: v for k, v in summary.items() if not k.endswith("_s")}

    assert maths(resumed) == pytest.approx(maths(straight), rel=1e-4) and "val_loss" in maths(straight)
    assert np.isfinite(straight["val_loss"]) and 0 < straight["val_loss"] < 2
    a = checkpoint.load(ResultsStore(tmp_path / "a", "t").run_dir("x") / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(store.run_dir("x") / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys() and any(k.startswith("ema.module.") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    model, loaded = checkpoint.load_model(store.run_dir("x") / "checkpoints" / "best.pt")
    assert loaded.model == "diffusion" and MODELS[loaded.model].defaults["sample_steps"] == 20
    images = model.sample(2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
