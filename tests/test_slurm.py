"""The SLURM backend: option parsing and the sbatch script, then real jobs on the local cluster.

The tests marked `slurm` need `slurm/local-cluster.sh start` (tests/run.sh and .ci/run do it as root);
they are skipped, with the reason, when no controller answers, except under CI=true where they fail.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from galaxygen import checkpoint
from galaxygen.config import TrainConfig
from galaxygen.results import ResultsStore, atomic_write_json
from sweeps import slurm, slurm_job, slurm_options
from sweeps.slurm import TrialPoller
from sweeps.slurm_job import Driver, SlurmJobRef
from sweeps.slurm_options import SlurmOptions, SlurmOptionsError
from tests.conftest import run_launcher

REPO = Path(__file__).resolve().parent.parent


def slurm_problem() -> str | None:
    """Why SLURM cannot be used here, or None when a controller answers and a node is up."""
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return "SLURM client commands are not installed (run: sudo slurm/local-cluster.sh start)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo failed: {err}"
    if out.returncode != 0:
        return f"no SLURM controller answers ({out.stderr.strip()}); run: sudo slurm/local-cluster.sh start"
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in out.stdout.split()):
        return f"no usable SLURM node (states: {out.stdout.split()})"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = slurm_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests, but {problem}")
        pytest.skip(problem)


def options(**changes) -> SlurmOptions:
    """Fast polling for tests (the defaults suit a real cluster)."""
    return SlurmOptions(**{"poll_s": 0.5, "squeue_s": 2.0, "heartbeat_s": 300.0, "timeout_min": 20, **changes})


def tiny_config(cache: Path, **changes) -> TrainConfig:
    return TrainConfig.from_dict({"model": "cnn", "batch_size": 16, "log_every": 4, "data": str(cache), "epochs": 1,
                                  **changes})


def squeue(*args: str) -> list[tuple[str, str, str]]:
    """(job id, name, state) of the jobs squeue lists (`-t all` includes recently finished ones)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%j|%T", *args], capture_output=True, text=True, check=True)
    return [tuple(line.split("|")) for line in out.stdout.splitlines() if line]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_gone(job_id: str) -> bool:
    return all(state not in slurm_job.ACTIVE_STATES for jid, _, state in squeue("-t", "all") if jid == job_id)


def assert_clean_metrics(store: ResultsStore, trial_id: str, epochs: int) -> None:
    metrics = store.metrics(trial_id)
    assert sorted(metrics["epoch"].unique()) == list(range(1, epochs + 1))
    dupes = metrics.duplicated(["epoch", "step", "split", "metric"])
    assert not dupes.any(), metrics[dupes]


# -- options, profiles and the sbatch script (no cluster needed) ------------------------------------------


