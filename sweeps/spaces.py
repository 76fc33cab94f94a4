"""The named sweeps: each is a Ray Tune search space over a base TrainConfig.

The report's studies use its Table III `cnn` as the base (select the MLP studies with
`--model mlp2`); `search` goes beyond the grid with random search and ASHA early stopping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray import tune
from ray.tune.search.variant_generator import generate_variants

from galaxygen.config import RECON_LOSSES, ConfigError, TrainConfig, coerce
from galaxygen.models import MODELS


@dataclass(frozen=True)
class Sweep:
    """A named study: values to grid over, distributions to sample, and how trials are scheduled."""

    name: str
    description: str
    grid: dict[str, list] = field(default_factory=dict)
    sample: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)
    samples: int = 1
    early_stopping: bool = False

    @property
    def varies(self) -> list[str]:
        return list(self.grid) + list(self.sample)

    def values(self) -> dict[str, str]:
        """What each varied key takes, in words: `{"dropout": "0.1, 0.2", "lr": "log-uniform 0.0001..0.003"}`."""
        out = {k: ", ".join(str(v) for v in values) for k, values in self.grid.items()}
        for key, domain in self.sample.items():
            if isinstance(domain, tune.search.sample.Categorical):
                out[key] = "one of " + ", ".join(str(v) for v in domain.categories)
            else:
                log = isinstance(domain.get_sampler(), tune.search.sample.LogUniform)
                out[key] = f"{'log-uniform' if log else 'uniform'} {domain.lower:g}..{domain.upper:g}"
        return out


# The main job's base: the gaussian likelihood (the bce one draws grey blobs: kid_domain 3.4-3.7 against the
# one-image generator's 1.96) and a wider CNN with a larger latent (at the report's width 16 and latent 12, or
# width 24, or latent 32 alone, 5 epochs render every galaxy in one colour). See README, "Sample quality".
MAIN_JOB_BASE = {"recon_loss": "gaussian", "width": 32, "latent_dim": 32}
# The architecture sweep's KL weight: with the latent prior fitted after training the encoder need not fill
# N(0, I), and a lighter KL term gives the residual VAE sharper samples (fid_domain 3.3-3.9 against 4.3-5.0 at
# alpha 1 over three sampling seeds, same 4-minute budget; README, "Sample quality"). GANs and diffusion models
# ignore it; the held-out nelbo that picks a VAE's best checkpoint is the alpha = 1 ELBO either way.
ARCHITECTURE_BASE = {"alpha": 0.3}


def _search_space() -> dict[str, Any]:
    return {
        "lr": tune.loguniform(1e-4, 3e-3),
        "alpha": tune.loguniform(1e-3, 1.0),
        "latent_dim": tune.choice([4, 8, 12, 16, 32]),
        "dropout": tune.uniform(0.0, 0.5),
    }


SWEEPS: dict[str, Sweep] = {
    s.name: s
    for s in [
        Sweep("dropout", "dropout probability p (report Figs. 8-9) of the Table III CNN at width 32 and latent 32, "
              "under the gaussian likelihood (what its samples need for colour in 5 epochs)",
              {"dropout": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}, base=MAIN_JOB_BASE),
        Sweep("batch_size", "batch size (report Fig. 10)", {"batch_size": [8, 16, 32, 64]}),
        Sweep("latent_dim", "latent size (report Fig. 11)", {"latent_dim": [2, 4, 8, 12, 16, 32]}),
        Sweep("alpha", "KL weight alpha, the report's values", {"alpha": [1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7]}),
        Sweep("recon_loss", "reconstruction loss", {"recon_loss": list(RECON_LOSSES)}),
        Sweep("augmentation", "augmentation on/off for mlp2 and cnn (report Figs. 12-14)",
              {"model": ["mlp2", "cnn"], "augment": [True, False]}),
        Sweep("data_reduction", "fraction of the train split used", {"data_fraction": [1.0, 0.5, 0.25, 0.1]}),
        Sweep("architecture", "every registered model at the same data and budget (epochs, or minutes with "
              "--budget-min), VAEs at KL weight 0.3", {"model": sorted(MODELS)}, base=ARCHITECTURE_BASE),
        Sweep("search", "random search over lr, alpha, latent size and dropout with ASHA early stopping",
              sample=_search_space(), samples=8, early_stopping=True),
    ]
}


def parse_grid(items: list[str]) -> dict[str, list]:
    """`["dropout=0.1,0.3", "model=cnn,mlp2"]` -> {"dropout": [0.1, 0.3], "model": ["cnn", "mlp2"]}."""
    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid expects key=v1,v2,..., got {item!r}; keys: {', '.join(TrainConfig.keys())}")
        key, values = (part.strip() for part in item.split("=", 1))
        texts = [v.strip() for v in values.split(",")]
        if not any(texts):
            raise ConfigError(f"--grid {key}= lists no values: give {key}=V1,V2,...")
        if "" in texts:
            raise ConfigError(f"--grid {item!r} has an empty value between commas: give {key}=V1,V2,...")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice: list all its values in one --grid {key}=V1,V2,...")
        grid[key] = []
        for text in texts:
            value = coerce(key, text)
            if value in grid[key]:
                raise ConfigError(f"--grid {item!r} lists {key}={value!r} twice: give each value once")
            grid[key].append(value)
    return grid


def get(name: str) -> Sweep:
    if name not in SWEEPS:
        raise ConfigError(f"unknown sweep {name!r}: choose one of {', '.join(SWEEPS)} (or --grid key=v1,v2 for an ad-hoc sweep)")
    return SWEEPS[name]


def adhoc(name: str, grid: dict[str, list]) -> Sweep:
    return Sweep(name, "ad-hoc grid " + ", ".join(f"{k} in {v}" for k, v in grid.items()), grid)


def param_space(sweep: Sweep, base: dict[str, Any]) -> dict[str, Any]:
    """The flat Ray Tune param_space: the base config with the swept keys replaced by their search."""
    space = {**sweep.base, **base}
    space.update({k: tune.grid_search(v) for k, v in sweep.grid.items()})
    space.update(sweep.sample)
    return space


def expand(sweep: Sweep, base: dict[str, Any], samples: int | None = None, seed: int = 0) -> list[TrainConfig]:
    """Every trial's config, validated and distinct (no two with the same trial id): what the launcher runs."""
    import numpy as np

    if samples and samples > 1 and not sweep.sample:
        raise ConfigError(f"--samples {samples} would repeat the same configs: sweep {sweep.name} samples nothing "
                          f"(it is a grid over {', '.join(sweep.varies)}); to repeat with other seeds, "
                          "add --grid seed=0,1,...")
    space = param_space(sweep, base)
    rng = np.random.default_rng(seed)  # what Tune's BasicVariantGenerator(random_state=seed) draws from
    configs: dict[str, TrainConfig] = {}
    for _ in range(samples or sweep.samples):
        for _, spec in generate_variants(space, random_state=rng):
            config = TrainConfig.from_dict(spec)
            trial_id = config.resolved().signature()
            if trial_id in configs:
                same = ", ".join(f"{k}={getattr(configs[trial_id], k)!r} and {getattr(config, k)!r}"
                                 for k in sweep.varies if getattr(configs[trial_id], k) != getattr(config, k))
                raise ConfigError(f"two trials of sweep {sweep.name} are the same config after the model's defaults "
                                  f"are filled in ({same or 'identical values'}): give each value once")
            configs[trial_id] = config
    return list(configs.values())
