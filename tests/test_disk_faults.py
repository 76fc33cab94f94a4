"""Disk faults of a results folder: a full disk, a read-only folder, and the temporaries of killed writers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pandas as pd
import pytest
import torch

from galaxygen import checkpoint
from galaxygen.results import ResultsStore, WriteError
from tests.conftest import run_launcher
from tests.test_faults import assert_clean_console
from tests.test_slurm import cluster  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[1]

WRITER = """
import sys, time
from galaxygen.results import ResultsStore, atomic_path
store = ResultsStore(sys.argv[1], "sweep")
with atomic_path(store.epoch_path("t1", 3)) as tmp:
    tmp.write_bytes(b"half an epoch")
    print(tmp, flush=True)
    time.sleep(120)
"""


def start_writer(results: Path) -> tuple[subprocess.Popen, Path]:
    """A process writing a metrics part through atomic_path, stopped mid-write; its temporary."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(results)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_file(), "the writer did not start writing"
    return proc, tmp


def test_temporaries_of_killed_writers_are_removed_when_the_store_opens(tmp_path):
    store = ResultsStore(tmp_path, "sweep")
    store.write_epoch("t1", 1, [{"step": 1, "epoch": 1, "split": "val", "metric": "loss", "value": 1.0}])
    killed, stale = start_writer(tmp_path)
    killed.kill()
    assert killed.wait() == -signal.SIGKILL
    live, running = start_writer(tmp_path)
    elsewhere = store.metrics_dir("t1") / ".epoch-00002.parquet.tmp-another-host-1"  # a writer on another node
    elsewhere.write_bytes(b"?")
    try:
        assert stale.is_file() and stale.name == f".epoch-00003.parquet.tmp-{socket.gethostname()}-{killed.pid}"
        assert store.epochs("t1") == [1] and len(store.metrics()) == 1  # readers skip every temporary

        assert store.remove_stale() == [stale]  # the launcher opening the sweep
        assert not stale.exists() and running.is_file() and elsewhere.is_file()
        assert store.epochs("t1") == [1] and len(store.metrics()) == 1
    finally:
        live.kill()
        live.wait()
    assert store.remove_stale("t1") == [running]  # a trial opening its own files
    assert sorted(p.name for p in store.metrics_dir("t1").iterdir()) == sorted(["epoch-00001.parquet", elsewhere.name])


def test_a_trial_removes_its_own_stale_temporaries_and_trains(tmp_path, blob_cache):
    from galaxygen.config import TrainConfig
    from galaxygen.train import run

    config = TrainConfig.from_dict({"data": str(blob_cache), "model": "mlp1", "epochs": 1, "batch_size": 32,
                                    "eval_n": 0}).resolved()
    trial = config.signature()
    store = ResultsStore(tmp_path, "sweep")
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    stale = [store.run_dir(trial) / "checkpoints" / f".last.pt.tmp-{socket.gethostname()}-{killed.pid}",
             store.trials_dir() / f".{trial}.parquet.tmp-{killed.pid}"]  # a name without host: this host's
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    run(config, tmp_path, "sweep", trial)
    assert not any(p.exists() for p in stale)
    assert store.read_trial(trial)["status"] == "completed" and store.epochs(trial) == [1]


@pytest.fixture
def small_disk(tmp_path):
    """A small tmpfs mounted for the test (root only): a disk that can be filled, grown and made read-only. 32 MB:
    room for the sweeps below when free (the `mlp1` of the local sweep writes 3 MB checkpoints, two per trial,
    and completing its best one at the end of training writes a third copy beside it before the rename)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def mount(disk: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(disk)], check=True)


def fill(disk: Path) -> Path:
    """Fill the disk to the last byte with a filler file; returns it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        st = os.statvfs(disk)
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize)
        with suppress(OSError):
            while True:
                f.write(b"\0" * 512)
    assert os.statvfs(disk).f_bavail == 0
    return filler


