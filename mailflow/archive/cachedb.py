"""The archive's record of what it built: one SQLite file in the output's cache folder.

It holds what used to be two JSON files read and written whole by every build (the manifest
and the thread cache), so that a build after one new message reads and writes a few rows,
whatever the size of the site:

- `manifest`: every published file, its sha256, and its *owner* — the thread whose files it
  is (`"123"`, `"report-7"`), or `""` for the site-wide files. A thread whose inputs did not
  change keeps all its files by owner (`Writer.keep_owner`), without a row being read.
- `threads`: each public thread's cached view (the JSON of `ThreadView`), the files it made,
  its fingerprint, its *probe* (a cheap digest of its rows in the store: see
  `reading.thread_probes`), the key its own pages were rendered under, a summary for the
  listings (`ThreadSummary`) and its line of the data dump.
- `listings`: the key each listing-type file (a page of a list, an authority's files, a part
  of the data dump) was rendered under, with its digest.
- `meta`: the cache's salt (a change of redaction rules or view code empties the cache).

Never published: it lives in the cache folder, like the DKIM results. A damaged file is
removed and the build starts from nothing (as `--full` would).
"""
from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger("mailflow.archive")

INDEX_FILE = "cache.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS manifest (rel TEXT PRIMARY KEY, digest TEXT NOT NULL,
                                     owner TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS manifest_owner ON manifest (owner);
CREATE TABLE IF NOT EXISTS threads (key TEXT PRIMARY KEY, probe TEXT, fp TEXT NOT NULL,
                                    pages_key TEXT, summary TEXT, view TEXT NOT NULL,
                                    files TEXT NOT NULL, pages TEXT, line TEXT);
CREATE TABLE IF NOT EXISTS listings (rel TEXT PRIMARY KEY, key TEXT NOT NULL,
                                     digest TEXT NOT NULL);
"""
# Above this many owners, one scan of the manifest beats a query per owner.
_SCAN_OWNERS = 300


class IndexRow(NamedTuple):
    """What every build reads of each cached thread (the view itself only on demand)."""
    probe: str | None
    fp: str
    pages_key: str | None
    summary: str | None


class CacheDB:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = self._open()
        except sqlite3.DatabaseError as e:
            log.warning("archive: cache %s is damaged (%s): starting again", self.path, e)
            for suffix in ("", "-wal", "-shm", "-journal"):
                self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
            self.conn = self._open()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")   # a commit is durable (one WAL fsync)
            conn.executescript(_SCHEMA)
            conn.execute("SELECT count(*) FROM meta").fetchone()
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self.conn.close()

    # -- transactions ------------------------------------------------------------------------
    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def begin(self) -> None:
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    # -- meta --------------------------------------------------------------------------------
    def get_meta(self, k: str) -> str | None:
        row = self.conn.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
        return row[0] if row else None

    def set_meta(self, k: str, v: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (k, v))

    # -- manifest ----------------------------------------------------------------------------
    def digest(self, rel: str) -> str | None:
        row = self.conn.execute("SELECT digest FROM manifest WHERE rel = ?", (rel,)).fetchone()
        return row[0] if row else None

    def manifest(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT rel, digest FROM manifest"))

    def manifest_size(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM manifest").fetchone()[0])

    def owners(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT DISTINCT owner FROM manifest")}

    def rels_of(self, owners: Iterable[str]) -> list[str]:
        """Every file of these owners."""
        owners = set(owners)
        if not owners:
            return []
        if len(owners) > _SCAN_OWNERS:
            return [rel for rel, owner in self.conn.execute("SELECT rel, owner FROM manifest")
                    if owner in owners]
        out: list[str] = []
        for owner in sorted(owners):
            out.extend(r[0] for r in self.conn.execute(
                "SELECT rel FROM manifest WHERE owner = ?", (owner,)))
        return out

    def put_files(self, rows: Iterable[tuple[str, str, str]]) -> None:
        self.conn.executemany(
            "INSERT OR REPLACE INTO manifest (rel, digest, owner) VALUES (?, ?, ?)", rows)

    def delete_files(self, rels: Iterable[str]) -> None:
        self.conn.executemany("DELETE FROM manifest WHERE rel = ?", ((r,) for r in rels))

    # -- threads -----------------------------------------------------------------------------
    def thread_index(self) -> dict[str, IndexRow]:
        return {key: IndexRow(probe, fp, pages_key, summary)
                for key, probe, fp, pages_key, summary in self.conn.execute(
                    "SELECT key, probe, fp, pages_key, summary FROM threads")}

    def thread_count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM threads").fetchone()[0])

    def thread_keys(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT key FROM threads")}

    def thread_entry(self, key: str) -> dict[str, Any] | None:
        """The whole cached entry of one thread: fp, view (its JSON text), files, pages,
        line."""
        row = self.conn.execute("SELECT fp, view, files, pages, line FROM threads WHERE key = ?",
                                (key,)).fetchone()
        if row is None:
            return None
        fp, view, files, pages, line = row
        return {"fp": fp, "view": view, "files": json.loads(files),
                "pages": json.loads(pages) if pages else None, "line": line}

    def view_json(self, key: str) -> Any:
        row = self.conn.execute("SELECT view FROM threads WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def lines(self, keys: Iterable[str]) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for key in keys:
            row = self.conn.execute("SELECT line FROM threads WHERE key = ?", (key,)).fetchone()
            out[key] = row[0] if row else None
        return out

    def put_thread(self, key: str, *, probe: str | None, fp: str, pages_key: str | None,
                   summary: str | None, view: str, files: dict[str, str],
                   pages: dict[str, Any] | None, line: str | None) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO threads (key, probe, fp, pages_key, summary, view, files, "
            "pages, line) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, probe, fp, pages_key, summary, view,
             json.dumps(files, separators=(",", ":"), sort_keys=True),
             json.dumps(pages, separators=(",", ":"), sort_keys=True) if pages else None, line))

    def delete_threads(self, keys: Iterable[str]) -> None:
        self.conn.executemany("DELETE FROM threads WHERE key = ?", ((k,) for k in keys))

    # -- listings ----------------------------------------------------------------------------
    def listings(self) -> dict[str, list[str]]:
        return {rel: [key, digest] for rel, key, digest in self.conn.execute(
            "SELECT rel, key, digest FROM listings")}

    def set_listings(self, listings: dict[str, list[str]],
                     old: dict[str, list[str]] | None = None) -> None:
        """`old`: the rows the index holds (`listings()`), to write only what differs: a
        build after one message changes a few of them, whatever the size of the site."""
        if old is None:
            self.conn.execute("DELETE FROM listings")
            old = {}
        else:
            self.conn.executemany("DELETE FROM listings WHERE rel = ?",
                                  ((rel,) for rel in old.keys() - listings.keys()))
        self.conn.executemany(
            "INSERT OR REPLACE INTO listings (rel, key, digest) VALUES (?, ?, ?)",
            ((rel, k, d) for rel, (k, d) in listings.items() if old.get(rel) != [k, d]))
