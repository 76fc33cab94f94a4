#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh Debian machine (python3-venv and chromium from
# Debian when run as root; a virtual environment with the project and its test extras; SLURM + munge through
# slurm/local-cluster.sh), starts a two-node SLURM cluster on this machine, then runs pytest with any arguments given.
# GALAXYGEN_SETUP_ONLY=1 stops after the set-up (CI uses it).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
python3 -c "import ensurepip, venv" 2>/dev/null || missing+=(python3-venv)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    else
        echo "not root, so not installing ${missing[*]} (without chromium the report-page browser test is skipped)" >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

if [ -x slurm/local-cluster.sh ] && [ "$(id -u)" = 0 ]; then
    slurm/local-cluster.sh start --nodes 2 || echo "could not start the local SLURM cluster: SLURM tests will be skipped" >&2
fi

[ -n "${GALAXYGEN_SETUP_ONLY:-}" ] && exit 0
exec .venv/bin/python -m pytest "$@"
