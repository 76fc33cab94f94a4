"""`python -m galaxygen.sample`: prior-sample grids and input/reconstruction pairs from a checkpoint."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from galaxygen import checkpoint
from galaxygen.config import TrainConfig
from galaxygen.data import Cache
from galaxygen.data.loader import to_float
from galaxygen.models import build_model, generate
from galaxygen.sample import main
from galaxygen.train import run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, blob_cache):
    results = tmp_path_factory.mktemp("results")
    run(TrainConfig(model="cnn", epochs=1, batch_size=16, data=str(blob_cache), log_every=4), results, "s", "vae")
    return results / "s" / "runs" / "vae"


def grid_of(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def tiles(grid: np.ndarray, size: int = 64, pad: int = 2) -> list[np.ndarray]:
    """Cut a torchvision grid (padding 2) back into its tiles, row by row."""
    rows, cols = (grid.shape[0] - pad) // (size + pad), (grid.shape[1] - pad) // (size + pad)
    return [grid[pad + r * (size + pad):pad + r * (size + pad) + size, pad + c * (size + pad):pad + c * (size + pad) + size]
            for r in range(rows) for c in range(cols)]


def test_sample_grid_has_n_tiles_and_is_reproducible_from_the_seed(run_dir, tmp_path, capsys):
    assert main([str(run_dir), "--n", "6", "--cols", "3", "--out", str(tmp_path / "a.png")]) == 0
    assert "6 samples (latent: fitted prior, with fitted pixel noise) of cnn" in capsys.readouterr().out
    a = grid_of(tmp_path / "a.png")
    assert a.shape == (2 + 2 * 66, 2 + 3 * 66, 3)
    parts = tiles(a)
    assert len(parts) == 6 and not np.array_equal(parts[0], parts[1])  # different z, different galaxies
    main([str(run_dir / "checkpoints" / "best.pt"), "--n", "6", "--cols", "3", "--out", str(tmp_path / "b.png")])
    main([str(run_dir), "--n", "6", "--cols", "3", "--seed", "1", "--out", str(tmp_path / "c.png")])
    assert np.array_equal(a, grid_of(tmp_path / "b.png"))
    assert not np.array_equal(a, grid_of(tmp_path / "c.png"))


def test_latent_chooses_the_fitted_prior_by_default_or_the_standard_normal(run_dir, tmp_path, capsys):
    model, _ = checkpoint.load_model(run_dir / "checkpoints" / "best.pt")
    assert model.latent_prior is not None  # training stored it with the checkpoint
    expected = {latent: (generate(model, 4, latent, seed=0).permute(0, 2, 3, 1).numpy() * 255).round()
                for latent in ("fitted", "prior")}
    assert not np.array_equal(expected["fitted"], expected["prior"])
    for args, latent in (([], "fitted"), (["--latent", "fitted"], "fitted"), (["--latent", "prior"], "prior")):
        out = tmp_path / f"{latent}-{len(args)}.png"
        assert main([str(run_dir), "--n", "4", "--cols", "4", *args, "--out", str(out)]) == 0
        for shown, image in zip(tiles(grid_of(out)), expected[latent]):
            assert np.abs(shown.astype(int) - image).max() <= 1
    assert "latent: N(0, I)" in capsys.readouterr().out


def test_reconstruction_pairs_show_the_held_out_inputs_above_their_outputs(run_dir, blob_cache, tmp_path):
    assert main([str(run_dir), "--reconstruct", "--n", "5", "--cols", "4", "--out", str(tmp_path / "r.png")]) == 0
    parts = tiles(grid_of(tmp_path / "r.png"))
    assert len(parts) == 16  # 2 input rows + 2 reconstruction rows of 4
    cache = Cache.open(blob_cache)
    inputs = cache.images[cache.indices("test")[:5]]
    shown_inputs = parts[0:4] + parts[8:9]
    for shown, real in zip(shown_inputs, inputs):
        assert np.abs(shown.astype(int) - real).max() <= 1  # PNG of float pixels: rounding only
    assert all((p == 255).all() for p in parts[9:12] + parts[13:16])  # blank after the fifth pair
    # each input's own reconstruction (decoded posterior mean) sits below it
    model, _ = checkpoint.load_model(run_dir / "checkpoints" / "best.pt")
    expected = (model.reconstruct(to_float(inputs)).permute(0, 2, 3, 1).numpy() * 255).round()
    for shown, recon in zip(parts[4:8] + parts[12:13], expected):
        assert np.abs(shown.astype(int) - recon).max() <= 1


def test_bad_requests_get_one_clear_error(run_dir, tmp_path, blob_cache):
    gan = tmp_path / "gan.pt"
    config = TrainConfig(model="dcgan", data=str(blob_cache)).resolved()
    checkpoint.save(gan, config=config.to_dict(), model=build_model(config).state_dict())
    assert main([str(gan), "--n", "4", "--out", str(tmp_path / "g.png")]) == 0  # a GAN samples ...
    cases = [([str(gan), "--reconstruct"], "no encoder"),  # ... but cannot reconstruct
             ([str(gan), "--latent", "fitted"], "dcgan samples from prior"),  # ... nor use a fitted prior
             ([str(tmp_path / "missing")], "no checkpoint at"),
             ([str(run_dir), "--reconstruct", "--data", str(tmp_path)], "not a galaxygen cache")]
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "galaxygen.sample", *args, "--out", str(tmp_path / "x.png")],
                              capture_output=True, text=True, timeout=120)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr
    assert not (tmp_path / "x.png").exists()
