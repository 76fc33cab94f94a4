"""Distributed data parallel set-up from the environment: one process, torchrun, or SLURM tasks."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank, the world size and its local (per-node) rank."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as 'gpu[03-05,07],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def master_port_for_job(job_id: str) -> int:
    """A port derived from the SLURM job id, so jobs sharing a node use different rendezvous ports."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 15000 + int(digits) % 20000


def read_env(environ: dict | None = None) -> DistEnv:
    """Rank and world size from torchrun's variables, else SLURM's task variables, else one process.

    Fills MASTER_ADDR / MASTER_PORT from SLURM when they are missing.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))))
        env.setdefault("MASTER_PORT", str(master_port_for_job(env.get("SLURM_JOB_ID", "0"))))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistEnv()


def setup(env: DistEnv) -> torch.device:
    """Initialise the process group (nccl on GPU, gloo on CPU) and return this process's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if env.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_mean(values: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all ranks (identity in one process)."""
    return all_sum(values) / dist.get_world_size() if dist.is_initialized() else values


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (identity in one process)."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
