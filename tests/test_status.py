"""`python -m sweeps.status`: one table from the results folder alone, true after the driver died."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time

import pytest

from galaxygen.results import ResultsStore, atomic_write_json
from sweeps import status
from tests.test_slurm import cluster, counting_shims  # noqa: F401  (cluster: a fixture)


def epoch_rows(epoch: int, loss: float, seconds: float = 10.0) -> list[dict]:
    return [{"step": 10 * epoch, "epoch": epoch, "split": "val", "metric": "loss", "value": loss, "wall_time": 0.0},
            {"step": 10 * epoch, "epoch": epoch, "split": "train", "metric": "epoch_time_s", "value": seconds,
             "wall_time": 0.0},
            {"step": 10 * epoch, "epoch": epoch, "split": "val", "metric": "loss_step", "value": 0.0, "wall_time": 0.0}]


def make_sweep(tmp_path, running_job: str | None = None) -> ResultsStore:
    """done: 3/3 epochs; fail: failed at epoch 1; run: running 1/3 epochs (SLURM job `running_job`, else the
    local launcher); wait: named by sweep.json, never started."""
    store = ResultsStore(tmp_path, "sw")
    atomic_write_json({"name": "sw", "varies": ["dropout"], "base": {"epochs": 3},
                       "trials": ["done", "fail", "run", "wait"]}, store.meta_path())
    for epoch, loss in ((1, 5.0), (2, 3.0), (3, 4.0)):
        store.write_epoch("done", epoch, epoch_rows(epoch, loss))
    store.write_trial("done", status="completed", epochs=3, epochs_done=3, dropout=0.1)
    store.write_epoch("fail", 1, epoch_rows(1, 7.0))
    store.write_trial("fail", status="failed", epochs=3, epochs_done=1, dropout=0.2, error="boom")
    store.write_epoch("run", 1, epoch_rows(1, 6.0))
    store.write_trial("run", status="running", epochs=3, epochs_done=1, dropout=0.3, job_id=running_job)
    return store


def by_id(statuses) -> dict:
    return {s.trial_id: s for s in statuses}


def test_states_epochs_losses_and_eta_from_the_folder_alone(tmp_path):
    store = make_sweep(tmp_path)
    with open(store.lock_path(), "w") as lock:  # a live launcher holds the sweep's lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = by_id(status.collect(store)[0])
        text, done = status.render(store)
    assert (rows["done"].state, rows["done"].epoch, rows["done"].latest, rows["done"].best) == ("completed", 3, 4.0, 3.0)
    assert (rows["fail"].state, rows["fail"].epoch) == ("failed", 1)
    assert (rows["run"].state, rows["run"].epoch, rows["run"].epochs) == ("running", 1, 3)
    assert (rows["wait"].state, rows["wait"].epoch) == ("pending", 0)
    assert rows["run"].label == "dropout=0.3" and not done
    # 2 epochs left for the running trial and 3 for the waiting one, 10 s each, one trial at a time
    assert "1/4 done, 1 running, 1 queued, 1 failed; 5 epochs left, ETA ~50 s" in text
    assert "1/3" in text and "3/3" in text


def test_a_running_trial_whose_launcher_died_is_lost(tmp_path):
    store = make_sweep(tmp_path)
    assert by_id(status.collect(store)[0])["run"].state == "running?", "no lock file: cannot tell"
    store.lock_path().write_text('{"host": "h", "pid": 1}')  # what a launcher killed with -9 leaves: unlocked
    rows = by_id(status.collect(store)[0])
    assert rows["run"].state == "lost" and "launcher" in rows["run"].reason
    assert rows["wait"].state == "pending"
    store.write_trial("wait", status="stopped")
    text, done = status.render(store)
    assert done and "launch command again to finish the lost trials" in text  # --watch stops: nothing runs


def test_without_squeue_a_slurm_trial_is_marked_uncertain(tmp_path, monkeypatch):
    store = make_sweep(tmp_path, running_job="123")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert by_id(status.collect(store)[0])["run"].state == "running?"


def watch(store: ResultsStore, env: dict, seconds: float) -> str:
    """`sweeps.status --watch` every 0.5 s for `seconds` (or until it ends by itself); its output."""
    proc = subprocess.Popen([sys.executable, "-m", "sweeps.status", str(store.dir), "--watch", "--interval", "0.5"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out
    return out


def squeue_calls(shims) -> list[str]:
    path = shims / "squeue.calls"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slurm
@pytest.mark.usefixtures("cluster")
def test_slurm_reason_of_a_pending_job_and_a_job_gone_from_squeue(tmp_path):
    held = subprocess.run(["sbatch", "--hold", "--parsable", "--job-name=status-test", "--wrap", "true"],
                          capture_output=True, text=True, timeout=60)
    assert held.returncode == 0, held.stderr
    job = held.stdout.strip().split(";")[0]
    try:
        store = make_sweep(tmp_path, running_job=job)
        store.write_trial("gone", status="running", epochs=3, job_id="999999")  # a job SLURM no longer knows
        rows = by_id(status.collect(store)[0])
        assert rows["run"].state == "pending" and rows["run"].job_id == job and "Held" in rows["run"].reason
        assert rows["gone"].state == "lost" and "squeue" in rows["gone"].reason
        assert rows["fail"].reason == "boom"  # a failed trial shows its error
        # no driver keeps the shared snapshot fresh (this one is a dead driver's): --watch asks squeue itself,
        # ONE call for the sweep's open jobs per the driver's squeue interval, however often it refreshes
        atomic_write_json({"time": time.time() - 60, "max_age_s": 30.0, "asked": [job], "ok": True,
                           "jobs": {job: "RUNNING"}, "reasons": {}}, store.squeue_path())
        env = counting_shims(tmp_path / "bin", "squeue")
        out = watch(store, env, 4.0)
        calls = squeue_calls(tmp_path / "bin")
        assert len(calls) == 1 and f"--jobs={job},999999" in calls[0] and "sacct" not in out, calls
        assert out.count("] ") >= 3, out  # several refreshes
        line = next(row for row in out.splitlines() if row.startswith("run "))
        assert job in line and "Held" in line and "SLURM job states from squeue (no driver" in out
    finally:
        subprocess.run(["scancel", job], timeout=60)


@pytest.mark.slurm
@pytest.mark.usefixtures("cluster")
def test_watch_beside_a_live_driver_calls_no_squeue(tmp_path, blob_cache):
    """A real one-trial SLURM sweep whose job waits 10 s to start (--begin): status --watch, refreshing every
    0.5 s beside it, shows the job pending with SLURM's reason, then running, then completed, all from the
    driver's shared snapshot, without a squeue call of its own."""
    results = tmp_path / "results"
    driver = subprocess.Popen(
        [sys.executable, "-m", "sweeps.launch", "dropout", "--backend", "slurm", "--data", str(blob_cache),
         "--epochs", "2", "--grid", "dropout=0.1", "--set", "model=mlp1", "--set", "batch_size=32", "--eval-n", "0",
         "--no-figures", "--results", str(results), "--slurm-poll-s", "0.5", "--slurm-squeue-s", "4",
         "--sbatch=--begin=now+10"], env=counting_shims(tmp_path / "driver-bin", "squeue"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    store = ResultsStore(results, "dropout")
    try:
        deadline = time.monotonic() + 120
        while not store.squeue_path().exists():  # the trial's job is submitted and its poller asked squeue
            assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()[0][-3000:]
            time.sleep(0.2)
        out = watch(store, counting_shims(tmp_path / "status-bin", "squeue"), 120.0)  # ends when the trial does
        driver_out, _ = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == 0, driver_out[-3000:]
    assert squeue_calls(tmp_path / "status-bin") == [], out  # none of its own beside a live driver
    assert squeue_calls(tmp_path / "driver-bin"), "the driver's squeue calls were not counted"
    frames = ["\n" + frame for frame in out.split("\n[")]
    trial = store.trial_ids()[0]
    states = [next(line.split()[2] for line in frame.splitlines() if line.startswith(trial)) for frame in frames]
    pending = next(frame for frame in frames if f"{trial} " in frame and " pending " in frame)
    assert "BeginTime" in pending and "from the driver's squeue snapshot" in pending, pending
    assert "running" in states and states[-1] == "completed", states
    assert out.rstrip().endswith("nothing left to run"), out[-2000:]


def test_not_a_sweep_exits_2_with_one_line(tmp_path):
    (tmp_path / "notes").mkdir()
    for path in (tmp_path / "missing", tmp_path / "notes"):
        proc = subprocess.run([sys.executable, "-m", "sweeps.status", str(path)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and "is not a sweep folder" in proc.stderr


def test_watch_ends_when_all_trials_are_done_and_exits_130_on_ctrl_c(tmp_path):
    store = make_sweep(tmp_path)
    cmd = [sys.executable, "-m", "sweeps.status", str(store.dir), "--watch", "--interval", "0.5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not proc.stdout.readline().startswith("["):
        pass
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(60) == 130
    for trial_id in ("run", "wait"):
        store.write_trial(trial_id, status="stopped", epochs=3)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "nothing left to run" in done.stdout
