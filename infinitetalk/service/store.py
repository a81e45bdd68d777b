"""Job records and the job queue on SQLAlchemy Core: a SQLite file (one server, the embedded default) or
PostgreSQL (a fleet sharing one database), the same statements on both.

A job is claimed by one worker at a time under a lease the worker extends (heartbeat); a lease that runs out
(a dead worker) makes the job claimable again. Every write a worker makes is fenced by its id, so a worker that
lost its lease cannot overwrite the job's new owner. A claim is one `UPDATE … WHERE id = (SELECT … FOR UPDATE
SKIP LOCKED)`, so workers racing for the queue each get a different job (SQLite serialises writers itself). On
PostgreSQL lease times come from the database clock, so servers with skewed clocks agree on when a lease ran
out. A database that cannot serve a call raises `StoreUnavailable` (the routes answer 503; workers retry).
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite

from .schema import jobs, job_events, migrate

FINAL = ("completed", "failed")
ACTIVE = ("created", "processing")
ENV_DATABASE_URL = "INFINITETALK_API_DATABASE_URL"
CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_MS = 15000
POOL_SIZE = 4
SQLITE_BUSY_S = 30.0


class StoreUnavailable(Exception):
    """The job database cannot be reached or answered with an error; nothing was written."""


class AccountQueueFull(Exception):
    """The account already has as many jobs queued or running as it may; nothing was written."""

    def __init__(self, active: int):
        super().__init__(f"{active} jobs queued or running")
        self.active = active


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
    worker_id: str | None = None     # lease columns are internal: describe() never shows them to clients
    lease_expires_at: float | None = None
    attempts: int = 0
    cancel_requested: int = 0
    account: str = ""                # who submitted it: only that account (or an admin key) sees it
    dedupe_key: str | None = None    # its Idempotency-Key: a repeat within the window gets this job back


def encode(changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(changes)
    for key in ("request", "outputs"):
        if key in out:
            out[key] = json.dumps(out[key])
    return out


def decode(row: Any) -> JobRecord:
    names = {f.name for f in fields(JobRecord)}
    d = {k: v for k, v in dict(row).items() if k in names}
    d["request"] = json.loads(d["request"])
    d["outputs"] = json.loads(d["outputs"])
    return JobRecord(**d)


def _now_iso() -> str:
    from .contract import now_iso

    return now_iso()


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    head, sep, rest = url.partition("://")
    if "@" in rest:
        cred, _, host = rest.rpartition("@")
        rest = f"{cred.split(':')[0]}:***@{host}" if ":" in cred else f"{cred}@{host}"
    return head + sep + rest


def _without_password(text: str, url: str) -> str:
    """`text` with the URL's password (as written in it) replaced by ***."""
    password = url.partition("://")[2].rpartition("@")[0].partition(":")[2]
    return text.replace(password, "***") if password else text


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise RuntimeError(f"{ENV_DATABASE_URL} is a postgresql:// URL, which needs the 'psycopg' package "
                           "(pip install 'psycopg[binary]>=3.1', or the package's 'fleet' extra); it is not "
                           "installed") from None
    return psycopg