def test_a_write_to_a_full_disk_names_the_file_and_keeps_the_old_one(small_disk):
    store = ResultsStore(small_disk, "sweep")
    store.write_trial("t1", status="running", epochs_done=1)
    store.reserve_space(2)
    filler = fill(small_disk)
    for write in (lambda: store.write_trial("t1", status="running", epochs_done=2, note="x" * 10000),
                  lambda: checkpoint.save(store.checkpoint("t1"), weights=torch.zeros(100_000)),
                  lambda: store.write_epoch("t1", 2, [{"epoch": 2, "metric": "loss", "value": float(v)}
                                                      for v in range(5000)])):
        with pytest.raises(WriteError) as caught:
            write()
        assert str(caught.value).startswith(f"no space left on device writing {small_disk}/sweep/")
    os.truncate(filler, filler.stat().st_size - 2**20)  # 1 MB free: torch would write part of a 4 MB checkpoint
    with pytest.raises(WriteError, match="no space left on device writing .*last.pt"):
        checkpoint.save(store.checkpoint("t1"), weights=torch.zeros(2**20))
    assert store.read_trial("t1")["epochs_done"] == 1  # the old row is whole
    assert not [p for p in small_disk.rglob(".*")]  # no temporary left behind
    store.release_space()  # the launcher records final statuses in the reserved space
    store.write_trial("t1", status="failed", error="no space left on device", note="x" * 10000)
    assert store.read_trial("t1")["status"] == "failed"
    with pytest.raises(WriteError, match="space.reserve"):  # a launcher starting on the full disk
        store.reserve_space(100)
    assert not store.reserve_path().exists()
    filler.unlink()
    mount(small_disk, "ro")
    with pytest.raises(WriteError, match=f"read-only file system writing {small_disk}/sweep/trials/t2.parquet"):
        store.write_trial("t2", status="running")


SWEEP = ["dfull", "--backend", "local", "--epochs", "1", "--grid", "dropout=0.1,0.5", "--set", "model=mlp1",
         "--set", "batch_size=32", "--eval-n", "0", "--no-figures", "--max-concurrent", "1"]


def trials_of(sweep_dir: Path):
    return ResultsStore.from_dir(sweep_dir).trials().set_index("trial_id")


def test_a_disk_that_fills_up_during_a_sweep_stops_it_truthfully_and_a_rerun_finishes(small_disk, blob_cache):
    args = [*SWEEP, "--data", str(blob_cache)]
    sweep_dir = small_disk / "dfull"
    cmd = [sys.executable, "-m", "sweeps.launch", *args, "--results", str(small_disk)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # fill the disk once the first trial is finished: the second fails at its next write
        deadline = time.monotonic() + 300
        while not (sweep_dir / "trials").is_dir() or "completed" not in set(trials_of(sweep_dir)["status"]):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no trial finished within 300 s"
            time.sleep(0.2)
        filler = fill(small_disk)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: no space left on device writing {sweep_dir}/"), err
    assert "the sweep stopped with 1 of 2 trials finished" in errors[0] and "rerun: " in errors[0]
    assert_clean_console(out + err)
    assert "Ray Tune could not" not in err  # Tune's own records are not on the results disk
    failed = [line for line in out.splitlines() if "FAILED: " in line]  # the trial that hit the full disk
    assert len(failed) == 1 and failed[0].split("FAILED: ")[1].startswith("no space left on device writing"), out
    first = trials_of(sweep_dir)
    assert sorted(first["status"]) == ["completed", "failed"]  # every status true, none left running
    assert first.loc[first["status"] == "failed", "error"].iloc[0] == failed[0].split("FAILED: ")[1]
    done = first.index[first["status"] == "completed"][0]
    kept = ResultsStore.from_dir(sweep_dir).metrics(done)
    assert not ResultsStore.from_dir(sweep_dir).reserve_path().exists()

    filler.rename(small_disk / "filler-1")
    filler = [small_disk / "filler-1", fill(small_disk)]  # the launcher freed its reserve: full again
    still = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)  # one line, before Ray
    errors = [line for line in still.stderr.splitlines() if line.startswith("error:")]
    assert still.returncode == 2 and len(errors) == 1, still.stderr
    assert str(sweep_dir) in errors[0] and "no space left on device" in errors[0].lower()
    assert_clean_console(still.stdout + still.stderr)
    assert set(trials_of(sweep_dir)["status"]) == {"completed", "failed"}
    for path in filler:  # space is back: the same command finishes the sweep
        path.unlink()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "1 of 2 trials already finished" in proc.stdout
    store = ResultsStore.from_dir(sweep_dir)
    again = trials_of(sweep_dir)
    assert sorted(again.index) == sorted(first.index) and set(again["status"]) == {"completed"}
    assert again.loc[done, "end_time"] == first.loc[done, "end_time"]  # not trained again
    metrics = store.metrics()
    assert not metrics.duplicated(["trial_id", "step", "epoch", "split", "metric"]).any()
    assert {tid: store.epochs(tid) for tid in again.index} == {tid: [1] for tid in again.index}
    pd.testing.assert_frame_equal(store.metrics(done), kept)  # nothing lost that was finished


