"""Loader throughput with augmentation on 2 cores, beside what training consumes.

    python bench/bench_loader.py [--data CACHE] [--batch 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from galaxygen.config import TrainConfig
from galaxygen.data import Cache, resolve_cache
from galaxygen.data.loader import BatchLoader
from galaxygen.losses import elbo_loss
from galaxygen.models import build_model


def loader_rate(cache: Cache, batch: int, augment: bool, epochs: int = 2) -> float:
    loader = BatchLoader(cache.images, cache.indices("train"), batch, augment=augment)
    seen, start = 0, time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x in loader:
            seen += len(x)
    return seen / (time.perf_counter() - start)


def training_rate(cache: Cache, batch: int, model_name: str, steps: int = 30) -> float:
    config = TrainConfig(model=model_name, batch_size=batch).resolved()
    model = build_model(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 3, cache.size, cache.size)
    start = time.perf_counter()
    for _ in range(steps):
        logits, mu, logvar = model(x)
        loss = elbo_loss(logits, x, mu, logvar).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(2)
    cache = Cache.open(resolve_cache(args.data))
    plain = loader_rate(cache, args.batch, augment=False)
    aug = loader_rate(cache, args.batch, augment=True)
    print(f"loader, no augmentation:   {plain:9.0f} images/s")
    print(f"loader, with augmentation: {aug:9.0f} images/s")
    for name in ("cnn", "mlp2"):
        need = training_rate(cache, args.batch, name)
        print(f"training {name:5s} consumes:    {need:9.0f} images/s  -> loader headroom x{aug / need:.1f}")


if __name__ == "__main__":
    main()
