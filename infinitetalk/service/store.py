"""Job records and the job queue behind one protocol: SQLite (one server, the embedded default) or
PostgreSQL (a fleet, `store_postgres.py`), chosen by `database.open_store`.

A job is claimed by one worker at a time under a lease the worker extends (heartbeat); a lease that
runs out (a dead worker) makes the job claimable again. Every write a worker makes is fenced by its
id, so a worker that lost its lease cannot overwrite the job's new owner.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Protocol

FINAL = ("completed", "failed")
ACTIVE = ("created", "processing")
# Lease columns are internal: describe() never shows them to clients.
COLUMNS = {
    "id": "TEXT PRIMARY KEY", "model": "TEXT NOT NULL", "request": "TEXT NOT NULL", "status": "TEXT NOT NULL",
    "prompt_id": "TEXT", "created_at": "TEXT NOT NULL", "started_at": "TEXT", "completed_at": "TEXT",
    "billed_seconds": "INTEGER", "video_seconds": "REAL", "inference_ms": "INTEGER",
    "outputs": "TEXT NOT NULL DEFAULT '[]'", "error": "TEXT NOT NULL DEFAULT ''", "webhook": "TEXT",
    "worker_id": "TEXT", "lease_expires_at": "DOUBLE PRECISION", "attempts": "INTEGER NOT NULL DEFAULT 0",
    "cancel_requested": "INTEGER NOT NULL DEFAULT 0",
}
# Once-per-job deliveries (a job's webhook), leased like jobs so a server that dies mid-retries hands the
# delivery on. `done` defaults to 1: rows from before the lease columns (delivered once) stay done.
EVENT_COLUMNS = {"owner": "TEXT", "lease_expires_at": "DOUBLE PRECISION", "tries": "INTEGER NOT NULL DEFAULT 0",
                 "first_try_at": "DOUBLE PRECISION", "outcome": "TEXT", "done": "INTEGER NOT NULL DEFAULT 1"}
EVENTS_TABLE = "CREATE TABLE IF NOT EXISTS job_events (job_id TEXT NOT NULL, event TEXT NOT NULL, " \
               "at TEXT NOT NULL, PRIMARY KEY (job_id, event))"
# Takes an event row: a new one, or one not done whose lease ran out. {p}: placeholder, {now}: the clock.
CLAIM_EVENT = ("INSERT INTO job_events (job_id, event, at, owner, lease_expires_at, done) VALUES ({p}, {p}, {p}, {p}, "
               "{now} + {p}, 0) ON CONFLICT (job_id, event) DO UPDATE SET owner = excluded.owner, "
               "lease_expires_at = excluded.lease_expires_at WHERE job_events.done = 0 AND "
               "(job_events.lease_expires_at IS NULL OR job_events.lease_expires_at < {now} "
               "OR job_events.owner = excluded.owner)")   # the owner's own replay (a lost reply) gets it again
HOLD_EVENT = ("UPDATE job_events SET lease_expires_at = {now} + {p}, tries = {p}, first_try_at = COALESCE(first_try_at, {p}) "
              "WHERE job_id = {p} AND event = {p} AND owner = {p} AND done = 0")
END_EVENT = "UPDATE job_events SET done = 1, outcome = {p}, at = {p} WHERE job_id = {p} AND event = {p} AND owner = {p} AND done = 0"
WEBHOOK_INDEX = "CREATE INDEX IF NOT EXISTS jobs_webhook_ended ON jobs(completed_at) WHERE webhook IS NOT NULL"
# Ended jobs with a webhook whose delivery has not started, or stalled (its server died); oldest first.
WEBHOOKS_DUE = ("SELECT j.* FROM jobs j LEFT JOIN job_events e ON e.job_id = j.id AND e.event = 'webhook' "
                "WHERE j.status IN ('completed', 'failed') AND j.webhook IS NOT NULL AND j.completed_at >= {p} AND "
                "(e.job_id IS NULL OR (e.done = 0 AND e.lease_expires_at < {now})) ORDER BY j.completed_at LIMIT {p}")
# How many queued jobs are ahead of one (RunComfy's queue_position): created earlier (id breaks ties), not started.
QUEUE_AHEAD = ("SELECT COUNT(*) AS ahead FROM jobs j, jobs me WHERE me.id = {p} AND j.status = 'created' AND "
               "(j.created_at < me.created_at OR (j.created_at = me.created_at AND j.id < me.id))")
# Claimable: active, and unowned or owned under a lease that ran out. Oldest first.
CLAIMABLE = "status IN ('created', 'processing') AND (worker_id IS NULL OR lease_expires_at < {now})"


class StoreUnavailable(Exception):
    """The job database cannot be reached or answered with an error; nothing was written."""


@dataclass
class JobRecord:
    id: str
    model: str
    request: dict[str, Any]
    status: str
    created_at: str
    prompt_id: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    billed_seconds: int | None = None
    video_seconds: float | None = None
    inference_ms: int | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)  # what OutputStore.publish returned
    error: str = ""
    webhook: str | None = None
    worker_id: str | None = None
    lease_expires_at: float | None = None
    attempts: int = 0
    cancel_requested: int = 0


def encode(changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(changes)
    for key in ("request", "outputs"):
        if key in out:
            out[key] = json.dumps(out[key])
    return out


def decode(row: dict[str, Any]) -> JobRecord:
    names = {f.name for f in fields(JobRecord)}
    d = {k: v for k, v in row.items() if k in names}
    d["request"] = json.loads(d["request"])
    d["outputs"] = json.loads(d["outputs"])
    return JobRecord(**d)


def _now_iso() -> str:
    from .contract import now_iso

    return now_iso()


class Store(Protocol):
    """What the job service and the workers need from a job database (both backends implement it)."""

    def insert(self, rec: JobRecord) -> None: ...
    def get(self, job_id: str) -> JobRecord | None: ...
    def update(self, job_id: str, **changes: Any) -> None: ...
    def claim(self, worker_id: str, lease_s: float) -> JobRecord | None: ...
    def heartbeat(self, job_id: str, worker_id: str, lease_s: float) -> JobRecord | None: ...
    def fenced_update(self, job_id: str, worker_id: str, **changes: Any) -> bool: ...
    def cancel_unclaimed(self, job_id: str, error: str) -> bool: ...
    def request_cancel(self, job_id: str) -> bool: ...
    def claim_event(self, job_id: str, event: str, owner: str, lease_s: float) -> tuple[int, float | None] | None: ...
    def hold_event(self, job_id: str, event: str, owner: str, lease_s: float, tries: int, first_try_at: float) -> bool: ...
    def end_event(self, job_id: str, event: str, owner: str, outcome: str) -> bool: ...
    def webhooks_due(self, since_iso: str, limit: int) -> list[JobRecord]: ...
    def queue_ahead(self, job_id: str) -> int: ...
    def close(self) -> None: ...


class SQLiteStore:
    """One SQLite file (one connection, serialised by a lock); claims take the write lock first
    (`BEGIN IMMEDIATE`), so processes sharing the file never claim one job twice."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        cols = ", ".join(f"{k} {v}" for k, v in COLUMNS.items())
        self._db.execute(f"CREATE TABLE IF NOT EXISTS jobs ({cols})")
        have = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
        for name, decl in COLUMNS.items():  # a file from before the queue: add the new columns
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status)")
        self._db.execute(WEBHOOK_INDEX)
        self._db.execute(EVENTS_TABLE)
        have = {r[1] for r in self._db.execute("PRAGMA table_info(job_events)")}
        for name, decl in EVENT_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE job_events ADD COLUMN {name} {decl}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The connection's lock; a database that cannot serve (locked past the timeout, an I/O error) becomes
        StoreUnavailable, like a PostgreSQL outage. "Disk is full" stays sqlite3's (the routes answer 507)."""
        with self._lock:
            try:
                yield
            except sqlite3.OperationalError as exc:
                if "full" in str(exc).lower():
                    raise
                raise StoreUnavailable(f"the job database ({self.path.name}) cannot be used: {exc}") from exc

    def _row(self, cur: sqlite3.Cursor) -> JobRecord | None:
        row = cur.fetchone()
        return None if row is None else decode(dict(zip([c[0] for c in cur.description], row)))

    def insert(self, rec: JobRecord) -> None:
        d = encode(asdict(rec))
        with self._locked():
            self._db.execute(f"INSERT INTO jobs ({', '.join(d)}) VALUES ({', '.join('?' * len(d))})", list(d.values()))

    def update(self, job_id: str, **changes: Any) -> None:
        if changes:
            d = encode(changes)
            with self._locked():
                self._db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in d)} WHERE id = ?",
                                 [*d.values(), job_id])

    def get(self, job_id: str) -> JobRecord | None:
        with self._locked():
            return self._row(self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)))

    def claim(self, worker_id: str, lease_s: float) -> JobRecord | None:
        now = time.time()
        with self._locked():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(f"SELECT id FROM jobs WHERE {CLAIMABLE.format(now='?')} "
                                       "ORDER BY created_at, id LIMIT 1", (now,)).fetchone()
                if row is not None:
                    self._db.execute("UPDATE jobs SET worker_id = ?, lease_expires_at = ?, attempts = attempts + 1 "
                                     "WHERE id = ?", (worker_id, now + lease_s, row[0]))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return None if row is None else self._row(self._db.execute("SELECT * FROM jobs WHERE id = ?", (row[0],)))

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float) -> JobRecord | None:
        with self._locked():
            cur = self._db.execute("UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND worker_id = ? "
                                   "AND status IN ('created', 'processing')", (time.time() + lease_s, job_id, worker_id))
            if cur.rowcount != 1:
                return None
            return self._row(self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)))

    def fenced_update(self, job_id: str, worker_id: str, **changes: Any) -> bool:
        d = encode(changes)
        with self._locked():
            cur = self._db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in d)} WHERE id = ? AND worker_id = ? "
                                   "AND status IN ('created', 'processing')", [*d.values(), job_id, worker_id])
            return cur.rowcount == 1

    def cancel_unclaimed(self, job_id: str, error: str) -> bool:
        with self._locked():
            cur = self._db.execute("UPDATE jobs SET status = 'failed', error = ?, completed_at = ? WHERE id = ? AND "
                                   "status = 'created' AND (worker_id IS NULL OR lease_expires_at < ?)",
                                   (error, _now_iso(), job_id, time.time()))
            return cur.rowcount == 1

    def queue_ahead(self, job_id: str) -> int:
        with self._locked():
            return int(self._db.execute(QUEUE_AHEAD.format(p="?"), (job_id,)).fetchone()[0])

    def request_cancel(self, job_id: str) -> bool:
        with self._locked():
            cur = self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'created'", (job_id,))
            return cur.rowcount == 1

    def claim_event(self, job_id: str, event: str, owner: str, lease_s: float) -> tuple[int, float | None] | None:
        """Take the job's `event` under a lease: (tries so far, time of the first try) or None (done, or held)."""
        now = time.time()
        with self._locked():
            cur = self._db.execute(CLAIM_EVENT.format(p="?", now="?"), (job_id, event, _now_iso(), owner, now, lease_s, now))
            if cur.rowcount != 1:
                return None
            row = self._db.execute("SELECT tries, first_try_at FROM job_events WHERE job_id = ? AND event = ?",
                                   (job_id, event)).fetchone()
            return row[0], row[1]

    def hold_event(self, job_id: str, event: str, owner: str, lease_s: float, tries: int, first_try_at: float) -> bool:
        """Extend the lease and record the tries; False when another server holds it now (or it is done)."""
        with self._locked():
            return self._db.execute(HOLD_EVENT.format(p="?", now="?"), (time.time(), lease_s, tries, first_try_at,
                                                                       job_id, event, owner)).rowcount == 1

    def end_event(self, job_id: str, event: str, owner: str, outcome: str) -> bool:
        with self._locked():
            return self._db.execute(END_EVENT.format(p="?"), (outcome, _now_iso(), job_id, event, owner)).rowcount == 1

    def webhooks_due(self, since_iso: str, limit: int) -> list[JobRecord]:
        with self._locked():
            cur = self._db.execute(WEBHOOKS_DUE.format(p="?", now="?"), (since_iso, time.time(), limit))
            names = [c[0] for c in cur.description]
            return [decode(dict(zip(names, row))) for row in cur.fetchall()]


JobStore = SQLiteStore  # the name before the queue existed
