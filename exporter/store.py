"""The durable store: one SQLite database (WAL mode) in the ``--storage.path`` directory.

Only I/O lives here: opening (one writer per directory, bad stores moved aside), loading
every table, and writing one ``Delta`` per transaction. What goes in the rows is
``snapshot.py``'s business. Every call but ``open`` runs on the store's own thread.

Why SQLite: it is in the standard library, a transaction is all-or-nothing across a SIGKILL
(so what was committed is whole, and what was not is not there), and a row per device or
per batch lets a round write only what changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger("exporter.store")

# Bump when a table or a row's encoding changes: a store of another version is moved aside.
SCHEMA_VERSION = 1
DATABASE = "state.db"
LOCK = "lock"

_TABLES = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS devices (device TEXT PRIMARY KEY, row BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ledger (device TEXT NOT NULL, batch TEXT NOT NULL,"
    " row BLOB NOT NULL, PRIMARY KEY (device, batch)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS marks (device TEXT PRIMARY KEY, row BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS blobs (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
)


class StoreUnusable(Exception):
    """The store cannot be opened (the directory cannot be made, locked or written)."""


class StoreLocked(StoreUnusable):
    """Another process holds the directory."""


@dataclass(slots=True)
class Delta:
    """One transaction: rows to put (``None`` deletes) per table."""

    devices: dict[str, bytes | None] = field(default_factory=dict)
    ledger: dict[tuple[str, str], bytes | None] = field(default_factory=dict)
    marks: dict[str, bytes | None] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.devices or self.ledger or self.marks or self.blobs)


@dataclass(slots=True)
class Loaded:
    """Every row of a store, as stored."""

    devices: dict[str, bytes]
    ledger: list[tuple[str, str, bytes]]
    marks: dict[str, bytes]
    blobs: dict[str, bytes]


class DirectoryLock:
    """An exclusive ``flock`` on DIR/lock, naming its holder (pid@host) in the file."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreLocked(
                f"--storage.path {self.path.parent} is in use by another exporter process"
                f" ({holder}); each process (each shard) needs a directory of its own"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class Store:
    def __init__(self, directory: Path, organization: str, connection: sqlite3.Connection):
        self.directory = directory
        self.organization = organization
        self._db = connection

    @classmethod
    def open(cls, directory: str | Path, organization: str) -> Store:
        """Open (or create) the store of ``organization`` in ``directory``. A store that
        cannot be read, of another schema version or of another organization is moved
        aside (renamed, kept) and a clean one started. The directory's lock must be held."""
        path = Path(directory)
        reason = _unusable(path / DATABASE, organization)
        if reason is not None:
            aside = _move_aside(path / DATABASE, reason)
            log.warning("store_moved_aside", reason=reason, kept_as=str(aside))
        try:
            db = _connect(path / DATABASE)
            _initialise(db, organization)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnusable(f"{path / DATABASE}: {exc}") from exc
        return cls(path, organization, db)

    def discard(self, reason: str) -> Store:
        """Move this store aside (its rows did not decode) and start a clean one."""
        self._db.close()
        aside = _move_aside(self.directory / DATABASE, reason)
        log.warning("store_moved_aside", reason=reason, kept_as=str(aside))
        return Store.open(self.directory, self.organization)

    def load(self) -> Loaded:
        db = self._db
        return Loaded(
            devices=dict(db.execute("SELECT device, row FROM devices")),
            ledger=list(db.execute("SELECT device, batch, row FROM ledger")),
            marks=dict(db.execute("SELECT device, row FROM marks")),
            blobs=dict(db.execute("SELECT name, value FROM blobs")),
        )

    def write(self, delta: Delta) -> None:
        """One transaction: all of ``delta`` or, on any error, none of it."""
        with self._db:  # commits, or rolls back on an exception
            _put(self._db, "devices", "device", delta.devices)
            _put(self._db, "marks", "device", delta.marks)
            _put(self._db, "blobs", "name", delta.blobs)
            rows = delta.ledger.items()
            self._db.executemany(
                "DELETE FROM ledger WHERE device = ? AND batch = ?",
                [key for key, row in rows if row is None],
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO ledger (device, batch, row) VALUES (?, ?, ?)",
                [(*key, row) for key, row in rows if row is not None],
            )

    def disk_bytes(self) -> int:
        """The database and its write-ahead log, as they take up disk now."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += (self.directory / (DATABASE + suffix)).stat().st_size
        return total

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()


def hold(directory: Path, lock: DirectoryLock) -> None:
    """Make the directory if needed and hold its lock: StoreLocked when another process
    holds it, StoreUnusable when it cannot be made or locked (read-only, not a directory)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except StoreLocked:
        raise
    except OSError as exc:
        raise StoreUnusable(f"{directory}: {exc.strerror or exc}") from exc


def open_directory(directory: Path, organization: str, lock: DirectoryLock) -> Store:
    """Hold the directory (``hold``) and open the store in it."""
    hold(directory, lock)
    return Store.open(directory, organization)


def _put(db: sqlite3.Connection, table: str, key: str, rows: Mapping[str, bytes | None]) -> None:
    """Rows by key; ``None`` deletes the row."""
    items = list(rows.items())
    db.executemany(f"DELETE FROM {table} WHERE {key} = ?", [(k,) for k, v in items if v is None])
    db.executemany(
        f"INSERT OR REPLACE INTO {table} ({key}, {_value(table)}) VALUES (?, ?)",
        [(k, v) for k, v in items if v is not None],
    )


def _value(table: str) -> str:
    return "value" if table == "blobs" else "row"


def _connect(path: Path) -> sqlite3.Connection:
    # check_same_thread off: opened on the loop's thread, then used by the store's own.
    db = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    # NORMAL: a commit survives the process being killed (the WAL is in the page cache),
    # and costs no fsync; a power cut may lose the last commits, never the file.
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def _initialise(db: sqlite3.Connection, organization: str) -> None:
    with db:
        for statement in _TABLES:
            db.execute(statement)
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if not meta:
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("organization", organization),
                    ("created_at", repr(time.time())),
                ],
            )


def _unusable(path: Path, organization: str) -> str | None:
    """Why the database at ``path`` cannot be continued (None: it can, or there is none)."""
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            if db.execute("PRAGMA quick_check").fetchone() != ("ok",):
                return "corrupt"
            meta = dict(db.execute("SELECT key, value FROM meta"))
        finally:
            db.close()
    except sqlite3.Error as exc:
        return f"unreadable ({exc})"
    if not meta:
        return None  # created, never initialised (stopped or out of room): initialise it
    if meta.get("schema_version") != str(SCHEMA_VERSION):
        return f"schema version {meta.get('schema_version')} (this exporter: {SCHEMA_VERSION})"
    if meta.get("organization") != organization:
        return f"organization {meta.get('organization')!r} (config: {organization!r})"
    return None


def _move_aside(path: Path, reason: str) -> Path:
    """Rename the database (and its WAL) out of the way, keeping it for a look."""
    tag = reason.split(" ", 1)[0].strip("(")
    aside = path.with_name(f"{path.name}.{tag}-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("-wal", "-shm", ""):
        source = path.with_name(path.name + suffix)
        if source.exists():
            source.rename(aside.with_name(aside.name + suffix))
    return aside
