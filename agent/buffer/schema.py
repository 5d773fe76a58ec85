"""The buffer file: its tables, their migrations, opening it, and quarantining a corrupt one.

SQLite in WAL mode. ``synchronous = FULL`` with ``durability = "fsync"`` (every commit is
on disk when append returns), ``NORMAL`` with ``"os"``; incremental auto-vacuum so
housekeeping can give freed pages back. The file is created with FILE_MODE before SQLite
touches it, and its name is fsynced in the directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from agent.durable_files import FILE_MODE, fsync_dir, make_dirs_durably
from agent.errors import BufferCorrupt, BufferError_
from agent.ids import ulid

log = logging.getLogger("edge_agent.buffer")

SCHEMA_VERSION = 2
# Each migration takes the file from version i to i+1. Never edit a released one: add one.
MIGRATIONS: list[str] = [
    # 0 -> 1: the core tables
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE streams (
        sid INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        last_seq INTEGER NOT NULL DEFAULT 0,
        forwarded_seq INTEGER NOT NULL DEFAULT 0,
        deleted_seq INTEGER NOT NULL DEFAULT 0,
        ingested_total INTEGER NOT NULL DEFAULT 0,
        ingested_bytes INTEGER NOT NULL DEFAULT 0,
        forwarded_total INTEGER NOT NULL DEFAULT 0,
        forwarded_bytes INTEGER NOT NULL DEFAULT 0,
        dropped_total INTEGER NOT NULL DEFAULT 0,
        dropped_bytes INTEGER NOT NULL DEFAULT 0,
        dead_lettered_total INTEGER NOT NULL DEFAULT 0,
        dead_lettered_bytes INTEGER NOT NULL DEFAULT 0,
        stored_bytes INTEGER NOT NULL DEFAULT 0,
        last_forwarded_at REAL,
        last_error TEXT,
        checkpoint_seq INTEGER NOT NULL DEFAULT 0,
        checkpoint_at REAL
    );
    CREATE TABLE events (
        sid INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        id TEXT NOT NULL,
        committed_at REAL NOT NULL,
        size INTEGER NOT NULL,
        body BLOB NOT NULL,
        ctl INTEGER NOT NULL DEFAULT 0,  -- 1: the agent's own gap/checkpoint: never dropped
        PRIMARY KEY (sid, seq)
    ) WITHOUT ROWID;
    CREATE TABLE batches (
        batch_id TEXT PRIMARY KEY,
        sid INTEGER NOT NULL,
        first_seq INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        created_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE forward_log (
        sid INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        forwarded_at REAL NOT NULL,
        PRIMARY KEY (sid, last_seq)
    ) WITHOUT ROWID;
    CREATE TABLE dead_letters (
        sid INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        id TEXT NOT NULL,
        body BLOB NOT NULL,
        reason TEXT NOT NULL,
        status INTEGER,
        dead_at REAL NOT NULL,
        retry_requested INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (sid, seq)
    ) WITHOUT ROWID;
    CREATE TABLE dedupe (
        sid INTEGER NOT NULL,
        source_event_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        id TEXT NOT NULL,
        committed_at REAL NOT NULL,
        PRIMARY KEY (sid, source_event_id)
    ) WITHOUT ROWID;
    CREATE TABLE marks (
        namespace TEXT NOT NULL,
        key TEXT NOT NULL,
        committed_at REAL NOT NULL,
        PRIMARY KEY (namespace, key)
    ) WITHOUT ROWID;
    """,
    # 1 -> 2: operator-requested replays of kept events
    """
    CREATE TABLE replays (
        replay_id INTEGER PRIMARY KEY,
        sid INTEGER NOT NULL,
        from_seq INTEGER NOT NULL,
        to_seq INTEGER NOT NULL,
        requested_at REAL NOT NULL
    );
    """,
]
assert len(MIGRATIONS) == SCHEMA_VERSION

#: meta key an operator command (agent/buffer/operator.py) bumps when it changed the
#: file's sizes behind a running agent's back; the agent re-reads them when it moves.
OPERATOR_GENERATION = "operator_generation"

STREAM_STATE_SQL = (
    "SELECT sid, name, last_seq, forwarded_seq, checkpoint_seq, stored_bytes FROM streams"
)


@dataclass(frozen=True, slots=True)
class Opened:
    """What the file says when it is opened: the epoch and every stream's state row."""

    epoch: str
    streams: list[tuple[int, str, int, int, int, int]]
    operator_generation: str


@dataclass(frozen=True, slots=True)
class FileSchema:
    """What an existing file is, as far as this module is concerned."""

    #: PRAGMA user_version: the buffer schema it was migrated to (0: never by edge-agent)
    version: int
    #: any table at all: an SQLite file with tables and version 0 is someone else's database
    has_tables: bool