def test_profile_then_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("GALAXYGEN_SLURM_PROFILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "nothing"))
    profile = tmp_path / "cluster.yaml"
    profile.write_text("slurm:\n  partition: gpu\n  account: astro\n  gpus-per-node: 4\n  mem_gb: 64\n"
                       "  sbatch: ['--mail-type=FAIL']\n  setup: ['module load cuda/12.4']\n")
    parser = argparse.ArgumentParser()
    slurm_options.add_arguments(parser)
    opts = slurm_options.options_from_args(parser.parse_args(
        ["--slurm-profile", str(profile), "--partition", "debug", "--sbatch=--exclusive", "--timeout-min", "30"]))
    assert (opts.partition, opts.account, opts.gpus_per_node, opts.tasks, opts.mem_gb, opts.timeout_min) == \
        ("debug", "astro", 4, 4, 64.0, 30)
    assert opts.sbatch == ("--mail-type=FAIL", "--exclusive")
    assert opts.setup == ("module load cuda/12.4",)

    toml = tmp_path / "cluster.toml"
    toml.write_text('partition = "a100"\ncpus_per_task = 8\nheartbeat_s = 0\n')
    monkeypatch.setenv("GALAXYGEN_SLURM_PROFILE", str(toml))
    opts = slurm_options.options_from_args(parser.parse_args([]))
    assert (opts.partition, opts.cpus_per_task, opts.heartbeat_s, opts.tasks) == ("a100", 8, 0.0, 1)
    assert slurm_options.options_from_args(parser.parse_args(["--slurm-no-snapshot"])).snapshot is False

    toml.write_text('partitoin = "a100"\n')
    with pytest.raises(SlurmOptionsError, match="unknown SLURM option 'partitoin': allowed nodes, "):
        slurm_options.options_from_args(parser.parse_args([]))
    with pytest.raises(SlurmOptionsError, match=r"invalid SLURM option nodes=0: allowed an integer >= 1"):
        SlurmOptions(nodes=0)
    with pytest.raises(SlurmOptionsError, match="does not exist"):
        slurm_options.load_profile(tmp_path / "missing.yaml")
    with pytest.raises(SlurmOptionsError, match="invalid sbatch line"):
        SlurmOptions(sbatch=("--=FAIL",))


def test_launcher_accepts_the_slurm_flags(tmp_path, monkeypatch):
    from sweeps.launch import build_parser

    monkeypatch.delenv("GALAXYGEN_SLURM_PROFILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))

    args = build_parser().parse_args(["dropout", "--backend", "slurm", "--gpus-per-node", "2", "--partition", "p",
                                      "--sbatch", "#SBATCH --exclusive"])
    opts = slurm_options.options_from_args(args)
    assert (opts.gpus_per_node, opts.tasks, opts.partition, opts.sbatch) == (2, 2, "p", ("#SBATCH --exclusive",))


def test_sbatch_script_golden():
    """The whole generated sbatch script: any change to it shows up here as a diff."""
    from submitit.slurm.slurm import _make_sbatch_string

    opts = SlurmOptions(nodes=2, gpus_per_node=4, cpus_per_task=8, mem_gb=64, timeout_min=720, partition="gpu",
                        account="astro", qos="high", constraint="a100",
                        sbatch=("--mail-type=FAIL", "#SBATCH --exclusive"), setup=("module load cuda/12.4",))
    driver = Driver("login1:42", "/home/me/galaxygen", "/home/me/galaxygen/.venv/bin/python", {},
                    "/scratch/me/results/search/code/0123456789ab")
    params = slurm_job.executor_parameters(opts, driver, "search-abcdef0123")
    script = _make_sbatch_string(command="PYTHON -u -m submitit.core._submit FOLDER", folder="/f", **params)
    expected = """#!/bin/bash

# Parameters
#SBATCH --account=astro
#SBATCH --chdir=/home/me/galaxygen
#SBATCH --constraint=a100
#SBATCH --cpus-per-task=8
#SBATCH --error=/f/%j_0_log.err
#SBATCH --exclusive
#SBATCH --gpus-per-node=4
#SBATCH --job-name=search-abcdef0123
#SBATCH --mail-type=FAIL
#SBATCH --mem=64G
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --open-mode=append
#SBATCH --output=/f/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --signal=USR2@120
#SBATCH --time=720
#SBATCH --wckey=submitit

# setup
export PYTHONPATH=/scratch/me/results/search/code/0123456789ab${PYTHONPATH:+:$PYTHONPATH}
export PYTHONSAFEPATH=1
export GALAXYGEN_CODE=/scratch/me/results/search/code/0123456789ab
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
module load cuda/12.4

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /f/%j_%t_log.out --error /f/%j_%t_log.err --kill-on-bad-exit=1 \
PYTHON -u -m submitit.core._submit FOLDER
"""
    assert script == expected.replace("\\\n", "")


def test_options_and_the_job_side_are_ray_free_leaves():
    """The job side and the options import neither Ray nor the Ray-side backend (no circle between them)."""
    code = ("import sys, sweeps.slurm_options, sweeps.slurm_job, sweeps.evaluate; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.') or m == 'sweeps.slurm'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_evaluation_jobs_follow_the_cluster_profile(tmp_path, monkeypatch):
    """sweeps.evaluate: K morphology tasks and a merge job, shaped by the same profile as the trial jobs."""
    from submitit.slurm.slurm import _make_sbatch_string

    from sweeps import evaluate

    profile = tmp_path / "cluster.yaml"
    profile.write_text("partition: cpu\naccount: astro\ngpus_per_node: 4\nnodes: 2\n"
                       "setup: ['module load gcc']\nsbatch: ['--qos=short']\n")
    monkeypatch.setenv("GALAXYGEN_SLURM_PROFILE", str(profile))
    ckpt = tmp_path / "runs" / "t1" / "checkpoints" / "best.pt"
    args = evaluate.build_parser().parse_args([str(ckpt), "--n", "500", "--shards", "3", "--shard-dir",
                                               str(tmp_path / "s"), "--out", str(tmp_path / "r" / "sw")])
    plan = evaluate.plan(args)
    assert (plan.options.nodes, plan.options.gpus_per_node, plan.options.tasks, plan.options.cpus_per_task) == \
        (1, 0, 1, evaluate.DEFAULT_CPUS)
    assert [a[a.index("--shard") + 1] for a in plan.shards] == ["0/3", "1/3", "2/3"]
    assert all(a[0] == str(ckpt) and "--out" not in a for a in plan.shards)
    assert "--shard" not in plan.merge and plan.merge[plan.merge.index("--out") + 1] == str(tmp_path / "r" / "sw")
    assert plan.merge[plan.merge.index("--shard-dir") + 1] == str(tmp_path / "s")
    driver = Driver("login1:1", "/home/me", "/venv/bin/python", {}, str(tmp_path / "s" / "code" / "abc"))
    script = _make_sbatch_string(command="CMD", folder="/f",
                                 **slurm_job.executor_parameters(plan.options, driver, "galaxygen-eval-morph"))
    for line in ("#SBATCH --partition=cpu", "#SBATCH --account=astro", "#SBATCH --qos=short", "module load gcc",
                 f"export PYTHONPATH={tmp_path}/s/code/abc", "#SBATCH --cpus-per-task=2", "#SBATCH --nodes=1"):
        assert line in script, script
    assert "gpus" not in script
    assert evaluate.main([str(ckpt), "--shards", "2", "--shard-dir", str(tmp_path / "s")]) == 2  # no checkpoint
    assert not (tmp_path / "s").exists()


def test_driver_environment_drops_slurm_and_ray_variables(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "100")
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/slurm.conf")
    monkeypatch.setenv("RAY_ADDRESS", "x")
    monkeypatch.setenv("GALAXYGEN_HOME", "/data")
    env = Driver.here().environ
    assert "SLURM_JOB_ID" not in env and "SLURM_MEM_PER_CPU" not in env and "RAY_ADDRESS" not in env
    assert env["SLURM_CONF"] == "/etc/slurm/slurm.conf" and env["GALAXYGEN_HOME"] == "/data"


def test_code_snapshot_is_a_content_addressed_copy(tmp_path):
    root = tmp_path / "src"
    for pkg in slurm_job.PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "galaxygen" / "__pycache__").mkdir(exist_ok=True)
    (root / "galaxygen" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    first = slurm_job.snapshot_code(tmp_path / "code", root)
    assert slurm_job.snapshot_code(tmp_path / "code", root) == first
    assert (first / "sweeps" / "slurm_job.py").read_text() == (REPO / "sweeps" / "slurm_job.py").read_text()
    assert not list(first.rglob("__pycache__")) and json.loads((first / "SNAPSHOT.json").read_text())["files"] > 10
    with open(root / "galaxygen" / "__init__.py", "a") as f:
        f.write("# edited while a sweep runs\n")
    second = slurm_job.snapshot_code(tmp_path / "code", root)
    assert second != first and "edited" not in (first / "galaxygen" / "__init__.py").read_text()


def test_scripts_have_help():
    for script in ("local-cluster.sh", "sweep.sh", "tensorboard.sh"):
        out = subprocess.run(["bash", str(REPO / "slurm" / script), "--help"], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert "Usage" in out.stdout or "usage" in out.stdout
    out = subprocess.run(["bash", str(REPO / "slurm" / "local-cluster.sh"), "launch"], capture_output=True, text=True)
    assert out.returncode == 2 and "allowed install, start, stop, status, restart" in out.stderr


def test_tensorboard_script_binds_localhost_and_prints_the_tunnel(tmp_path):
    (tmp_path / "sweep" / "runs").mkdir(parents=True)
    proc = subprocess.Popen(["bash", str(REPO / "slurm" / "tensorboard.sh"), str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "TensorBoard" in line and "Press CTRL+C" in line:
                break
        text = "".join(lines)
        assert "ssh -N -L" in text and ":127.0.0.1:" in text, text
        served = re.search(r"TensorBoard \S+ at http://127\.0\.0\.1:(\d+)/", text)
        assert served, text
        with urllib.request.urlopen(f"http://127.0.0.1:{served.group(1)}/", timeout=30) as page:
            assert page.status == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


# -- real jobs on the local cluster ---------------------------------------------------------------------


@pytest.mark.slurm
def test_sweep_sh_runs_a_tiny_dropout_sweep(cluster, blob_cache, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    cmd = ["sbatch", "--wait", "--parsable", "--output", str(results / "sweep-%j.out"), "slurm/sweep.sh", "dropout",
           "--data", str(blob_cache), "--epochs", "1", "--grid", "dropout=0.1,0.5", "--set", "batch_size=16",
           "--set", "log_every=4", "--results", str(results), "--no-figures", "--slurm-poll-s", "1",
           "--slurm-squeue-s", "2", "--eval-n", "0"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    logs = "\n".join(p.read_text()[-4000:] for p in results.glob("sweep-*.out"))
    assert out.returncode == 0, out.stdout + out.stderr + logs
    store = ResultsStore(results, "dropout")
    trials = store.trials()
    assert sorted(trials["dropout"]) == [0.1, 0.5] and set(trials["status"]) == {"completed"}, trials
    assert trials["job_id"].notna().all()
    metrics = store.metrics()
    assert set(metrics["trial_id"]) == set(trials["trial_id"])
    for trial_id in trials["trial_id"]:
        assert_clean_metrics(store, trial_id, 1)
        assert list((store.run_dir(trial_id) / "tb").glob("events.out.tfevents.*"))
        assert list((store.dir / "slurm_logs" / trial_id).glob("*/*_0_log.out"))
    snapshots = list((store.dir / "code").glob("*/SNAPSHOT.json"))
    assert len(snapshots) == 1
    err_logs = "".join(p.read_text() for p in (store.dir / "slurm_logs").glob("*/*/*_0_log.err"))
    assert f"code from {snapshots[0].parent}/galaxygen" in err_logs
    names = {f"dropout-{t}" for t in trials["trial_id"]}
    assert not [j for j in squeue() if j[1] in names or j[0] == out.stdout.strip()], squeue()


def sweep_driver(results: Path, blob_cache: Path, *args: str, sbatch: tuple[str, ...] = ()) -> str:
    """Submit `sbatch slurm/sweep.sh search ...` (the driver as a SLURM job); returns its job id."""
    cmd = ["sbatch", "--parsable", *sbatch, "--output", str(results / "driver-%j.out"), "slurm/sweep.sh", "search",
           "--data", str(blob_cache), "--set", "batch_size=16", "--set", "log_every=4", "--results", str(results),
           "--no-figures", "--eval-n", "0", "--slurm-poll-s", "1", "--slurm-squeue-s", "3", *args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip().split(";")[0]


def sweep_jobs(store: ResultsStore, driver: str) -> list[tuple[str, str, str]]:
    return [j for j in squeue() if j[0] == driver or j[1].startswith(f"{store.sweep}-")]


@pytest.mark.slurm
def test_a_requeued_driver_adopts_its_jobs_and_finishes_the_sweep(cluster, blob_cache, tmp_path):
    """A driver job with a 2-minute limit (USR1 20 s before it) and a sweep that outlasts it: the driver
    requeues itself, the next run adopts the trial jobs, and every trial runs exactly once.

    SLURM's time-limit warning is USR1 to the batch shell (--signal=B:USR1@20). On an idle machine the sweep
    can end before the limit, so the test also sends that same warning (scancel --batch --signal=USR1) as soon
    as a trial is training: at least one requeue happens however fast the machine is."""
    results = tmp_path / "results"
    results.mkdir()
    # 3 trial jobs at a time leave a CPU of the 4-CPU test cluster to the requeued driver
    driver = sweep_driver(results, blob_cache, "--samples", "4", "--epochs", "40", "--seed", "3",
                          "--max-concurrent", "3", sbatch=("--time=2", "--signal=B:USR1@20"))
    store = ResultsStore(results, "search")
    try:
        wait_until(lambda: any(1 <= len(store.epochs(t)) < 20 for t in store.trial_ids()), 240,
                   "a trial job in mid-training", interval=0.5)
        subprocess.run(["scancel", "--batch", "--signal=USR1", driver], check=True)
        wait_until(lambda: not [j for j in squeue() if j[0] == driver], 420, "the sweep driver to finish", interval=3)
    finally:
        subprocess.run(["scancel", driver], check=False)
    log_text = "\n".join(p.read_text() for p in results.glob("driver-*.out"))
    assert "sweep.sh: driver requeue" in log_text and "(restart 1)" in log_text, log_text[-5000:]
    records = [json.loads(p.read_text()) for p in (results / "search" / "slurm_logs").glob("*/job.json")]
    assert any(r.get("adopted") for r in records), records  # a later driver took over a running job
    assert log_text.rstrip().endswith("driver exited with status 0 at " + log_text.rstrip().rsplit(" at ", 1)[1]), \
        log_text[-3000:]
    trials = store.trials()
    assert len(trials) == 4, trials
    # the seeded random search gave every driver the trial ids the launcher expected
    assert set(trials["trial_id"]) == set(json.loads((store.dir / "sweep.json").read_text())["trials"])
    for row in trials.itertuples():
        assert row.status == "completed" or (row.status == "stopped" and row.stop_reason == "early"), trials
        jobs = [p for p in (store.dir / "slurm_logs" / row.trial_id).iterdir() if p.is_dir()]
        assert len(jobs) == 1, (row.trial_id, jobs)  # submitted once, by one driver
        assert_clean_metrics(store, row.trial_id, int(row.epochs_done))
    assert (trials["status"] == "completed").any()
    assert not sweep_jobs(store, driver), squeue()


@pytest.mark.slurm
def test_cancel_ends_the_driver_and_every_trial_job(cluster, blob_cache, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    driver = sweep_driver(results, blob_cache, "--samples", "2", "--epochs", "200")
    store = ResultsStore(results, "search")
    try:
        wait_until(lambda: len(list((store.dir / "slurm_logs").glob("*/job.json"))) == 2, 180, "two trial jobs")
        out = run_launcher(["search", "--cancel"], results, timeout=120)
        assert out.returncode == 0 and "cancelled 3 SLURM job(s)" in out.stdout, out.stdout + out.stderr
        wait_until(lambda: not sweep_jobs(store, driver), 90, "the sweep's jobs to leave squeue")
    finally:
        subprocess.run(["scancel", driver], check=False)
    trials = store.trials()
    assert list(trials["status"]) == ["stopped"] * 2 and set(trials["stop_reason"]) == {"cancelled"}, trials
    out = run_launcher(["no-such-sweep", "--cancel"], results, timeout=120)
    assert out.returncode == 2 and "not a sweep's results folder" in out.stderr


def ddp_probe(config: dict, results: str) -> dict:
    """Runs in each task of a 2-task job: train, then a digest of this rank's parameters."""
    from galaxygen import distributed
    from galaxygen.train import Trainer

    env = distributed.read_env()
    device = distributed.setup(env)
    try:
        cfg = TrainConfig.from_dict(config).resolved()
        trainer = Trainer(cfg, ResultsStore(results, "ddp"), cfg.signature(), env, device)
        summary = trainer.fit()
        digest = hashlib.sha1(b"".join(p.detach().cpu().numpy().tobytes() for p in trainer.model.parameters()))
        return {"rank": env.rank, "world": env.world_size, "digest": digest.hexdigest(), "summary": summary,
                "port": os.environ.get("MASTER_PORT"), "backend": str(__import__("torch").distributed.get_backend())}
    finally:
        distributed.teardown()


@pytest.mark.slurm
def test_two_task_job_trains_with_ddp_and_both_ranks_agree(cluster, blob_cache, tmp_path):
    config = tiny_config(blob_cache, epochs=1).to_dict()
    opts = options(tasks_per_node=2, cpus_per_task=1, setup=(f"export PYTHONPATH={REPO}",))
    driver = Driver.here()
    job = slurm_job.submit(functools.partial(ddp_probe, config, str(tmp_path)), tmp_path / "logs", opts, driver, "ddp")
    assert job.tasks == 2
    wait_until(lambda: len(job.results()) == 2 or (job.outcome() or ("",))[0] == "failed" or job_gone(job.job_id), 240,
               "both tasks' results")
    results = job.results()
    assert set(results) == {0, 1}, (results, job.log_tail())
    assert all(kind == "success" for kind, _ in results.values()), results
    ranks = {value["rank"]: value for _, value in results.values()}
    assert set(ranks) == {0, 1} and {r["world"] for r in ranks.values()} == {2}
    assert {r["backend"] for r in ranks.values()} == {"gloo"}
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["port"] == str(15000 + int(job.job_id) % 20000)
    trials = ResultsStore(tmp_path, "ddp").trials()
    assert len(trials) == 1 and trials["status"].iloc[0] == "completed"


@pytest.mark.slurm
def test_usr2_requeues_and_the_trial_resumes_without_duplicates(cluster, blob_cache, tmp_path):
    epochs = 4
    poller = TrialPoller(tiny_config(blob_cache, epochs=epochs), tmp_path, "requeue", options(),
                         Driver.here(slurm_job.snapshot_code(tmp_path / "requeue" / "code")))
    poller.start()
    last_pt = poller.store.run_dir(poller.trial_id) / "checkpoints" / "last.pt"
    reports = []
    while not reports or not reports[-1].get("done"):
        reports.append(poller.next_report())
        if len(reports) == 1:
            wait_until(last_pt.exists, 60, "the epoch-1 checkpoint", interval=0.1)
            subprocess.run(["scancel", "--signal=USR2", poller.job.job_id], check=True)
    assert [r["epoch"] for r in reports] == list(range(1, epochs + 1))
    assert all("val_loss" in r for r in reports)
    row = poller.store.read_trial(poller.trial_id)
    assert row["status"] == "completed" and row["epochs_done"] == epochs
    assert_clean_metrics(poller.store, poller.trial_id, epochs)
    log_text = Path(poller.job.log_path(0, "err")).read_text()
    assert "Requeued job" in log_text and "restarts 1" in log_text, log_text[-3000:]
    assert "resumed " in log_text, log_text[-3000:]


@pytest.mark.slurm
def test_end_of_trial_evaluation_as_its_own_cpu_job_after_training(cluster, blob_cache, tmp_path):
    """eval_job: the training job skips the evaluation; a 1-CPU job that depends on it scores the best
    checkpoint into the trial's eval part, and the trial is done only once that job has finished."""
    config = tiny_config(blob_cache, epochs=1, eval_n=8)
    poller = TrialPoller(config, tmp_path, "evaljob", options(eval_job=True, eval_cpus=1),
                         Driver.here(slurm_job.snapshot_code(tmp_path / "evaljob" / "code")))
    poller.start()
    assert poller.eval_job is not None and poller.eval_job.job_id != poller.job.job_id
    script = (Path(poller.eval_job.folder) / f"{poller.eval_job.job_id}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{poller.job.job_id}" in script and "--kill-on-invalid-dep=yes" in script
    assert "#SBATCH --cpus-per-task=1" in script and "gpus" not in script
    report = poller.next_report()
    assert report["done"] and report["epoch"] == 1
    assert poller.eval_job.outcome() == ("completed", None), poller.eval_job.log_tail()
    row = poller.store.read_trial(poller.trial_id)
    assert row["status"] == "completed" and not row["error"], row
    metrics = poller.store.metrics(poller.trial_id)
    assert {"eval", "eval_real_vs_real", "eval_one_image"} <= set(metrics["split"])
    assert (metrics.query("split == 'eval' and metric == 'eval_n'")["value"] == 8).all()
    train_log = poller.job.log_path(0, "err").read_text()
    eval_log = poller.eval_job.log_path(0, "err").read_text()
    assert "galaxygen.evaluate" in eval_log and "eval metrics" not in train_log
    # the latent prior of the best checkpoint is CPU work too: the evaluation job fits it in, not the training job
    assert "fitting the latent prior" in eval_log and "fitting the latent prior" not in train_log
    assert checkpoint.load(poller.store.checkpoint(poller.trial_id, "best"))["model"]["_extra_state"]["latent_prior"]
    assert json.loads(poller.store.job_record(poller.trial_id).read_text())["eval_job"]["job_id"] == \
        poller.eval_job.job_id


@pytest.mark.slurm
def test_sweeps_evaluate_runs_a_morphology_array_then_the_merge(cluster, blob_cache, tmp_path):
    from galaxygen.train import run
    from sweeps import evaluate

    config = tiny_config(blob_cache, epochs=1)
    run(config, tmp_path / "r", "ev", trial_id="t1")
    store = ResultsStore(tmp_path / "r", "ev")
    shards = tmp_path / "shards"
    assert evaluate.main([str(store.checkpoint("t1", "best")), "--n", "8", "--shards", "2", "--shard-dir", str(shards),
                          "--out", str(store.dir), "--cpus-per-task", "1"]) == 0
    names = ("galaxygen-eval-morph", "galaxygen-eval-merge")
    wait_until(lambda: not [j for j in squeue() if j[1] in names], 240, "the evaluation jobs to finish", interval=2)
    assert len(list(shards.glob("morph-n8-*-of-0002.parquet"))) == 2, list(shards.iterdir())
    rows = store.metrics("t1")
    assert {"eval", "eval_real_vs_real", "eval_one_image"} <= set(rows["split"]), sorted(set(rows["split"]))
    scripts = {int(p.name.split("_")[0]): p.read_text() for p in (shards / "slurm").glob("*_submission.sh")}
    (array_id, array), (_, merge) = sorted(scripts.items())  # the array is submitted first
    assert "#SBATCH --array=0-1" in array and f"#SBATCH --dependency=afterok:{array_id}" in merge
    assert "#SBATCH --cpus-per-task=1" in array and "export PYTHONPATH=" + str(shards / "code") in array


@pytest.mark.slurm
def test_tune_early_stop_cancels_the_job_and_a_failing_job_records_its_traceback(cluster, blob_cache, tmp_path):
    import ray
    from ray import tune

    results = tmp_path / "r"
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=f"/tmp/ray-t{os.getpid()}",
             logging_level=logging.WARNING, log_to_driver=False)
    try:
        trainable = slurm.make_trainable(results, "stop", options())
        base = tiny_config(blob_cache, epochs=30).to_dict()
        space = {**base, "data": tune.grid_search([str(blob_cache), str(tmp_path / "no-such-cache")])}
        grid = tune.Tuner(trainable, param_space=space,
                          tune_config=tune.TuneConfig(metric="val_loss", mode="min"),
                          run_config=tune.RunConfig(storage_path=str(results / "stop" / "ray"), stop={"epoch": 1},
                                                    verbose=0)).fit()
    finally:
        ray.shutdown()
    by_data = {r.config["data"]: r for r in grid}
    good, bad = by_data[str(blob_cache)], by_data[str(tmp_path / "no-such-cache")]
    assert good.error is None and good.metrics["epoch"] == 1
    assert bad.error is not None and "is not a galaxygen cache" in str(bad.error)
    store = ResultsStore(results, "stop")
    trials = store.trials().set_index("data")
    stopped, failed = trials.loc[str(blob_cache)], trials.loc[str(tmp_path / "no-such-cache")]
    assert failed["status"] == "failed"
    assert "Traceback" in failed["error"] and "CacheError" in failed["error"] and "submitit" in failed["error"]
    assert stopped["status"] == "stopped" and stopped["stop_reason"] == "early" and stopped["epochs_done"] < 30
    wait_until(lambda: job_gone(str(stopped["job_id"])), 60, f"job {stopped['job_id']} to leave squeue")
    states = {jid: state for jid, _, state in squeue("-t", "all")}
    assert states.get(str(stopped["job_id"]), "CANCELLED") == "CANCELLED"
    assert not [j for j in squeue() if j[1].startswith("stop-")]


@pytest.mark.slurm
def test_a_job_whose_driver_is_gone_cancels_itself(cluster, blob_cache, tmp_path):
    poller = TrialPoller(tiny_config(blob_cache, epochs=200), tmp_path, "orphan", options(heartbeat_s=3.0),
                         Driver.here(slurm_job.snapshot_code(tmp_path / "orphan" / "code")))
    poller.start()  # ... and never polls again, like a driver killed with SIGKILL
    wait_until(lambda: job_gone(poller.job.job_id), 150, "the orphaned job to cancel itself")
    row = poller.store.read_trial(poller.trial_id)
    assert row["status"] == "stopped" and row["stop_reason"] == "orphaned" and "heartbeat" in row["error"], row
    assert len(poller.store.metrics(poller.trial_id)["epoch"].unique()) < 200
    states = {jid: state for jid, _, state in squeue("-t", "all")}
    assert states.get(poller.job.job_id, "CANCELLED") == "CANCELLED"


@pytest.mark.slurm
def test_driver_exit_cancels_its_unfinished_jobs(cluster, blob_cache, tmp_path):
    driver = Driver.here(slurm_job.snapshot_code(tmp_path / "exit" / "code"))
    poller = TrialPoller(tiny_config(blob_cache, epochs=200), tmp_path, "exit", options(), driver)
    poller.start()
    life = slurm.DriverLife(poller.store, Driver("elsewhere:1", driver.cwd, driver.python, driver.environ,
                                                driver.code), options())
    life.at_exit()  # another driver's exit leaves this driver's job alone
    assert not json.loads((poller.dir / "job.json").read_text()).get("finished")
    life = slurm.DriverLife(poller.store, driver, options())
    life.at_exit()
    wait_until(lambda: job_gone(poller.job.job_id), 60, "the cancelled job to leave squeue")
    row = poller.store.read_trial(poller.trial_id)
    assert (row["status"], row["stop_reason"], row["error"]) == ("stopped", "cancelled", "the sweep driver exited")
    assert json.loads((poller.dir / "job.json").read_text())["finished"] is True


def counting_shims(folder: Path, *commands: str) -> dict[str, str]:
    """Scripts named like the SLURM commands that log each call to folder/<command>.calls and run the real one;
    returns an environment with them first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    for command in commands:
        shim = folder / command
        shim.write_text(f"#!/bin/sh\necho \"$*\" >> {folder / command}.calls\nexec {shutil.which(command)} \"$@\"\n")
        shim.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def poll_squeue(results: str, job_ids: list[str], seconds: float) -> dict[str, str | None]:
    """One trial's poller, in its own process: ask the shared snapshot about its job every 0.1 s."""
    snap = slurm_job.SqueueSnapshot(ResultsStore(results, "sw"), max_age_s=2.0)
    deadline = time.monotonic() + seconds
    states = {}
    while time.monotonic() < deadline:
        states = {job_id: snap.state(job_id) for job_id in job_ids}
        time.sleep(0.1)
    return states


@pytest.mark.slurm
def test_one_squeue_per_interval_for_all_pollers(cluster, tmp_path, monkeypatch):
    import concurrent.futures

    env = counting_shims(tmp_path / "bin", "squeue")
    monkeypatch.setenv("PATH", env["PATH"])
    store = ResultsStore(tmp_path, "sw")
    jobs = [subprocess.run(["sbatch", "--parsable", "--output=/dev/null", "--wrap", "sleep 60"], capture_output=True,
                           text=True, check=True).stdout.strip().split(";")[0] for _ in range(2)]
    try:
        for i, job_id in enumerate([*jobs, "999999"]):
            atomic_write_json({"job_id": job_id, "folder": str(tmp_path), "trial_id": f"trial{i}", "finished": False},
                              store.job_record(f"trial{i}"))
        atomic_write_json({"job_id": "999998", "folder": str(tmp_path), "finished": True}, store.job_record("done"))
        with concurrent.futures.ProcessPoolExecutor(6) as pool:
            futures = [pool.submit(poll_squeue, str(tmp_path), [*jobs, "999999"], 7.0) for _ in range(6)]
            states = [f.result() for f in futures]
    finally:
        subprocess.run(["scancel", *jobs], check=False)
    calls = (tmp_path / "bin" / "squeue.calls").read_text().splitlines()
    # 6 pollers x 70 polls over 7 s with a 2 s interval: one call per interval for all of them
    assert 2 <= len(calls) <= 6, calls
    assert all(call.count(",") == 2 and "999998" not in call for call in calls), calls  # one call, all live jobs
    for seen in states:
        assert seen[jobs[0]] in ("PENDING", "RUNNING") and seen[jobs[1]] in ("PENDING", "RUNNING")
        assert seen["999999"] is None


@pytest.mark.slurm
def test_local_cluster_status(cluster):
    out = subprocess.run(["bash", str(REPO / "slurm" / "local-cluster.sh"), "status"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "slurmctld: running" in out.stdout, out.stdout + out.stderr


# slurm/local-cluster.sh's node network, and the ports of its slurmctld and slurmd (it runs no slurmdbd; munged
# listens on a Unix socket only)
NODE_NETWORK = ipaddress.ip_network("10.77.0.0/24")
SLURM_PORTS = {6817, 6818}


def listening_tcp() -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(address, port) of every listening TCP socket in this process's network namespace, from /proc/net/tcp{,6}."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":  # TCP_LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            # the kernel prints the address as 32-bit words in host (little-endian) order
            raw = b"".join(bytes.fromhex(hex_addr[i:i + 8])[::-1] for i in range(0, len(hex_addr), 8))
            addr = ipaddress.ip_address(raw)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            found.append((addr, int(hex_port, 16)))
    return found


def test_listening_tcp_reads_this_namespaces_sockets():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert (ipaddress.ip_address("127.0.0.1"), port) in listening_tcp()


@pytest.mark.slurm
def test_local_cluster_listens_only_on_loopback_and_the_node_network(cluster):
    # SLURM has no bind address: a daemon in this machine's own network namespace would listen on every interface
    exposed = [f"{addr}:{port}" for addr, port in listening_tcp()
               if port in SLURM_PORTS and not (addr.is_loopback or addr in NODE_NETWORK)]
    assert not exposed, f"SLURM ports reachable from this machine's other interfaces: {exposed}"


def test_job_ref_reads_results_without_sacct(tmp_path):
    from submitit.core.utils import cloudpickle_dump

    job = SlurmJobRef("123", str(tmp_path), tasks=2)
    assert job.outcome() is None
    cloudpickle_dump(("success", {"epoch": 3}), job.result_path(0))
    assert job.outcome() == ("completed", {"epoch": 3})
    cloudpickle_dump(("error", "Traceback ...\nValueError: boom"), job.result_path(1))
    assert job.outcome() == ("failed", "Traceback ...\nValueError: boom")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
