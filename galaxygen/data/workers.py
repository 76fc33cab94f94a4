"""Process pools for `synth` and `pack` whose workers end with the process that started them.

A multiprocessing pool's workers outlive a parent killed outright (kill -9, the out-of-memory
killer): each finishes the task it holds, and synth's GZ2 layout writes JPEGs into the dead
parent's temporary folder meanwhile, racing the next run that removes it. On Linux each worker
therefore asks the kernel to SIGKILL it when its parent dies (prctl PR_SET_PDEATHSIG); elsewhere
the pool behaves as a plain one.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.pool
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Pool initializer: have this worker killed when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        os.kill(parent, 0)  # the parent may have died before the request was made
    except ProcessLookupError:
        os._exit(1)


def pool(workers: int) -> multiprocessing.pool.Pool:
    """A pool of `workers` processes that are killed when this process dies."""
    return multiprocessing.get_context().Pool(workers, initializer=die_with_parent, initargs=(os.getpid(),))
