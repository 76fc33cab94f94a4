"""Hidden temporaries of writers, named by their owner, and their removal once the owner is gone.

Every writer of the project (a results file, a cache folder) writes into a hidden temporary beside its
target and renames it into place. The temporary's name says who wrote it, `.<name>.<kind>-<host>-<pid>`,
because a writer killed outright (kill -9, the out-of-memory killer) cannot clean up after itself: the
next writer of the same place removes the temporaries of dead processes of its own host, and leaves
those of live processes and of other hosts (a shared file system, where a pid cannot be checked) alone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
from pathlib import Path

log = logging.getLogger(__name__)

KINDS = ("tmp", "old")  # a file or folder being written; the previous folder being replaced
# .<name>.<kind>-<host>-<pid>[<suffix>]; names without a host (older versions) count as this host's
TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?:(?P<host>.+)-)?(?P<pid>\d+)(?P<suffix>\.[A-Za-z0-9]+)?")


def temporary(path: str | os.PathLike, kind: str = "tmp", suffix: str = "") -> Path:
    """This process's hidden temporary beside `path`: .<name>.<kind>-<host>-<pid><suffix>.

    `suffix` keeps writers that append their own extension (np.save adds .npy) on the temporary's name."""
    if kind not in KINDS:
        raise ValueError(f"temporary kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    return path.parent / f".{path.name}.{kind}-{socket.gethostname()}-{os.getpid()}{suffix}"


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a zombie counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def remove_stale(folder: str | os.PathLike, name: str | None = None, recursive: bool = False) -> list[Path]:
    """Remove the temporaries in `folder` of dead processes of this host; returns what was removed.

    `name` limits it to the temporaries of one target (`.<name>.tmp-...`); `recursive` also looks into
    sub-folders (not into temporary folders themselves).
    Temporaries of live processes (another writer, still at work) and of other hosts are left alone,
    with a warning.
    """
    folder = Path(folder)
    host, removed = socket.gethostname(), []
    try:
        entries = sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for path in entries:
        match = TEMPORARY.fullmatch(path.name)
        if not match:
            if recursive and path.is_dir() and not path.is_symlink():
                removed += remove_stale(path, name, recursive)
            continue
        if name is not None and match["name"] != name:
            continue
        owner, pid = match["host"] or host, int(match["pid"])
        if owner != host:
            log.warning("%s belongs to a writer on host %s (pid %d): left alone; remove it if that writer no "
                        "longer runs", path, owner, pid)
        elif pid == os.getpid():
            continue
        elif process_alive(pid):
            log.warning("%s belongs to process %d, still running: another writer is at work (the last to finish "
                        "wins)", path, pid)
        else:
            log.info("removing %s, left by process %d that is no longer running", path, pid)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
