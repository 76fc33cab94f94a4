"""Distributed data parallel set-up from the environment: one process, torchrun, or SLURM tasks."""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


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


class DistributedError(RuntimeError):
    """The rendezvous cannot be worked out from this environment."""


def slurm_hostnames(nodelist: str) -> list[str]:
    """The hosts of a SLURM nodelist such as 'gpu[03-05,07],cpu1', expanded by SLURM itself.

    `scontrol show hostnames` needs a slurm.conf (every SLURM node has one) but no controller.
    """
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise DistributedError(f"cannot expand the SLURM nodelist {nodelist!r}: scontrol is not on PATH "
                               "(set MASTER_ADDR, or run where the SLURM client commands are installed)")
    out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=120)
    hosts = out.stdout.split()
    if out.returncode != 0 or not hosts:
        raise DistributedError(f"scontrol could not expand the SLURM nodelist {nodelist!r}: "
                               f"{out.stderr.strip() or 'no hosts'}")
    return hosts


def master_port_for_job(job_id: str) -> int:
    """A port derived from the SLURM job id, so jobs sharing a node use different rendezvous ports."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 15000 + int(digits) % 20000


def read_env(environ: dict | None = None) -> DistEnv:
    """Rank and world size from torchrun's variables, else SLURM's task variables, else one process.

    Fills MASTER_ADDR (the job's first host, from `scontrol show hostnames`) and MASTER_PORT (from the job
    id) when they are missing.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        if "MASTER_ADDR" not in env:  # rank 0 runs on the job's first node
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            env["MASTER_ADDR"] = slurm_hostnames(nodelist)[0] if nodelist else "127.0.0.1"
        env.setdefault("MASTER_PORT", str(master_port_for_job(env.get("SLURM_JOB_ID", "0"))))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistEnv()


def _resolves_to_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except OSError:  # unresolvable: gloo falls back to the loopback address too
        return True


def route_interface(host: str) -> str:
    """Name of the network interface this machine uses to reach `host` (Linux)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), 9))  # UDP: picks the route, sends nothing
        local = s.getsockname()[0]
        for _, name in socket.if_nameindex():
            try:  # SIOCGIFADDR: the interface's IPv4 address
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == local:
                return name
    raise DistributedError(f"no network interface has {local}, the address that reaches {host}")


def pin_gloo_interface(environ: dict | None = None, hostname: str | None = None) -> str | None:
    """Set GLOO_SOCKET_IFNAME to the interface that reaches MASTER_ADDR, only where gloo would otherwise fail.

    gloo binds the address this host's name resolves to; where that is loopback (Debian's default /etc/hosts
    maps the host name to 127.0.1.1), ranks on other nodes cannot connect. A GLOO_SOCKET_IFNAME already set
    wins; a loopback MASTER_ADDR means every rank is on this host. Returns the interface set, if any.
    """
    env = os.environ if environ is None else environ
    master = env.get("MASTER_ADDR")
    if "GLOO_SOCKET_IFNAME" in env or not master or _resolves_to_loopback(master):
        return None
    if not _resolves_to_loopback(hostname or socket.gethostname()):
        return None
    env["GLOO_SOCKET_IFNAME"] = route_interface(master)
    log.info("this host's name resolves to loopback: gloo uses %s, the interface that reaches %s",
             env["GLOO_SOCKET_IFNAME"], master)
    return env["GLOO_SOCKET_IFNAME"]


def setup(env: DistEnv) -> torch.device:
    """Initialise the process group (nccl on GPU, gloo on CPU) and return this process's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if env.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "gloo":
            pin_gloo_interface()
        log.info("%s: rank %d of %d on %s, rendezvous %s:%s", backend, env.rank, env.world_size, socket.gethostname(),
                 os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))
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
