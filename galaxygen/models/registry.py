"""The model registry (imported by every model module; it imports none of them): names are part of the
public interface (`--model NAME`, config `model`).

Every model takes images (B, 3, S, S) in [0, 1] and is built from image_size, latent_dim, width,
depth and dropout (depth is each model's own notion: hidden layers of an MLP, residual blocks per
stage of `resvae`; the report's fixed designs and the DCGAN keep theirs). Each registered model
belongs to a `Family`, declared once in the family's own module (`vae`, `dcgan`): its kind, the
objective that trains it and picks its best checkpoint, the latent distributions it samples
from, and what those need fitted beside the weights (a VAE's latent prior). Every model has
`latent_dim` and `sample(n, generator, latent)`; `generate` is the one seeded way to draw images
from any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

TrainingData = Callable[[], tuple[np.ndarray, np.ndarray]]
"""A zero-argument function giving a run's uint8 images (N, S, S, 3) and the rows of its train split."""


def nothing_to_fit(model: nn.Module, data: TrainingData) -> bool:
    """The `Family.fit_sampling` of families whose latents need nothing beside the weights."""
    return False


@dataclass(frozen=True)
class Family:
    """What the models of one kind share.

    objective: built as objective(model, config, env, device); it runs the train and held-out steps and
        scores an epoch's summary (`score`, lower is better), which picks the best checkpoint.
    latents: the latent distributions its models sample from, the default first.
    fit_sampling: fit_sampling(model, data) fits to the model's current weights what its latents need beside
        them (a VAE's latent prior) when the model lacks it, calling `data()` only then; True when it fitted
        something (the model's state changed). Used where a model is sampled: training fits it for the
        checkpoints that are sampled, and `checkpoint.load_model` for a checkpoint saved without it.
    configure: called as configure(model, config) on every model built (`build_model`): what the family's
        models take from the config beyond their sizes (a VAE: its likelihood); None for nothing.
    """

    kind: str
    objective: type
    latents: tuple[str, ...]
    fit_sampling: Callable[[nn.Module, TrainingData], bool] = nothing_to_fit
    configure: Callable[[nn.Module, object], None] | None = None


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its family, how to build it and its own defaults for the config's None fields."""

    name: str
    build: Callable[..., nn.Module]
    family: Family
    defaults: dict
    summary: str
    fixed_depth: bool = False  # depth is part of the design (the report's tables), not a knob

    @property
    def kind(self) -> str:
        return self.family.kind


MODELS: dict[str, ModelSpec] = {}


def register(name: str, summary: str, family: Family, *, fixed_depth: bool = False, **defaults):
    """Decorator adding a model builder of `family` to the registry under `name`."""

    def wrap(build):
        defaults.setdefault("lr", 1e-3)
        MODELS[name] = ModelSpec(name, build, family, defaults, summary, fixed_depth)
        return build

    return wrap


def all_latents() -> tuple[str, ...]:
    """Every latent distribution some registered family samples from (for command-line choices)."""
    return tuple(dict.fromkeys(latent for spec in MODELS.values() for latent in spec.family.latents))


def build_model(config) -> nn.Module:
    """Build the model a (resolved) TrainConfig names from image_size and the keys it has defaults for, configured
    by its family (Family.configure)."""
    spec = MODELS[config.model]
    model = spec.build(image_size=config.image_size, **{k: getattr(config, k) for k in spec.defaults if k != "lr"})
    if spec.family.configure is not None:
        spec.family.configure(model, config)
    return model


def memory_format(model: nn.Module) -> torch.memory_format:
    """The layout a model trains fastest in: channels-last when it has convolutions, else the default.

    oneDNN (CPU) and cuDNN with mixed precision (GPU) run channels-last convolutions faster; measured on
    2 CPU cores, a `cnn` training step takes 52 ms against 75 ms in the default layout.
    """
    convs = (nn.Conv2d, nn.ConvTranspose2d)
    return torch.channels_last if any(isinstance(m, convs) for m in model.modules()) else torch.contiguous_format


def autocast_args(config, device: torch.device) -> dict:
    """Mixed precision (bf16 autocast) on GPU when config.amp; full precision on CPU."""
    return dict(device_type=device.type, dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda")


@contextmanager
def evaluating(model: nn.Module) -> Iterator[torch.device]:
    """Run a block with `model` in eval mode (dropout off, normalisation frozen), giving its device; its mode is
    restored after, also on an error."""
    was_training = model.training
    model.eval()
    try:
        yield next(model.parameters()).device
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(model: nn.Module, n: int, latent: str, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """n images (n, 3, S, S) in [0, 1], float32 on the CPU, decoded from `latent` draws seeded by `seed`.

    The model samples in eval mode (its mode is restored after); the same model, n and seed give the
    same images. `latent` is one of the model's family's latents (e.g. "prior", "fitted").
    """
    with evaluating(model) as device:
        generator = torch.Generator(device=device).manual_seed(seed)
        parts = [model.sample(min(batch_size, n - i), generator=generator, latent=latent).float().cpu()
                 for i in range(0, n, batch_size)]
    return torch.cat(parts).contiguous()
