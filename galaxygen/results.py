"""The Parquet results store of a sweep, and the one owner of a sweep's on-disk layout.

Layout under RESULTS/SWEEP/ (every path comes from a `ResultsStore` method; nothing else spells these names):

    sweep.json                         the launcher's record of the sweep            meta_path()
    trials/<trial_id>.parquet          one row: trial_id, sweep, config_hash, the    trials_dir(), trial_path(t)
                                       flattened config, status, error, job_id,
                                       start_time, end_time, epochs_done
    metrics/<trial_id>/<part>.parquet  long format: sweep, trial_id, step, epoch,    metrics_dir(t), part_path(t, part),
                                       split, metric, value, wall_time               epoch_part(e), EVAL_PART
                                       (part epoch-00003 holds epoch 3, part eval    epochs(t), read_epoch(t, e)
                                       the end-of-run evaluation); rewriting a part
                                       replaces it, so a resumed epoch never
                                       duplicates rows
    runs/<trial_id>/                   config.json, checkpoints/{best,last}.pt, tb/  run_dir(t), config_path(t),
                                                                                     checkpoint(t, "best"|"last"), tb_dir(t)
    slurm_logs/<trial_id>/             the SLURM backend's job records and logs      slurm_dir(t), job_record(t)
    launcher.lock                      host and pid of the running launcher          lock_path()
    space.reserve                      disk space the launcher sets aside to record  reserve_path()
                                       the trials' status on a full disk
    code/<hash>/                       code snapshots the SLURM jobs import          code_dir()
    report/                            figures and report.html                       report_dir()

Writers: write_trial, write_metrics (a named part), write_epoch, write_eval, clear_metrics; remove_stale
removes the temporaries of killed writers.
Readers: read_trial, trials, metrics, epochs, read_epoch, load(); bad_parts() lists unreadable files.

Readers read only what the store wrote: names that are not the store's own (notes, editor backups,
`epoch-00003 (copy).parquet`) are skipped with one warning each, and a truncated or garbage Parquet file
is reported once (naming it) and skipped, so one bad file never breaks a reader.

Every file is written to a hidden temporary name and renamed into place, so readers (pandas,
pyarrow.dataset, duckdb) never see a partial file, and a killed writer leaves only a hidden
temporary that readers ignore and the next launcher or trial removes. One writer per trial (rank 0).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from galaxygen import staging

log = logging.getLogger(__name__)

METRIC_SCHEMA = pa.schema(
    [
        ("sweep", pa.string()),
        ("trial_id", pa.string()),
        ("step", pa.int64()),
        ("epoch", pa.int64()),
        ("split", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("wall_time", pa.float64()),
    ]
)
STATUSES = ("pending", "running", "completed", "failed", "stopped")
RESERVE_PER_TRIAL = 64 * 1024  # space.reserve per trial: a trial's row is about 20 kB, with a traceback more

# the names of the layout: renaming a file pattern is a one-line change here
PARQUET = ".parquet"
EPOCH_PREFIX = "epoch-"  # metrics part of epoch e: epoch-00003
EPOCH_DIGITS = 5
EVAL_PART = "eval"  # metrics part of the end-of-run evaluation
CHECKPOINTS = ("best", "last")  # runs/<trial_id>/checkpoints/<kind>.pt
TRIAL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
EPOCH_NAME = re.compile(rf"^{re.escape(EPOCH_PREFIX)}(\d{{{EPOCH_DIGITS},}})$")


class StoreError(ValueError):
    """A results folder or trial id this store cannot use; the message names it and what is allowed."""


# the errors of a folder that takes no more writes, whatever is written: full, over quota, read-only, forbidden
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class WriteError(OSError):
    """A results file that could not be written because of its folder (a full disk, a quota, a read-only or
    forbidden folder); its message is one line naming the file: "no space left on device writing PATH"."""

    def __str__(self) -> str:
        text = self.strerror or "error"
        return f"{text[:1].lower()}{text[1:]} writing {self.filename}"


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn the OSError of a folder that takes no more writes (WRITE_ERRNOS) into a WriteError naming `path`."""
    try:
        yield
    except OSError as err:
        if err.errno in WRITE_ERRNOS and not isinstance(err, WriteError):
            raise WriteError(err.errno, os.strerror(err.errno), str(path)) from err
        raise


