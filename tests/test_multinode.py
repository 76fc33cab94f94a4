"""Multi-node DDP on the local SLURM cluster: one rank per node, gloo over the nodes' network.

Needs `slurm/local-cluster.sh start --nodes 2` (tests/run.sh and .ci/run do it as root); skipped with the
reason when the cluster has fewer than 2 nodes, except under CI=true where it fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from galaxygen.config import TrainConfig
from galaxygen.results import ResultsStore, epoch_report
from galaxygen.train import run
from tests.conftest import run_launcher
from tests.test_slurm import slurm_problem


def usable_nodes() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20)
    return sorted({n for n, state in (line.split() for line in out.stdout.splitlines())
                   if state.rstrip("*~#") in ("idle", "mixed", "allocated", "completing")})


@pytest.fixture(scope="module")
def two_nodes():
    problem = slurm_problem()
    if not problem and len(usable_nodes()) < 2:
        problem = (f"the SLURM cluster has fewer than 2 usable nodes ({usable_nodes()}); "
                   "run: sudo slurm/local-cluster.sh start --nodes 2")
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the multi-node test, but {problem}")
        pytest.skip(problem)


@pytest.mark.slurm
def test_two_node_trial_trains_one_rank_per_node_and_matches_one_process(two_nodes, blob_cache, tmp_path):
    results = tmp_path / "results"
    proc = run_launcher(["multinode", "--backend", "slurm", "--nodes", "2", "--tasks-per-node", "1",
                         "--cpus-per-task", "1", "--data", str(blob_cache), "--epochs", "1", "--grid", "dropout=0.0",
                         "--set", "augment=false", "--set", "batch_size=32", "--set", "log_every=4",
                         "--eval-n", "0", "--no-figures", "--slurm-poll-s", "1", "--slurm-squeue-s", "2"],
                        results, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    store = ResultsStore(results, "multinode")
    trials = store.trials()
    assert len(trials) == 1 and trials["status"].iloc[0] == "completed", trials
    trial_id = trials["trial_id"].iloc[0]

    # one rank on each node, joined by gloo at the first node's name (the nodes only share a bridge)
    logs = {int(m.group(1)): p.read_text()
            for p in (store.dir / "slurm_logs" / trial_id).glob("*/*_log.err")
            if (m := re.search(r"_(\d+)_log\.err$", p.name))}
    assert set(logs) == {0, 1}, sorted(logs)
    port = str(15000 + int(trials["job_id"].iloc[0]) % 20000)
    for rank, node in ((0, "node1"), (1, "node2")):
        assert f"gloo: rank {rank} of 2 on {node}, rendezvous node1:{port}" in logs[rank], logs[rank][-3000:]

    config = TrainConfig.from_dict(json.loads((store.run_dir(trial_id) / "config.json").read_text()))
    assert (config.dropout, config.batch_size, config.augment, config.epochs) == (0.0, 32, False, 1)
    two = epoch_report(store.metrics(trial_id), 1)
    one = run(config, tmp_path / "one", "multinode", trial_id)
    diff = {k: abs(two[k] - one[k]) / abs(one[k]) for k in ("val_nelbo", "train_loss")}
    print(f"two nodes vs one process: relative difference {diff}")  # for the record (pytest -s)
    # the tolerance of the 2-process test in tests/test_train.py
    assert two["val_nelbo"] == pytest.approx(one["val_nelbo"], rel=0.03)
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=0.03)
