"""One training run's configuration: every hyperparameter in one validated dataclass."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, fields
from typing import Any, NoReturn

RECON_LOSSES = ("bce", "l1", "mse", "gaussian")  # see galaxygen.losses
NOT_IDENTITY = ("epochs", "budget_min")  # keys that extend a trial instead of making another one (see signature)
MAX_SEED = 2**32 - 1
MAX_PARAMETERS = 10**9  # 16 GB of fp32 weights, gradients and Adam moments: far beyond any 64 px model here
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
# per-model keys: None means "the model's default"; a model without a default for one does not use it
MODEL_KEYS = ("latent_dim", "width", "depth", "dropout", "lr", "attention_res", "sample_steps")


class ConfigError(ValueError):
    """A configuration value or key is not allowed; the message names it and what is allowed."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one run. None means "the model's own default" (see `resolved`).

    batch_size is the global batch of the run: under DDP each of W ranks gets batch_size / W.
    """

    model: str = "cnn"
    latent_dim: int | None = None
    width: int | None = None
    depth: int | None = None
    dropout: float | None = None
    attention_res: int | None = None
    sample_steps: int | None = None
    image_size: int = 64
    batch_size: int = 32
    lr: float | None = None
    weight_decay: float = 0.0
    alpha: float = 1.0
    recon_loss: str = "bce"
    free_bits: float = 0.0
    kl_warmup_epochs: int = 0
    tv_weight: float = 0.0
    augment: bool = True
    data_fraction: float = 1.0
    data_count: int = 0
    epochs: int = 5
    seed: int = 0
    grad_clip: float = 0.0
    amp: bool = True
    log_every: int = 25
    eval_n: int = 0
    quick_eval_n: int = 0  # samples scored each epoch by the cheap fid_domain estimate (val fid_domain_quick); 0 = off
    budget_min: float = 0.0  # training budget in minutes (train.BudgetClock: CPU time on CPU): stop after the epoch that reaches it; 0 = off
    data: str = ""

    def __post_init__(self) -> None:
        from galaxygen.models import MODELS
        from galaxygen.models.diffusion import TRAIN_STEPS

        def bad(key: str, allowed: str) -> NoReturn:
            raise ConfigError(f"invalid config {key}={getattr(self, key)!r}: allowed {allowed}")

        if self.model not in MODELS:
            bad("model", "one of " + ", ".join(sorted(MODELS)))
        if self.recon_loss not in RECON_LOSSES:
            bad("recon_loss", "one of " + ", ".join(RECON_LOSSES))
        if self.dropout is not None and not 0 <= self.dropout < 1:
            bad("dropout", "a probability in [0, 1)")
        for key in ("batch_size", "epochs", "image_size", "log_every"):
            if getattr(self, key) < 1:
                bad(key, "an integer >= 1")
        for key in ("latent_dim", "width", "depth"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                bad(key, "an integer >= 1 (or unset for the model's default)")
        spec = MODELS[self.model]
        for key in MODEL_KEYS:
            if getattr(self, key) is not None and key not in spec.defaults:
                users = ", ".join(name for name, s in sorted(MODELS.items()) if key in s.defaults)
                bad(key, f"only unset for {self.model}, which does not use it ({key} is for {users})")
        if self.attention_res is not None and self.attention_res < 0:
            bad("attention_res", "an integer >= 0 (px; 0 turns attention off)")
        if self.sample_steps is not None and not 1 <= self.sample_steps <= TRAIN_STEPS:
            bad("sample_steps", f"an integer in [1, {TRAIN_STEPS}] (the training timesteps)")
        if spec.fixed_depth and self.depth not in (None, spec.defaults["depth"]):
            variable = ", ".join(name for name, s in sorted(MODELS.items()) if not s.fixed_depth)
            bad("depth", f"only {spec.defaults['depth']} for {self.model}, whose depth is part of its design "
                         f"(depth can vary for {variable})")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", "a finite number > 0 (or unset for the model's default)")
        for key in ("alpha", "free_bits", "tv_weight", "weight_decay", "grad_clip", "budget_min"):
            if not (getattr(self, key) >= 0 and math.isfinite(getattr(self, key))):
                bad(key, "a finite number >= 0")
        if not 0 <= self.seed <= MAX_SEED:
            bad("seed", f"an integer in [0, {MAX_SEED}] (numpy's seed range)")
        for key in ("kl_warmup_epochs", "data_count", "eval_n", "quick_eval_n"):
            if getattr(self, key) < 0:
                bad(key, "an integer >= 0")
        if not 0 < self.data_fraction <= 1:
            bad("data_fraction", "a fraction in (0, 1]")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict, coercing strings and rejecting unknown keys."""
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}: allowed {', '.join(cls.keys())}")
        return cls(**{k: coerce(k, v) for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def resolved(self) -> TrainConfig:
        """Fill the model's keys (MODEL_KEYS it uses) from its defaults (the report's tables)."""
        from galaxygen.models import MODELS

        defaults = MODELS[self.model].defaults
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def check_model(self) -> int:
        """The model's parameter count, from building it on the meta device (shapes only: no memory, no time).

        Raises one ConfigError when the model cannot take the image size, or when its sizes (width,
        latent_dim, depth, image_size) would need more than MAX_PARAMETERS parameters, instead of an
        allocation of tens of GB."""
        import torch

        from galaxygen.models import build_model

        config = self.resolved()
        sizes = ", ".join(f"{k}={getattr(config, k)}" for k in ("width", "latent_dim", "depth", "image_size"))
        too_large = f"invalid config sizes of {config.model} ({sizes}): allowed at most {MAX_PARAMETERS:.0e} parameters"
        try:
            with torch.device("meta"):
                model = build_model(config)
        except ValueError as err:
            if "overflow" in str(err).lower():
                raise ConfigError(f"{too_large} (the tensors' sizes overflow)") from None
            raise ConfigError(f"invalid config image_size={config.image_size}: allowed are the sizes {config.model} "
                              f"can take ({err})") from None
        except (TypeError, RuntimeError, OverflowError):  # torch cannot even describe tensors this large
            raise ConfigError(f"{too_large} (the tensors' sizes overflow)") from None
        count = sum(p.numel() for p in model.parameters())
        if count > MAX_PARAMETERS:
            raise ConfigError(f"{too_large}, the model would have {count:.3g} ({16 * count / 1e9:.3g} GB of "
                              "weights, gradients and optimizer state)")
        return count

    def signature(self) -> str:
        """Short id of the resolved config: equal configs share it, so a rerun finds its finished trial.

        The keys of NOT_IDENTITY are left out: a trial run for more epochs (or a longer wall-clock budget) is the
        same trial, continued from its last checkpoint (the learning rate is constant and nothing else depends on
        the total)."""
        blob = json.dumps({k: v for k, v in self.resolved().to_dict().items() if k not in NOT_IDENTITY}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


def field_type(key: str) -> type:
    hint = {f.name: f.type for f in fields(TrainConfig)}[key]
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if hint.startswith(name):
            return typ
    raise AssertionError(hint)


def coerce(key: str, value: Any) -> Any:
    """Turn a value (often a command-line string) into the field's type, or fail naming the key."""
    if key not in TrainConfig.keys():
        raise ConfigError(f"unknown config key {key}: allowed {', '.join(TrainConfig.keys())}")
    typ = field_type(key)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
        if key in MODEL_KEYS:
            return None
        if typ is str:
            return ""
    try:
        return parse_value(typ, value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"invalid config {key}={value!r}: expected {typ.__name__}") from None


def parse_value(typ: type, value: Any) -> Any:
    """`value` (often a command-line or profile string) as a bool, int, float or str; ValueError if it is not one.

    The one value coercion of the project (config keys and SLURM options): booleans are 1/true/yes/on or
    0/false/no/off in any case, integers may be written as floats without a fraction (1e3)."""
    if typ is bool:
        if isinstance(value, str):
            if value.lower() in TRUE_WORDS:
                return True
            if value.lower() in FALSE_WORDS:
                return False
            raise ValueError(f"expected one of {', '.join(TRUE_WORDS + FALSE_WORDS)}")
        if value in (0, 1):  # also numpy's bools and integers
            return bool(value)
        raise ValueError("expected a boolean")
    if typ is int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        as_float = float(value)
        if not as_float.is_integer():
            raise ValueError("expected an integer")
        return int(as_float) if abs(as_float) < 2**53 else int(value)
    if typ is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        return float(value)
    return typ(value)


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """`["lr=1e-3", "model=mlp2"]` -> {"lr": 0.001, "model": "mlp2"} with types checked."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}; keys: {', '.join(TrainConfig.keys())}")
        key, value = item.split("=", 1)
        out[key.strip()] = coerce(key.strip(), value.strip())
    return out
