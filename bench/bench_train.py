"""Training throughput on CPU: galaxygen's training loop as a fraction of the bare model step, its real limit.

    python bench/bench_train.py [--model cnn] [--data CACHE] [--batch 32] [--threads 2] [--rounds 5]

The reference is the same model's training step (forward, ELBO, backward, AdamW step) on one batch
already resident in memory, in the layout that runs it fastest (both layouts are timed), timed with
torch.utils.benchmark: nothing a loop could do is left out of it, so our loop can approach it but not
exceed it. Ours is galaxygen's Trainer.train_epoch as a run calls it: batches drawn from the memory-mapped
cache, converted and augmented, the step, the held-out probe every log_every steps, the reductions and
TensorBoard scalars. Reference and ours alternate for --rounds rounds (machine load drifts; every round
gives one ratio and the median is reported), after an untimed warm-up. Then each piece of a step of ours
is timed on its own, and the once-per-epoch work (validation, checkpoint, TensorBoard images) is given
as a share of a full epoch on the whole train split.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.benchmark import Timer
from torch.utils.tensorboard import SummaryWriter

from galaxygen import checkpoint, distributed
from galaxygen.config import TrainConfig
from galaxygen.data import Cache, resolve_cache
from galaxygen.data.loader import to_float
from galaxygen.losses import elbo_loss
from galaxygen.models import build_model
from galaxygen.results import ResultsStore
from galaxygen.train import Trainer


def bare_step(config: TrainConfig, batch: np.ndarray, layout: torch.memory_format) -> Callable[[], None]:
    """One training step of a fresh model on a resident batch in `layout`: nothing but the model's own work."""
    torch.manual_seed(config.seed)
    model = build_model(config).to(memory_format=layout).train()
    x = to_float(batch, layout)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def step() -> None:
        logits, mu, logvar = model(x)
        loss = elbo_loss(logits, x, mu, logvar, recon_loss=config.recon_loss, alpha=config.alpha).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def seconds(fn: Callable[[], object], threads: int, clock: Callable[[], float], min_run_time: float = 0.5) -> float:
    """Median seconds per call (torch.utils.benchmark, blocked_autorange)."""
    timer = Timer("fn()", globals={"fn": fn}, num_threads=threads, timer=clock)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="cache (default: the built-in synthetic galaxies)")
    p.add_argument("--model", default="cnn")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=25, help="steps of ours per round (default 25: one log window)")
    p.add_argument("--rounds", type=int, default=8, help="alternations of reference and ours (default 8)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="augment the batches, as runs do by default (--no-augment: the loop's own costs alone)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time (default), or this process's CPU time: steadier on a shared, loaded machine "
                        "(use it with --threads 1, where no thread waits for another)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    data = str(resolve_cache(args.data))
    cache = Cache.open(data)
    config = TrainConfig(model=args.model, batch_size=args.batch, data=data, epochs=args.rounds + 1,
                         data_count=args.steps * args.batch, augment=args.augment).resolved()
    batch = cache.images[np.sort(cache.indices("train")[: args.batch])]
    refs = {layout: bare_step(config, batch, layout) for layout in (torch.contiguous_format, torch.channels_last)}
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, ResultsStore(out, "bench"), "ours", distributed.read_env(), torch.device("cpu"))
        trainer.writer = SummaryWriter(f"{out}/tb")  # as in a run (rank 0 writes TensorBoard)
        loader = trainer.train_loader
        idx, generator = loader.batches()[0], torch.Generator().manual_seed(0)
        x = loader.load(idx, generator)
        probe_every = min(config.log_every, args.steps)
        pieces = {  # each piece of a step of ours on its own, per training step
            "objective step (the model step and what wraps it)": lambda: trainer.objective.train_step(x, 0.5),
            "batch: slice, to float" + (", augment" if config.augment else ""): lambda: loader.load(idx, generator),
            f"held-out probe (1 in {probe_every} steps)": trainer.probe_loss,
        }

        def ours_step() -> float:
            """Seconds per step of one pass of our loop over the --steps batches."""
            start = clock()
            trainer.train_epoch()
            trainer.epoch += 1
            return (clock() - start) / args.steps

        ours_step()  # warm-up, untimed: the first steps of a process run slower (allocator, oneDNN)
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):  # alternating, so drifting machine load hits every measurement alike
            for lay, fn in refs.items():
                times.setdefault(lay, []).append(seconds(fn, args.threads, clock))
            times.setdefault("ours", []).append(ours_step())
            for name, fn in pieces.items():
                times.setdefault(name, []).append(seconds(fn, args.threads, clock, 0.3))
        ratios = [min(times[lay][r] for lay in refs) / times["ours"][r] for r in range(args.rounds)]
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        best = min(refs, key=ms.get)

        print(f"model {args.model}, batch {args.batch}, {args.threads} threads, {args.clock} clock, {args.steps} steps "
              f"x {args.rounds} rounds (medians over rounds; our loop's layout: {name_of(loader.memory_format)})")
        for lay in refs:
            mark = "  <- the reference" if lay == best else ""
            print(f"  bare model step, resident batch, {name_of(lay):17s} {args.batch / ms[lay] * 1e3:8.1f} images/s{mark}")
        print(f"  galaxygen training loop                            {args.batch / ms['ours'] * 1e3:8.1f} images/s")
        print(f"ours / reference: {statistics.median(ratios):.3f}  (per round {min(ratios):.3f} .. {max(ratios):.3f})")

        print(f"where a step of ours goes ({ms['ours']:.1f} ms):")
        shares = {"model step (the reference)": ms[best]}
        for name in pieces:
            shares[name] = ms[name] / (probe_every if "probe" in name else 1)
        shares["objective step (the model step and what wraps it)"] -= ms[best]
        shares = {k.replace("objective step (the model step and what wraps it)", "the objective around it"): v
                  for k, v in shares.items()}
        shares["the rest (bookkeeping, reductions, TensorBoard)"] = ms["ours"] - sum(shares.values())
        for name, value in shares.items():
            print(f"  {name:48s} {value:7.2f} ms  {value / ms['ours']:6.1%}")

        # once per epoch, as a share of a full epoch on the whole train split
        epoch_s = len(cache.indices("train")) // args.batch * ms["ours"] / 1e3
        once = {}
        for name, fn in (("validation over the val split", trainer.validate),
                         ("checkpoint", lambda: checkpoint.save(trainer.store.checkpoint(trainer.trial_id), **trainer.state())),
                         ("TensorBoard prior samples and reconstructions", lambda: trainer.log_epoch({}))):
            start = clock()
            fn()
            once[name] = clock() - start
        trainer.writer.close()
    print(f"once per epoch (a full epoch of {len(cache.indices('train'))} images takes ~{epoch_s:.1f} s here):")
    for name, value in once.items():
        print(f"  {name:48s} {value:7.2f} s   {value / epoch_s:6.1%}")


def name_of(layout: torch.memory_format) -> str:
    return str(layout).split(".")[-1]


if __name__ == "__main__":
    main()
