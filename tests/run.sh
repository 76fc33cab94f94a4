#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh Debian machine (a virtual environment with
# the project and its test extras; Debian's chromium for the report-page test; SLURM + munge through
# slurm/local-cluster.sh), starts the single-node SLURM cluster, then runs pytest with any arguments given.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
    else
        echo "chromium is not installed and this is not root: the report-page browser test will be skipped" >&2
    fi
fi

if [ -x slurm/local-cluster.sh ] && [ "$(id -u)" = 0 ]; then
    slurm/local-cluster.sh start || echo "could not start the local SLURM cluster: SLURM tests will be skipped" >&2
fi

exec .venv/bin/python -m pytest "$@"
