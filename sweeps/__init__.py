"""Named sweeps and their launcher.

Importing the package sets Ray's environment before Ray itself is imported (Ray reads it at import time):
every Ray process of a sweep listens on 127.0.0.1 only, token authentication is on without Ray's banner
about it, and Tune leaves the console to the launcher (no configuration box, no TensorBoard hint into
/tmp, no SIGINT handler of its own). A variable the user set keeps its value.
"""

import os

RAY_ENVIRONMENT = {
    # Ray takes the node's address from its routes unless "clusters" are off; off, every process (GCS,
    # raylet, workers, agents, metrics export) binds 127.0.0.1 instead of all interfaces or the node IP
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "token",  # Ray's default for a new local cluster, set explicitly: no warning
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune's legacy reporter, silent at verbose=0
    "TUNE_DISABLE_SIGINT_HANDLER": "1",  # the launcher handles Ctrl-C and SIGTERM itself
    "RAY_USAGE_STATS_ENABLED": "0",
}
for _key, _value in RAY_ENVIRONMENT.items():
    os.environ.setdefault(_key, _value)
