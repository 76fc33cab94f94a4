#!/usr/bin/env bash
# Serve a results folder's TensorBoard events on 127.0.0.1 and print the SSH tunnel command to reach it.
#
# Usage: slurm/tensorboard.sh RESULTS [--port N] [-- extra tensorboard args]
#   RESULTS  a results folder (every sweep in it) or one sweep, RESULTS/SWEEP; TensorBoard finds the
#            events of every trial under it (RESULTS/SWEEP/runs/<trial_id>/tb)
#   --port   port to serve on (default: 6006, or the next free one)
#
# Run it on the login node (or in an interactive job) that sees the shared results folder. It binds
# 127.0.0.1 only, so nobody else on the machine can reach it; from your laptop run the printed
#   ssh -N -L PORT:127.0.0.1:PORT USER@HOST
# and open http://localhost:PORT. Stop it with Ctrl-C.
# One-liner without this script:
#   .venv/bin/tensorboard --logdir RESULTS --host 127.0.0.1 --port 6006
# Python: $GALAXYGEN_PYTHON, else the repository's .venv, else python3 on PATH.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# //' -e 's/^#$//'; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${GALAXYGEN_PYTHON:-} ]]; then
    PYTHON=$GALAXYGEN_PYTHON
elif [[ -x $REPO/.venv/bin/python ]]; then
    PYTHON=$REPO/.venv/bin/python
else
    PYTHON=$(command -v python3 || true)
fi

port=""
results=""
extra=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --port) port=${2:?--port needs a number}; shift 2 ;;
        --port=*) port=${1#--port=}; shift ;;
        --) shift; extra=("$@"); break ;;
        -*) echo "tensorboard.sh: unknown option $1 (allowed: --port N, --help, -- extra args)" >&2; exit 2 ;;
        *) [[ -z $results ]] || { echo "tensorboard.sh: one RESULTS folder only, got '$results' and '$1'" >&2; exit 2; }
           results=$1; shift ;;
    esac
done
[[ -n $results ]] || { usage >&2; exit 2; }
[[ -d $results ]] || { echo "tensorboard.sh: RESULTS folder '$results' does not exist" >&2; exit 2; }
if [[ -z $PYTHON ]] || ! "$PYTHON" -c "import tensorboard" 2>/dev/null; then
    echo "tensorboard.sh: tensorboard is not installed for ${PYTHON:-python3} (pip install tensorboard)" >&2
    exit 2
fi
if [[ -n $port && ! $port =~ ^[0-9]+$ ]]; then
    echo "tensorboard.sh: --port must be a number, got '$port'" >&2
    exit 2
fi

if [[ -z $port ]]; then
    # 6006 or the next free port on 127.0.0.1
    port=$("$PYTHON" - <<'EOF'
import socket
for port in range(6006, 6106):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(port)
        break
EOF
)
fi

host=$(hostname -f 2>/dev/null || hostname)
echo "TensorBoard for $results on http://127.0.0.1:$port (this host only)."
echo "From your machine, open a tunnel and browse http://localhost:$port :"
echo "    ssh -N -L $port:127.0.0.1:$port ${USER:-$(id -un)}@$host"
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    echo "(inside SLURM job $SLURM_JOB_ID on a compute node: go through the login node)"
    echo "    ssh -N -J ${USER:-$(id -un)}@LOGIN_NODE -L $port:127.0.0.1:$port ${USER:-$(id -un)}@$host"
fi
exec "$PYTHON" -m tensorboard.main --logdir "$results" --host 127.0.0.1 --port "$port" "${extra[@]}"
