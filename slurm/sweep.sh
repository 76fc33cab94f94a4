#!/usr/bin/env bash
# Run a galaxygen sweep driver as a small CPU job; it submits one SLURM job per trial.
#
# Usage (from the repository root, so the job finds the project's .venv):
#   sbatch slurm/sweep.sh NAME [launcher args]      e.g. sbatch slurm/sweep.sh dropout --epochs 10
#   sbatch --partition=cpu --time=2-00:00:00 slurm/sweep.sh search --samples 32 --gpus-per-node 1
#   bash slurm/sweep.sh --help                      this text, then the launcher's options
#
# The driver (Ray Tune + one light poller per trial) needs about 1 CPU and 2-4 GB; the trials' own
# resources are launcher flags (--gpus-per-node, --cpus-per-task, --mem-gb, --timeout-min, --partition,
# ...) or a cluster profile (~/.config/galaxygen/slurm.yaml). Override the #SBATCH defaults below on
# the sbatch command line.
#
# The driver outlives its time limit: USR1 arrives 5 minutes before it; the driver then detaches from its
# trial jobs (they keep running) and this script requeues itself (scontrol requeue). The restarted driver
# (same job id, same command, log appended) adopts the running trial jobs and goes on; finished, failed and
# early-stopped trials are not run again. A trial job waits --slurm-heartbeat-s (default 600 s) for a
# driver to poll it before it cancels itself: the requeued driver must start again within that time
# (raise it where the queue is slow). Preemption or `scancel` of the driver also detaches it (its jobs
# keep running until a driver adopts them or their heartbeat runs out).
#
# Python: $GALAXYGEN_PYTHON, else REPO/.venv/bin/python, else python3 on PATH. REPO is $GALAXYGEN_REPO,
# else the submit directory when it holds slurm/sweep.sh, else this script's parent folder.
# Stopping a sweep: python -m sweeps.launch NAME --cancel [--results DIR] cancels the driver and every
# trial job, and records the unfinished trials as stopped.
#
#SBATCH --job-name=galaxygen-sweep
#SBATCH --cpus-per-task=1
#SBATCH --mem=4G
#SBATCH --time=3-00:00:00
#SBATCH --output=slurm-sweep-%j.out
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# //' -e 's/^#$//'; }

find_repo() {
    if [[ -n ${GALAXYGEN_REPO:-} ]]; then
        echo "$GALAXYGEN_REPO"
    elif [[ -n ${SLURM_SUBMIT_DIR:-} && -f $SLURM_SUBMIT_DIR/slurm/sweep.sh ]]; then
        echo "$SLURM_SUBMIT_DIR"
    else
        cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
    fi
}

REPO=$(find_repo)
if [[ -n ${GALAXYGEN_PYTHON:-} ]]; then
    PYTHON=$GALAXYGEN_PYTHON
elif [[ -x $REPO/.venv/bin/python ]]; then
    PYTHON=$REPO/.venv/bin/python
else
    PYTHON=$(command -v python3 || true)
fi
[[ -n $PYTHON ]] || { echo "sweep.sh: no python found (create $REPO/.venv or set GALAXYGEN_PYTHON)" >&2; exit 2; }

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    usage
    echo
    cd "$REPO" && exec "$PYTHON" -m sweeps.launch --help
fi
if [[ $# -lt 1 ]]; then
    usage >&2
    exit 2
fi

export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# a driver that is this SLURM job detaches from its trial jobs when it stops, instead of cancelling them
export GALAXYGEN_DRIVER_JOB=${SLURM_JOB_ID:-}
echo "sweep.sh: job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname) at $(date -Is):" \
    "$PYTHON -m sweeps.launch --backend slurm $*"

# The driver runs in the background so that signals reach this shell at once. scancel and preemption send
# SIGTERM to every process of this job (the driver too); the time-limit warning (USR1) reaches this shell
# only. The shell passes them on as SIGTERM; the driver detaches and stops Ray Tune gracefully.
"$PYTHON" -m sweeps.launch --backend slurm "$@" &
driver=$!
requeue=0
# shellcheck disable=SC2317  # called from the traps below
stop() { echo "sweep.sh: $1 at $(date -Is): stopping the sweep driver" >&2; kill -TERM "$driver" 2>/dev/null || true; }
trap 'requeue=1; stop "SIGUSR1 (time limit ahead)"' USR1
trap 'stop SIGTERM' TERM
trap 'stop SIGINT' INT
status=0
while true; do
    wait "$driver" && status=0 || status=$?
    # wait returns >128 when a trapped signal interrupted it; the driver is then still running
    kill -0 "$driver" 2>/dev/null || break
done
echo "sweep.sh: driver exited with status $status at $(date -Is)"
# requeue only a driver that detached (143); one that finished the sweep meanwhile is done
if [[ $requeue == 1 && $status == 143 && -n ${SLURM_JOB_ID:-} ]]; then
    echo "sweep.sh: driver requeue: scontrol requeue $SLURM_JOB_ID (its trial jobs keep running)"
    scontrol requeue "$SLURM_JOB_ID"
    sleep 600 & wait $!  # SLURM ends this run now and starts the job again
fi
exit "$status"