class JobStore:
    """The job store on `target`: a `postgresql://` (or `postgres://`) URL, else a SQLite file's path.

    PostgreSQL: a small pool (one transaction per call, short timeouts, keepalives; connections checked before
    use), its schema made or brought up to date on first use, so a server starts while the database is down.
    SQLite: one pooled connection (calls from threads take turns), WAL, every transaction `BEGIN IMMEDIATE`.
    """

    def __init__(self, target: str | Path, sqlite_busy_s: float = SQLITE_BUSY_S):
        text = str(target)
        self.postgres = text.startswith(("postgresql://", "postgres://"))
        if "://" in text and not self.postgres:
            raise RuntimeError(f"{ENV_DATABASE_URL}={text.split('://')[0]}://…: expected a postgresql:// URL "
                               "(or, unset, the server's SQLite file)")
        self._url = text
        self.where = redacted(text) if self.postgres else Path(text).name
        self._schema_lock = threading.Lock()
        self._schema_ready = False
        if self.postgres:
            self.engine = self._postgres_engine(text)
            try:
                self._ensure_schema()
            except StoreUnavailable:   # the server still starts; routes answer 503 until the database is back
                pass
        else:
            Path(text).parent.mkdir(parents=True, exist_ok=True)
            self.engine = self._sqlite_engine(Path(text), sqlite_busy_s)
            self._ensure_schema()
        self._insert = postgresql.insert if self.postgres else sqlite.insert

    def _postgres_engine(self, url: str) -> sa.Engine:
        psycopg = _psycopg()
        try:   # a malformed URL is a setting to fix, not a database to wait for
            psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise RuntimeError(f"{ENV_DATABASE_URL}={self.where}: not a PostgreSQL connection URL "
                               f"({_without_password(str(exc).strip(), url)})") from None

        def connect():
            # TCP keepalives and a user timeout: a database that vanishes from the network (no RST) is noticed in
            # seconds, not after the kernel's retransmission time (a heartbeat must not hang for 15 minutes).
            # Not autocommit: `engine.begin()` must be one transaction (the advisory lock of `insert` is held
            # until its commit; with autocommit every statement would commit, and the lock go, on its own).
            return psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S,
                                   options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}", keepalives=1,
                                   keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
                                   tcp_user_timeout=STATEMENT_TIMEOUT_MS + 5000)
        return sa.create_engine("postgresql+psycopg://", creator=connect, pool_size=POOL_SIZE, max_overflow=16,
                                pool_timeout=STATEMENT_TIMEOUT_MS / 1000, pool_pre_ping=True)

    @staticmethod
    def _sqlite_engine(path: Path, busy_s: float) -> sa.Engine:
        engine = sa.create_engine(sa.URL.create("sqlite", database=str(path)), pool_size=1, max_overflow=0,
                                  pool_timeout=busy_s, connect_args={"check_same_thread": False, "timeout": busy_s})

        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None   # transactions are ours (below), not the driver's
            dbapi_conn.execute("PRAGMA journal_mode=WAL")

        @sa.event.listens_for(engine, "begin")
        def _begin(conn):   # the write lock first: processes sharing the file never claim one job twice
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        return engine

    def close(self) -> None:
        self.engine.dispose()

    # -- running statements ------------------------------------------------------------------------------------
    def _now(self) -> sa.ColumnElement:
        """The clock leases are measured on: the database's on PostgreSQL (shared by the fleet), else ours."""
        if self.postgres:
            return sa.func.extract("epoch", sa.func.clock_timestamp())
        return sa.literal(time.time(), sa.DOUBLE_PRECISION)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Database errors as StoreUnavailable. SQLite's "disk is full" stays sqlite3's own (routes answer 507)."""
        try:
            yield
        except sa_exc.TimeoutError as exc:   # every pooled connection busy past the timeout
            raise StoreUnavailable(f"the job database ({self.where}) is busy: {exc}") from exc
        except sa_exc.DBAPIError as exc:
            orig = exc.orig
            detail = _without_password(str(orig).strip(), self._url)[:200]
            if not self.postgres:
                if not isinstance(exc, sa_exc.OperationalError) or "full" in detail.lower():
                    raise orig from None
                raise StoreUnavailable(f"the job database ({self.where}) cannot be used: {detail}") from exc
            if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
                raise StoreUnavailable(f"the job database ({self.where}) is unreachable: {detail}") from exc
            errors = _psycopg().errors
            if isinstance(exc, sa_exc.InternalError) or isinstance(orig, errors.InsufficientPrivilege):
                raise StoreUnavailable(f"the job database ({self.where}) refused the request: {detail}") from exc
            raise

    def _run(self, fn: Callable[[sa.Connection], Any], replay: bool = True) -> Any:
        """`fn(conn)` in one transaction. `replay`: whether `fn` may run once more on a new connection when the
        connection broke under it (only calls whose repetition changes nothing: the first run may have committed
        before its reply was lost)."""
        if not self._schema_ready:
            self._ensure_schema()
        with self._errors():
            try:
                with self.engine.begin() as conn:
                    return fn(conn)
            except sa_exc.DBAPIError as exc:
                if not (replay and self.postgres and exc.connection_invalidated):
                    raise
            with self.engine.begin() as conn:
                return fn(conn)

    def _ensure_schema(self) -> None:
        with self._schema_lock:
            if self._schema_ready:
                return
            with self._errors(), self.engine.begin() as conn:
                migrate(conn, self.postgres)
            self._schema_ready = True

    def _fenced(self, job_id: str, worker_id: str) -> sa.ColumnElement:
        return sa.and_(jobs.c.id == job_id, jobs.c.worker_id == worker_id, jobs.c.status.in_(ACTIVE))

    # -- jobs --------------------------------------------------------------------------------------------------
    def insert(self, rec: JobRecord, max_active: int = 0, dedupe_since: str = "") -> JobRecord:
        """Record a new job and return it, or return the job of the same account that holds its `dedupe_key` and
        was created at or after `dedupe_since` (then nothing is written; an older holder gives the key up).
        AccountQueueFull when the account has `max_active` (> 0) jobs created or running. One transaction, one
        account at a time (SQLite: the write lock; PostgreSQL: an advisory lock on the account); a replay after a
        lost reply finds the job it wrote."""
        mine = jobs.c.account == rec.account

        def write(conn: sa.Connection) -> JobRecord:
            if self.postgres:
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(rec.account))))
            written = self._one(conn.execute(jobs.select().where(jobs.c.id == rec.id)))
            if written is not None:
                return written
            if rec.dedupe_key is not None:
                first = self._one(conn.execute(jobs.select().where(mine, jobs.c.dedupe_key == rec.dedupe_key)))
                if first is not None and first.created_at >= dedupe_since:
                    return first
                if first is not None:
                    conn.execute(jobs.update().where(jobs.c.id == first.id).values(dedupe_key=None))
            if max_active > 0:
                active = conn.execute(sa.select(sa.func.count()).where(mine, jobs.c.status.in_(ACTIVE))).scalar_one()
                if active >= max_active:
                    raise AccountQueueFull(active)
            conn.execute(jobs.insert().values(**encode(asdict(rec))))
            return rec
        return self._run(write)

    def find_dedupe(self, account: str, dedupe_key: str, since: str) -> JobRecord | None:
        """The account's job holding `dedupe_key`, if created at or after `since`."""
        stmt = jobs.select().where(jobs.c.account == account, jobs.c.dedupe_key == dedupe_key,
                                   jobs.c.created_at >= since)
        return self._run(lambda c: self._one(c.execute(stmt)))

    def update(self, job_id: str, **changes: Any) -> None:
        if changes:
            stmt = jobs.update().where(jobs.c.id == job_id).values(**encode(changes))
            self._run(lambda c: c.execute(stmt))

    def get(self, job_id: str) -> JobRecord | None:
        return self._run(lambda c: self._one(c.execute(jobs.select().where(jobs.c.id == job_id))))

    @staticmethod
    def _one(result: sa.CursorResult) -> JobRecord | None:
        row = result.mappings().first()
        return None if row is None else decode(row)

    def claim(self, worker_id: str, lease_s: float) -> JobRecord | None:
        """The oldest claimable job (active, and unowned or its lease ran out), now leased to `worker_id`."""
        now = self._now()
        oldest = (sa.select(jobs.c.id)
                  .where(jobs.c.status.in_(ACTIVE), sa.or_(jobs.c.worker_id.is_(None), jobs.c.lease_expires_at < now))
                  .order_by(jobs.c.created_at, jobs.c.id).limit(1).with_for_update(skip_locked=True).scalar_subquery())
        stmt = (jobs.update().where(jobs.c.id == oldest)
                .values(worker_id=worker_id, lease_expires_at=now + lease_s, attempts=jobs.c.attempts + 1)
                .returning(*jobs.c))
        return self._run(lambda c: self._one(c.execute(stmt)), replay=False)   # a replay would claim twice

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float) -> JobRecord | None:
        stmt = (jobs.update().where(self._fenced(job_id, worker_id))
                .values(lease_expires_at=self._now() + lease_s).returning(*jobs.c))
        return self._run(lambda c: self._one(c.execute(stmt)))

    def fenced_update(self, job_id: str, worker_id: str, **changes: Any) -> bool:
        stmt = jobs.update().where(self._fenced(job_id, worker_id)).values(**encode(changes))
        return self._run(lambda c: c.execute(stmt).rowcount == 1)

    def refund_attempt(self, job_id: str, worker_id: str) -> bool:
        """Give back the attempt of `worker_id`'s claim (a live worker that lost its lease); the job is released
        if that worker still owns it. Not replayed: a replay would give back two."""
        mine = jobs.c.worker_id == worker_id
        stmt = (jobs.update().where(jobs.c.id == job_id, jobs.c.status.in_(ACTIVE), jobs.c.attempts > 0)
                .values(attempts=jobs.c.attempts - 1, worker_id=sa.case((mine, None), else_=jobs.c.worker_id),
                        lease_expires_at=sa.case((mine, None), else_=jobs.c.lease_expires_at)))
        return self._run(lambda c: c.execute(stmt).rowcount == 1, replay=False)

    def cancel_unclaimed(self, job_id: str, error: str) -> bool:
        stmt = (jobs.update()
                .where(jobs.c.id == job_id, jobs.c.status == "created",
                       sa.or_(jobs.c.worker_id.is_(None), jobs.c.lease_expires_at < self._now()))
                .values(status="failed", error=error, completed_at=_now_iso()))
        return self._run(lambda c: c.execute(stmt).rowcount == 1)

    def queue_ahead(self, job_id: str) -> int:
        """How many queued jobs (any account's) are ahead of this one: created earlier (the id breaks ties) and
        not started, as the claim order takes them (RunComfy's queue_position)."""
        me = jobs.alias("me")
        earlier = sa.or_(jobs.c.created_at < me.c.created_at,
                         sa.and_(jobs.c.created_at == me.c.created_at, jobs.c.id < me.c.id))
        stmt = sa.select(sa.func.count()).select_from(jobs).join(me, me.c.id == job_id).where(
            jobs.c.status == "created", earlier)
        return self._run(lambda c: int(c.execute(stmt).scalar_one()))

    def request_cancel(self, job_id: str) -> bool:
        stmt = jobs.update().where(jobs.c.id == job_id, jobs.c.status == "created").values(cancel_requested=1)
        return self._run(lambda c: c.execute(stmt).rowcount == 1)

    # -- once-per-job deliveries (a job's webhook), leased like jobs -------------------------------------------
    def _event(self, job_id: str, event: str, owner: str) -> sa.ColumnElement:
        ev = job_events.c
        return sa.and_(ev.job_id == job_id, ev.event == event, ev.owner == owner, ev.done == 0)

    def claim_event(self, job_id: str, event: str, owner: str, lease_s: float) -> tuple[int, float | None] | None:
        """Take the job's `event` under a lease: (tries so far, time of the first try) or None (done, or held).
        A new row, or one not done whose lease ran out; the owner's own replay (a lost reply) gets it again."""
        now, ev = self._now(), job_events.c
        stmt = self._insert(job_events).values(job_id=job_id, event=event, at=_now_iso(), owner=owner,
                                               lease_expires_at=now + lease_s, done=0)
        stmt = stmt.on_conflict_do_update(
            index_elements=["job_id", "event"],
            set_={"owner": stmt.excluded.owner, "lease_expires_at": stmt.excluded.lease_expires_at},
            where=sa.and_(ev.done == 0, sa.or_(ev.lease_expires_at.is_(None), ev.lease_expires_at < now,
                                               ev.owner == stmt.excluded.owner)),
        ).returning(ev.tries, ev.first_try_at)

        def claim(conn: sa.Connection) -> tuple[int, float | None] | None:
            row = conn.execute(stmt).first()
            return None if row is None else (row[0], row[1])
        return self._run(claim)

    def hold_event(self, job_id: str, event: str, owner: str, lease_s: float, tries: int, first_try_at: float) -> bool:
        """Extend the lease and record the tries; False when another server holds it now (or it is done)."""
        stmt = (job_events.update().where(self._event(job_id, event, owner))
                .values(lease_expires_at=self._now() + lease_s, tries=tries,
                        first_try_at=sa.func.coalesce(job_events.c.first_try_at, first_try_at)))
        return self._run(lambda c: c.execute(stmt).rowcount == 1)

    def end_event(self, job_id: str, event: str, owner: str, outcome: str) -> bool:
        stmt = (job_events.update().where(self._event(job_id, event, owner))
                .values(done=1, outcome=outcome, at=_now_iso()))
        return self._run(lambda c: c.execute(stmt).rowcount == 1)

    def webhooks_due(self, since_iso: str, limit: int) -> list[JobRecord]:
        """Ended jobs with a webhook whose delivery has not started, or stalled (its server died); oldest first."""
        ev = job_events.c
        joined = jobs.outerjoin(job_events, sa.and_(ev.job_id == jobs.c.id, ev.event == "webhook"))
        stmt = (sa.select(*jobs.c).select_from(joined)
                .where(jobs.c.status.in_(FINAL), jobs.c.webhook.is_not(None), jobs.c.completed_at >= since_iso,
                       sa.or_(ev.job_id.is_(None), sa.and_(ev.done == 0, ev.lease_expires_at < self._now())))
                .order_by(jobs.c.completed_at).limit(limit))
        return self._run(lambda c: [decode(row) for row in c.execute(stmt).mappings()])
