"""Fault injection on real local sweeps (tiny data, 1-2 epochs): exposure, bad input, signals, trials that die,
concurrent launchers. Each case asserts its outcome and that nothing finished is lost; see FAULT_CASES."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from galaxygen.results import ResultsStore
from sweeps.launch import ray_temp_dir
from tests.conftest import run_launcher

TRIAL_ARGS = ["--backend", "local", "--set", "batch_size=16", "--eval-n", "0", "--no-figures"]


def launcher(args: list[str], results: Path, **popen) -> subprocess.Popen:
    """Start `python -m sweeps.launch` in its own session (as from a terminal), output captured."""
    cmd = [sys.executable, "-m", "sweeps.launch", *args, "--results", str(results)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **popen)


def process_tree(pid: int) -> list:
    import psutil  # Ray bundles it and puts it on the path (sweeps imports Ray)

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def listening(pid: int) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of pid's process tree."""
    import psutil

    found = set()
    for proc in process_tree(pid):
        try:
            found |= {(proc.name(), c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the launcher ended early: {proc.communicate()}"
        assert time.time() < deadline, "timed out waiting for the sweep"
        time.sleep(0.1)


def statuses(results: Path, sweep: str) -> dict[str, str]:
    trials = ResultsStore(results, sweep).trials()
    return dict(zip(trials.trial_id, trials.status))


def assert_clean_console(text: str) -> None:
    """Nothing of Ray's internals reaches the user: no tracebacks, C++ dumps, Tune boxes or restore hints."""
    for noise in ("Traceback", "Tuner.restore", "*** SIG", "EOFError", "Configuration for experiment",
                  "To visualize your results with TensorBoard", "Token authentication"):
        assert noise not in text, f"{noise!r} on the console:\n{text[-3000:]}"


# -- exposure and concurrent launchers ---------------------------------------------------------------------


def test_ray_listens_on_loopback_only_and_a_second_launcher_refuses(tmp_path, blob_cache):
    args = ["busy", "--data", str(blob_cache), "--epochs", "2", "--max-concurrent", "1",
            "--grid", "dropout=0.1,0.3,0.5", *TRIAL_ARGS]
    first = launcher(args, tmp_path)
    store = ResultsStore(tmp_path, "busy")
    sockets: set[tuple[str, str, int]] = set()
    try:
        wait_for(lambda: bool(store.trials().size), first)  # Ray is up and a trial runs
        second = launcher(args, tmp_path)
        for _ in range(20):
            sockets |= listening(first.pid)
            time.sleep(0.1)
        second_err = second.communicate(timeout=120)[1]
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    names = {name for name, _, _ in sockets}
    assert len(sockets) >= 3 and {"gcs_server", "raylet"} <= names, f"the test must see Ray's sockets: {sockets}"
    exposed = sorted((name, ip, port) for name, ip, port in sockets if not is_loopback(ip))
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"

    assert second.returncode == 2
    errors = [line for line in second_err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"pid {first.pid}" in errors[0] and socket.gethostname() in errors[0]
    assert first.returncode == 0, err[-3000:]
    assert set(statuses(tmp_path, "busy").values()) == {"completed"}
    assert not store.lock_path().exists()
    assert_clean_console(out + err)

    # a rerun with nothing to do says so, keeps the sweep's backend, and starts no Ray
    again = run_launcher([a for a in args if a not in ("--backend", "local")], tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 of 3 trials already finished" in again.stdout and "epoch 1" not in again.stdout
    assert "backend local: the one this sweep started with" in again.stderr
    assert "sweep busy:" not in again.stderr  # Ray's sweep start line


def test_the_tensorboard_script_listens_on_loopback_only(tmp_path):
    script = Path(__file__).resolve().parents[1] / "slurm" / "tensorboard.sh"
    env = {**os.environ, "GALAXYGEN_PYTHON": sys.executable}
    proc = subprocess.Popen(["bash", str(script), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    try:
        found: set = set()
        deadline = time.time() + 120
        while not found and time.time() < deadline and proc.poll() is None:
            found = listening(proc.pid)
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    assert found, f"TensorBoard never listened: {out[-2000:]}"
    assert all(is_loopback(ip) for _, ip, _ in found), found
    assert "ssh -N -L" in out


# -- bad input -----------------------------------------------------------------------------------------------

BAD_INPUT = [
    (["--samples", "-1"], "--samples"),
    (["--samples", "0"], "--samples"),
    (["--samples", "2"], "would repeat the same configs"),
    (["--max-concurrent", "0"], "--max-concurrent"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial"),
    (["--cpus-per-trial", str((os.cpu_count() or 1) + 1)], "CPU(s)"),
    (["--gpus-per-trial", "-1"], "--gpus-per-trial"),
    (["--gpus-per-trial", "nan"], "--gpus-per-trial"),
    (["--gpus-per-trial", "GPUS+1"], "GPU(s)"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "two"], "--epochs"),
    (["--eval-n", "-1"], "--eval-n"),
    (["--seed", "-1"], "--seed"),
    (["--grid", "dropout="], "lists no values"),
    (["--grid", "dropout=0.1,,0.3"], "empty value"),
    (["--grid", "lr=1e-3,0.001"], "lr=0.001 twice"),
    (["--grid", "dropout=0.1", "--grid", "dropout=0.3"], "given twice"),
]


@pytest.mark.parametrize("extra,needle", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_launcher_input_is_one_error_line_exit_2_and_nothing_written(tmp_path, blob_cache, capsys, extra, needle):
    import torch

    from sweeps.launch import main

    extra = [str(torch.cuda.device_count() + 1) if a == "GPUS+1" else a for a in extra]
    results = tmp_path / "r"
    try:
        status = main(["dropout", "--data", str(blob_cache), *TRIAL_ARGS, *extra, "--results", str(results)])
    except SystemExit as exit_info:  # argparse's own checks
        status = exit_info.code
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    assert not results.exists() and not os.path.exists(ray_temp_dir(results))


# -- signals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum,target,status", [(signal.SIGINT, "group", 130), (signal.SIGTERM, "pid", 143)],
                         ids=["ctrl-c", "sigterm"])
def test_an_interrupted_sweep_exits_128_plus_signal_with_the_resume_command(tmp_path, blob_cache, signum, target,
                                                                            status):
    args = ["sig", "--data", str(blob_cache), "--epochs", "2", "--max-concurrent", "1",
            "--grid", "dropout=0.1,0.3", *TRIAL_ARGS]
    proc = launcher(args, tmp_path)
    try:
        wait_for(lambda: "running" in statuses(tmp_path, "sig").values(), proc)
        if target == "group":  # what Ctrl-C in a terminal does: the whole foreground process group
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid, signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == status, err[-3000:]
    resume = [line for line in err.splitlines() if "resume with:" in line]
    assert len(resume) == 1 and resume[0].startswith(signum.name)
    command = resume[0].split("resume with: ", 1)[1]
    assert " -m sweeps.launch sig " in command and "--results" in command
    assert_clean_console(out + err)
    assert "running" not in statuses(tmp_path, "sig").values()
    if signum == signal.SIGTERM:
        return  # the resume command is the same either way: run it once

    rerun = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert set(statuses(tmp_path, "sig").values()) == {"completed"} and len(statuses(tmp_path, "sig")) == 2


# -- trials that fail before their first epoch -------------------------------------------------------------


@pytest.mark.parametrize("fault", ["process killed", "corrupt checkpoint"])
def test_a_trial_failing_before_its_first_epoch_gives_its_cause_and_a_rerun_finishes(tmp_path, blob_cache, fault):
    args = ["early", "--data", str(blob_cache), "--epochs", "1", "--max-concurrent", "1",
            "--grid", "dropout=0.1,0.3", *TRIAL_ARGS]
    dry = run_launcher([*args, "--dry-run"], tmp_path, timeout=120)
    victim = dry.stdout.split()[0]
    checkpoint = ResultsStore(tmp_path, "early").run_dir(victim) / "checkpoints" / "last.pt"
    if fault == "corrupt checkpoint":
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(b"not a checkpoint" * 64)
    proc = launcher(args, tmp_path)
    try:
        if fault == "process killed":  # the first trial's process, as the out-of-memory killer would
            def kill_trial() -> bool:
                for p in process_tree(proc.pid):
                    try:
                        if "ImplicitFunc" in p.name() + " ".join(p.cmdline()):
                            p.kill()
                            return True
                    except Exception:
                        continue
                return False

            wait_for(kill_trial, proc)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert_clean_console(out + err)
    trials = ResultsStore(tmp_path, "early").trials().set_index("trial_id")
    assert trials.loc[victim, "status"] == "failed" and set(trials.status) == {"failed", "completed"}
    failed = [line for line in out.splitlines() if "FAILED:" in line]
    assert len(failed) == 1
    cause = failed[0].split("FAILED: ", 1)[1]
    recorded = trials.loc[victim, "error"].splitlines()[0]
    assert cause == recorded
    if fault == "corrupt checkpoint":
        assert "process died" not in cause and ":" in cause  # the trial's own exception, by type
        return
    assert "process died" in cause
    rerun = run_launcher(args, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 of 2 trials already finished; running the other 1" in rerun.stdout
    assert set(statuses(tmp_path, "early").values()) == {"completed"}


def test_two_failed_trials_exit_1_and_a_stale_lock_of_a_dead_launcher_is_taken_over(tmp_path, blob_cache):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = ResultsStore(tmp_path, "diverge").lock_path()
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "started": time.time() - 60}))
    proc = run_launcher(["diverge", "--data", str(blob_cache), "--epochs", "1", "--grid", "lr=1e9,2e9", *TRIAL_ARGS],
                        tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "2 trial(s) failed" in proc.stderr
    assert set(statuses(tmp_path, "diverge").values()) == {"failed"}
    assert_clean_console(proc.stdout + proc.stderr)
    assert not lock.exists()

