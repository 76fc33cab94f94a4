"""Image grids from a trained model: samples, or input/reconstruction pairs.

    python -m galaxygen.sample CKPT --n 32 --out grid.png [--latent fitted|noiseless|prior]
    python -m galaxygen.sample CKPT --reconstruct --n 16 --out pairs.png [--data CACHE] [--split test]

CKPT is a checkpoint file or a run folder (RESULTS/SWEEP/runs/ID, whose checkpoints/best.pt is used).
Samples decode latent draws, so they show what the model generates, not what it remembers: a VAE's from the
latent prior fitted to its training galaxies' posterior means with sky noise from its fitted pixel-noise model
(`--latent fitted`, the default), from the same latents without noise (`--latent noiseless`), or from N(0, I)
(`--latent prior`); a GAN's from its input distribution (`prior`).
With --reconstruct, rows of held-out inputs alternate with rows of their reconstructions (the decoded
posterior mean), as in the report's Figure 5; the inputs come from the run's own data unless --data.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from galaxygen.checkpoint import CheckpointError, load_model
from galaxygen.cli import positive
from galaxygen.data import Cache, CacheError, resolve_cache
from galaxygen.data.loader import to_float
from galaxygen.models import MODELS, all_latents, generate
from galaxygen.results import run_checkpoint
from galaxygen.splits import SPLITS

LATENT_WORDS = {"fitted": "fitted prior, with fitted pixel noise", "noiseless": "fitted prior, decoder mean",
                "prior": "N(0, I)"}


class SampleError(ValueError):
    """A request this command cannot satisfy, in words a user can act on."""


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or the best checkpoint of a run folder."""
    path = Path(path)
    if path.is_dir():
        best = run_checkpoint(path, "best")
        path = best if best.parent.is_dir() else path / best.name
    if not path.is_file():
        raise SampleError(f"no checkpoint at {path}: give a .pt file or a run folder (RESULTS/SWEEP/runs/ID)")
    return path


def sample_grid(model: torch.nn.Module, n: int, cols: int, latent: str, seed: int = 0) -> torch.Tensor:
    """n images decoded from `latent` draws, tiled `cols` to a row: (3, H, W) in [0, 1]."""
    return make_grid(generate(model, n, latent, seed), nrow=cols, padding=2, pad_value=1.0)


def check_latent(model_name: str, latent: str | None) -> str:
    """The latent to sample from: the one asked for, or the model family's default; one clear error otherwise."""
    latents = MODELS[model_name].family.latents
    if latent is None:
        latent = latents[0]
    if latent not in latents:
        raise SampleError(f"--latent {latent}: {model_name} samples from {' or '.join(latents)}")
    return latent


def reconstruction_grid(model: torch.nn.Module, inputs: torch.Tensor, cols: int) -> torch.Tensor:
    """Rows of `cols` inputs, each followed by the row of their reconstructions: (3, H, W) in [0, 1]."""
    if not hasattr(model, "reconstruct"):
        raise SampleError(f"{type(model).__name__} has no encoder, so it cannot reconstruct: --reconstruct is for VAEs")
    outputs = model.reconstruct(inputs).float()
    rows = []
    for start in range(0, len(inputs), cols):
        chunk = slice(start, start + cols)
        rows += [pad_row(inputs[chunk], cols), pad_row(outputs[chunk], cols)]
    return make_grid(torch.cat(rows), nrow=cols, padding=2, pad_value=1.0)


def pad_row(images: torch.Tensor, cols: int) -> torch.Tensor:
    """A row of exactly `cols` images, blank (white) after the last one."""
    blank = torch.ones(cols - len(images), *images.shape[1:])
    return torch.cat([images, blank])


def held_out_inputs(data: str | Path, split: str, n: int, size: int) -> torch.Tensor:
    """The first n images of a split of a cache (a fixed, reproducible choice)."""
    cache = Cache.open(data)
    if cache.size != size:
        raise SampleError(f"the cache {cache.path} holds {cache.size} px images; the model takes {size} px")
    indices = cache.indices(split)
    if len(indices) == 0:
        raise SampleError(f"the cache {cache.path} has no {split!r} split")
    return to_float(cache.images[indices[:n]])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m galaxygen.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file or run folder")
    p.add_argument("--n", type=positive, default=32, help="number of samples (or of inputs with --reconstruct); default 32")
    p.add_argument("--out", default="grid.png", help="output image (.png or .jpg; default grid.png)")
    p.add_argument("--cols", type=positive, help="images per row (default: about sqrt(n), 8 with --reconstruct)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent draws (default 0)")
    p.add_argument("--latent", choices=all_latents(), help="what to sample: the prior fitted to the training "
                   "galaxies' posterior means with fitted pixel noise (fitted), the same without noise (noiseless), "
                   "or N(0, I) (prior) (default: fitted for VAEs, prior for GANs and diffusion)")
    p.add_argument("--reconstruct", action="store_true", help="input/reconstruction pairs instead of prior samples")
    p.add_argument("--data", help="cache to take the inputs from (default: the run's own data)")
    p.add_argument("--split", default="test", choices=SPLITS, help="split of the inputs (default test)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, config = load_model(checkpoint_path(args.checkpoint))
        if args.reconstruct:
            cols = args.cols or min(8, args.n)
            data = resolve_cache(args.data or config.data)
            grid = reconstruction_grid(model, held_out_inputs(data, args.split, args.n, config.image_size), cols)
        else:
            cols = args.cols or math.ceil(math.sqrt(args.n))
            latent = check_latent(config.model, args.latent)
            grid = sample_grid(model, args.n, cols, latent, args.seed)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, out)
    except (SampleError, CacheError, CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    what = "input/reconstruction pairs" if args.reconstruct else f"samples (latent: {LATENT_WORDS[latent]})"
    print(f"{out}: {args.n} {what} of {config.model} ({grid.shape[2]}x{grid.shape[1]} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