def read_file_schema(path: Path) -> FileSchema:
    """The schema of an existing file, read-only, so that ``config check`` can say whether
    this agent can open it without opening it the way ``run`` does (no migration, no WAL
    write). The answer comes from the module that owns the schema, not from a second reader
    of its tables. Raises sqlite3.DatabaseError for a file that is not a readable SQLite
    database."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is not None
    finally:
        conn.close()
    return FileSchema(version=version, has_tables=tables)


def prepare_file(path: Path) -> bool:
    """Create the directory and the empty file durably with FILE_MODE; True when the file
    existed (and so must pass the integrity check)."""
    make_dirs_durably(path.parent)
    existed = path.exists() and path.stat().st_size > 0
    if existed and not os.access(path, os.R_OK | os.W_OK):
        raise BufferError_(
            f"cannot open buffer {path}: permission denied "
            "(the agent's user must own it: chown edge-agent and chmod 640)"
        )
    if not existed:
        # FILE_MODE from the first byte, whatever the umask (-wal/-shm follow the main file)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, FILE_MODE))
        # the name too: SQLite fsyncs the directory only for its -wal/-journal files
        fsync_dir(path.parent)
    return existed


def connect(path: Path) -> sqlite3.Connection:
    """The writer's connection: autocommit (transactions are explicit BEGIN IMMEDIATE), and
    usable from the writer's thread only, whichever thread opened it."""
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


#: the page size of a new buffer file (see initialise)
PAGE_SIZE = 16384


def initialise(db: sqlite3.Connection, path: Path, existed: bool, durability: str) -> Opened:
    """Check, configure and migrate the file; raises sqlite3.DatabaseError when corrupt."""
    db.execute("PRAGMA busy_timeout = 5000")
    # 16 MiB of page cache (default 2 MiB): a 10,000-event group commit dirties ~6.5 MB,
    # which spilled to the WAL before COMMIT (sqlite3PcacheFetchStress in py-spy)
    db.execute("PRAGMA cache_size = -16384")
    if existed:
        # Fails with DatabaseError on a file that is not SQLite or is damaged.
        row = db.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {row[0] if row else '?'}")
    else:
        # 16 KiB pages for a new file (SQLite's default is 4 KiB; an existing file keeps
        # its own). An event is ~600 bytes in a WITHOUT ROWID table, so a 4 KiB leaf holds
        # about six: reading a 1000-event batch walked ~170 pages, and that read was the
        # drain path's largest cost (py-spy, the writer thread). Measured on a 1M-event
        # file, the same rows: SELECT of 1000-row runs 0.55-0.89M rows/s with 4 KiB pages,
        # 1.1-1.5M with 16 KiB (64 KiB: no better). docs/performance.md, issue 16.
        # Before auto_vacuum: that pragma fixes the page size of an empty file.
        db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise sqlite3.DatabaseError(f"cannot switch to WAL mode (got {mode})")
    db.execute(f"PRAGMA synchronous = {'FULL' if durability == 'fsync' else 'NORMAL'}")
    _migrate(db, path)
    row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
    if row is None:
        epoch = ulid()
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO meta VALUES ('epoch', ?)", (epoch,))
        db.execute("INSERT INTO meta VALUES ('created_at', ?)", (repr(time.time()),))
        db.execute("COMMIT")
    else:
        epoch = row[0]
    return Opened(epoch, db.execute(STREAM_STATE_SQL).fetchall(), operator_generation(db))


def operator_generation(db: sqlite3.Connection) -> str:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (OPERATOR_GENERATION,)).fetchone()
    return str(row[0]) if row else ""


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise BufferError_(
            f"buffer {path} has schema version {version}, newer than this agent "
            f"understands ({SCHEMA_VERSION}); upgrade edge-agent or set buffer.path elsewhere"
        )
    for v in range(version, SCHEMA_VERSION):
        db.execute("BEGIN IMMEDIATE")
        for stmt in _split_sql(MIGRATIONS[v]):
            db.execute(stmt)
        db.execute(f"PRAGMA user_version = {v + 1}")
        db.execute("COMMIT")
        if version:
            log.info("buffer %s migrated from schema %d to %d", path, v, v + 1)


def quarantine(path: Path) -> Path:
    """Move a corrupt file (and its -wal, -shm) aside, durably; returns the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            src.rename(Path(str(target) + suffix))
    # the move itself must survive a power cut: the message below points at target
    with contextlib.suppress(OSError):
        fsync_dir(path.parent)
    log.error("buffer %s quarantined to %s", path, target)
    return target


def corrupt_error(path: Path, moved: Path, exc: BaseException) -> BufferCorrupt:
    return BufferCorrupt(
        f"buffer {path} is unreadable ({exc}); moved aside to {moved} and kept. "
        "Start the agent again to begin a new buffer (new stream epoch); recover events "
        f"from the old file with: sqlite3 {moved} .recover"
    )


def chmod_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.chmod(path, FILE_MODE)


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
