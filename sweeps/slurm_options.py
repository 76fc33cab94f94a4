"""How SLURM jobs are shaped and watched: `SlurmOptions`, cluster profiles, the command-line flags.

A leaf module (standard library and galaxygen.config only, no Ray, no submitit): the Ray-side backend
(`sweeps.slurm`), the job side (`sweeps.slurm_job`) and the evaluation jobs (`sweeps.evaluate`) all take
their options from here. Precedence: command line > profile file > the defaults below.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from galaxygen.config import parse_value


class SlurmOptionsError(ValueError):
    """A SLURM option or profile key is not allowed; the message names it and what is allowed."""


@dataclass(frozen=True)
class SlurmOptions:
    """How each trial's SLURM job is shaped and watched (command line > profile file > these defaults)."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one task per GPU (or 1 without GPUs)
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    timeout_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch: tuple[str, ...] = ()  # extra "#SBATCH" lines, e.g. "--mail-type=FAIL" or "--exclusive"
    setup: tuple[str, ...] = ()  # shell lines run before srun, e.g. "module load cuda/12.4"
    signal_delay_s: int = 120  # USR2 this long before the time limit: checkpoint and requeue
    max_requeues: int = 3  # requeues after time-outs (preemptions do not count)
    max_jobs: int | None = None  # trial jobs in flight at once (the launcher's --max-concurrent overrides it)
    eval_job: bool | None = None  # end-of-trial evaluation as its own CPU job after training (default: with GPUs)
    eval_cpus: int = 2  # CPUs (statmorph workers) of that evaluation job
    poll_s: float = 5.0  # how often a trial looks for new metrics
    squeue_s: float = 30.0  # how often the sweep asks squeue (one call for all its jobs) whether they still exist
    heartbeat_s: float = 600.0  # a job with no poller for this long cancels itself (0: never)
    cancel_wait_s: float = 120.0  # after scancel, wait this long for the job to end before recording "stopped"
    trial_cpus: float = 0.1  # Ray CPUs per polling trial
    snapshot: bool = True  # run jobs from a copy of the code in RESULTS/SWEEP/code/
    python: str | None = None  # the jobs' python (default: the driver's, i.e. the project's .venv)

    def __post_init__(self) -> None:
        def bad(key: str, allowed: str) -> None:
            raise SlurmOptionsError(f"invalid SLURM option {key}={getattr(self, key)!r}: allowed {allowed}")

        for key in ("nodes", "timeout_min", "eval_cpus"):
            if getattr(self, key) < 1:
                bad(key, "an integer >= 1")
        for key in ("tasks_per_node", "cpus_per_task", "max_jobs"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                bad(key, "an integer >= 1 (or unset)")
        for key in ("gpus_per_node", "signal_delay_s", "max_requeues"):
            if getattr(self, key) < 0:
                bad(key, "an integer >= 0")
        if self.mem_gb is not None and not self.mem_gb > 0:
            bad("mem_gb", "a number of GB > 0 (or unset for the cluster's DefMemPerCPU)")
        for key in ("poll_s", "squeue_s", "trial_cpus", "cancel_wait_s"):
            if not getattr(self, key) > 0:
                bad(key, "a number > 0")
        if self.heartbeat_s < 0:
            bad("heartbeat_s", "a number of seconds >= 0 (0 disables the heartbeat)")
        sbatch_parameters(self.sbatch)

    @property
    def tasks(self) -> int:
        """SLURM tasks per node: one per GPU unless set."""
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def separate_eval(self) -> bool:
        """Whether a trial's end-of-run evaluation (CPU work) runs as its own job instead of in the training
        job's allocation: as set, else when the training jobs have GPUs (which would wait idle meanwhile)."""
        return self.gpus_per_node > 0 if self.eval_job is None else self.eval_job

    def cpu_job(self, cpus: int, *sbatch: str) -> SlurmOptions:
        """These options shaped as a one-task, single-node CPU job (evaluation), plus extra sbatch lines."""
        return dataclasses.replace(self, nodes=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=cpus,
                                   sbatch=(*self.sbatch, *sbatch))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SlurmOptions:
        """Options from a profile or the command line; keys may use dashes; unknown keys fail."""
        out: dict[str, Any] = {}
        names = {f.name: f for f in fields(cls)}
        for raw, value in values.items():
            key = raw.replace("-", "_")
            if key not in names:
                raise SlurmOptionsError(f"unknown SLURM option {raw!r}: allowed {', '.join(names)}")
            out[key] = coerce(key, names[key].type, value)
        return cls(**out)


def coerce(key: str, hint: str, value: Any) -> Any:
    """A profile or flag value as the option's type (`hint` is the dataclass field's annotation), by the
    project's one value coercion (galaxygen.config.parse_value)."""
    if value is None:
        return None
    try:
        if hint.startswith("tuple"):
            return tuple(str(v) for v in ([value] if isinstance(value, str) else value))
        typ = next(t for t in (bool, int, float, str) if hint.startswith(t.__name__))
        return parse_value(typ, value)
    except (TypeError, ValueError, OverflowError):
        raise SlurmOptionsError(f"invalid SLURM option {key}={value!r}: expected {hint}") from None


def sbatch_parameters(lines: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Extra `#SBATCH` lines ("#SBATCH --mail-type=FAIL", "--exclusive", "gres=gpu:a100:2") as submitit's
    additional_parameters (these override the generated ones)."""
    out: dict[str, Any] = {}
    for line in lines:
        text = line.strip()
        text = text[len("#SBATCH"):].strip() if text.startswith("#SBATCH") else text
        text = text.lstrip("-")
        match = re.fullmatch(r"([A-Za-z][\w-]*)(?:[= ]\s*(.+))?", text)
        if not match:
            raise SlurmOptionsError(f"invalid sbatch line {line!r}: expected '--option=value' or '--flag'")
        key, value = match.group(1).replace("_", "-"), match.group(2)
        out[key] = True if value is None else value.strip()
    return out


# -- profile files and the command line ------------------------------------------------------------------


def default_profile() -> Path | None:
    """$GALAXYGEN_SLURM_PROFILE, else the first of ~/.config/galaxygen/slurm.{yaml,yml,toml} that exists."""
    if os.environ.get("GALAXYGEN_SLURM_PROFILE"):
        return Path(os.environ["GALAXYGEN_SLURM_PROFILE"])
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "galaxygen"
    for name in ("slurm.yaml", "slurm.yml", "slurm.toml"):
        if (config / name).is_file():
            return config / name
    return None


def load_profile(path: str | os.PathLike) -> dict[str, Any]:
    """A cluster profile: a YAML or TOML mapping of SlurmOptions keys (optionally under a `slurm` table)."""
    path = Path(path)
    if not path.is_file():
        raise SlurmOptionsError(f"SLURM profile {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as err:
        raise SlurmOptionsError(f"SLURM profile {path} is not valid {path.suffix.lstrip('.').upper() or 'YAML'}: "
                                f"{err}") from None
    if not isinstance(data, dict):
        raise SlurmOptionsError(f"SLURM profile {path} must be a mapping of option: value")
    if isinstance(data.get("slurm"), dict):
        data = data["slurm"]
    SlurmOptions.from_dict(data)  # fail early, naming the file's bad key
    return data


# (flag, option, type, metavar, help); every default is None so that a profile's value shows through
CLI = [
    ("--nodes", "nodes", int, "N", "nodes per trial job (default 1)"),
    ("--gpus-per-node", "gpus_per_node", int, "N", "GPUs per node (default 0); one task per GPU"),
    ("--tasks-per-node", "tasks_per_node", int, "N", "tasks per node (default: one per GPU, or 1)"),
    ("--cpus-per-task", "cpus_per_task", int, "N", "CPUs per task (default: the cluster's)"),
    ("--mem-gb", "mem_gb", float, "GB", "memory per node (default: the cluster's DefMemPerCPU)"),
    ("--timeout-min", "timeout_min", int, "MIN", "time limit per job; the job is checkpointed and requeued "
     "before it (default 60)"),
    ("--partition", "partition", str, "NAME", "SLURM partition (default: the cluster's)"),
    ("--account", "account", str, "NAME", "SLURM account"),
    ("--qos", "qos", str, "NAME", "SLURM quality of service"),
    ("--constraint", "constraint", str, "EXPR", "SLURM node constraint, e.g. a100"),
    ("--slurm-signal-delay-s", "signal_delay_s", int, "S", "USR2 (checkpoint + requeue) this long before the "
     "time limit (default 120)"),
    ("--slurm-max-requeues", "max_requeues", int, "N", "requeues after time-outs (default 3)"),
    ("--slurm-poll-s", "poll_s", float, "S", "seconds between metric polls per trial (default 5)"),
    ("--slurm-squeue-s", "squeue_s", float, "S", "seconds between the sweep's squeue calls, one for all its "
     "jobs (default 30)"),
    ("--slurm-heartbeat-s", "heartbeat_s", float, "S", "a job whose sweep driver is gone cancels itself after "
     "this many seconds (default 600; 0 never)"),
    ("--slurm-python", "python", str, "CMD", "python command of the jobs (default: this python)"),
    ("--slurm-eval-job", "eval_job", str, "yes|no", "end-of-trial evaluation as its own CPU job after the "
     "training job, so it does not hold the training allocation (default: yes when --gpus-per-node > 0)"),
    ("--slurm-eval-cpus", "eval_cpus", int, "N", "CPUs of that evaluation job (default 2)"),
]


def add_arguments(parser: argparse.ArgumentParser, what: str = "--backend slurm") -> None:
    """Add the SLURM options (job shape, profile, sbatch and setup lines) to a command's parser."""
    group = parser.add_argument_group(f"SLURM ({what})", "Defaults come from a cluster profile: "
                                      "--slurm-profile, $GALAXYGEN_SLURM_PROFILE or ~/.config/galaxygen/slurm.yaml "
                                      "(YAML or TOML: partition, gpus_per_node, cpus_per_task, mem_gb, timeout_min, "
                                      "account, qos, constraint, max_jobs, sbatch: [lines], setup: [lines], ...); "
                                      "flags override it.")
    group.add_argument("--slurm-profile", metavar="FILE", help="cluster profile (YAML or TOML)")
    for flag, dest, typ, metavar, help_text in CLI:
        group.add_argument(flag, dest=f"slurm_{dest}", type=typ, default=None, metavar=metavar, help=help_text)
    group.add_argument("--sbatch", dest="slurm_sbatch", action="append", default=None, metavar="LINE",
                       help="extra #SBATCH line, repeatable (e.g. --sbatch=--mail-type=FAIL)")
    group.add_argument("--slurm-setup", dest="slurm_setup", action="append", default=None, metavar="LINE",
                       help="shell line run in the job before its command, repeatable (e.g. 'module load cuda')")
    group.add_argument("--slurm-no-snapshot", dest="slurm_snapshot", action="store_false", default=None,
                       help="run jobs from the live code instead of a snapshot of it")


def options_from_args(args: argparse.Namespace) -> SlurmOptions:
    """SlurmOptions from parsed arguments: the profile's values, overridden (lists: extended) by flags."""
    profile = getattr(args, "slurm_profile", None) or default_profile()
    values = dict(load_profile(profile)) if profile else {}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    for _, dest, _, _, _ in CLI:
        if getattr(args, f"slurm_{dest}", None) is not None:
            values[dest] = getattr(args, f"slurm_{dest}")
    for dest in ("sbatch", "setup"):
        extra = getattr(args, f"slurm_{dest}", None)
        if extra:
            before = values.get(dest) or []
            values[dest] = [*([before] if isinstance(before, str) else before), *extra]
    if getattr(args, "slurm_snapshot", None) is False:
        values["snapshot"] = False
    return SlurmOptions.from_dict(values)
