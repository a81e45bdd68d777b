"""The job store protocol on both backends — SQLite and a real PostgreSQL — claims, leases, fencing,
cancel paths and the at-most-once marker."""
from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

from infinitetalk.service.store import JobRecord, JobStore, StoreUnavailable


@pytest.fixture(params=["sqlite", "postgres"])
def target(request, tmp_path):
    """Where a job database is: a SQLite file, or an empty throwaway PostgreSQL."""
    return tmp_path / "jobs.sqlite3" if request.param == "sqlite" else request.getfixturevalue("postgres_url")


@pytest.fixture
def make_store(target):
    """A factory of store handles on one database (several handles = several servers)."""
    opened = []

    def factory():
        opened.append(JobStore(target))
        return opened[-1]
    yield factory
    for store in opened:
        store.close()


def job(n: int = 0, **over) -> JobRecord:
    rec = JobRecord(id=uuid.uuid4().hex, model="infinitetalk/image-to-video-multi",
                    request={"kind": "image-to-video-multi", "seed": n}, status="created",
                    created_at=f"2026-01-01T00:00:{n:02d}.000Z", billed_seconds=5)
    for k, v in over.items():
        setattr(rec, k, v)
    return rec


def wait_for(fn, what: str, limit_s: float = 30.0):
    """Poll `fn` until it returns something truthy (a lease running out); fail after `limit_s`."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {limit_s:.0f} s")


def test_queue_ahead_counts_queued_jobs_submitted_earlier(make_store):
    store = make_store()
    jobs = [job(n) for n in (3, 1, 2, 4)]
    jobs[3].status = "processing"                    # started: ahead of nobody
    for rec in jobs:
        store.insert(rec)
    assert [store.queue_ahead(rec.id) for rec in jobs[:3]] == [2, 0, 1]
    store.update(jobs[1].id, status="completed")
    assert store.queue_ahead(jobs[0].id) == 1 and store.queue_ahead(jobs[2].id) == 0


def test_round_trip_keeps_every_field(make_store):
    store = make_store()
    rec = job(1, webhook="https://hooks.example.com/x", outputs=[{"filename": "a.mp4", "subfolder": "s", "type": "output"}],
              video_seconds=1.5)
    store.insert(rec)
    got = store.get(rec.id)
    assert got == rec
    store.update(rec.id, status="failed", error="boom")
    assert (store.get(rec.id).status, store.get(rec.id).error) == ("failed", "boom")
    assert store.get("missing") is None


def test_claims_are_oldest_first_and_each_job_goes_to_exactly_one_worker(make_store):
    stores = [make_store() for _ in range(3)]   # three servers on one database
    ids = []
    for n in range(24):
        rec = job(n)
        stores[0].insert(rec)
        ids.append(rec.id)
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        store, me = stores[index % 3], f"w{index}"
        while (rec := store.claim(me, 60.0)) is not None:
            with lock:
                claimed.append((rec.id, me))
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(i for i, _ in claimed) == sorted(ids)      # every job, none twice
    for job_id, me in claimed:
        rec = stores[1].get(job_id)
        assert rec.worker_id == me and rec.attempts == 1 and rec.status == "created"
    first = make_store()
    rec = job(99)
    first.insert(rec)
    assert first.claim("late", 60.0).id == rec.id and first.claim("late", 60.0) is None


def test_an_expired_lease_passes_the_job_on_and_fences_the_old_owner(make_store):
    a, b = make_store(), make_store()
    rec = job(1)
    a.insert(rec)
    assert a.claim("A", 1.0).id == rec.id
    assert b.claim("B", 1.0) is None                         # A's lease holds
    assert a.heartbeat(rec.id, "A", 1.0) is not None         # still A's
    assert a.fenced_update(rec.id, "A", status="processing", started_at="t0")
    taken = wait_for(lambda: b.claim("B", 30.0), "B taking over the expired lease")
    assert taken.id == rec.id and taken.attempts == 2 and taken.worker_id == "B" and taken.status == "processing"
    assert a.heartbeat(rec.id, "A", 1.0) is None             # A learns it lost the job
    assert not a.fenced_update(rec.id, "A", status="completed", outputs=[{"filename": "stale.mp4"}])
    assert b.fenced_update(rec.id, "B", status="completed", outputs=[{"filename": "good.mp4"}])
    final = a.get(rec.id)
    assert final.status == "completed" and final.outputs == [{"filename": "good.mp4"}]
    assert not b.fenced_update(rec.id, "B", status="failed")  # an ended job is never rewritten
    assert b.claim("C", 1.0) is None


def test_cancel_paths(make_store):
    store = make_store()
    free, claimed, running = job(1), job(2), job(3)
    for rec in (free, claimed, running):
        store.insert(rec)
    assert store.cancel_unclaimed(free.id, "cancelled by the client")
    assert store.get(free.id).status == "failed" and store.get(free.id).error == "cancelled by the client"
    assert not store.cancel_unclaimed(free.id, "again")       # ended: nothing to cancel
    assert store.claim("W", 60.0).id == claimed.id
    assert store.claim("W2", 60.0).id == running.id
    store.fenced_update(running.id, "W2", status="processing")
    assert not store.cancel_unclaimed(claimed.id, "x")        # claimed: the worker has to act
    assert store.request_cancel(claimed.id)
    beat = store.heartbeat(claimed.id, "W", 60.0)
    assert beat.cancel_requested == 1
    assert not store.request_cancel(running.id)               # running: cannot be cancelled
    assert store.get(running.id).cancel_requested == 0


def test_a_delivery_is_claimed_by_exactly_one_caller(make_store):
    stores = [make_store(), make_store()]
    results: list[object] = []
    lock = threading.Lock()

    def claim(i: int) -> None:
        got = stores[i % 2].claim_event("job1", "webhook", f"S{i}", 60.0)
        with lock:
            results.append(got)
    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r for r in results if r is not None] == [(0, None)] and len(results) == 8
    assert stores[0].claim_event("job1", "other-event", "S0", 60.0) == (0, None)
    assert stores[1].claim_event("job2", "webhook", "S1", 60.0) == (0, None)


def test_a_delivery_lease_runs_out_hands_on_its_tries_and_ends_once(make_store):
    a, b = make_store(), make_store()
    assert a.claim_event("job1", "webhook", "A", 0.3) == (0, None)
    assert a.hold_event("job1", "webhook", "A", 0.3, 2, 1234.5)     # A made 2 tries, the first at 1234.5
    assert not b.hold_event("job1", "webhook", "B", 0.3, 1, 1.0)     # not B's
    assert b.claim_event("job1", "webhook", "B", 60.0) is None        # A's lease still runs
    time.sleep(0.5)
    assert b.claim_event("job1", "webhook", "B", 60.0) == (2, 1234.5)  # A went silent: B goes on from try 3
    assert not a.hold_event("job1", "webhook", "A", 60.0, 3, 1234.5)  # A lost it: its writes are fenced
    assert not a.end_event("job1", "webhook", "A", "delivered")
    assert b.end_event("job1", "webhook", "B", "delivered")
    assert not b.end_event("job1", "webhook", "B", "delivered")       # once
    time.sleep(0.1)
    assert a.claim_event("job1", "webhook", "A", 0.01) is None        # done: never claimed again


def test_webhooks_due_are_ended_jobs_with_a_webhook_not_delivered_nor_held(make_store):
    store = make_store()
    recent = "2026-12-07T10:00:00.000Z"
    jobs = {name: job(i, webhook="https://hooks.example.com/x" if name != "no_hook" else None,
                      status="completed" if name != "running" else "processing", completed_at=recent)
            for i, name in enumerate(["fresh", "held", "stalled", "done", "no_hook", "running", "old"])}
    jobs["old"].completed_at = "2026-12-05T10:00:00.000Z"
    for rec in jobs.values():
        store.insert(rec)
    store.claim_event(jobs["held"].id, "webhook", "S", 60.0)
    store.claim_event(jobs["stalled"].id, "webhook", "S", 0.01)
    store.claim_event(jobs["done"].id, "webhook", "S", 60.0)
    store.end_event(jobs["done"].id, "webhook", "S", "delivered")
    time.sleep(0.1)
    due = store.webhooks_due("2026-12-06T10:00:00.000Z", 10)
    assert sorted(r.id for r in due) == sorted([jobs["fresh"].id, jobs["stalled"].id])
    assert all(r == store.get(r.id) for r in due) and len(store.webhooks_due("2026-12-06T10:00:00.000Z", 1)) == 1


def test_an_old_database_gains_the_queue_columns(target):
    import sqlalchemy as sa

    url = (f"sqlite:///{target}" if isinstance(target, Path)
           else target.replace("postgresql://", "postgresql+psycopg://"))
    engine = sa.create_engine(url)
    with engine.begin() as db:
        _old_schema(db)
    engine.dispose()
    store = JobStore(target)
    assert store.get("old").status == "completed" and store.get("old").attempts == 0 and store.get("old").webhook is None
    assert store.claim_event("old", "webhook", "S", 60.0) is None      # delivered back then: not sent again
    assert store.claim_event("new", "webhook", "S", 60.0) == (0, None)
    rec = job(1, webhook="https://hooks.example.com/x")
    store.insert(rec)
    assert store.get(rec.id) == rec and store.claim("W", 60.0).id == rec.id   # the queue works on the old file
    store.close()


def _old_schema(db) -> None:
    """The tables as the first release made them (before the queue and the delivery lease)."""
    db.exec_driver_sql("CREATE TABLE jobs (id TEXT PRIMARY KEY, model TEXT NOT NULL, request TEXT NOT NULL, status TEXT "
               "NOT NULL, prompt_id TEXT, created_at TEXT NOT NULL, started_at TEXT, completed_at TEXT, billed_seconds "
               "INTEGER, video_seconds REAL, inference_ms INTEGER, outputs TEXT NOT NULL DEFAULT '[]', error TEXT NOT "
               "NULL DEFAULT '')")
    db.exec_driver_sql("INSERT INTO jobs (id, model, request, status, created_at) "
                       "VALUES ('old', 'm', '{}', 'completed', 't')")
    db.exec_driver_sql("CREATE TABLE job_events (job_id TEXT NOT NULL, event TEXT NOT NULL, at TEXT NOT NULL, "
                       "PRIMARY KEY (job_id, event))")      # the once-only marks of before the delivery lease
    db.exec_driver_sql("INSERT INTO job_events VALUES ('old', 'webhook', 't')")


def test_a_database_url_of_another_kind_is_refused_by_name():
    with pytest.raises(RuntimeError, match="mysql://.*postgresql://"):
        JobStore("mysql://db/jobs")


def test_a_postgresql_url_without_psycopg_names_the_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "psycopg", None)   # as if not installed
    with pytest.raises(RuntimeError, match=r"psycopg\[binary\]") as info:
        JobStore("postgresql://jobs@127.0.0.1:1/jobs")
    assert "INFINITETALK_API_DATABASE_URL" in str(info.value)


def test_an_unreachable_database_at_start_is_not_fatal_and_names_it_without_the_password():
    from infinitetalk.service.store import StoreUnavailable

    pytest.importorskip("psycopg")
    from pg_support import free_port

    store = JobStore(f"postgresql://jobs:s3cret@127.0.0.1:{free_port()}/jobs")   # nothing listens there
    with pytest.raises(StoreUnavailable) as info:
        store.get("x")
    assert "127.0.0.1" in str(info.value) and "s3cret" not in str(info.value)
    store.close()


def test_a_locked_sqlite_file_is_unavailable_not_an_error(tmp_path):
    """Another process holding the file past the busy timeout: StoreUnavailable (routes answer 503)."""
    import sqlite3

    store = JobStore(tmp_path / "jobs.sqlite3", sqlite_busy_s=0.05)
    store.insert(job(1))
    other = sqlite3.connect(tmp_path / "jobs.sqlite3", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable, match="jobs.sqlite3"):
            store.insert(job(2))
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.insert(job(3))                                   # and it works again once the lock is gone
    store.close()


def test_a_role_without_create_rights_uses_tables_an_admin_made(postgres_server, postgres_url):
    """Production databases often give the app role only data rights; a role with none is unavailable (503)."""
    psycopg = pytest.importorskip("psycopg")
    admin = JobStore(postgres_url)                       # the admin's first start creates the schema
    admin.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for role in ("jobs_app", "jobs_nobody"):
            conn.execute(f"DROP ROLE IF EXISTS {role}")
            conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON jobs, job_events TO jobs_app")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    app_url = postgres_url.replace("postgres@", "jobs_app@", 1)
    app = JobStore(app_url)
    rec = job(1)
    app.insert(rec)
    assert app.get(rec.id) == rec and app.claim("W", 60.0).id == rec.id
    assert app.claim_event(rec.id, "webhook", "S", 60.0) == (0, None)
    app.close()
    nobody = JobStore(postgres_url.replace("postgres@", "jobs_nobody@", 1))
    with pytest.raises(StoreUnavailable, match="refused the request"):
        nobody.get(rec.id)
    nobody.close()


def test_an_owner_replaying_its_claim_gets_it_again(make_store):
    """A claim whose reply was lost is sent again on a new connection: the owner gets its delivery, not None."""
    store = make_store()
    assert store.claim_event("job1", "webhook", "S", 60.0) == (0, None)
    assert store.claim_event("job1", "webhook", "S", 60.0) == (0, None)
    assert store.claim_event("job1", "webhook", "T", 60.0) is None


def test_an_insert_replayed_after_a_lost_reply_changes_nothing(make_store):
    store = make_store()
    rec = job(1)
    store.insert(rec)
    store.insert(rec)
    assert store.get(rec.id) == rec


def test_one_job_per_dedupe_key_and_account_even_when_racing(make_store):
    stores = [make_store(), make_store()]
    first = job(1, account="a", dedupe_key="k")
    assert stores[0].insert(first, dedupe_since="2026-01-01T00:00:00.000Z") == first
    results: list[JobRecord] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def submit(i: int) -> None:
        try:
            got = stores[i % 2].insert(job(10 + i, account="b", dedupe_key="k"),
                                       dedupe_since="2026-01-01T00:00:00.000Z")
        except BaseException as exc:   # noqa: BLE001 - a racer's error is the failure this test looks for
            with lock:
                failures.append(exc)
            return
        with lock:
            results.append(got)
    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures and len(results) == 8, failures   # every racer gets the one job, none an error
    assert len({r.id for r in results}) == 1 and results[0].id != first.id   # account b: one job, not a's
    again = job(2, account="a", dedupe_key="k")
    assert stores[1].insert(again, dedupe_since="2026-01-01T00:00:00.000Z") == first   # within the window
    assert stores[1].get(again.id) is None
    assert stores[1].insert(again, dedupe_since="2026-01-01T00:00:02.000Z") == again   # the first is too old now
    assert stores[1].get(first.id).dedupe_key is None and stores[1].get(again.id).dedupe_key == "k"


def test_an_accounts_active_jobs_are_bounded(make_store):
    from infinitetalk.service.store import AccountQueueFull

    store = make_store()
    for n in range(2):
        store.insert(job(n, account="a"), max_active=2)
    with pytest.raises(AccountQueueFull) as info:
        store.insert(job(5, account="a"), max_active=2)
    assert info.value.active == 2
    store.insert(job(6, account="b"), max_active=2)               # another account's queue
    ended = store.claim("W", 60.0)
    assert store.fenced_update(ended.id, "W", status="completed")
    rec = job(7, account="a")
    assert store.insert(rec, max_active=2) == rec                 # one of a's ended: room again
