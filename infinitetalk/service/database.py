"""Which job store a server uses: `open_store` picks the backend from the configured URL or path."""
from __future__ import annotations

from pathlib import Path

from .store import SQLiteStore, Store
from .store_postgres import PostgresStore


def open_store(url_or_path: str | Path) -> Store:
    """`postgresql://…` (or `postgres://…`) opens PostgreSQL (needs psycopg 3); anything else is a SQLite file."""
    text = str(url_or_path)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresStore(text)
    if "://" in text:
        raise RuntimeError(f"INFINITETALK_API_DATABASE_URL={text.split('://')[0]}://…: expected a postgresql:// URL "
                           "(or, unset, the server's SQLite file)")
    return SQLiteStore(text)
