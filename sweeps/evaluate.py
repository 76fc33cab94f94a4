"""`python -m sweeps.evaluate CKPT --shards K --shard-dir DIR`: a checkpoint's sample-quality evaluation on SLURM.

The statmorph morphology (the slow, CPU-bound part) runs as a K-task job array, each task running
`python -m galaxygen.evaluate ... --shard I/K`, and a job that depends on the whole array merges the shards and
evaluates (`--out RESULTS/SWEEP` writes the metrics into the sweep's store). Both are submitted through submitit
exactly like the sweeps' trial jobs: the same cluster profile and SLURM flags (partition, account, qos, setup
lines, sbatch lines), from a snapshot of the code in DIR/code/. The jobs are single-node CPU jobs: GPUs and
node counts of the profile are ignored, and --cpus-per-task (default 2) sets the statmorph workers per task.

This lives in sweeps/ (with the rest of the SLURM orchestration) rather than behind a flag of
galaxygen.evaluate, so that galaxygen never imports sweeps.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from galaxygen.cli import positive
from sweeps.slurm_job import Driver, environment, executor, run_evaluate, snapshot_code
from sweeps.slurm_options import SlurmOptions, SlurmOptionsError, add_arguments, options_from_args

log = logging.getLogger("sweeps.evaluate")

DEFAULT_CPUS = 2


def build_parser() -> argparse.ArgumentParser:
    from galaxygen.evaluate.__main__ import build_parser as evaluate_parser

    p = evaluate_parser()
    p.prog, p.description = "python -m sweeps.evaluate", __doc__
    p.add_argument("--shards", type=positive, default=4, metavar="K",
                   help="morphology array tasks (default 4); a merge job follows them")
    add_arguments(p, "the evaluation jobs")
    return p


@dataclasses.dataclass(frozen=True)
class Plan:
    """What gets submitted: the job shape, one argv per array task, and the merge job's argv."""

    options: SlurmOptions
    shards: list[list[str]]
    merge: list[str]


def plan(args: argparse.Namespace) -> Plan:
    """The jobs of an evaluation, from parsed arguments (paths made absolute; the profile's shape as CPU jobs)."""
    options = options_from_args(args)
    cpus = options.cpus_per_task or DEFAULT_CPUS
    options = options.cpu_job(cpus)
    common = [str(Path(args.checkpoint).resolve()), "--n", str(args.n), "--seed", str(args.seed), "--shard-dir",
              str(Path(args.shard_dir).resolve()), "--workers", str(cpus), "--no-progress"]
    if args.data:
        common += ["--data", str(Path(args.data).resolve())]
    if args.inception:
        common += ["--inception", str(Path(args.inception).resolve())]
    merge = list(common)
    for flag, value in (("--out", args.out), ("--json", args.json)):
        if value:
            merge += [flag, str(Path(value).resolve())]
    if args.trial:
        merge += ["--trial", args.trial]
    return Plan(options, [[*common, "--shard", f"{i}/{args.shards}"] for i in range(args.shards)], merge)


def submit(job_plan: Plan, shard_dir: Path) -> tuple[str, str]:
    """Submit the morphology array, then the merge job after it; returns both SLURM job ids."""
    options = job_plan.options
    code = snapshot_code(shard_dir / "code") if options.snapshot else None
    driver = Driver.here(code, options.python)
    folder = shard_dir / "slurm"
    with environment(driver.environ):
        array = executor(folder, options, driver, "galaxygen-eval-morph").map_array(run_evaluate, job_plan.shards)
        array_id = str(array[0].job_id).split("_")[0]
        after = dataclasses.replace(options, sbatch=(*options.sbatch, f"--dependency=afterok:{array_id}"))
        merge = executor(folder, after, driver, "galaxygen-eval-merge").submit(run_evaluate, job_plan.merge)
    return array_id, str(merge.job_id)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.shard:
        print("error: --shard is for one task of the array; give --shards K instead", file=sys.stderr)
        return 2
    if not args.shard_dir:
        print("error: give --shard-dir DIR (the morphology shards, the job logs and the code snapshot go there)",
              file=sys.stderr)
        return 2
    from galaxygen.evaluate.__main__ import input_error

    try:
        problem = input_error(args)
        job_plan = plan(args)
    except SlurmOptionsError as err:
        problem = str(err)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    shard_dir = Path(args.shard_dir).resolve()
    array_id, merge_id = submit(job_plan, shard_dir)
    print(f"submitted morphology array {array_id} ({args.shards} tasks) and merge job {merge_id}; shards and logs "
          f"in {shard_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