def write_error(err: BaseException | None, where: str | os.PathLike = "a results file") -> WriteError | None:
    """The WriteError behind an exception (itself, its cause or context, or Ray's wrapper of it), else None.

    An OSError of WRITE_ERRNOS that did not come through `writing` (TensorBoard's event writer) counts too; when it
    names no file, `where` (the folder its writer was writing into, if the caller knows it) is named instead."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if getattr(err, "cause", None) is not None:  # Ray's RayTaskError (an instance of its cause's class too)
            err = err.cause
        elif isinstance(err, WriteError):
            return err
        elif isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
            return WriteError(err.errno, os.strerror(err.errno), err.filename or str(where))
        else:
            err = err.__cause__ or err.__context__
    return None


def write_error_in(text: str) -> WriteError | None:
    """The WriteError named in a text: a traceback printed elsewhere (a SLURM job's, from submitit's result file
    or the job's log), by its last "...WriteError: <strerror> writing PATH" line, or a trial's recorded error
    that is that one line alone; rebuilt, errno included. None when there is none."""
    lines = str(text).strip().splitlines()
    tagged = [line for line in lines if re.match(r"^\s*(?:[\w.]+\.)?WriteError: ", line)]
    line = tagged[-1] if tagged else lines[0] if len(lines) == 1 else ""
    found = re.match(r"^\s*(?:(?:[\w.]+\.)?WriteError: )?(.+?) writing (.+?)\s*$", line)
    number = next((n for n in WRITE_ERRNOS if found and os.strerror(n).lower() == found[1].lower()), None)
    return None if number is None else WriteError(number, os.strerror(number), found[2])


def full_disk(*folders: str | os.PathLike) -> WriteError | None:
    """A WriteError (ENOSPC) naming the first of `folders` whose file system has less than RESERVE_PER_TRIAL free.

    For a SLURM job that ended without a result: with less room than the launcher sets aside to record one trial's
    final status (its row; a traceback in submitit's result file is as large), the job could not report its error,
    its log cut off mid-traceback. The threshold is above the one block the driver's own small writes take, so a
    driver still running can find a disk its job could not write. A folder not made yet counts as its parent's."""
    for folder in map(Path, folders):
        here = next(p for p in (folder, *folder.parents) if p.exists())
        with suppress(OSError):
            stat = os.statvfs(here)
            if stat.f_bavail * stat.f_frsize < RESERVE_PER_TRIAL:
                return WriteError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
    return None


@dataclass(frozen=True, order=True)
class BadPart:
    """A store file that cannot be read: its path, what is wrong, and which trial and part it is."""

    path: Path
    reason: str
    trial_id: str
    part: str  # "trial" for a trials/ row, else the metrics part name (epoch-00003, eval)

    @property
    def epoch(self) -> int | None:
        m = EPOCH_NAME.match(self.part)
        return int(m.group(1)) if m else None


_reported: set[tuple[str, int, int]] = set()  # (path, mtime, size) of files already warned about


def warn_once(path: Path, message: str) -> None:
    """Log one warning per file version (a rewritten file is judged again)."""
    try:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        key = (str(path), 0, 0)
    if key not in _reported:
        _reported.add(key)
        log.warning("%s: %s", path, message)


def epoch_part(epoch: int) -> str:
    """The metrics part name of an epoch (epoch-00003)."""
    return f"{EPOCH_PREFIX}{int(epoch):0{EPOCH_DIGITS}d}"


def is_part_name(name: str) -> bool:
    """True for the metrics part names the store writes (without the extension)."""
    return name == EVAL_PART or EPOCH_NAME.match(name) is not None


def check_trial_id(trial_id: str) -> str:
    """A trial id is a file name: letters, digits and ._+- only, so it can never leave its folder."""
    if not isinstance(trial_id, str) or not TRIAL_ID.match(trial_id):
        raise StoreError(f"invalid trial id {trial_id!r}: allowed 1-128 letters, digits, '.', '_', '+' or '-', "
                         "starting with a letter or digit")
    return trial_id


def run_checkpoint(run_dir: str | os.PathLike, kind: str = "best") -> Path:
    """The best or last checkpoint file of a run folder (RESULTS/SWEEP/runs/<trial_id>)."""
    if kind not in CHECKPOINTS:
        raise ValueError(f"checkpoint kind must be one of {CHECKPOINTS}, got {kind!r}")
    return Path(run_dir) / "checkpoints" / f"{kind}.pt"


def locate(path: str | os.PathLike) -> tuple[ResultsStore, str] | None:
    """The store and trial id of a path inside a run folder (RESULTS/SWEEP/runs/<trial_id>/...), or None."""
    parts = Path(path).resolve().parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "runs" and TRIAL_ID.match(parts[i + 1]):
            sweep_dir = Path(*parts[:i])
            return ResultsStore(sweep_dir.parent, sweep_dir.name), parts[i + 1]
    return None


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a hidden temporary path beside `path` to write to; then fsync it and rename it over `path`.

    Readers see the old file or the new one, never a partial one; a writer killed mid-write leaves only
    a hidden temporary named by its host and pid (`galaxygen.staging.temporary`), which pyarrow.dataset and
    ResultsStore skip and `ResultsStore.remove_stale` removes once its process is gone. `suffix` keeps
    writers that append their own extension (np.save, np.savez) on the temporary name.
    """
    path = Path(path)
    tmp = staging.temporary(path, suffix=suffix)
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        with suppress(OSError):  # nothing left to remove, or a read-only folder
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_parquet(table: pa.Table | pd.DataFrame, path: Path) -> None:
    """Write a Parquet file atomically (see `atomic_path`)."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # Python closes its file even when a write failed
        pq.write_table(table, f)


def atomic_write_json(obj, path: Path) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


class ResultsStore:
    """The results of one sweep: RESULTS/SWEEP, and every path in it."""

    def __init__(self, root: str | os.PathLike, sweep: str):
        self.root = Path(root)
        self.sweep = sweep
        self.dir = self.root / sweep
        self._bad: dict[Path, BadPart] = {}

    @classmethod
    def from_dir(cls, sweep_dir: str | os.PathLike) -> ResultsStore:
        """The store of a sweep folder RESULTS/SWEEP."""
        sweep_dir = Path(sweep_dir).resolve()
        return cls(sweep_dir.parent, sweep_dir.name)

    def is_sweep(self) -> bool:
        """True when the folder holds a sweep this store wrote (a trials/ folder or sweep.json)."""
        return self.trials_dir().is_dir() or self.meta_path().is_file()

    # -- paths ----------------------------------------------------------------------------------------------
    def meta_path(self) -> Path:
        return self.dir / "sweep.json"

    def trials_dir(self) -> Path:
        return self.dir / "trials"

    def trial_path(self, trial_id: str) -> Path:
        return self.trials_dir() / f"{check_trial_id(trial_id)}{PARQUET}"

    def metrics_root(self) -> Path:
        return self.dir / "metrics"

    def metrics_dir(self, trial_id: str) -> Path:
        return self.metrics_root() / check_trial_id(trial_id)

    def part_path(self, trial_id: str, part: str) -> Path:
        if not is_part_name(part):
            raise ValueError(f"metrics part must be {EVAL_PART!r} or {epoch_part(1)!r}-like, got {part!r}")
        return self.metrics_dir(trial_id) / f"{part}{PARQUET}"

    def epoch_path(self, trial_id: str, epoch: int) -> Path:
        return self.part_path(trial_id, epoch_part(epoch))

    def runs_dir(self) -> Path:
        return self.dir / "runs"

    def run_dir(self, trial_id: str) -> Path:
        return self.runs_dir() / check_trial_id(trial_id)

    def config_path(self, trial_id: str) -> Path:
        return self.run_dir(trial_id) / "config.json"

    def checkpoint(self, trial_id: str, kind: str = "last") -> Path:
        """runs/<trial_id>/checkpoints/{best,last}.pt"""
        return run_checkpoint(self.run_dir(trial_id), kind)

    def tb_dir(self, trial_id: str) -> Path:
        return self.run_dir(trial_id) / "tb"

    def slurm_root(self) -> Path:
        return self.dir / "slurm_logs"

    def slurm_dir(self, trial_id: str) -> Path:
        return self.slurm_root() / check_trial_id(trial_id)

    def job_record(self, trial_id: str) -> Path:
        """slurm_logs/<trial_id>/job.json: the trial's current SLURM job (id, submitit folder, driver)."""
        return self.slurm_dir(trial_id) / "job.json"

    def job_records(self) -> list[Path]:
        """Every trial's slurm_logs/<trial_id>/job.json that exists, sorted."""
        root = self.slurm_root()
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and TRIAL_ID.match(p.name)) if root.is_dir() else []
        return [self.job_record(name) for name in folders if self.job_record(name).is_file()]

    def squeue_path(self) -> Path:
        """slurm_logs/squeue.json: the latest squeue snapshot of the sweep's jobs, shared by all its pollers
        and read by sweeps.status."""
        return self.slurm_root() / "squeue.json"

    def lock_path(self) -> Path:
        """launcher.lock: host and pid of the launcher running the sweep, flock-ed while it runs."""
        return self.dir / "launcher.lock"

    def reserve_path(self) -> Path:
        """space.reserve: room the launcher keeps on the sweep's disk to record final statuses when it is full."""
        return self.dir / "space.reserve"

    def code_dir(self) -> Path:
        return self.dir / "code"

    def report_dir(self) -> Path:
        return self.dir / "report"

    # -- writing --------------------------------------------------------------------------------------------
    def remove_stale(self, trial_id: str | None = None) -> list[Path]:
        """Remove the temporaries that killed writers of this host left (see atomic_path): in the whole sweep
        (the launcher, before it runs a sweep), or in one trial's files (a trial, before it writes).
        Temporaries of running writers and of other hosts are left alone."""
        if trial_id is None:
            return staging.remove_stale(self.dir, recursive=True)
        return (staging.remove_stale(self.trials_dir(), name=self.trial_path(trial_id).name)
                + staging.remove_stale(self.metrics_dir(trial_id))
                + staging.remove_stale(self.run_dir(trial_id), recursive=True))

    def reserve_space(self, trials: int) -> None:
        """Set aside disk space to rewrite `trials` trial rows (RESERVE_PER_TRIAL each), so that on a disk that
        fills up during the sweep the launcher can still record every trial's final status (release_space)."""
        path = self.reserve_path()
        try:
            with writing(path):
                self.dir.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as f:
                    os.posix_fallocate(f.fileno(), 0, RESERVE_PER_TRIAL * max(1, trials))
        except OSError:
            with suppress(OSError):
                path.unlink(missing_ok=True)
            raise

    def release_space(self) -> None:
        """Give the space of reserve_space back to the writes that need it."""
        self.reserve_path().unlink(missing_ok=True)

    def write_trial(self, trial_id: str, **fields) -> dict:
        """Create or update a trial's row (fields are merged into the existing row)."""
        row = self.read_trial(trial_id) or {"trial_id": trial_id, "sweep": self.sweep, "error": None, "job_id": None}
        row.update(fields)
        row["updated_time"] = time.time()
        if row.get("status") not in STATUSES:
            raise ValueError(f"trial status must be one of {STATUSES}, got {row.get('status')!r}")
        atomic_write_parquet(pd.DataFrame([row]), self.trial_path(trial_id))
        return row

    def write_metrics(self, trial_id: str, part: str, rows: list[dict]) -> None:
        """Write (or replace) one part of a trial's metrics: rows of step, epoch, split, metric, value, wall_time."""
        data = {name: [] for name in METRIC_SCHEMA.names}
        for row in rows:
            full = {"sweep": self.sweep, "trial_id": trial_id, **row}
            for name in METRIC_SCHEMA.names:
                data[name].append(full.get(name))
        table = pa.Table.from_pydict(data, schema=METRIC_SCHEMA)
        atomic_write_parquet(table, self.part_path(trial_id, part))

    def write_epoch(self, trial_id: str, epoch: int, rows: list[dict]) -> None:
        """Write (or replace) the metrics of one epoch."""
        self.write_metrics(trial_id, epoch_part(epoch), rows)

    def write_eval(self, trial_id: str, rows: list[dict]) -> None:
        """Write (or replace) the metrics of the end-of-run evaluation."""
        self.write_metrics(trial_id, EVAL_PART, rows)

    def clear_metrics(self, trial_id: str, after_epoch: int) -> None:
        """Remove epoch parts beyond `after_epoch` (used when a trial restarts from an older checkpoint)."""
        for epoch in self.epochs(trial_id):
            if epoch > after_epoch:
                self.epoch_path(trial_id, epoch).unlink(missing_ok=True)

    # -- reading --------------------------------------------------------------------------------------------
    def _entries(self, folder: Path, accept) -> list[Path]:
        """The store's own entries of a folder (`accept(path)` decides), sorted; warns once about strays.

        Hidden names are writers' temporaries (see atomic_path) and are skipped silently."""
        if not folder.is_dir():
            return []
        out = []
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue
            if accept(path):
                out.append(path)
            else:
                warn_once(path, "ignored: not a file the results store writes (a stray file or copy?)")
        return out

    def trial_ids(self) -> list[str]:
        """Trials with a row (trials/<id>.parquet) or metrics (metrics/<id>/), sorted."""
        rows = self._entries(self.trials_dir(), lambda p: p.suffix == PARQUET and bool(TRIAL_ID.match(p.stem))
                             and p.is_file())
        folders = self._entries(self.metrics_root(), lambda p: p.is_dir() and bool(TRIAL_ID.match(p.name)))
        return sorted({p.stem for p in rows} | {p.name for p in folders})

    def _bad_file(self, path: Path, reason: str, trial_id: str, part: str) -> None:
        self._bad[path] = BadPart(path, reason, trial_id, part)
        warn_once(path, f"skipped: {reason}")

    def _read_table(self, path: Path, trial_id: str, part: str) -> pa.Table | None:
        try:
            return pq.read_table(path)
        except FileNotFoundError:
            return None  # removed since it was listed (a rewrite or clear_metrics): not an error
        except (pa.ArrowException, OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self._bad_file(path, f"not a readable Parquet file ({first})", trial_id, part)
            return None

    def read_trial(self, trial_id: str) -> dict | None:
        path = self.trial_path(trial_id)
        if not path.exists():
            return None
        table = self._read_table(path, trial_id, "trial")
        if table is None:
            return None
        if table.num_rows != 1 or "trial_id" not in table.column_names or table["trial_id"][0].as_py() != trial_id:
            self._bad_file(path, f"not the row of trial {trial_id} ({table.num_rows} rows)", trial_id, "trial")
            return None
        return table.to_pandas().iloc[0].to_dict()

    def trials(self) -> pd.DataFrame:
        """One row per trial (trials whose row is unreadable are left out, with a warning)."""
        rows = [row for tid in self.trial_ids() if (row := self.read_trial(tid)) is not None]
        if not rows:
            return pd.DataFrame(columns=["trial_id", "sweep", "status"])
        return pd.DataFrame(rows)

    def part_files(self, trial_id: str | None = None) -> list[tuple[str, str, Path]]:
        """(trial_id, part, path) of every metrics part the store wrote, of one trial or all."""
        ids = [check_trial_id(trial_id)] if trial_id else self.trial_ids()
        out = []
        for tid in ids:
            accept = (lambda p: p.suffix == PARQUET and is_part_name(p.stem) and p.is_file())
            out += [(tid, p.stem, p) for p in self._entries(self.metrics_root() / tid, accept)]
        return out

    def epochs(self, trial_id: str) -> list[int]:
        """The epochs with a metrics part on disk, sorted."""
        return sorted(int(m.group(1)) for _, part, _ in self.part_files(trial_id) if (m := EPOCH_NAME.match(part)))

    def read_epoch(self, trial_id: str, epoch: int) -> pd.DataFrame:
        """The rows of one epoch's part (empty when it is missing or unreadable)."""
        table = self._read_table(self.epoch_path(trial_id, epoch), trial_id, epoch_part(epoch))
        return self._as_metrics(table, self.epoch_path(trial_id, epoch), trial_id, epoch_part(epoch))

    def _as_metrics(self, table: pa.Table | None, path: Path, trial_id: str, part: str) -> pd.DataFrame:
        if table is not None and table.schema.names != METRIC_SCHEMA.names:
            self._bad_file(path, f"columns {table.schema.names} are not the metrics schema", trial_id, part)
            table = None
        if table is None:
            return METRIC_SCHEMA.empty_table().to_pandas()
        return table.cast(METRIC_SCHEMA).to_pandas()

    def metrics(self, trial_id: str | None = None) -> pd.DataFrame:
        """The metrics rows of one trial or all; unreadable parts are left out, with one warning each."""
        files = self.part_files(trial_id)
        if not files:
            return METRIC_SCHEMA.empty_table().to_pandas()
        try:  # one dataset over exactly the store's files (fast); on any error, file by file to find the bad ones
            return ds.dataset([str(p) for _, _, p in files], format="parquet", schema=METRIC_SCHEMA).to_table().to_pandas()
        except (pa.ArrowException, OSError, ValueError):
            pass
        frames = [self._as_metrics(self._read_table(p, tid, part), p, tid, part) for tid, part, p in files]
        frames = [f for f in frames if len(f)]
        if not frames:
            return METRIC_SCHEMA.empty_table().to_pandas()
        return pd.concat(frames, ignore_index=True)

    def bad_parts(self) -> list[BadPart]:
        """Every trial row and metrics part that cannot be read (truncated, garbage, wrong columns), sorted."""
        self._bad = {}
        for tid in self.trial_ids():
            self.read_trial(tid)
        for tid, part, path in self.part_files():
            self._as_metrics(self._read_table(path, tid, part), path, tid, part)
        return sorted(self._bad.values())


def load(results_dir: str | os.PathLike, sweep: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trials and metrics of a sweep as DataFrames; the metrics carry the trial's config columns."""
    store = ResultsStore(results_dir, sweep)
    trials = store.trials()
    metrics = store.metrics()
    if len(trials) and len(metrics):
        config_cols = [c for c in trials.columns if c not in metrics.columns or c == "trial_id"]
        metrics = metrics.merge(trials[config_cols], on="trial_id", how="left")
    return trials, metrics


def epoch_report(metrics: pd.DataFrame, epoch: int) -> dict:
    """The per-epoch summary a trial reports to Ray Tune: {"epoch": e, "<split>_<metric>": value, ...}.

    Built from the epoch-level rows (step-level metrics end in `_step` and are left out), so the local
    backend and the SLURM poller report exactly the same thing.
    """
    rows = metrics[(metrics["epoch"] == epoch) & ~metrics["metric"].str.endswith("_step")]
    report = {f"{r.split}_{r.metric}": float(r.value) for r in rows.itertuples()}
    report["epoch"] = int(epoch)
    return report
