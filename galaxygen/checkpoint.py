"""Checkpoints: state dicts and plain data only, loaded with weights_only=True."""

from __future__ import annotations

import ast
import functools
import io
import logging
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from galaxygen.config import TrainConfig
from galaxygen.models import MODELS, build_model
from galaxygen.models.registry import TrainingData
from galaxygen.results import CHECKPOINTS, ResultsStore, atomic_path

log = logging.getLogger(__name__)

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


def save(*paths: Path, **payload) -> None:
    """Write a checkpoint to each of `paths`, each atomically (temporary file + rename), serialised once."""
    data = io.BytesIO()  # torch writing a file itself turns a full disk into "enforce fail at inline_container.cc"
    torch.save({"format_version": FORMAT_VERSION, **payload}, data)
    for path in paths:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # Python's write: a full disk is an OSError (WriteError)
            f.write(data.getbuffer())


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded; the message names the file and what is wrong, in one line."""


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint's payload (tensors and plain data only: anything else is refused, never executed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found:
            raise CheckpointError(f"{path}: refused to load: it holds a Python object ({found.group(1)}), which a "
                                  "galaxygen checkpoint never does and which could run code") from None
        raise CheckpointError(f"{path} is not a torch checkpoint (truncated or corrupt)") from None
    except Exception as err:  # whatever the unpickler of untrusted bytes raises (IndexError, EOFError, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt: {first})") from None
    if not isinstance(state, dict) or not {"config", "model"} <= set(state):
        raise CheckpointError(f"{path} is not a galaxygen checkpoint (expected a dict with config and model state)")
    return state


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, TrainConfig]:
    """The trained model (in eval mode) and its config from a checkpoint file, ready to sample from each latent of
    its family: a checkpoint saved without what those need beside the weights (a VAE's latent prior: a last
    checkpoint, or the best of a run killed before its end) gets it fitted from the run's data, as training
    would have (CheckpointError when that data cannot be opened: never a model that would sample another latent)."""
    model, config, _ = fitted_model(path, load(path, map_location), map_location)
    return model, config


def complete(path: str | os.PathLike, data: TrainingData | None = None, model: torch.nn.Module | None = None,
             map_location: str | torch.device = "cpu") -> bool:
    """Fit into the checkpoint file at `path` what sampling needs beside its weights when it lacks it (a VAE's
    latent prior; see `load_model`), rewriting it atomically; True when it did. `data` and `model` as in
    `fitted_model` (a trainer passes its own: `model` is left holding the completed checkpoint, in eval mode)."""
    state = load(path, map_location)
    model, _, fitted = fitted_model(path, state, map_location, data, model)
    if fitted:
        save(Path(path), **{**state, "model": model.state_dict()})
    return fitted


def fitted_model(path: str | os.PathLike, state: dict, map_location: str | torch.device,
                 data: TrainingData | None = None,
                 model: torch.nn.Module | None = None) -> tuple[torch.nn.Module, TrainConfig, bool]:
    """The model of a loaded checkpoint `state` (in eval mode), its config, and whether what sampling needs beside
    the weights had to be fitted: to `data()` (default: the run's data, opened only then: `training_data`), in
    `model` (default: one built from the checkpoint's config)."""
    try:
        config = TrainConfig.from_dict(state["config"]).resolved()
        if model is None:
            model = build_model(config)
        model.load_state_dict(state["model"])
    except (ValueError, RuntimeError, TypeError) as err:  # ConfigError is a ValueError
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} does not hold a model of this galaxygen version ({first})") from None
    model.eval()
    model = model.to(map_location)
    if data is None:
        data = functools.partial(training_data, config, Path(path))
    fitted = MODELS[config.model].family.fit_sampling(model, data)
    return model, config, fitted


def training_data(config: TrainConfig, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The images and train rows of the run that wrote the checkpoint at `path` (`Family.fit_sampling` fits to
    them); raises CheckpointError naming the data when it cannot be opened."""
    # open_data owns what a run's train rows are; imported here because galaxygen.train imports this module
    from galaxygen.data import CacheError
    from galaxygen.train import open_data

    try:
        data = open_data(config)
    except (ValueError, CacheError, OSError) as err:  # ConfigError is a ValueError
        raise CheckpointError(f"{path} needs its run's data {config.data} to fit its latent prior: {err}") from None
    log.info("fitting the latent prior of %s (saved without it) to its run's data %s", path, config.data)
    return data.cache.images, data.train


def repair(store: ResultsStore) -> list[str]:
    """Repair the unreadable files of a sweep (ResultsStore.bad_parts); returns one line per file.

    An epoch's metrics part is rewritten from the last checkpoint when that checkpoint is of this epoch
    (it carries the epoch's rows); otherwise the rows are lost, so the part and the trial's checkpoints are
    removed and the trial is marked stopped: its next run trains it again from the start (deterministically,
    to the same metrics). A bad evaluation part is removed and its trial marked stopped (the next run
    resumes from the last checkpoint and evaluates again); a bad trial row is removed (the next run of the
    trial writes it again)."""
    done = []
    for bad in store.bad_parts():
        if bad.part == "trial":
            bad.path.unlink(missing_ok=True)
            done.append(f"{bad.path} ({bad.reason}): removed; the trial's next run writes its row again")
            continue
        epoch = bad.epoch
        if epoch is not None:
            last = store.checkpoint(bad.trial_id, "last")
            try:
                state = load(last) if last.exists() else {}
            except CheckpointError:
                state = {}
            if state.get("epoch") == epoch and state.get("epoch_rows"):
                store.write_epoch(bad.trial_id, epoch, state["epoch_rows"])
                done.append(f"{bad.path} ({bad.reason}): rewritten from {last}")
                continue
            for kind in CHECKPOINTS:
                store.checkpoint(bad.trial_id, kind).unlink(missing_ok=True)
            what = "its rows are lost, so the trial will be trained again from the start"
        else:
            what = "the trial will be evaluated again"
        bad.path.unlink(missing_ok=True)
        if store.read_trial(bad.trial_id):
            store.write_trial(bad.trial_id, status="stopped")
        done.append(f"{bad.path} ({bad.reason}): removed; {what}")
    return done
