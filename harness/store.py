"""The DuckDB results store: one file holds every run, checkpoint, video, score and benchmark.

Location: the ``path`` argument, else the ``M4V_STORE`` environment variable, else
``reports/results.duckdb`` (relative to the working directory).

Several processes may write at once. DuckDB lets only one process open a database file for
writing, so every access is a short open-work-close under an ``fcntl`` lock on a sidecar file
``<store>.lock``: writers hold it exclusively, readers shared (DuckDB cannot mix a read-write and a
read-only process on one file either). A process outside this protocol that holds the file (a
DuckDB shell, a notebook) makes ``connect`` fail with a lock error; such failures are retried with
back-off until ``timeout`` seconds have passed.

Every row carries its provenance: ``created_at`` (UTC), ``git_commit`` (``+dirty`` when the work
tree had changes), ``versions`` (JSON of Python and key package versions) and ``host``.

Tables (primary keys in brackets; a write with an existing key replaces that row, which makes
re-running a stage idempotent):

* ``runs`` [run]: kind, config (JSON), seed, status.
* ``checkpoints`` [checkpoint]: run, step, path, metrics (JSON).
* ``train_metrics`` [run, step, name]: value, wall_time.
* ``videos`` [checkpoint, suite, video]: path, prompt, sample_index, seed, num_frames, height,
  width, fps, params (JSON).
* ``scores`` [checkpoint, suite, dimension, video]: value, weight, evaluator, error, detail (JSON),
  seed. ``video = ''`` (``AGGREGATE``) holds the aggregate of a dimension over the suite; summary
  scores (VBench total/quality/semantic) are dimensions of their own with ``video = ''``. A row
  with ``error`` set and ``value`` NULL records a video that could not be scored.
* ``profiles`` [profile, model, setting, metric, device]: value, unit, params (JSON);
  ``setting`` is a canonical JSON string (e.g. resolution and frames).
* ``ablations`` [grid, variant, seed, metric]: factors (JSON), checkpoint, value.
* ``studies`` [study, item, rater, criterion]: choice, payload (JSON).

Readers return pandas DataFrames (``query``, ``table``, ``scores``) or lists of dicts
(``records``).
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import functools
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

DEFAULT_PATH = Path("reports") / "results.duckdb"
ENV_VAR = "M4V_STORE"
AGGREGATE = ""  # the ``video`` key of a dimension's aggregate score
SCHEMA_VERSION = 1
_ROWS_PER_STATEMENT = 500

_PROVENANCE = {
    "created_at": "TIMESTAMP",
    "git_commit": "VARCHAR",
    "versions": "JSON",
    "host": "VARCHAR",
}

# table -> (columns in order, primary key). JSON columns take dicts/lists; they are serialised here.
SCHEMA: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "runs": (
        {"run": "VARCHAR", "kind": "VARCHAR", "config": "JSON", "seed": "BIGINT",
         "status": "VARCHAR"},
        ("run",),
    ),
    "checkpoints": (
        {"checkpoint": "VARCHAR", "run": "VARCHAR", "step": "BIGINT", "path": "VARCHAR",
         "metrics": "JSON"},
        ("checkpoint",),
    ),
    "train_metrics": (
        {"run": "VARCHAR", "step": "BIGINT", "name": "VARCHAR", "value": "DOUBLE",
         "wall_time": "DOUBLE"},
        ("run", "step", "name"),
    ),
    "videos": (
        {"checkpoint": "VARCHAR", "suite": "VARCHAR", "video": "VARCHAR", "path": "VARCHAR",
         "prompt": "VARCHAR", "sample_index": "INTEGER", "seed": "BIGINT",
         "num_frames": "INTEGER", "height": "INTEGER", "width": "INTEGER", "fps": "DOUBLE",
         "params": "JSON"},
        ("checkpoint", "suite", "video"),
    ),
    "scores": (
        {"checkpoint": "VARCHAR", "suite": "VARCHAR", "dimension": "VARCHAR", "video": "VARCHAR",
         "value": "DOUBLE", "weight": "DOUBLE", "evaluator": "VARCHAR", "error": "VARCHAR",
         "detail": "JSON", "seed": "BIGINT"},
        ("checkpoint", "suite", "dimension", "video"),
    ),
    "profiles": (
        {"profile": "VARCHAR", "model": "VARCHAR", "setting": "VARCHAR", "metric": "VARCHAR",
         "device": "VARCHAR", "value": "DOUBLE", "unit": "VARCHAR", "params": "JSON"},
        ("profile", "model", "setting", "metric", "device"),
    ),
    "ablations": (
        {"grid": "VARCHAR", "variant": "VARCHAR", "seed": "BIGINT", "metric": "VARCHAR",
         "factors": "JSON", "checkpoint": "VARCHAR", "value": "DOUBLE"},
        ("grid", "variant", "seed", "metric"),
    ),
    "studies": (
        {"study": "VARCHAR", "item": "VARCHAR", "rater": "VARCHAR", "criterion": "VARCHAR",
         "choice": "VARCHAR", "payload": "JSON"},
        ("study", "item", "rater", "criterion"),
    ),
}

_VERSIONED_PACKAGES = (
    "m4v", "torch", "numpy", "duckdb", "av", "vbench", "timm", "transformers", "open_clip_torch",
    "pyiqa",
)


def default_path() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_PATH)


@functools.cache
def provenance() -> dict[str, Any]:
    """Git commit, package versions and host of this process (computed once per process)."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"git_commit": _git_commit(), "versions": versions, "host": socket.gethostname()}


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def _canonical_json(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        json.loads(value)  # already JSON: validate, keep as given
        return value
    return json.dumps(value, sort_keys=True, default=str)


class StoreLockTimeout(TimeoutError):
    """The store stayed locked by other processes for longer than the timeout."""


class Store:
    """Process-safe access to the results database (see the module docstring)."""

    def __init__(self, path: str | os.PathLike | None = None, timeout: float = 600.0):
        if timeout <= 0:
            raise ValueError(f"timeout: got {timeout}, expected > 0 seconds")
        self.path = Path(path) if path is not None else default_path()
        if self.path.suffix in (".lock", ".wal"):
            raise ValueError(f"path: got {self.path}, expected the database file, not a sidecar")
        self.timeout = timeout
        self._schema_ready = False

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # -- connections -------------------------------------------------------------------------

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        deadline = time.monotonic() + self.timeout
        with open(lock_path, "a+") as handle:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            delay = 0.005
            while True:
                try:
                    fcntl.flock(handle, mode | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() > deadline:
                        raise StoreLockTimeout(
                            f"store {self.path}: lock {lock_path} held by another process for "
                            f"more than {self.timeout} s"
                        ) from e
                    time.sleep(delay)
                    delay = min(delay * 2, 0.25)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        """Open the database, retrying while a process outside the lock protocol holds it."""
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.IOException as e:
                if "lock" not in str(e).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short exclusive read-write transaction: committed on success, rolled back on error."""
        with self._locked(exclusive=True):
            con = self._connect(read_only=False)
            try:
                if not self._schema_ready:
                    _create_schema(con)
                    self._schema_ready = True
                con.execute("BEGIN TRANSACTION")
                try:
                    yield con
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
            finally:
                con.close()

    @contextmanager
    def reading(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection shared with other readers (the schema is created if absent)."""
        if not self.path.exists() or not self._schema_ready:
            with self.transaction():
                pass
        with self._locked(exclusive=False):
            con = self._connect(read_only=True)
            try:
                yield con
            finally:
                con.close()

    # -- generic writes ----------------------------------------------------------------------

    def write(self, table: str, rows: Mapping[str, Any] | Iterable[Mapping[str, Any]],
              replace: bool = True) -> int:
        """Insert ``rows`` (dicts of column -> value) in ``table`` in one transaction; a row whose
        key is stored already replaces it (``replace=False``: leaves it as it is).

        Missing columns are NULL; provenance columns are filled in unless given. Rows repeating a
        key keep the last one. Returns the number of rows given (after that de-duplication).
        """
        if table not in SCHEMA:
            raise ValueError(f"table: got {table!r}, expected one of {sorted(SCHEMA)}")
        columns, key = SCHEMA[table]
        rows = [rows] if isinstance(rows, Mapping) else list(rows)
        if not rows:
            return 0
        names = list(columns) + list(_PROVENANCE)
        prov = provenance()
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        by_key: dict[tuple, list] = {}  # last row wins for a repeated key, as in sequential writes
        for i, row in enumerate(rows):
            unknown = set(row) - set(names)
            if unknown:
                raise ValueError(
                    f"rows[{i}] for table {table!r}: unknown columns {sorted(unknown)}, "
                    f"expected a subset of {names}"
                )
            missing_key = [k for k in key if row.get(k) is None]
            if missing_key:
                raise ValueError(f"rows[{i}] for table {table!r}: key columns {missing_key} unset")
            full = {"created_at": now, **prov, **row}
            by_key[tuple(row[k] for k in key)] = [
                _canonical_json(full.get(c)) if kind == "JSON" else full.get(c)
                for c, kind in {**columns, **_PROVENANCE}.items()
            ]
        values = list(by_key.values())
        placeholders = "(" + ", ".join("?" * len(names)) + ")"
        with self.transaction() as con:
            # one multi-row statement per chunk: DuckDB's executemany costs ~10 ms a row
            for start in range(0, len(values), _ROWS_PER_STATEMENT):
                chunk = values[start : start + _ROWS_PER_STATEMENT]
                con.execute(
                    f"INSERT OR {'REPLACE' if replace else 'IGNORE'} INTO {table} "
                    f"({', '.join(names)}) VALUES "
                    + ", ".join([placeholders] * len(chunk)),
                    [v for row in chunk for v in row],
                )
        return len(values)

    # -- typed writers -----------------------------------------------------------------------

    def add_run(self, run: str, kind: str = "train", config: Mapping | None = None,
                seed: int | None = None, status: str = "started", replace: bool = True) -> None:
        self.write("runs", {"run": run, "kind": kind, "config": config, "seed": seed,
                            "status": status}, replace=replace)

    def add_checkpoint(self, checkpoint: str, run: str | None = None, step: int | None = None,
                       path: str | None = None, metrics: Mapping | None = None,
                       replace: bool = True) -> None:
        self.write("checkpoints", {"checkpoint": checkpoint, "run": run, "step": step,
                                   "path": path, "metrics": metrics}, replace=replace)

    def log_train_metrics(self, run: str, step: int, metrics: Mapping[str, float],
                          wall_time: float | None = None) -> int:
        return self.write(
            "train_metrics",
            [{"run": run, "step": step, "name": k, "value": float(v), "wall_time": wall_time}
             for k, v in metrics.items()],
        )

    def add_videos(self, rows: Iterable[Mapping[str, Any]]) -> int:
        return self.write("videos", rows)

    def add_scores(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Per-video and aggregate scores (``video = AGGREGATE`` for the aggregate)."""
        return self.write("scores", rows)

    # -- readers -----------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] | None = None):
        """Run a read-only SQL query; returns a pandas DataFrame."""
        with self.reading() as con:
            return con.execute(sql, params or []).df()

    def records(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Run a read-only SQL query; returns a list of dicts (one per row)."""
        with self.reading() as con:
            cursor = con.execute(sql, params or [])
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def table(self, table: str, **equal: Any):
        """All rows of ``table`` whose columns equal the given values, as a DataFrame."""
        if table not in SCHEMA:
            raise ValueError(f"table: got {table!r}, expected one of {sorted(SCHEMA)}")
        known = set(SCHEMA[table][0]) | set(_PROVENANCE)
        unknown = set(equal) - known
        if unknown:
            raise ValueError(f"filters for table {table!r}: unknown columns {sorted(unknown)}")
        where = " AND ".join(f"{c} = ?" for c in equal) or "TRUE"
        order = ", ".join(SCHEMA[table][1])
        return self.query(f"SELECT * FROM {table} WHERE {where} ORDER BY {order}",
                          list(equal.values()))

    def has_score(self, checkpoint: str, suite: str, dimension: str,
                  video: str = AGGREGATE) -> bool:
        """True when a successful score is stored for this checkpoint+suite+dimension+video."""
        return bool(
            self.records(
                "SELECT 1 FROM scores WHERE checkpoint = ? AND suite = ? AND dimension = ? "
                "AND video = ? AND error IS NULL LIMIT 1",
                [checkpoint, suite, dimension, video],
            )
        )

    def scored_videos(self, checkpoint: str, suite: str, dimension: str) -> set[str]:
        """The videos with a successful per-video score for this checkpoint+suite+dimension."""
        rows = self.records(
            "SELECT video FROM scores WHERE checkpoint = ? AND suite = ? AND dimension = ? "
            "AND video <> ? AND error IS NULL",
            [checkpoint, suite, dimension, AGGREGATE],
        )
        return {r["video"] for r in rows}

    def scores(self, checkpoint: str | None = None, suite: str | None = None,
               aggregate: bool | None = None):
        """Scores as a DataFrame, optionally filtered; ``aggregate`` True/False keeps only the
        aggregate / only the per-video rows."""
        clauses, params = [], []
        for column, value in (("checkpoint", checkpoint), ("suite", suite)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if aggregate is not None:
            clauses.append("video = ?" if aggregate else "video <> ?")
            params.append(AGGREGATE)
        where = " AND ".join(clauses) or "TRUE"
        return self.query(
            f"SELECT * FROM scores WHERE {where} ORDER BY checkpoint, suite, dimension, video",
            params,
        )


def _create_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    stored = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if stored is not None and int(stored[0]) != SCHEMA_VERSION:
        raise RuntimeError(
            f"store schema version {stored[0]} differs from this code's {SCHEMA_VERSION}: "
            "use a new store file (M4V_STORE) or migrate it"
        )
    for table, (columns, key) in SCHEMA.items():
        body = ", ".join(f"{c} {t}" for c, t in {**columns, **_PROVENANCE}.items())
        con.execute(
            f"CREATE TABLE IF NOT EXISTS {table} ({body}, PRIMARY KEY ({', '.join(key)}))"
        )
    if stored is None:
        con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