def test_a_read_only_results_folder_is_refused_in_one_line_before_ray_starts(small_disk, blob_cache):
    from sweeps.launch import ray_temp_dir

    (small_disk / "dfull").mkdir()
    mount(small_disk, "ro")
    proc = run_launcher([*SWEEP, "--data", str(blob_cache)], small_disk, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_clean_console(proc.stdout + proc.stderr)
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: cannot write to the results folder {small_disk}/dfull: Read-only file system"], proc.stderr
    assert not os.path.exists(ray_temp_dir(small_disk))  # Ray never started



def test_a_bare_os_error_of_a_full_disk_names_where_its_writer_wrote():
    """TensorBoard's event writer raises ENOSPC without a file name: the one line names the folder it writes into
    (the caller's `where`), not a vague "a results file"; an error that names its file keeps it; others are not."""
    import errno

    from galaxygen.results import write_error

    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as bare:
            raise RuntimeError("event writer failed") from bare
    except RuntimeError as err:
        assert str(write_error(err, where="/r/s/runs/t1/tb")) == "no space left on device writing /r/s/runs/t1/tb"
    named = OSError(errno.EROFS, os.strerror(errno.EROFS), "/r/s/trials/t1.parquet")
    assert write_error(named, where="/elsewhere").filename == "/r/s/trials/t1.parquet"
    assert write_error(OSError(errno.ENOENT, "missing"), where="/r") is None


def test_a_write_error_is_read_back_from_a_remote_traceback():
    """What reaches the SLURM driver of a job's failure is its traceback as text (submitit's result file, or the
    log's last lines): the WriteError in it is rebuilt, errno included; any other failure is not one."""
    import errno

    from galaxygen.results import write_error_in

    try:
        try:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        except OSError as err:
            raise WriteError(err.errno, err.strerror, "/r/s/runs/t 1/last.pt") from err
    except WriteError:
        import traceback

        text = traceback.format_exc() + "srun: error: node1: task 0: Exited with exit code 1\n"
    found = write_error_in(text)
    assert isinstance(found, WriteError) and found.errno == errno.EROFS
    assert str(found) == "read-only file system writing /r/s/runs/t 1/last.pt"
    assert write_error_in("Traceback (most recent call last):\nValueError: no space left") is None
    # a trial's recorded one-line error reads back too: a SLURM rerun resumes such a trial instead of replaying it
    assert write_error_in(str(found)).filename == "/r/s/runs/t 1/last.pt"
    assert write_error_in("no space left on device writing /r/x").errno == errno.ENOSPC
    assert write_error_in("TrainingDiverged: loss is nan writing nothing") is None
    from sweeps.slurm_job import is_final

    config = object()  # is_final reads it only for completed rows
    assert not is_final({"status": "failed", "error": "no space left on device writing /r/x"}, config)
    assert is_final({"status": "failed", "error": text.replace("WriteError", "ValueError")}, config)


def start_slurm_sweep(disk: Path, data: Path, epochs: int, squeue_s: float) -> tuple[list[str], subprocess.Popen]:
    """A one-trial sweep `dslurm` on the SLURM backend with its results on `disk`, started in the background:
    its command and process, once its job has written its first epoch."""
    cmd = [sys.executable, "-m", "sweeps.launch", "dslurm", "--backend", "slurm", "--data", str(data),
           "--epochs", str(epochs), "--grid", "dropout=0.1", "--set", "batch_size=16", "--set", "log_every=4",
           "--eval-n", "0", "--no-figures", "--results", str(disk), "--slurm-poll-s", "0.5",
           "--slurm-squeue-s", str(squeue_s)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((disk / "dslurm").glob("metrics/*/epoch-00001.parquet")):  # the job trains
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no epoch within 120 s: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    return cmd, proc


@pytest.mark.slurm
@pytest.mark.usefixtures("cluster")
def test_a_slurm_trial_on_a_full_disk_fails_with_one_line_naming_the_file(small_disk, blob_cache):
    """A SLURM trial job whose results disk fills up mid-training (1 MB left: its checkpoint no longer fits):
    the driver, the trial's row and sweeps.status give one line naming the file, as on the local backend, and
    once there is room the same command resumes the trial (not replayed as failed) and completes it."""
    sweep_dir = small_disk / "dslurm"
    cmd, proc = start_slurm_sweep(small_disk, blob_cache, epochs=3, squeue_s=2)
    try:
        filler = fill(small_disk)
        os.truncate(filler, filler.stat().st_size - 2**20)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    assert_clean_console(out + err)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: no space left on device writing {sweep_dir}/"), err
    failed = [line.split("FAILED: ")[1] for line in out.splitlines() if "FAILED: " in line]
    assert len(failed) == 1 and failed[0].startswith(f"no space left on device writing {sweep_dir}/"), out
    row = ResultsStore.from_dir(sweep_dir).trials().iloc[0]
    assert row["status"] == "failed" and "\n" not in row["error"], row["error"]
    assert row["error"].startswith(f"no space left on device writing {sweep_dir}/"), row["error"]
    filler.unlink()
    shown = subprocess.run([sys.executable, "-m", "sweeps.status", str(sweep_dir)], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    line = next(line for line in shown.stdout.splitlines() if line.startswith(row["trial_id"]))
    assert shown.returncode == 0 and " failed " in line and line.endswith(row["error"]), shown.stdout
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    store = ResultsStore.from_dir(sweep_dir)
    assert store.read_trial(row["trial_id"])["status"] == "completed" and store.epochs(row["trial_id"]) == [1, 2, 3]


def job_state(job_id: str) -> str:
    """The job's state in squeue ("" once squeue no longer lists it)."""
    return subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True,
                          text=True, timeout=60).stdout.strip()


@pytest.mark.slurm
@pytest.mark.usefixtures("cluster")
def test_a_slurm_job_that_cannot_even_write_its_error_is_reported_as_the_full_disk(small_disk, blob_cache):
    """The results disk, which holds the job's log folder, fills up to the last byte mid-training: the job can write
    neither its traceback (its log is cut off) nor submitit's result file, so it ends without a result. When the
    driver looks, a few kB are free again (with none, the driver's own next write would fail and name the disk): its
    small writes fit, a trial's error does not. It reports the same one line as when the job's error reaches it
    (exit 1, the trial failed with that line, the sweep stopped), not "ended without a result", and once there is
    room the same command resumes the trial and completes it."""
    sweep_dir = small_disk / "dslurm"
    snapshot = sweep_dir / "slurm_logs" / "squeue.json"
    cmd, proc = start_slurm_sweep(small_disk, blob_cache, epochs=20, squeue_s=5)
    try:
        deadline = time.monotonic() + 60
        trial_id = next(sweep_dir.glob("metrics/*")).name
        job_id = json.loads((sweep_dir / "slurm_logs" / trial_id / "job.json").read_text())["job_id"]
        seen = snapshot.stat().st_mtime_ns
        while snapshot.stat().st_mtime_ns == seen:  # fill the disk just after the driver's squeue call, so that
            assert time.monotonic() < deadline  # its next one (5 s later) finds the disk as the job left it
            time.sleep(0.05)
        filler = fill(small_disk)
        while job_state(job_id) == "RUNNING":  # the job fails at its next write (COMPLETING: its processes ended)
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.truncate(filler, filler.stat().st_size - 48 * 1024)  # the driver's writes (and the trial's row) fit
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    log = next(sweep_dir.glob(f"slurm_logs/{trial_id}/*/{job_id}_0_log.err")).read_text()
    result = list(sweep_dir.glob(f"slurm_logs/{trial_id}/*/{job_id}_0_result.pkl"))
    assert "WriteError: " not in log and not result, "the job got its error out: " + log[-3000:]
    assert_clean_console(out + err)
    full = f"no space left on device writing {sweep_dir}/runs/{trial_id}"  # the trial's run folder
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {full}; the sweep stopped"), err
    failed = [line.split("FAILED: ")[1] for line in out.splitlines() if "FAILED: " in line]
    assert failed == [full], out
    row = ResultsStore.from_dir(sweep_dir).read_trial(trial_id)
    assert row["status"] == "failed" and row["error"] == full
    filler.unlink()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    store = ResultsStore.from_dir(sweep_dir)
    assert store.read_trial(trial_id)["status"] == "completed" and store.epochs(trial_id) == list(range(1, 21))
