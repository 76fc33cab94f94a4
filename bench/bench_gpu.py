"""Training throughput on CUDA GPUs: images/s per model and how busy the device is.

    python bench/bench_gpu.py [--models cnn,resvae] [--batch 256] [--steps 40] [--gpus N] [--data CACHE]

Every model trains as a run does: galaxygen's Trainer on the cache (batches pinned and copied to the GPU as
uint8, made float and augmented there), bf16 autocast, channels-last for convolutional models, and with 2 or
more GPUs one DDP rank per GPU over nccl (torch.multiprocessing), --batch images per GPU. For each model:
  * images/s of the training loop (batches from the cache + step), all GPUs together;
  * the same step on a batch already on the GPU (the reference the loop can approach) and loop / reference;
  * busy: the share of the loop's wall time the GPU spends running kernels (torch.profiler, rank 0).
Without a CUDA GPU it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

from galaxygen import distributed
from galaxygen.config import TrainConfig
from galaxygen.data import resolve_cache
from galaxygen.models import MODELS
from galaxygen.results import ResultsStore
from galaxygen.train import Trainer


def loop(trainer: Trainer, steps: int) -> float:
    """Seconds for `steps` steps of the training loop, batches drawn from the cache (epochs wrap around)."""
    done, start = 0, time.perf_counter()
    while done < steps:
        trainer.train_loader.set_epoch(trainer.epoch)
        for x in trainer.train_loader:
            trainer.objective.train_step(x, 0.5)
            done += 1
            if done == steps:
                break
        trainer.epoch += 1
    torch.cuda.synchronize()
    return time.perf_counter() - start


def resident(trainer: Trainer, steps: int) -> float:
    """Seconds for `steps` steps on one batch that stays on the GPU."""
    x = next(iter(trainer.train_loader))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.objective.train_step(x, 0.5)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def busy_fraction(trainer: Trainer, steps: int) -> float:
    """Share of the wall time of `steps` loop steps in which the GPU runs a kernel or a copy on any stream
    (the union of their intervals, so nccl's stream overlapping the compute stream is not counted twice)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = loop(trainer, steps)
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy / 1e6 / wall  # microseconds


def measure(rank: int, world: int, port: int, args: argparse.Namespace, results: dict) -> None:
    """One rank: every model's loop, reference and busy fraction; rank 0 stores the figures in `results`."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    env = distributed.read_env()
    device = distributed.setup(env)
    try:
        for name in args.models.split(","):
            config = TrainConfig(model=name, batch_size=args.batch * world, data=args.data, amp=True).resolved()
            with tempfile.TemporaryDirectory() as out:
                trainer = Trainer(config, ResultsStore(out, "bench"), name, env, device)
                trainer.model.train()
                loop(trainer, 10)  # warm-up: cuDNN autotuning, allocator, nccl buckets
                seconds = loop(trainer, args.steps)
                reference = resident(trainer, args.steps)
                busy = busy_fraction(trainer, min(args.steps, 20))
            if rank == 0:
                images = args.steps * args.batch * world
                results[name] = (images / seconds, images / reference, busy)
    finally:
        distributed.teardown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model names (default: every registered one)")
    p.add_argument("--batch", type=int, default=256, help="images per GPU per step (default 256)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per model (default 40)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs to use (default: all of this node's)")
    p.add_argument("--data", default="", help="cache (default: the built-in synthetic galaxies)")
    args = p.parse_args()
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; allowed: {', '.join(MODELS)}", file=sys.stderr)
        sys.exit(2)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here, nothing to measure (run it on a GPU node)")
        return
    world = args.gpus or torch.cuda.device_count()
    args.data = str(resolve_cache(args.data))  # rendered once, before the ranks start
    if world > 1:
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(measure, args=(world, free_port(), args, results), nprocs=world)
            results = dict(results)
    else:
        results = {}
        measure(0, 1, free_port(), args, results)
    print(f"{world} x {torch.cuda.get_device_name(0)}, {args.batch} images per GPU per step, bf16 autocast, "
          f"{'nccl DDP' if world > 1 else 'one process'}, torch {torch.__version__}")
    print(f"  {'model':8s} {'loop images/s':>14s} {'resident batch':>15s} {'loop/resident':>14s} {'GPU busy':>9s}")
    for name, (rate, reference, busy) in results.items():
        print(f"  {name:8s} {rate:14.0f} {reference:15.0f} {rate / reference:14.3f} {busy:9.1%}")


if __name__ == "__main__":
    main()
