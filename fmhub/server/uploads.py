"""Who uploaded which object: proof that they held its bytes (the server checked the sha256).

An object a user uploaded may be named by that user's pushes, and read
back by them, even where no protected branch lets them read it: they had
the bytes already. Kept in ``REPO.git/fmhub/uploads.sqlite`` (one row per
object and user).
"""

from __future__ import annotations

import os
import sqlite3
import threading


class Uploads:
    def __init__(self, repo_path: str) -> None:
        self.path = os.path.join(repo_path, "fmhub", "uploads.sqlite")
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS uploads (oid TEXT NOT NULL, user TEXT NOT NULL, PRIMARY KEY (oid, user))")
            self._db = db
        return self._db

    def add(self, oid: str, user: str) -> None:
        with self._lock:
            self._conn().execute("INSERT OR IGNORE INTO uploads VALUES (?, ?)", (oid, user))

    def by(self, oid: str, user: str) -> bool:
        with self._lock:
            return self._conn().execute("SELECT 1 FROM uploads WHERE oid = ? AND user = ?", (oid, user)).fetchone() is not None
