"""The study database: one SQLite file in write-ahead-log mode, so readers answering at the same time never block
each other, and an answer is on disk when its request returns (`synchronous=FULL`: a killed server, or a lost
machine, keeps every answer it acknowledged).

Tables: `meta` (the study's settings), `images` (the answer key: origin, arm, labels; never sent to a browser),
`readers` (name, experience, personal token, order seed), `items` (each reader's order), `answers` (one row per
reader and position, written once).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from ..cli import UsageError

DATABASE = "study.sqlite"
IMAGES = "images"  # the re-encoded images, <id>.png
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE images (
    id TEXT PRIMARY KEY, origin TEXT NOT NULL CHECK (origin IN ('real', 'synthetic')), arm TEXT,
    findings TEXT NOT NULL, patient_sex TEXT, view_position TEXT, age_bin TEXT, source_index INTEGER NOT NULL,
    practice INTEGER NOT NULL);
CREATE TABLE readers (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, years REAL, token TEXT NOT NULL UNIQUE,
    seed INTEGER NOT NULL);
CREATE TABLE items (
    reader_id INTEGER NOT NULL REFERENCES readers (id), position INTEGER NOT NULL,
    image_id TEXT NOT NULL REFERENCES images (id), repeat INTEGER NOT NULL, practice INTEGER NOT NULL,
    PRIMARY KEY (reader_id, position));
CREATE TABLE answers (
    reader_id INTEGER NOT NULL, position INTEGER NOT NULL,
    call TEXT NOT NULL CHECK (call IN ('real', 'synthetic')),
    confidence INTEGER NOT NULL CHECK (confidence BETWEEN 1 AND 5),
    quality INTEGER NOT NULL CHECK (quality BETWEEN 1 AND 5),
    findings TEXT NOT NULL, comment TEXT NOT NULL, seconds REAL, answered_at TEXT NOT NULL DEFAULT (datetime('now')),
    PRIMARY KEY (reader_id, position), FOREIGN KEY (reader_id, position) REFERENCES items (reader_id, position));
"""


def connect(folder) -> sqlite3.Connection:
    """A connection to the study in `folder` (one per request: sqlite3 connections stay in their thread)."""
    path = Path(folder) / DATABASE
    if not path.is_file():
        raise UsageError(f"{folder} holds no reader study ({DATABASE}); make one with `create`")
    db = sqlite3.connect(path, timeout=30, isolation_level=None)  # autocommit; writes take explicit transactions
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


@contextmanager
def opened(folder) -> Iterator[sqlite3.Connection]:
    """`connect`, closed at the end of the block (a request's connection)."""
    with closing(connect(folder)) as db:
        yield db


def create(folder) -> sqlite3.Connection:
    path = Path(folder) / DATABASE
    path.parent.mkdir(parents=True, exist_ok=True)
    sqlite3.connect(path).executescript(SCHEMA).close()
    return connect(folder)


def meta(db: sqlite3.Connection) -> dict:
    return {row["key"]: json.loads(row["value"]) for row in db.execute("SELECT key, value FROM meta")}


def reader_by_token(db: sqlite3.Connection, token: str) -> sqlite3.Row | None:
    return db.execute("SELECT * FROM readers WHERE token = ?", (token,)).fetchone()


def next_item(db: sqlite3.Connection, reader_id: int) -> sqlite3.Row | None:
    """The reader's first unanswered item (None: done), so a reader resumes where they stopped, in any browser."""
    return db.execute("""SELECT i.* FROM items i LEFT JOIN answers a ON a.reader_id = i.reader_id
                         AND a.position = i.position WHERE i.reader_id = ? AND a.position IS NULL
                         ORDER BY i.position LIMIT 1""", (reader_id,)).fetchone()


def progress(db: sqlite3.Connection) -> list[dict]:
    """Per reader: name, experience, items answered and in all, the last answer's time (the organiser's page)."""
    return [dict(row) for row in db.execute("""
        SELECT r.name, r.years, (SELECT COUNT(*) FROM answers a WHERE a.reader_id = r.id) AS answered,
               (SELECT COUNT(*) FROM items i WHERE i.reader_id = r.id) AS total,
               (SELECT MAX(answered_at) FROM answers a WHERE a.reader_id = r.id) AS last_answer
        FROM readers r ORDER BY r.id""")]


def record_answer(db: sqlite3.Connection, reader_id: int, position: int, answer: dict) -> bool:
    """Write one answer, committed before this returns; False when that position was already answered (a double
    submit or a second browser): the first answer stands, never overwritten."""
    cursor = db.execute(  # autocommit: one statement, one transaction
        """INSERT OR IGNORE INTO answers (reader_id, position, call, confidence, quality, findings, comment, seconds)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
        (reader_id, position, answer["call"], answer["confidence"], answer["quality"], json.dumps(answer["findings"]),
         answer["comment"], answer.get("seconds")))
    return cursor.rowcount == 1
