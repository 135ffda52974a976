"""SQLite storage for the web app: review items and reviewers' answers.

Every write is one transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on error), each request uses
its own connection, and the journal is in WAL mode, so concurrent requests neither block readers nor
leave half-written answers. Item ids are random tokens: a blinded Turing-test page never reveals
where an image came from, and nothing a user sends is ever used as a file path.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from melanogan.errors import MelanoganError

SCHEMA_VERSION = 2  # 2 added reviewer_ids (per-reviewer public item ids); a version-1 file is upgraded in place
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    item_id   TEXT PRIMARY KEY,
    task      TEXT NOT NULL CHECK (task IN ('turing', 'review')),
    pool      TEXT NOT NULL CHECK (pool IN ('real', 'synthetic')),
    uid       TEXT NOT NULL,
    label     INTEGER NOT NULL CHECK (label IN (0, 1)),
    diagnosis TEXT,
    dataset   TEXT NOT NULL,
    UNIQUE (task, pool, uid, dataset)
);
CREATE TABLE IF NOT EXISTS reviewer_ids (
    public_id TEXT PRIMARY KEY,
    reviewer  TEXT NOT NULL,
    item_id   TEXT NOT NULL REFERENCES items (item_id),
    UNIQUE (reviewer, item_id)
);
CREATE TABLE IF NOT EXISTS turing_answers (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    reviewer    TEXT NOT NULL,
    item_id     TEXT NOT NULL REFERENCES items (item_id),
    answer      TEXT NOT NULL CHECK (answer IN ('real', 'synthetic')),
    confidence  INTEGER NOT NULL CHECK (confidence BETWEEN 1 AND 5),
    answered_at TEXT NOT NULL,
    UNIQUE (reviewer, item_id)
);
CREATE TABLE IF NOT EXISTS review_answers (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    reviewer       TEXT NOT NULL,
    item_id        TEXT NOT NULL REFERENCES items (item_id),
    probability    REAL NOT NULL,
    threshold      REAL NOT NULL,
    model_decision TEXT NOT NULL,
    agree          INTEGER NOT NULL CHECK (agree IN (0, 1)),
    diagnosis      TEXT NOT NULL,
    comment        TEXT NOT NULL DEFAULT '',
    model_run      TEXT NOT NULL,
    answered_at    TEXT NOT NULL,
    UNIQUE (reviewer, item_id)
);
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ReviewStore:
    """The app's database file. Safe to share between threads: each call opens its own connection."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise MelanoganError(f"--db {self.path}: exists and is not a file.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.transaction() as db:
                for statement in _SCHEMA.split(";"):  # not executescript: it would commit mid-transaction
                    if statement.strip():
                        db.execute(statement)
                row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is None:
                    db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif int(row[0]) == 1:  # the schema above has just added reviewer_ids: nothing else changed
                    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
                elif int(row[0]) != SCHEMA_VERSION:
                    raise MelanoganError(f"--db {self.path}: schema version {row[0]}, this melanogan reads "
                                         f"{SCHEMA_VERSION}. Use another --db file.")
        except sqlite3.DatabaseError as exc:
            raise MelanoganError(f"--db {self.path}: not a melanogan review database ({exc}). "
                                 "Pass a new file name to --db.") from exc

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA busy_timeout = 30000")
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def query(self, sql: str, params: Iterable = ()) -> list[sqlite3.Row]:
        db = self._connect()
        try:
            return db.execute(sql, tuple(params)).fetchall()
        finally:
            db.close()

    # items -----------------------------------------------------------------------------------
    def register_items(self, task: str, dataset: str, rows: Iterable[tuple[str, str, int, str]]) -> int:
        """Add (pool, uid, label, diagnosis) items unless present; ids of existing items never change,
        so answers stay attached across restarts. Returns how many were new."""
        with self.transaction() as db:
            before = db.total_changes
            db.executemany(
                "INSERT INTO items (item_id, task, pool, uid, label, diagnosis, dataset) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (task, pool, uid, dataset) DO NOTHING",
                [(secrets.token_urlsafe(9), task, pool, uid, int(label), diagnosis, dataset)
                 for pool, uid, label, diagnosis in rows])
            return db.total_changes - before

    def item(self, item_id: str) -> sqlite3.Row | None:
        rows = self.query("SELECT * FROM items WHERE item_id = ?", (item_id,))
        return rows[0] if rows else None

    def items(self, task: str, dataset: str | None = None) -> list[sqlite3.Row]:
        if dataset is None:
            return self.query("SELECT * FROM items WHERE task = ?", (task,))
        return self.query("SELECT * FROM items WHERE task = ? AND dataset = ?", (task, dataset))

    def public_id(self, reviewer: str, item_id: str) -> str:
        """The id under which `reviewer` sees `item_id`: random, and different for every reviewer, so
        reviewers cannot pool what they know about an image by its id."""
        with self.transaction() as db:
            db.execute("INSERT INTO reviewer_ids (public_id, reviewer, item_id) VALUES (?, ?, ?) "
                       "ON CONFLICT (reviewer, item_id) DO NOTHING", (secrets.token_urlsafe(12), reviewer, item_id))
            return db.execute("SELECT public_id FROM reviewer_ids WHERE reviewer = ? AND item_id = ?",
                              (reviewer, item_id)).fetchone()[0]

    def resolve_public(self, public_id: str) -> sqlite3.Row | None:
        """(reviewer, item_id) behind a public id, or None."""
        rows = self.query("SELECT reviewer, item_id FROM reviewer_ids WHERE public_id = ?", (public_id,))
        return rows[0] if rows else None

    def answered_item_ids(self, task: str, reviewer: str) -> set[str]:
        table = "turing_answers" if task == "turing" else "review_answers"
        return {r[0] for r in self.query(f"SELECT item_id FROM {table} WHERE reviewer = ?", (reviewer,))}

    # answers ---------------------------------------------------------------------------------
    def add_turing_answer(self, reviewer: str, item_id: str, answer: str, confidence: int) -> bool:
        """Store one answer; False if this reviewer already answered this item (the first answer counts)."""
        with self.transaction() as db:
            cur = db.execute("INSERT INTO turing_answers (reviewer, item_id, answer, confidence, answered_at) "
                             "VALUES (?, ?, ?, ?, ?) ON CONFLICT (reviewer, item_id) DO NOTHING",
                             (reviewer, item_id, answer, int(confidence), _now()))
            return cur.rowcount == 1

    def add_review_answer(self, reviewer: str, item_id: str, probability: float, threshold: float,
                          model_decision: str, agree: bool, diagnosis: str, comment: str, model_run: str) -> bool:
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO review_answers (reviewer, item_id, probability, threshold, model_decision, agree, "
                "diagnosis, comment, model_run, answered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (reviewer, item_id) DO NOTHING",
                (reviewer, item_id, float(probability), float(threshold), model_decision, int(agree), diagnosis,
                 comment, model_run, _now()))
            return cur.rowcount == 1

    def turing_answers(self) -> list[sqlite3.Row]:
        """Every Turing-test answer joined with the truth about its image."""
        return self.query(
            "SELECT a.id, a.reviewer, a.item_id, i.pool AS truth, a.answer, (a.answer = i.pool) AS correct, "
            "a.confidence, i.label, i.diagnosis, i.uid, i.dataset, a.answered_at "
            "FROM turing_answers a JOIN items i USING (item_id) ORDER BY a.id")

    def review_answers(self) -> list[sqlite3.Row]:
        return self.query(
            "SELECT a.id, a.reviewer, a.item_id, i.uid, i.label AS true_label, i.diagnosis AS true_diagnosis, "
            "a.probability, a.threshold, a.model_decision, a.agree, a.diagnosis AS reviewer_diagnosis, a.comment, "
            "a.model_run, i.dataset, a.answered_at FROM review_answers a JOIN items i USING (item_id) ORDER BY a.id")
