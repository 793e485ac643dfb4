"""The results store: one SQLite file, one row per cell, keyed by a hash of the cell's config.

Safety against interruption (``kill -9``, power loss after a commit, Ctrl-C):

* the database runs in WAL mode with ``synchronous=FULL``; every :meth:`ResultStore.put` is
  one transaction, committed before it returns, so a row is either entirely there or absent;
* a cell is keyed by :func:`cell_key` (sha256 of the canonical JSON of its resolved config),
  and the key is the primary key: running a study again skips cells already stored
  (``has``) and can never write the same cell twice;
* every row carries its provenance (git sha, library versions from :mod:`qrobust.provenance`),
  the seed, and the masking warnings of the evaluation that produced it.

The store is a plain file: ``sqlite3 results.sqlite 'select * from results'`` reads it.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from hashlib import sha256
from pathlib import Path
from typing import Any

from qrobust.errors import ConfigError, QrobustError
from qrobust.provenance import provenance

try:
    import fcntl
except ImportError:  # not POSIX: runs on one directory are not locked against each other
    fcntl = None

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key       TEXT PRIMARY KEY,
    tbl       TEXT NOT NULL,
    config    TEXT NOT NULL,
    metrics   TEXT NOT NULL,
    warnings  TEXT NOT NULL,
    seed      INTEGER,
    git_sha   TEXT,
    versions  TEXT NOT NULL,
    created   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_tbl ON results (tbl);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StoreError(QrobustError):
    """The results file is not a qrobust store, or a value cannot be stored."""


def _plain(value: Any, finite: bool = True) -> Any:
    """JSON-ready copy: tuples -> lists, numpy/torch scalars and arrays -> Python, Paths -> str.

    Non-finite floats raise when ``finite`` (configs), else become None (metrics: "undefined",
    e.g. a transfer rate over zero attacked points)."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"config keys must be strings, got {k!r} ({type(k).__name__})")
            out[k] = _plain(v, finite)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, finite) for v in value]
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isfinite(value):
            return value
        if finite:
            raise ConfigError(f"a config value is {value}; configs must hold finite numbers")
        return None
    if hasattr(value, "tolist"):  # numpy arrays, torch tensors (0-d gives a scalar)
        return _plain(value.tolist(), finite)
    raise ConfigError(f"cannot store a value of type {type(value).__name__}: {value!r}; "
                      "use numbers, strings, lists and dicts")


def canonical_json(config: Mapping[str, Any]) -> str:
    """Key-sorted, whitespace-free JSON: equal configs give byte-equal strings."""
    return json.dumps(_plain(config), sort_keys=True, separators=(",", ":"), allow_nan=False)


def cell_key(config: Mapping[str, Any]) -> str:
    """sha256 (64 hex characters) of the canonical JSON of a resolved cell config.

    Key order does not matter; tuples and lists hash alike; ``1`` and ``1.0`` differ (JSON
    keeps them apart), so resolve configs through the validated models before hashing.
    """
    return sha256(canonical_json(config).encode()).hexdigest()


def remove_stale_temporaries(out: Path) -> int:
    """Delete the half-written ``.NAME.*.tmp`` files (``atomic_write_bytes``) a killed run left
    under ``out``: safe while holding the writer lock, since no other writer is running."""
    count = 0
    for tmp in out.rglob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            count += 1
    return count


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (hex), read in 1 MB blocks."""
    h = sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def writer_lock(out: str | Path) -> Iterator[None]:
    """Hold ``<out>/.qrobust.lock`` while a run writes ``out``: a second run on the same
    directory fails at once instead of repeating (and racing) the first one's work. The lock
    is the kernel's (``flock``), so it goes with the process, however that ends."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / ".qrobust.lock", "a+")  # noqa: SIM115 - closed below
    except (FileExistsError, NotADirectoryError):
        raise StoreError(f"{out} is a file, not a directory: give another output "
                         "directory") from None
    except OSError as err:
        raise StoreError(f"cannot write in {out}: {err.strerror}") from None
    if fcntl is None:
        f.close()
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise StoreError(f"{out} is being written by another qrobust run ({holder}); wait "
                             "for it to finish or give another output directory") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        remove_stale_temporaries(out)
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


