"""Job records in SQLite, so status and results survive a server restart."""
from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    status TEXT NOT NULL,
    prompt_id TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT,
    completed_at TEXT,
    billed_seconds INTEGER,
    video_seconds REAL,
    inference_ms INTEGER,
    outputs TEXT NOT NULL DEFAULT '[]',
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
"""


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
    outputs: list[dict[str, str]] = field(default_factory=list)  # {"filename", "subfolder", "type"}
    error: str = ""


class JobStore:
    """Thread-safe access to one SQLite file (one connection, serialised by a lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def insert(self, rec: JobRecord) -> None:
        d = asdict(rec)
        d["request"] = json.dumps(d["request"])
        d["outputs"] = json.dumps(d["outputs"])
        cols = ", ".join(d)
        with self._lock:
            self._db.execute(f"INSERT INTO jobs ({cols}) VALUES ({', '.join('?' * len(d))})", list(d.values()))

    def update(self, job_id: str, **changes: Any) -> None:
        if not changes:
            return
        for key in ("request", "outputs"):
            if key in changes:
                changes[key] = json.dumps(changes[key])
        sets = ", ".join(f"{k} = ?" for k in changes)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", [*changes.values(), job_id])

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            cur = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,))
            row = cur.fetchone()
            names = [c[0] for c in cur.description]
        if row is None:
            return None
        d = dict(zip(names, row))
        d["request"] = json.loads(d["request"])
        d["outputs"] = json.loads(d["outputs"])
        return JobRecord(**d)

