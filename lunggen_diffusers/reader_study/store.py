"""The study database: one SQLite file in write-ahead-log mode, so readers answering at the same time never block
each other, and an answer is on disk when its request returns (`synchronous=FULL`: a killed server, or a lost
machine, keeps every answer it acknowledged).

Tables: `meta` (the study's settings), `images` (the answer key: origin, arm, labels; never sent to a browser),
`readers` (name, experience, personal token, order seed), `items` (each reader's order), `answers` (one row per
reader and position, written once).
"""

from __future__ import annotations

import json
import secrets
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
    """The reader whose token this is, compared in constant time with every reader's (a study has a handful), so the
    time of a refusal tells nothing of how much of a token was right."""
    found = None
    for row in db.execute("SELECT * FROM readers"):
        if secrets.compare_digest(row["token"].encode(), token.encode()):
            found = row
    return found


def is_organiser(db: sqlite3.Connection, token: str) -> bool:
    return secrets.compare_digest(meta(db)["organiser_token"].encode(), token.encode())


def reader_tokens(db: sqlite3.Connection) -> dict[str, str]:
    """Each reader's name and token, in the order they were named (the organiser's links)."""
    return {row["name"]: row["token"] for row in db.execute("SELECT name, token FROM readers ORDER BY id")}


def item_counts(db: sqlite3.Connection, reader_id: int) -> tuple[int, int]:
    """(items in all, practice items) of a reader's order."""
    row = db.execute("SELECT COUNT(*), COALESCE(SUM(practice), 0) FROM items WHERE reader_id = ?",
                     (reader_id,)).fetchone()
    return row[0], row[1]


def shows(db: sqlite3.Connection, reader_id: int, image_id: str) -> bool:
    """Whether the image is in the reader's own order (an image is served to no one else)."""
    return db.execute("SELECT 1 FROM items WHERE reader_id = ? AND image_id = ?",
                      (reader_id, image_id)).fetchone() is not None


def item_at(db: sqlite3.Connection, reader_id: int, position: int) -> sqlite3.Row | None:
    return db.execute("SELECT * FROM items WHERE reader_id = ? AND position = ?", (reader_id, position)).fetchone()


def origin(db: sqlite3.Connection, image_id: str) -> str:
    """The answer key of one image: real or synthetic."""
    return db.execute("SELECT origin FROM images WHERE id = ?", (image_id,)).fetchone()[0]


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


def add_image(db: sqlite3.Connection, image_id: str, origin: str, arm: str | None, findings: list[str] | None,
              labels: dict, source_index: int, practice: int) -> None:
    db.execute("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (image_id, origin, arm, json.dumps(findings), labels["patient_sex"], labels["view_position"],
                labels["age_bin"], source_index, practice))


def add_reader(db: sqlite3.Connection, name: str, years: float | None, token: str, seed: int,
               order: list[tuple[str, int, int]]) -> None:
    """A reader and their order: (image ID, repeat, practice) per position."""
    cursor = db.execute("INSERT INTO readers (name, years, token, seed) VALUES (?, ?, ?, ?)",
                        (name, years, token, seed))
    db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?)",
                   [(cursor.lastrowid, k, image, rep, prac) for k, (image, rep, prac) in enumerate(order)])


def write_meta(db: sqlite3.Connection, settings: dict) -> None:
    db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in settings.items()])


def readings(db: sqlite3.Connection) -> list[dict]:
    """Every non-practice reading joined with the answer key and the reader, `asked` and `seen` as lists."""
    rows = db.execute("""
        SELECT r.name AS reader, r.years, i.position, i.image_id, i.repeat, g.origin, g.arm, g.findings AS asked,
               g.patient_sex, g.view_position, g.age_bin, a.call, a.confidence, a.quality, a.findings AS seen
        FROM answers a JOIN items i ON i.reader_id = a.reader_id AND i.position = a.position
        JOIN readers r ON r.id = a.reader_id JOIN images g ON g.id = i.image_id
        WHERE i.practice = 0 ORDER BY r.id, i.position""").fetchall()
    reads = []
    for row in rows:
        read = dict(row)
        read["asked"], read["seen"] = json.loads(read["asked"]), json.loads(read["seen"])
        reads.append(read)
    return reads


def practice_answers(db: sqlite3.Connection) -> int:
    return db.execute("SELECT COUNT(*) FROM answers a JOIN items i ON i.reader_id = a.reader_id AND "
                      "i.position = a.position WHERE i.practice = 1").fetchone()[0]