class ResultStore:
    """SQLite results store; use as a context manager or call :meth:`close`.

    ``put`` writes one row in one committed transaction; rows are returned as dicts with
    keys ``key, table, config, metrics, warnings, seed, git_sha, versions, created``.
    """

    def __init__(self, path: str | Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory; give the results file, e.g. "
                             f"{self.path / 'results.sqlite'}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                             (str(SCHEMA_VERSION),))
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path} is not a qrobust results store ({err}); "
                             "point to a results.sqlite written by qrobust or a new file") from None
        self._provenance = provenance()

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    # -- reads ---------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        cur = self._db.execute("SELECT 1 FROM results WHERE key = ?", (key,))
        return cur.fetchone() is not None

    def get(self, key: str) -> dict | None:
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM results WHERE key = ?", (key,))
        row = cur.fetchone()
        return _row(row) if row else None

    def rows(self, table: str | None = None) -> list[dict]:
        """All rows (of one table if given), in the order they were written."""
        if table is None:
            cur = self._db.execute(f"SELECT {_COLUMNS} FROM results ORDER BY rowid")
        else:
            cur = self._db.execute(f"SELECT {_COLUMNS} FROM results WHERE tbl = ? ORDER BY rowid",
                                   (table,))
        return [_row(r) for r in cur.fetchall()]

    def keys(self, table: str | None = None) -> set[str]:
        return {r["key"] for r in self.rows(table)}

    def tables(self) -> list[str]:
        return [t for (t,) in self._db.execute("SELECT DISTINCT tbl FROM results ORDER BY tbl")]

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    # -- writes --------------------------------------------------------------------------
    def put(self, key: str, table: str, config: Mapping[str, Any], metrics: Mapping[str, Any],
            warnings: Iterable[str] = (), seed: int | None = None, *,
            replace: bool = False) -> bool:
        """Write one row in one transaction. Returns False (and writes nothing) when ``key``
        is already stored, unless ``replace``; a stored cell is never duplicated."""
        if not table or not isinstance(table, str):
            raise StoreError(f"table must be a non-empty string, got {table!r}")
        values = (key, table, canonical_json(config),
                  json.dumps(_plain(dict(metrics), finite=False), sort_keys=True),
                  json.dumps([str(w) for w in warnings]), None if seed is None else int(seed),
                  self._provenance["git_sha"],
                  json.dumps(self._provenance["versions"], sort_keys=True), time.time())
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        try:
            with self._transaction():
                cur = self._db.execute(f"{verb} INTO results ({_COLUMNS}) VALUES "
                                       "(?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
        except sqlite3.Error as err:  # a full disk, a lost mount: this row only is lost
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")  # a failed COMMIT leaves the transaction open
            raise StoreError(f"{self.path}: could not write a result ({err}); the rows "
                             "stored before it are intact: free space and rerun to resume") from None
        return cur.rowcount == 1

    def set_meta(self, name: str, value: Any) -> None:
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                             (name, json.dumps(_plain(value, finite=False))))

    def get_meta(self, name: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return default if row is None else json.loads(row[0])

    def _transaction(self):
        return _Transaction(self._db)


_COLUMNS = "key, tbl, config, metrics, warnings, seed, git_sha, versions, created"


def _row(r: tuple) -> dict:
    key, tbl, config, metrics, warnings, seed, sha, versions, created = r
    return {"key": key, "table": tbl, "config": json.loads(config), "metrics": json.loads(metrics),
            "warnings": json.loads(warnings), "seed": seed, "git_sha": sha,
            "versions": json.loads(versions), "created": created}


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
