"""The job database's tables (one schema for SQLite and PostgreSQL) and the migration of older databases."""
from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()
jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("request", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("prompt_id", sa.Text),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("started_at", sa.Text),
    sa.Column("completed_at", sa.Text),
    sa.Column("billed_seconds", sa.Integer),
    sa.Column("video_seconds", sa.REAL),
    sa.Column("inference_ms", sa.Integer),
    sa.Column("outputs", sa.Text, nullable=False, server_default=sa.text("'[]'")),
    sa.Column("error", sa.Text, nullable=False, server_default=sa.text("''")),
    sa.Column("webhook", sa.Text),
    sa.Column("worker_id", sa.Text),
    sa.Column("lease_expires_at", sa.DOUBLE_PRECISION),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("cancel_requested", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("account", sa.Text, nullable=False, server_default=sa.text("''")),   # whose job ("" = no keys)
    sa.Column("dedupe_key", sa.Text),   # the submission's Idempotency-Key, unique per account
    sa.Index("jobs_status", "status", "created_at"),
    sa.Index("jobs_account", "account", "status"),
    sa.Index("jobs_dedupe", "account", "dedupe_key", unique=True, sqlite_where=sa.text("dedupe_key IS NOT NULL"),
             postgresql_where=sa.text("dedupe_key IS NOT NULL")),
    # Ended jobs with a webhook (the sweep for deliveries a stopped server left unfinished).
    sa.Index("jobs_webhook_ended", "completed_at", sqlite_where=sa.text("webhook IS NOT NULL"),
             postgresql_where=sa.text("webhook IS NOT NULL")),
)
# Once-per-job deliveries (a job's webhook), leased like jobs so a server that dies mid-retries hands the
# delivery on. `done` defaults to 1: rows from before the lease columns (delivered once) stay done.
job_events = sa.Table(
    "job_events", metadata,
    sa.Column("job_id", sa.Text, primary_key=True),
    sa.Column("event", sa.Text, primary_key=True),
    sa.Column("at", sa.Text, nullable=False),
    sa.Column("owner", sa.Text),
    sa.Column("lease_expires_at", sa.DOUBLE_PRECISION),
    sa.Column("tries", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("first_try_at", sa.DOUBLE_PRECISION),
    sa.Column("outcome", sa.Text),
    sa.Column("done", sa.Integer, nullable=False, server_default=sa.text("1")),
)
ADVISORY_LOCK = 7311016   # PostgreSQL: servers starting together migrate one at a time


def _missing(conn: sa.Connection) -> tuple[dict[str, list[sa.Column]], bool]:
    """Per existing table the columns it lacks, and whether any table or index is missing."""
    inspector = sa.inspect(conn)
    lacking: dict[str, list[sa.Column]] = {}
    incomplete = False
    for table in metadata.sorted_tables:
        if not inspector.has_table(table.name):
            incomplete = True
            continue
        have = {c["name"] for c in inspector.get_columns(table.name)}
        lacking[table.name] = [c for c in table.columns if c.name not in have]
        indexes = {i["name"] for i in inspector.get_indexes(table.name)}
        incomplete |= any(index.name not in indexes for index in table.indexes)
    return lacking, incomplete


def migrate(conn: sa.Connection, postgres: bool) -> None:
    """Create what is missing and add the columns an older database lacks. A database already up to date is
    only read, so a role without CREATE rights (tables made by an admin) works too."""
    lacking, incomplete = _missing(conn)
    if not incomplete and not any(lacking.values()):
        return
    if postgres:
        conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK})"))
        lacking, _ = _missing(conn)   # another server may have done it meanwhile
    for name, columns in lacking.items():
        for column in columns:   # e.g. "attempts INTEGER DEFAULT 0 NOT NULL"
            ddl = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
            conn.execute(sa.text(f"ALTER TABLE {name} ADD COLUMN {'IF NOT EXISTS ' if postgres else ''}{ddl}"))
    for table in metadata.sorted_tables:
        table.create(conn, checkfirst=True)
        for index in table.indexes:   # a table from before an index existed gains it
            index.create(conn, checkfirst=True)
