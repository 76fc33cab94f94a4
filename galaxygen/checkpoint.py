"""Checkpoints: state dicts and plain data only, loaded with weights_only=True."""

from __future__ import annotations

import ast
import os
import random
from pathlib import Path

import numpy as np
import torch

from galaxygen.config import TrainConfig
from galaxygen.models import build_model
from galaxygen.results import atomic_path

FORMAT_VERSION = 1


def rng_state() -> dict:
    """Every random generator's state, as tensors and plain data (safe for weights_only loading)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": repr(random.getstate()),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(ast.literal_eval(state["python"]))


def save(path: Path, **payload) -> None:
    """Write a checkpoint atomically (temporary file + rename)."""
    with atomic_path(path) as tmp:
        torch.save({"format_version": FORMAT_VERSION, **payload}, tmp)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, TrainConfig]:
    """The trained model (in eval mode) and its config from a checkpoint file."""
    state = load(path, map_location)
    config = TrainConfig.from_dict(state["config"]).resolved()
    model = build_model(config)
    model.load_state_dict(state["model"])
    model.eval()
    return model.to(map_location), config
