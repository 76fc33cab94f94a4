"""galaxygen: train, sweep and compare generative models of galaxy images."""

import os
from pathlib import Path

__version__ = "0.1.0"

if not os.isatty(2):  # progress bars written to a log file: a line every 30 s, not every step
    os.environ.setdefault("TQDM_MININTERVAL", "30")


def home() -> Path:
    """Folder for galaxygen's own caches (synthetic datasets, encoders): $GALAXYGEN_HOME or ~/.cache/galaxygen."""
    return Path(os.environ.get("GALAXYGEN_HOME", Path.home() / ".cache" / "galaxygen"))
