"""Training throughput of `cnn` on CPU: galaxygen's loop against a bare PyTorch loop, same model and batch.

    python bench/bench_train.py [--data CACHE] [--epochs 2] [--batch 32] [--threads 2]

Ours includes memory-mapped loading, batched augmentation, step logging with the held-out probe,
TensorBoard, Parquet and per-epoch checkpoints. The reference trains the same model with the same
loss and optimiser on tensors already in memory, with no augmentation, logging or checkpoints, in
PyTorch's default layout. A second reference runs that bare loop channels-last, the layout our loop
trains conv models in, so the report separates the layout's gain from our loop's own costs.
All loops run in this process, interleaved --repeats times after an untimed warm-up; means are compared.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from galaxygen import distributed
from galaxygen.config import TrainConfig
from galaxygen.data import Cache, resolve_cache
from galaxygen.data.loader import augment, to_float
from galaxygen.losses import elbo_loss
from galaxygen.models import build_model, memory_format
from galaxygen.models.vae import VAEObjective
from galaxygen.results import ResultsStore
from galaxygen.train import run


def reference(config: TrainConfig, images: torch.Tensor, epochs: int, layout=torch.contiguous_format) -> float:
    """images/s of a plain loop: shuffled slices of an in-memory tensor, forward, ELBO, backward, step."""
    torch.manual_seed(config.seed)
    model = build_model(config).to(memory_format=layout)
    images = images.contiguous(memory_format=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    b = config.batch_size
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for i in range(len(images) // b):
            x = images[order[i * b : (i + 1) * b]]
            logits, mu, logvar = model(x)
            loss = elbo_loss(logits, x, mu, logvar).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(x)
    return seen / (time.perf_counter() - start)


def milliseconds(fn, repeats: int = 30) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def costs(config: TrainConfig, images: torch.Tensor) -> dict[str, float]:
    """Milliseconds per training step of the pieces a bare loop does not have."""
    model = build_model(config)
    layout = memory_format(model)
    model.to(memory_format=layout).eval()
    objective = VAEObjective(model, config, distributed.read_env(), torch.device("cpu"))
    batch = images[: config.batch_size]
    probe = batch.contiguous(memory_format=layout)
    generator = torch.Generator().manual_seed(0)
    return {"augmentation": milliseconds(lambda: augment(batch, generator).contiguous(memory_format=layout)),
            "held-out probe (amortised)": milliseconds(lambda: float(objective.eval_step(probe)["loss"]))
            / config.log_every}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="cache (default: the built-in synthetic galaxies)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="cnn")
    p.add_argument("--repeats", type=int, default=2, help="interleaved measurements of each loop (default 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = str(resolve_cache(args.data))
    cache = Cache.open(data)
    config = TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.batch, data=data).resolved()
    train = to_float(cache.images[cache.indices("train")])
    # warm-up, untimed: the first ~60 steps of a process run several times slower (allocator and
    # oneDNN warm-up), which would otherwise bias whichever loop runs first
    reference(config, train[:2048], 1)
    refs, refs_cl, ours, walls = [], [], [], []
    for rep in range(args.repeats):  # interleaved, so drifting machine load hits all loops alike
        refs.append(reference(config, train, args.epochs))
        refs_cl.append(reference(config, train, args.epochs, torch.channels_last))
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            summary = run(config, out, "bench", f"ours{rep}")
            walls.append(time.perf_counter() - start)
            m = ResultsStore(out, "bench").metrics(f"ours{rep}")
        ours.append(float(m[(m.metric == "images_per_s") & (m.split == "train")].value.mean()))
    ref, ref_cl, ours, wall = (statistics.mean(v) for v in (refs, refs_cl, ours, walls))
    overall = len(train) // args.batch * args.batch * args.epochs / wall
    step_ms = args.batch / ours * 1e3
    print(f"model {args.model}, batch {args.batch}, {len(train)} train images, {args.epochs} epochs, {args.threads} threads")
    print(f"reference loop (tensors in RAM, no augmentation/logging): {ref:8.1f} images/s")
    print(f"  the same bare loop, channels-last:                      {ref_cl:8.1f} images/s")
    print(f"galaxygen training loop (load+augment+log):               {ours:8.1f} images/s  ratio {ours / ref:.3f} "
          f"(against the channels-last bare loop {ours / ref_cl:.3f})")
    print(f"galaxygen whole run incl. validation, checkpoints, TB:    {overall:8.1f} images/s  ratio {overall / ref:.3f}")
    print(f"where a step of our loop goes ({step_ms:.1f} ms):")
    for name, ms in costs(config, train).items():
        print(f"  {name:28s} {ms:6.2f} ms  ({ms / step_ms:.1%})")
    print(f"  {'model step (bare loop)':28s} {args.batch / ref_cl * 1e3:6.2f} ms")
    print(f"final val nelbo {summary['val_nelbo']:.1f} nats/image")


if __name__ == "__main__":
    main()
