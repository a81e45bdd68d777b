"""The job store and queue on PostgreSQL (psycopg 3), for a fleet of servers sharing one database.

Claims use `FOR UPDATE SKIP LOCKED`, so workers racing for the queue each get a different job; lease
times come from the database clock, so servers with skewed clocks agree on when a lease ran out.
Every connection problem becomes `StoreUnavailable` (the routes answer 503; workers retry).
"""
from __future__ import annotations

import queue
import threading
from dataclasses import asdict
from typing import Any

from .store import (CLAIM_EVENT, CLAIMABLE, COLUMNS, END_EVENT, EVENT_COLUMNS, EVENTS_TABLE, HOLD_EVENT,
                    QUEUE_AHEAD, WEBHOOK_INDEX, WEBHOOKS_DUE, JobRecord, StoreUnavailable, decode, encode, _now_iso)

_NOW = "extract(epoch from clock_timestamp())"
CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_MS = 15000
POOL_SIZE = 4


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise RuntimeError("INFINITETALK_API_DATABASE_URL is a postgresql:// URL, which needs the 'psycopg' package "
                           "(pip install 'psycopg[binary]>=3.1', or the package's 'fleet' extra); it is not "
                           "installed") from None
    return psycopg


def _redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    head, sep, rest = url.partition("://")
    if "@" in rest:
        cred, _, host = rest.rpartition("@")
        rest = f"{cred.split(':')[0]}:***@{host}" if ":" in cred else f"{cred}@{host}"
    return head + sep + rest


def _without_password(text: str, url: str) -> str:
    """`text` with the URL's password (as written in it) replaced by ***."""
    cred = url.partition("://")[2].rpartition("@")[0]
    password = cred.partition(":")[2]
    return text.replace(password, "***") if password else text


class PostgresStore:
    """A few pooled connections (autocommit, short timeouts); a broken one is dropped, not reused."""

    def __init__(self, url: str):
        self.psycopg = _psycopg()
        from psycopg.rows import dict_row

        self._dict_row = dict_row
        self.url = url
        self.where = _redacted(url)
        try:   # a malformed URL is a setting to fix, not a database to wait for
            self.psycopg.conninfo.conninfo_to_dict(url)
        except self.psycopg.ProgrammingError as exc:
            raise RuntimeError(f"INFINITETALK_API_DATABASE_URL={self.where}: not a PostgreSQL connection URL "
                               f"({_without_password(str(exc).strip(), url)})") from None
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._closed = False
        self._schema_lock = threading.Lock()
        self._schema_ready = False
        try:
            self._ensure_schema()
        except StoreUnavailable:  # the server still starts; routes answer 503 until the database is back
            pass

    def _connect(self):
        # TCP keepalives and a user timeout: a database that vanishes from the network (no RST) is noticed in
        # seconds, not after the kernel's retransmission time (a heartbeat must not hang for 15 minutes).
        return self.psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                    options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}", row_factory=self._dict_row,
                                    keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
                                    tcp_user_timeout=STATEMENT_TIMEOUT_MS + 5000)

    def _run(self, fn, replay: bool = True):
        """Run `fn(conn)` on a pooled connection; a database that cannot serve it becomes StoreUnavailable.
        `replay`: whether `fn` may run again on a new connection when a pooled one fails (only statements
        whose repetition changes nothing: the first run may have committed before its reply was lost)."""
        if not self._schema_ready:
            self._ensure_schema()
        return self._with_conn(fn, replay=replay)

    def _with_conn(self, fn, fresh: bool = False, replay: bool = True):
        conn = None
        if not fresh:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                pass
        pooled = conn is not None
        try:
            if conn is None or conn.closed:
                conn = self._connect()
            result = fn(conn)
        except self.psycopg.OperationalError as exc:
            if conn is not None:
                conn.close()
            if pooled and replay:   # a pooled connection the server dropped (e.g. it restarted): once more
                return self._with_conn(fn, fresh=True)
            raise StoreUnavailable(f"the job database ({self.where}) is unreachable: {str(exc).strip()[:200]}") from exc
        except (self.psycopg.errors.InsufficientPrivilege, self.psycopg.errors.ReadOnlySqlTransaction,
                self.psycopg.InternalError) as exc:   # the server answers but cannot serve this server now
            if conn is not None:
                conn.close()
            raise StoreUnavailable(f"the job database ({self.where}) refused the request: "
                                   f"{str(exc).strip()[:200]}") from exc
        except BaseException:
            if conn is not None and not conn.closed and conn.info.transaction_status != 0:  # 0 = idle
                conn.close()
            raise
        if self._closed or self._idle.qsize() >= POOL_SIZE:
            conn.close()
        else:
            self._idle.put(conn)
        return result

    def _ensure_schema(self) -> None:
        with self._schema_lock:
            if self._schema_ready:
                return

            def create(conn):
                have = {(r["table_name"], r["column_name"]) for r in conn.execute(
                    "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = "
                    "current_schema() AND table_name IN ('jobs', 'job_events')").fetchall()}
                index = conn.execute("SELECT 1 FROM pg_indexes WHERE schemaname = current_schema() AND "
                                     "indexname = 'jobs_webhook_ended'").fetchone()
                wanted = {("jobs", c) for c in COLUMNS} | {("job_events", c) for c in EVENT_COLUMNS}
                if wanted <= have and index is not None:
                    return   # up to date: a role without CREATE rights (tables made by an admin) works too
                cols = ", ".join(f"{k} {v}" for k, v in COLUMNS.items())
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(7311016)")  # servers starting together
                    conn.execute(f"CREATE TABLE IF NOT EXISTS jobs ({cols})")
                    for name, decl in COLUMNS.items():
                        if name != "id":
                            conn.execute(f"ALTER TABLE jobs ADD COLUMN IF NOT EXISTS {name} {decl}")
                    conn.execute("CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created_at)")
                    conn.execute(WEBHOOK_INDEX)
                    conn.execute(EVENTS_TABLE)
                    for name, decl in EVENT_COLUMNS.items():
                        conn.execute(f"ALTER TABLE job_events ADD COLUMN IF NOT EXISTS {name} {decl}")
            self._with_conn(create)
            self._schema_ready = True

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    @staticmethod
    def _one(cur) -> JobRecord | None:
        row = cur.fetchone()
        return None if row is None else decode(row)

    def insert(self, rec: JobRecord) -> None:
        d = encode(asdict(rec))   # ON CONFLICT: a replay after a lost reply inserts nothing twice
        sql = f"INSERT INTO jobs ({', '.join(d)}) VALUES ({', '.join(['%s'] * len(d))}) ON CONFLICT (id) DO NOTHING"
        self._run(lambda c: c.execute(sql, list(d.values())))

    def update(self, job_id: str, **changes: Any) -> None:
        if changes:
            d = encode(changes)
            sql = f"UPDATE jobs SET {', '.join(f'{k} = %s' for k in d)} WHERE id = %s"
            self._run(lambda c: c.execute(sql, [*d.values(), job_id]))

    def get(self, job_id: str) -> JobRecord | None:
        return self._run(lambda c: self._one(c.execute("SELECT * FROM jobs WHERE id = %s", (job_id,))))

    def claim(self, worker_id: str, lease_s: float) -> JobRecord | None:
        sql = (f"UPDATE jobs SET worker_id = %s, lease_expires_at = {_NOW} + %s, attempts = attempts + 1 "
               f"WHERE id = (SELECT id FROM jobs WHERE {CLAIMABLE.format(now=_NOW)} ORDER BY created_at, id "
               "FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING *")
        return self._run(lambda c: self._one(c.execute(sql, (worker_id, lease_s))), replay=False)  # 2 claims

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float) -> JobRecord | None:
        sql = (f"UPDATE jobs SET lease_expires_at = {_NOW} + %s WHERE id = %s AND worker_id = %s "
               "AND status IN ('created', 'processing') RETURNING *")
        return self._run(lambda c: self._one(c.execute(sql, (lease_s, job_id, worker_id))))

    def fenced_update(self, job_id: str, worker_id: str, **changes: Any) -> bool:
        d = encode(changes)
        sql = (f"UPDATE jobs SET {', '.join(f'{k} = %s' for k in d)} WHERE id = %s AND worker_id = %s "
               "AND status IN ('created', 'processing')")
        return self._run(lambda c: c.execute(sql, [*d.values(), job_id, worker_id]).rowcount == 1)

    def cancel_unclaimed(self, job_id: str, error: str) -> bool:
        sql = ("UPDATE jobs SET status = 'failed', error = %s, completed_at = %s WHERE id = %s AND status = 'created' "
               f"AND (worker_id IS NULL OR lease_expires_at < {_NOW})")
        return self._run(lambda c: c.execute(sql, (error, _now_iso(), job_id)).rowcount == 1)

    def queue_ahead(self, job_id: str) -> int:
        return self._run(lambda c: int(c.execute(QUEUE_AHEAD.format(p="%s"), (job_id,)).fetchone()["ahead"]))

    def request_cancel(self, job_id: str) -> bool:
        sql = "UPDATE jobs SET cancel_requested = 1 WHERE id = %s AND status = 'created'"
        return self._run(lambda c: c.execute(sql, (job_id,)).rowcount == 1)

    def claim_event(self, job_id: str, event: str, owner: str, lease_s: float) -> tuple[int, float | None] | None:
        sql = CLAIM_EVENT.format(p="%s", now=_NOW) + " RETURNING tries, first_try_at"

        def claim(conn):
            row = conn.execute(sql, (job_id, event, _now_iso(), owner, lease_s)).fetchone()
            return None if row is None else (row["tries"], row["first_try_at"])
        return self._run(claim)

    def hold_event(self, job_id: str, event: str, owner: str, lease_s: float, tries: int, first_try_at: float) -> bool:
        sql = HOLD_EVENT.format(p="%s", now=_NOW)
        return self._run(lambda c: c.execute(sql, (lease_s, tries, first_try_at, job_id, event, owner)).rowcount == 1)

    def end_event(self, job_id: str, event: str, owner: str, outcome: str) -> bool:
        sql = END_EVENT.format(p="%s")
        return self._run(lambda c: c.execute(sql, (outcome, _now_iso(), job_id, event, owner)).rowcount == 1)

    def webhooks_due(self, since_iso: str, limit: int) -> list[JobRecord]:
        sql = WEBHOOKS_DUE.format(p="%s", now=_NOW)
        return self._run(lambda c: [decode(row) for row in c.execute(sql, (since_iso, limit)).fetchall()])
