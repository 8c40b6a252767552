"""`build`: the archive from the store, in the order that keeps it honest.

1. Read every thread in one read-only transaction, and gather every private value of every
   thread (including drafts never sent) for the writer's leak check.
2. Build the public view of each sent thread — FOI request or fault report (`reports`) —
   redacted, attachments published or withheld.
3. Render every page, feed and JSON twin from that view, and hand each file to the writer,
   which checks it and stages it.
4. Commit: staged files move into place, files no longer produced go. With `full`, all of
   this happens in a sibling folder that is then swapped in whole.
5. Re-index search with Pagefind if any page changed.

Two caches in the output's `.mailflow-cache/` (never published) keep incremental builds
cheap: DKIM results per raw message (by sha256), so a rebuild never asks DNS again about a
message it has already checked (the signature was made with the key of the day, and it is that
day's answer the reader needs); and each thread's public view (`ThreadCache`), so only threads
whose inputs changed are parsed and redacted again.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import gzip
import hashlib
import hmac
import heapq
import importlib.util
import json
import logging
import operator
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from mailflow import __version__, heap
from mailflow.archive import context as C
from mailflow.archive import feeds
from mailflow.archive import maps
from mailflow.archive import pool
from mailflow.archive import reports as R
from mailflow.archive import reading
from mailflow.archive.cachedb import INDEX_FILE, CacheDB, IndexRow
from mailflow.archive.reading import events_by_thread, message_summaries_by_thread
from mailflow.archive.charts import report_chart
from mailflow.archive.render import SEARCH_CSP, Renderer, authority_json, thread_json
from mailflow.archive.siteindex import SiteIndex
from mailflow.archive.writer import (CACHE_DIR, LeakGuard, Writer, _exchange, load_manifest,
                                     swap_in, sweep_removed,
                                     write_private_json)
from mailflow.core.redaction import PrivatePattern, Redactor, load_redactions, private_values
from mailflow.errors import MailflowError
from mailflow.outbound.signing import verify as dkim_verify
from mailflow.rulesdir import packaged_dir
from mailflow.site import Site

log = logging.getLogger("mailflow.archive")
DnsTxt = Callable[[bytes], bytes | None]


@dataclass
class BuildReport:
    out: Path
    written: int = 0
    unchanged: int = 0
    removed: int = 0
    threads: int = 0
    reports: int = 0
    authorities: int = 0
    search: str = "not run"
    warnings: list[str] = field(default_factory=list)
    written_paths: list[str] = field(default_factory=list)
    removed_paths: list[str] = field(default_factory=list)
    # Attachments not published, for the admin queue: {thread_id, message_id, n, filename,
    # reason}. The build only reads the store; whoever runs it queues these (deduplicated).
    withheld: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def archive_settings(site: Site) -> tuple[Path, str]:
    """(output folder, public base URL ending in "/"), from `[archive]` when the config has it.

    Defaults: `var/archive` beside the config, and the site's `[site] url`.
    """
    a = getattr(site.settings, "archive", None)
    out = getattr(a, "dir", None) or site.settings.base / "var" / "archive"
    base_url = getattr(a, "base_url", None) or site.settings.site.url
    return Path(out), base_url.rstrip("/") + "/"


# -- DKIM, checked once per message --------------------------------------------------------------
class DkimCache:
    """verify() results by raw sha256, kept in the output's cache folder between builds.

    A lookup that failed for a passing reason (a DNS timeout) is not remembered, so the next
    build tries again; a missing key or a bad signature is an answer and is kept.

    The results of a build that adds a few are appended to a journal beside the file
    (`dkim.json.log`, a JSON list a line), not written with all the others: an incremental
    build after one message writes one line, whatever the size of the site. The journal is
    folded into the file once it holds JOURNAL_MAX results (and by a full build).
    """

    JOURNAL_MAX = 2000

    def __init__(self, path: Path, dns_txt: DnsTxt | None):
        self.path = path
        self.journal = path.with_name(path.name + ".log")
        self.dns_txt = dns_txt
        self.added: dict[str, list[Any]] = {}
        self.changed = False
        self.transient = 0      # lookups that failed for a passing reason, this build
        hit = _DKIM_KEPT.get(str(path))
        if hit is not None and hit[0] == self._files():
            # The results this process saved last, the files unchanged since: not read
            # again (an answer per message of the site).
            self.results, self.journaled = hit[1], hit[2]
            return
        try:
            self.results: dict[str, list[Any]] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.results = {}
        self.journaled = 0
        try:
            with open(self.journal, encoding="utf-8") as f:
                for line in f:
                    try:
                        sha, ok, domain = json.loads(line)
                    except (ValueError, TypeError):
                        continue     # a line cut short by a crash: asked again
                    self.results[sha] = [ok, domain]
                    self.journaled += 1
        except OSError:
            pass

    def _files(self, path: Path | None = None) -> tuple[Any, ...]:
        """The file's and its journal's identity and size (None: missing); `path`: the file
        (a full build's, swapped in with both as they are), else this one's."""
        path = path or self.path
        out: list[Any] = []
        for p in (path, path.with_name(path.name + ".log")):
            try:
                st = os.stat(p)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    def __call__(self, sha: str, raw: bytes) -> tuple[bool, str | None]:
        hit = self.results.get(sha)
        if isinstance(hit, list) and len(hit) == 2:
            return bool(hit[0]), hit[1]
        transient = False
        base = self.dns_txt
        if base is None:
            from dkim.dnsplug import get_txt as base_get_txt
            base = base_get_txt

        def lookup(name: bytes) -> bytes | None:
            nonlocal transient
            try:
                return base(name)
            except Exception:
                transient = True
                raise

        try:
            ok, domain = dkim_verify(raw, lookup)
        except Exception:   # whatever DNS raised: not verified today, asked again next build
            ok, domain, transient = False, None, True
        self.transient += transient
        if not transient:
            self.results[sha] = self.added[sha] = [ok, domain]
            self.changed = True
        return ok, domain

    def save(self, path: Path | None = None) -> None:
        """Record the results added by this build; `path`: write them all there (a full
        build's new folder), without a journal."""
        if path is not None or (self.changed and (
                self.journaled + len(self.added) > self.JOURNAL_MAX or not self.path.exists())):
            write_private_json(path or self.path, self.results)
            if path is None:
                self.journal.unlink(missing_ok=True)
                self.journaled = 0
        elif self.changed:
            with open(self.journal, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps([sha, *v], separators=(",", ":")) + "\n"
                                for sha, v in sorted(self.added.items())))
                f.flush()
                os.fsync(f.fileno())
            self.journaled += len(self.added)
        self.added = {}
        self.changed = False
        _DKIM_KEPT[str(self.path)] = (self._files(path), self.results,
                                      0 if path is not None else self.journaled)


# What each `DkimCache.save` of this process left, by file: (`_files`, results, journaled).
_DKIM_KEPT: dict[str, tuple[tuple[Any, ...], dict[str, list[Any]], int]] = {}


# -- threads whose inputs did not change ----------------------------------------------------------
CACHE_VERSION = 3
# The code that shapes a thread's public view: a change to any of them invalidates the cache.
_VIEW_CODE = ("mailflow/archive/context.py", "mailflow/archive/attachments.py",
              "mailflow/archive/reports.py", "mailflow/core/redaction.py",
              "mailflow/mail/sanitise.py", "mailflow/mail/parse.py")


def _fields(obj: Any) -> dict[str, Any]:
    return {f: getattr(obj, f) for f in obj.__dataclass_fields__}


_RULES_JSON: dict[int, tuple[Any, Any]] = {}


def _rules_dict(obj: Any) -> Any:
    """`asdict` of an authority or a law, once per object (the same few for every thread)."""
    if obj is None:
        return None
    hit = _RULES_JSON.get(id(obj))
    if hit is None or hit[0] is not obj:
        hit = _RULES_JSON[id(obj)] = (obj, asdict(obj))
    return hit[1]


class ThreadCache:
    """Each public thread's view from the last build, keyed by a fingerprint of everything it
    was made from (the thread row, its messages, its clock events, its authority and law, the
    redaction rules and the code that makes views; for a fault report also its report row —
    state, fixed_at, place — and the names of its category and area).

    Parsing and redacting mail is most of a build's time; with this, a build after one new
    message parses one thread, not thousands. Each entry also records the thread's own files
    (its page, JSON twin and feed: `pages`) with the key they were rendered under (the view's
    fingerprint, its list state today and the site-level inputs of pages: `pages_salt`), so an
    unchanged thread's files are kept rather than rendered and checked again; so are the
    listing pages whose threads did not change (`listings`, see `_Listings`).

    The entries live in the cache index (`cachedb.CacheDB`, one SQLite file in the output's
    cache folder, so `--full` starts without it), a row per thread. Each row also holds the
    thread's *probe* (`reading.probe`: a digest of its row and of the ids of its messages and
    events, read with a few index scans) and a summary for the listings: a thread whose probe
    and list state are those of the last build is not read, fingerprinted or decoded at all
    (`rows`, `ThreadSummary`).
    """

    def __init__(self, index: CacheDB, salt: bytes, rows: dict[str, IndexRow] | None = None):
        """`rows`: the index's thread rows, when the caller knows them (`_Memory`)."""
        self.index = index
        self.salt = salt
        valid = index.get_meta("salt") == salt.hex()
        if rows is None or not valid:
            rows = index.thread_index() if valid else {}
        self.rows: dict[str, IndexRow] = rows
        self.old_keys: set[str] = set(self.rows) if valid else index.thread_keys()
        self.listings: dict[str, list[str]] = index.listings()  # page -> [key, digest]
        self.old_listings = self.listings       # as the index holds them
        self.fresh: dict[str, Any] = {}    # entries made or checked by this build
        self.written_pages: dict[str, str] = {}  # key -> page key, own files written already
        self.alive: set[str] = set()       # entries kept as they are (not read)

    @staticmethod
    def salt_for(site: Site, redactions: str) -> bytes:
        h = hashlib.sha256(f"{CACHE_VERSION}:{__version__}:{site.domain}:".encode())
        h.update(redactions.encode("utf-8"))
        root = Path(__file__).resolve().parent.parent.parent
        for rel in _VIEW_CODE:
            p = root / rel
            h.update(p.read_bytes() if p.exists() else rel.encode())
        return h.digest()

    def fingerprint(self, inp: C.ThreadInput, authority: Any, law: Any,
                    extra: list[Any] | None = None) -> str:
        t = inp.thread
        # Shallow dicts: `asdict` deep-copies every value, and the JSON below is the same.
        data = [_fields(t),
                [(m.id, m.kind, m.direction, m.hidden, m.raw_sha256, m.created_at, m.subject,
                  m.from_name, hashlib.sha256(m.text.encode("utf-8", "replace")).hexdigest())
                 for m in inp.messages if (m.direction, m.kind) in C.SHOWN or m.kind == "response"],
                [e for e in inp.events if e["kind"] in ("clock", "attachment_released")],
                _rules_dict(authority), _rules_dict(law)]
        if extra is not None:
            data.append(extra)
        h = hashlib.sha256(self.salt)
        h.update(json.dumps(data, default=str, sort_keys=True).encode("utf-8"))
        return h.hexdigest()

    def get(self, t: Any, fp: str, writer: Writer, today: date) -> C.ThreadView | None:
        """The cached view, if its fingerprint matches and its files are on disk as written
        (they are then kept in the manifest without being produced again)."""
        view = self._get(str(t.id), fp, writer, C.view_from_dict)
        return replace(view, list_state=C.list_state(t, today)) if view is not None else None

    def get_report(self, t: Any, fp: str, writer: Writer) -> R.ReportView | None:
        return self._get(f"report-{t.id}", fp, writer, R.view_from_dict)

    def _get(self, key: str, fp: str, writer: Writer, decode: Callable[[Any], Any]) -> Any:
        row = self.rows.get(key)
        if row is None or row.fp != fp:
            return None
        e = self.index.thread_entry(key)
        if e is None or not all(writer.has(r, d) for r, d in e["files"].items()):
            return None
        try:
            view = decode(json.loads(e["view"]))
        except (KeyError, TypeError, ValueError):
            return None
        for rel, digest in e["files"].items():
            writer.keep(rel, digest)
        self.fresh[key] = {"fp": fp, "view": e["view"], "files": e["files"],
                           "pages": e["pages"]}
        return view

    def put(self, t: Any, fp: str, view: C.ThreadView, files: dict[str, str],
            view_json: str | None = None) -> None:
        """`view_json`: `_view_json(view)`, when a view worker made it already."""
        self.fresh[str(t.id)] = {"fp": fp, "view": view_json or _view_json(view), "files": files,
                                 "pages": None}

    def put_report(self, t: Any, fp: str, view: R.ReportView, files: dict[str, str]) -> None:
        self.fresh[f"report-{t.id}"] = {"fp": fp, "files": files,
                                        "view": json.dumps(R.view_to_dict(view),
                                                           ensure_ascii=False),
                                        "pages": None}

    def keep_pages(self, key: str, pages_key: str, writer: Writer) -> bool:
        """Keep the thread's own files if they were rendered under `pages_key` and are on
        disk as written; False if they must be rendered."""
        if self.written_pages.get(key) == pages_key:   # written with the view, this build
            return True
        e = self.fresh.get(key)
        pages = e.get("pages") if e else None
        if (not pages or pages.get("key") != pages_key
                or not all(writer.has(r, d) for r, d in pages["files"].items())):
            return False
        for rel, digest in pages["files"].items():
            writer.keep(rel, digest)
        return True

    def put_pages(self, key: str, pages_key: str, files: dict[str, str]) -> None:
        """Record the thread's files as rendered now (only for a view that is cached)."""
        e = self.fresh.get(key)
        if e is not None:
            e["pages"] = {"key": pages_key, "files": files}

    def save(self) -> None:
        """Write the entries made or checked by this build, drop those of threads no longer
        public, in the index's open transaction."""
        index = self.index
        for key, e in self.fresh.items():
            pages = e.get("pages")
            index.put_thread(key, probe=e.get("probe"), fp=e["fp"],
                             pages_key=pages["key"] if pages else None,
                             summary=e.get("summary"), view=e["view"], files=e["files"],
                             pages=pages, line=e.get("line"))
        index.delete_threads(self.old_keys - self.alive - set(self.fresh))
        index.set_meta("salt", self.salt.hex())
        index.set_listings(self.listings, self.old_listings)


def _view_json(v: C.ThreadView) -> str:
    """`C.view_to_dict(v)` as JSON text, without `asdict`'s deep copies (the views are
    frozen dataclasses of plain values: the same dict, built directly)."""
    d = dict(v.__dict__)
    d["messages"] = [
        {**m.__dict__, "attachments": [dict(a.__dict__) for a in m.attachments],
         "dkim": dict(m.dkim.__dict__) if m.dkim is not None else None}
        for m in v.messages]
    return json.dumps(d, default=_iso_default, ensure_ascii=False)


def _iso_default(o: Any) -> str:
    return o.isoformat()


class ThreadSummary:
    """What the site-wide files need of a thread whose files were kept (lists, authority
    pages and records, the sitemap, counts), from its cache row; its messages are decoded
    only if asked for (`messages`: the newest threads, for the feeds and the home page)."""

    FIELDS = ("id", "slug", "title", "authority", "authority_name", "law_name", "state",
              "list_state", "sent", "first_response", "answered_in_time", "last_activity",
              "top", "responses")
    __slots__ = (*FIELDS, "pages_key", "_load", "_view")

    def __init__(self, values: list[Any], pages_key: str | None,
                 load: Callable[[str], C.ThreadView]):
        (self.id, self.slug, self.title, self.authority, self.authority_name, self.law_name,
         self.state, self.list_state, sent, first, self.answered_in_time, last, top,
         self.responses) = values
        self.sent = date.fromisoformat(sent)
        self.first_response = date.fromisoformat(first) if first else None
        self.last_activity = datetime.fromisoformat(last)
        self.top = (datetime.fromisoformat(top[0]), top[1]) if top else None
        self.pages_key = pages_key
        self._load = load
        self._view: C.ThreadView | None = None

    @staticmethod
    def encode(t: C.ThreadView) -> str:
        top = _top(t)
        return json.dumps([t.id, t.slug, t.title, t.authority, t.authority_name, t.law_name,
                           t.state, t.list_state, t.sent.isoformat(),
                           t.first_response.isoformat() if t.first_response else None,
                           t.answered_in_time, t.last_activity.isoformat(),
                           [top[0].isoformat(), top[1]] if top else None,
                           sum(1 for m in t.messages if m.kind == "response")],
                          ensure_ascii=False)

    def full(self) -> C.ThreadView:
        if self._view is None:
            self._view = replace(self._load(str(self.id)), list_state=self.list_state)
        return self._view

    @property
    def messages(self) -> tuple[C.MessageView, ...]:
        return self.full().messages

    path = C.ThreadView.path
    id_path = C.ThreadView.id_path
    state_words = C.ThreadView.state_words
    days_to_answer = C.ThreadView.days_to_answer


def _top(t: Any) -> tuple[datetime, int] | None:
    """The (time, number) of a thread's newest public message: the feeds and the home page
    show the newest messages of the site, which are all in the threads with the newest."""
    if isinstance(t, ThreadSummary):
        return t.top
    return max(((m.at, m.pk) for m in t.messages if m.placeholder is None), default=None)


def _newest(threads: Any, n: int) -> list[Any]:
    """The `n` threads with the newest public messages: the newest `n` messages of `threads`
    are all in these (each of those threads has one of them as its newest)."""
    return heapq.nlargest(n, (t for t in threads if _top(t) is not None), key=_top)


def _responses(t: Any) -> int:
    if isinstance(t, ThreadSummary):
        return t.responses
    return sum(1 for m in t.messages if m.kind == "response")


# The code and data a thread's own files are rendered with, besides its view: a change to any
# of them renders every thread's files again.
_PAGE_CODE = ("mailflow/archive/render.py", "mailflow/archive/feeds.py",
              "mailflow/archive/build.py", "mailflow/archive/charts.py",
              "mailflow/archive/context.py", "mailflow/archive/cachedb.py",
              "mailflow/templating.py", "mailflow/i18n.py")


def _tree_digest(h: Any, folder: Path | None) -> None:
    if folder is None or not folder.is_dir():
        h.update(b"-")
        return
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode("utf-8", "surrogateescape") + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())


def pages_salt(site: Site, sv: C.SiteView) -> str:
    """Everything besides a thread's view that its page, JSON twin and feed depend on: the
    site's name, base URL and language, whether the site takes fault reports (the menu), the
    templates (shipped and the site's own), the translations and the rendering code."""
    return _pages_salt(site, sv.name, sv.base_url, sv.reports is not None)


def _pages_salt(site: Site, name: str, base_url: str, reports: bool) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}:{__version__}:".encode())
    h.update(json.dumps([name, base_url, site.settings.site.language,
                         reports]).encode("utf-8"))
    root = Path(__file__).resolve().parent.parent.parent
    for rel in _PAGE_CODE:
        p = root / rel
        h.update(p.read_bytes() if p.exists() else rel.encode())
    _tree_digest(h, packaged_dir("templates"))
    _tree_digest(h, site.settings.site.templates)
    _tree_digest(h, root / "mailflow" / "locale")
    return h.hexdigest()


# -- private values already checked --------------------------------------------------------------
SECRETS_FILE = "secrets.bin"


def _secret_digest(value: str, key: bytes) -> bytes:
    """A private value's fingerprint in `secrets.bin`: an HMAC keyed by the site's secret (in
    config.toml, never in the archive), so the file says nothing to someone who guesses an
    address, should `.mailflow-cache/` ever be published with the archive around it."""
    return hmac.new(key, value.strip().lower().encode("utf-8"), hashlib.sha256).digest()[:16]


_KNOWN: list[Any] = [None, None]    # (path, size, mtime_ns), digests: the last file read


def load_secret_digests(path: Path) -> set[bytes] | None:
    """The digests (never the values) of the private values the last build checked against;
    None when there is no record (nothing kept can then be trusted unchecked)."""
    try:
        st = path.stat()
        stamp = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        if _KNOWN[0] == stamp:
            return _KNOWN[1]  # type: ignore[no-any-return]
        data = path.read_bytes()
    except OSError:
        return None
    found = {data[i:i + 16] for i in range(0, len(data) - len(data) % 16, 16)}
    _KNOWN[:] = [stamp, frozenset(found)]
    return found


def save_secret_digests(path: Path, digests: set[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(b"".join(sorted(digests)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    st = path.stat()
    _KNOWN[:] = [(str(path), st.st_size, st.st_mtime_ns, st.st_ino), frozenset(digests)]


# -- search ---------------------------------------------------------------------------------------
def pagefind_available() -> bool:
    return importlib.util.find_spec("pagefind") is not None


def run_pagefind(root: Path) -> str:
    """Index the site with Pagefind's binary (from `pagefind[extended]`), then swap the new
    index in whole so a search never reads half an index."""
    if not pagefind_available():
        return "skipped: pagefind is not installed (pip install 'pagefind[extended]')"
    tmp = root / CACHE_DIR / "pagefind-new"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pagefind", "--site", str(root), "--output-path", str(tmp),
           "--silent"]
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"failed: {e}"
    if r.returncode != 0 or not (tmp / "pagefind-ui.js").exists():
        detail = (r.stderr or r.stdout).decode("utf-8", "replace").strip()[-500:]
        return f"failed: pagefind exited {r.returncode}: {detail}"
    final = root / "pagefind"
    if not final.exists():
        os.replace(tmp, final)
    elif _exchange(tmp, final):
        shutil.rmtree(tmp)
    else:
        old = root / CACHE_DIR / "pagefind-old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    return "indexed"


# Pagefind re-indexes the whole site (about a minute at 10,000 pages: it has no incremental
# mode), so a long-running process runs it apart from the builds, at most this often.
SEARCH_INTERVAL = 300.0
_search_lock = threading.Lock()
_search_timers: dict[Path, threading.Timer] = {}   # pending or running, per folder
_search_last: dict[Path, threading.Timer] = {}     # the latest started (to wait for it)


def refresh_search(out: Path, *, min_interval: float = 0.0) -> str:
    """Index the published site with Pagefind if pages changed since the index was made
    (the builds mark it stale), and if it last ran at least `min_interval` seconds ago.

    Runs beside builds rather than inside one: the stale mark is cleared before Pagefind
    starts, so a build that changes pages meanwhile marks it again and the next run picks
    that up; a failed run marks it again too. The new index is swapped in whole
    (`run_pagefind`). Returns "indexed", "unchanged", "later", "busy", or the failure."""
    out = Path(out).resolve()
    cache = out / CACHE_DIR
    stale, ran = cache / "search-stale", cache / "search-ran"
    cache.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.search.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "busy"
        try:
            if not stale.exists() and (out / "pagefind").exists():
                return "unchanged"
            try:
                since = time.time() - ran.stat().st_mtime
            except OSError:
                since = float("inf")
            if since < min_interval:
                return "later"
            stale.unlink(missing_ok=True)
            ran.touch()
            status = run_pagefind(out)
            if status != "indexed":
                stale.touch()
            return status
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def search_in_background(out: Path, min_interval: float = SEARCH_INTERVAL) -> str:
    """Start `refresh_search` in a thread of this process, now if it last ran more than
    `min_interval` ago, else when that much time has passed (one pending run per folder).
    For the daemon: a build publishes pages at once and search catches up within minutes."""
    out = Path(out).resolve()
    try:
        since = time.time() - (out / CACHE_DIR / "search-ran").stat().st_mtime
    except OSError:
        since = float("inf")
    delay = max(0.0, min_interval - since)

    def run() -> None:
        with _search_lock:
            _search_timers.pop(out, None)
        status = refresh_search(out, min_interval=0.0)
        if status not in ("indexed", "unchanged", "busy"):
            log.warning("archive search: %s", status)

    with _search_lock:
        if out in _search_timers:
            return "scheduled"
        timer = threading.Timer(delay, run)
        timer.daemon = True    # a stale index is marked on disk: the next process catches up
        _search_timers[out] = _search_last[out] = timer
        timer.start()
    return "scheduled" if delay else "started"


# -- the build ------------------------------------------------------------------------------------
class ArchiveBusy(MailflowError):
    """Another process (on this machine or, on PostgreSQL, any machine) is building."""


@contextlib.contextmanager
def _locked(out: Path, wait: bool = True) -> Iterator[None]:
    """One build at a time per output folder (the daemon's and an admin's, say). The lock file
    sits beside the folder, so it survives a full rebuild swapping the folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArchiveBusy(f"another process is building {out}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _writer_key(site: Site) -> int:
    """The site's advisory-lock number: the same on every machine that serves the site."""
    digest = hashlib.sha256(f"mailflow-archive:{site.domain}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def _one_writer(site: Site, out: Path, wait: bool = True) -> Iterator[None]:
    """One archive writer for the whole site. Several daemons sharing a PostgreSQL database
    take a session advisory lock on a connection of its own (released by PostgreSQL if the
    holder dies), so any instance can take over; on SQLite one machine is all there is, and
    the file lock is enough."""
    with _locked(out, wait):
        engine = site.store.engine
        if engine.dialect.name != "postgresql":
            yield
            return
        from sqlalchemy import text as sql
        with engine.connect() as conn:
            key = _writer_key(site)
            if wait:
                conn.execute(sql("SELECT pg_advisory_lock(:k)"), {"k": key})
            elif not conn.execute(sql("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                conn.rollback()
                raise ArchiveBusy("another instance of this site is building the archive")
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sql("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()


def build(site: Site, out: Path | None = None, full: bool = False, *,
          dns_txt: DnsTxt | None = None, today: date | None = None,
          search: bool | str = True, wait: bool = True) -> BuildReport:
    """Build (or bring up to date) the public archive; returns what was written.

    `out`: the output folder (default: `[archive] dir`). `full`: rebuild everything aside and
    swap it in. `dns_txt`: the DNS TXT lookup for DKIM checks (default: real DNS). `today`:
    the date that decides which requests are overdue (default: today, UTC). `search`: run
    Pagefind afterwards when pages changed; "background": leave it to a thread of this
    process, at most every SEARCH_INTERVAL seconds (`search_in_background`: what a daemon
    wants, as Pagefind takes about a minute at 10,000 pages). `wait`: False raises ArchiveBusy at once when
    another writer holds the site's archive (the daemon then tries again later).
    """
    started = time.monotonic()
    default_out, base_url = archive_settings(site)
    out = Path(out or default_out).resolve()
    today = today or datetime.now(timezone.utc).date()
    with _one_writer(site, out, wait):
        if full:
            sweep_removed(out)
            work = out.with_name(f".{out.name}.new-{os.getpid()}")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
        else:
            work = out
            work.mkdir(parents=True, exist_ok=True)
        previous = load_manifest(out) if full else {}
        dkim = DkimCache(out / CACHE_DIR / "dkim.json", dns_txt)
        try:
            report = _build_into(site, work, base_url, today, dkim, fresh=full,
                                 memory_key=_memory_key(site, out))
            if full:
                dkim.save(work / CACHE_DIR / "dkim.json")
                report.removed_paths = sorted(set(previous) - set(load_manifest(work)))
                report.removed = len(report.removed_paths)
            else:
                dkim.save()
            # The index is stale from a page change until Pagefind has run successfully.
            stale = work / CACHE_DIR / "search-stale"
            if any(p.endswith(".html") for p in report.written_paths + report.removed_paths):
                stale.touch()
            if not search:
                report.search = "not run"
            elif full:
                report.search = run_pagefind(work)   # the new folder has no index yet
                if report.search == "indexed":
                    stale.unlink(missing_ok=True)
            elif not stale.exists() and (out / "pagefind").exists():
                report.search = "unchanged"
            elif search == "background":
                report.search = search_in_background(out)
            else:
                report.search = refresh_search(out)
            if not report.search.startswith(("indexed", "unchanged", "not run", "scheduled",
                                              "started")):
                report.warnings.append(f"search: {report.search}")
            if full:
                swap_in(work, out)
        except BaseException:
            if full:
                shutil.rmtree(work, ignore_errors=True)
            raise
    report.out = out
    report.seconds = round(time.monotonic() - started, 3)
    for w in report.warnings:
        log.warning("archive: %s", w)
    return report


# Private values per thread, remembered for the life of the process (the daemon builds again
# after every message; a thread's values change only with its address or its tokens), and the
# leak guard of the last build (the same values make the same guard).
_SECRETS: dict[tuple[Any, ...], tuple[list[tuple[str, str]], list[bytes]]] = {}
_GUARD: list[Any] = [None, None, None, None]


def _thread_secrets(r: reading.ThreadRow, domain: str, dkey: bytes
                    ) -> tuple[tuple[Any, ...], list[tuple[str, str]], list[bytes]]:
    key = (r.id, r.kind, r.citizen_email, r.request_token, r.reply_token, r.confirm_token,
           domain, dkey)
    hit = _SECRETS.get(key)
    if hit is None:
        if len(_SECRETS) > 1_000_000:
            _SECRETS.clear()
        # Literal secrets only: the patterns (any thread-shaped address, a local part as a
        # word) are for redaction, too broad to scan other threads' pages with.
        values = [(v, label) for v, label in private_values(r, domain)  # type: ignore[arg-type]
                  if not isinstance(v, PrivatePattern)]
        hit = _SECRETS[key] = (values, [_secret_digest(v, dkey) for v, _ in values])
    return key, hit[0], hit[1]


def _guard(site: Site, rows: list[reading.ThreadRow]
           ) -> tuple[LeakGuard, list[tuple[str, str]], set[bytes]]:
    """The guard against every private value of every thread (drafts never sent included),
    the values, and their digests."""
    secret = site.settings.site.secret
    domain = site.domain
    gkey = (secret, tuple((r.id, r.kind, r.citizen_email, r.request_token, r.reply_token,
                           r.confirm_token, domain) for r in rows))
    if _GUARD[0] == gkey:      # the same threads' values as the last build of this process
        return _GUARD[1], _GUARD[2], _GUARD[3]
    secrets: list[tuple[str, str]] = [(secret, "the site's secret")]
    dkey = secret.encode("utf-8")
    digests = {_secret_digest(secret, dkey)}
    for r in rows:
        _, values, found = _thread_secrets(r, domain, dkey)
        secrets.extend(values)
        digests.update(found)
    _GUARD[:] = [gkey, LeakGuard(secrets), secrets, digests]
    return _GUARD[1], secrets, digests


# The summaries this process decoded, by thread key: the same row (summary and page key)
# makes the same summary, so a daemon decodes only what changed since its last build.
_SUMMARIES: dict[str, tuple[str, ThreadSummary]] = {}


def _summary(key: str, row: IndexRow, load: Callable[[str], C.ThreadView]) -> ThreadSummary:
    hit = _SUMMARIES.get(key)
    if hit is not None and hit[0] == row.summary and hit[1].pages_key == row.pages_key:
        if hit[1]._load is load:
            return hit[1]
        # Another archive's (another loader): a copy of its own, as a process that builds
        # two archives keeps each one's summaries (`_Memory.kept`) between builds.
        made = object.__new__(ThreadSummary)
        for name in ThreadSummary.__slots__:
            setattr(made, name, getattr(hit[1], name))
        made._load = load
        _SUMMARIES[key] = (row.summary, made)  # type: ignore[assignment]
        return made
    if len(_SUMMARIES) > 1_000_000:
        _SUMMARIES.clear()
    made = ThreadSummary(json.loads(row.summary), row.pages_key, load)  # type: ignore[arg-type]
    _SUMMARIES[key] = (row.summary, made)  # type: ignore[assignment]
    return made


class _ViewLoader:
    """Loads a kept thread's whole view from the cache index of the build under way: the
    summaries this process keeps between builds hold this one object, re-pointed at each
    build's index (never at a closed one)."""

    def __init__(self) -> None:
        self.index: CacheDB | None = None

    def __call__(self, key: str) -> C.ThreadView:
        return C.view_from_dict(self.index.view_json(key))  # type: ignore[union-attr]


@dataclass
class _Memory:
    """What a process knows after building an archive, so that its next build of the same
    archive visits only the threads changed since (`reading.changed_threads`): every
    thread's row, the cache index's thread rows as that build left them, and the kept
    threads' summaries. It stands only while the cache index is the one that build wrote
    (`generation`), the day is the same (list states: overdue...), and so are the rules,
    the redactions and code (`salt`), and the pages' inputs (`psalt`); else the build reads
    everything, as a new process does. (The index holding as many threads as it did is a
    cheap check against rows deleted by hand to have views made again.)"""
    generation: str
    mark: int                                # reading.watermark of that build
    today: date
    salt: bytes
    psalt: str
    rules: tuple[Any, ...]                   # _rules_identity
    rows: dict[int, reading.ThreadRow]       # every thread
    index: dict[str, IndexRow]               # the cache's thread rows
    kept: dict[str, ThreadSummary]           # public FOI threads whose files stand
    revisit: set[int]                        # public FOI threads to look at again
    loader: _ViewLoader
    guard: tuple[LeakGuard, list[tuple[str, str]], set[bytes]] | None  # _guard's answer
    owners: set[str] | None                  # Writer.owners_now: the manifest's owners
    reports: set[int]                        # public fault reports (always looked at)
    site: SiteIndex | None = None            # the public FOI threads, grouped and ordered


# By (database, output folder): the daemon builds the same archive after every message.
_MEMORY: dict[tuple[str, str], _Memory] = {}
_LOADERS: dict[tuple[str, str] | None, _ViewLoader] = {}


def _rules_identity(site: Site) -> tuple[Any, ...]:
    """The authorities and laws as objects (rules are read into new ones when they change):
    a thread's probe has its own authority's and law's digest in it (`_rules_key`)."""
    rules = site.rules
    return (tuple(rules.authorities.items()), tuple(rules.laws.items()))


def _secret_key(r: reading.ThreadRow) -> tuple[Any, ...]:
    """What a thread's private values are made from (`_thread_secrets`)."""
    return (r.id, r.kind, r.citizen_email, r.request_token, r.reply_token, r.confirm_token)


def _unchanged(row: IndexRow | None, probe: str, psalt: str, r: reading.ThreadRow,
               today: date) -> bool:
    """Whether a thread's files stand as the last build left them: its probe (its row, the
    ids of its messages, hidden ones and events) and list state are as they were."""
    return (row is not None and row.probe == probe and row.summary is not None
            and row.pages_key == _pages_key(psalt, row.fp,
                                            C.list_state(r, today)))  # type: ignore[arg-type]


def _remember(cache: ThreadCache, kept: dict[str, ThreadSummary],
              need: list[tuple[reading.ThreadRow, str | None]],
              rows: dict[int, reading.ThreadRow], psalt: str, today: date, mark: int,
              generation: str, rules_id: tuple[Any, ...], loader: _ViewLoader,
              guard: tuple[LeakGuard, list[tuple[str, str]], set[bytes]],
              owners: set[str] | None, reports: set[int], site: SiteIndex) -> _Memory:
    """What the next build of this archive in this process starts from: the cache index as
    `cache.save` left it, and which threads it will keep. A thread looked at now is kept
    next time if its entry passes the same test (`_unchanged`) a full look would make; one
    that does not (a DKIM answer that may change was not cached) is looked at again."""
    index = cache.rows
    for key in cache.old_keys - cache.alive - set(cache.fresh):
        index.pop(key, None)
    for key, e in cache.fresh.items():
        pages = e.get("pages")
        index[key] = IndexRow(e.get("probe"), e["fp"], pages["key"] if pages else None,
                              e.get("summary"))
    revisit: set[int] = set()
    for r, probe in need:
        if R.is_public(r):
            continue
        key = str(r.id)
        row = index.get(key)
        if probe is not None and _unchanged(row, probe, psalt, r, today):
            kept[key] = _summary(key, row, loader)  # type: ignore[arg-type]
        else:
            revisit.add(r.id)
    # The views made now are kept summaries next time: in the site index too, in place.
    site.replace(lambda tid: kept.get(str(tid)))
    return _Memory(generation=generation, mark=mark, today=today, salt=cache.salt,
                   psalt=psalt, rules=rules_id, rows=rows, index=index, kept=kept,
                   revisit=revisit, loader=loader, guard=guard, owners=owners,
                   reports=reports, site=site)


# A process's memory of a site of this many threads or more is kept out of the garbage
# collector's full passes (`_settle`).
SETTLE_THREADS = 500


def _settle() -> None:
    """`mailflow.heap.settle`: what a process keeps of a large site between builds (a row,
    an index row, a summary and site-index entries per thread, the caches) is long-lived,
    and Python walks all of it at every full collection, which it makes every few builds
    once enough new objects have survived: 120-140 ms of CPU at 10,000 threads, in whichever
    build or message it falls on."""
    heap.settle()


def _memory_key(site: Site, out: Path) -> tuple[str, str]:
    return (str(site.store.engine.url), str(Path(out).resolve()))


def _open_index(root: Path) -> CacheDB:
    """The output's cache index; an archive built before it had `manifest.json` and
    `threads.json`: their manifest is taken over (each file then belongs to the site, so any
    the first build does not produce is removed), the old thread cache is dropped."""
    cache_dir = root / CACHE_DIR
    index = CacheDB(cache_dir / INDEX_FILE)
    legacy = cache_dir / "manifest.json"
    if legacy.exists():
        if index.manifest_size() == 0:
            files = load_manifest(root)
            index.begin()
            index.put_files((rel, digest, "") for rel, digest in files.items())
            index.commit()
        legacy.unlink()
        (cache_dir / "threads.json").unlink(missing_ok=True)
    return index


def _pages_key(salt: str, fp: str, list_state: str) -> str:
    return hashlib.sha256(f"{salt}:{fp}:{list_state}".encode()).hexdigest()


def _rules_key(site: Site, r: reading.ThreadRow, memo: dict[tuple[str, str], bytes]) -> bytes:
    """A digest of the thread's authority and law as the rules have them now."""
    k = (r.authority, r.law)
    hit = memo.get(k)
    if hit is None:
        hit = memo[k] = hashlib.sha256(json.dumps(
            [_rules_dict(site.rules.authorities.get(r.authority)),
             _rules_dict(site.rules.laws.get(r.law))],
            default=str, sort_keys=True).encode("utf-8")).digest()
    return hit


def _build_into(site: Site, root: Path, base_url: str, today: date,
                verify: DkimCache, fresh: bool = False,
                memory_key: tuple[str, str] | None = None) -> BuildReport:
    """`memory_key`: the archive's key in `_MEMORY` (its final folder), to build from what
    this process knows of it, and to leave what the next build needs there."""
    path = site.settings.site.rules / "redactions.toml"
    redactions = path.read_text(encoding="utf-8") if path.exists() else ""
    rules = load_redactions(redactions, str(path)) if redactions else []
    index = _open_index(root)
    salt = ThreadCache.salt_for(site, redactions)
    rules_id = _rules_identity(site)
    mem = _MEMORY.pop(memory_key, None) if memory_key is not None else None
    if mem is not None and (fresh or mem.today != today or mem.salt != salt
                            or mem.rules != rules_id
                            or mem.generation != index.get_meta("generation")
                            or len(mem.index) != index.thread_count()):
        mem = None
    cache = ThreadCache(index, salt, rows=mem.index if mem is not None else None)
    views: list[Any] = []     # ThreadView (made, or from the cache) or ThreadSummary (kept)
    report_views: list[R.ReportView] = []
    writer: Writer | None = None
    secrets_path = root / CACHE_DIR / SECRETS_FILE
    report_rules = getattr(site.rules, "reports", None)
    load_view = mem.loader if mem is not None else _LOADERS.setdefault(memory_key, _ViewLoader())
    load_view.index = index
    kept: dict[str, ThreadSummary] = {}
    index_of_site: SiteIndex | None = None
    touched: set[int] = set()    # the threads whose entry in the kept site index may change

    try:
        with site.store.read() as tx:
            mark = reading.watermark(tx)
            changed: set[int] = set()
            if mem is not None:
                # Only the threads changed since that build are read again.
                changed = reading.changed_threads(tx, mem.mark)
                rows = mem.rows
                before = sorted(_secret_key(rows[i]) for i in changed if i in rows)
                for i in changed:
                    if i in rows:
                        del rows[i]
                for r in reading.thread_rows(tx, changed):
                    rows[r.id] = r
                same_secrets = before == sorted(_secret_key(rows[i]) for i in changed
                                                if i in rows)
            else:
                rows = {r.id: r for r in reading.thread_rows(tx)}
                same_secrets = False
            # The private values' digests are those the last build (of this process, which
            # wrote the cache index as it stands) saved: nothing to read or compare.
            saved_digests: set[bytes] | None = None
            if same_secrets and mem is not None and mem.guard is not None:
                guard, secrets, digests = mem.guard
                saved_digests = digests
            else:
                guard, secrets, digests = _guard(site, sorted(rows.values(), key=_ID))
            writer = Writer(root, guard, fresh=fresh, index=index)
            if mem is not None:
                writer.known_owners = mem.owners
                report_ids = mem.reports
                for i in changed:
                    report_ids.discard(i)
                    if i in rows and R.is_public(rows[i]):
                        report_ids.add(i)
            else:
                report_ids = {r.id for r in rows.values() if R.is_public(r)}
            reports_public = bool(report_ids)
            psalt = _pages_salt(site, site.settings.site.name, base_url,
                                report_rules is not None or reports_public)
            if mem is not None and mem.psalt == psalt:
                # The threads kept by that build stand, but for those changed since (and
                # fault reports, always looked at).
                kept = mem.kept
                visit = changed | mem.revisit
                for i in visit:
                    kept.pop(str(i), None)
                candidates = [rows[i] for i in sorted(visit | report_ids) if i in rows]
                index_of_site = mem.site
                touched = visit
            else:
                mem = None
                candidates = sorted(rows.values(), key=_ID)
            public = [r for r in candidates if R.is_public(r) or C.is_public(r)]
            # What changed since the last build: a thread whose probe (its row, the ids of
            # its messages, hidden ones and events) and list state are as they were keeps
            # its files, and its summary stands in for its view (nothing else is read).
            probes = (reading.thread_probes(tx, None if mem is None else
                                            [r.id for r in public if not R.is_public(r)])
                      if public else None)
            rules_memo: dict[tuple[str, str], bytes] = {}
            need: list[tuple[reading.ThreadRow, str | None]] = []
            for r in public:
                if R.is_public(r):
                    need.append((r, None))
                    continue
                key = str(r.id)
                probe = reading.probe(cache.salt, r, probes(r.id),  # type: ignore[misc]
                                      _rules_key(site, r, rules_memo))
                row = cache.rows.get(key)
                if _unchanged(row, probe, psalt, r, today):
                    kept[key] = _summary(key, row, load_view)  # type: ignore[arg-type]
                    continue
                need.append((r, probe))
            writer.keep_owners(kept)
            cache.alive.update(kept)
            if index_of_site is None:
                views.extend(kept.values())
            else:       # only the threads looked at again: the others stand in the index
                views.extend(kept[k] for k in map(str, touched | index_of_site.view_ids)
                             if k in kept)
            if need:
                ids = [r.id for r, _ in need]
                many = len(need) > 200
                threads = ({t.id: t for t in tx.threads()} if many
                           else {i: tx.thread(i) for i in ids})
                # Summaries of the messages for the fingerprints; whole messages
                # (tx.messages) only for the threads whose views are made again.
                msgs = message_summaries_by_thread(tx, None if many else ids)
                events = events_by_thread(tx, None if many else ids)
                report_rows = ({x.thread_id: x for x in tx.reports()} if reports_public
                               else {})
                get_raw = reading.raw_reader(tx)
                # First the views the cache has; then those to make, in worker processes
                # when there are many (`pool`), in the order of `need` either way.
                to_make: list[tuple[int, C.ThreadInput, str, str | None]] = []
                for r, probe in need:
                    t = threads[r.id]
                    inp = C.ThreadInput(t, msgs.get(t.id, []), events.get(t.id, []),  # type: ignore[arg-type]
                                        get_raw)
                    if R.is_public(t):
                        writer.owner = f"report-{t.id}"
                        report_views.append(_report(site, inp, tx.messages,
                                                    report_rows.get(t.id), rules, verify,
                                                    cache, writer))
                    else:
                        writer.owner = str(t.id)
                        fp, view = _cached_thread(site, inp, cache, writer, today)
                        if view is None:
                            to_make.append((len(views), inp, fp, probe))
                        else:
                            _cached_probe(cache, t, probe)
                        views.append(view)
                    writer.owner = ""
                del msgs, events
                page_site = functools.partial(
                    C.SiteView, name=site.settings.site.name, base_url=base_url, today=today,
                    threads=(), authorities=(), reports=None)
                made = _made_views(site, to_make, rules, verify, today,
                                   lambda: page_site(reports=_report_lists(site, report_views)),
                                   writer)
                with contextlib.closing(made):
                    for (slot, inp, fp, probe), (view, files, transient, extra) in zip(to_make,
                                                                                        made):
                        t = inp.thread
                        writer.owner = str(t.id)
                        # Checked (and in a fresh folder written) where the view was made.
                        written = {f[0]: writer.put_checked(*f) for f in files}
                        if not transient:   # a DKIM answer that may change is not kept
                            cache.put(t, fp, view, written, extra[1] if extra else None)
                            _cached_probe(cache, t, probe)
                            if extra is not None:   # a worker rendered its pages: kept by
                                # `_write_pages` (`keep_pages`), with its data line and summary
                                pages_key = _pages_key(psalt, fp, view.list_state)
                                cache.put_pages(str(t.id), pages_key, {
                                    f[0]: writer.put_checked(*f) for f in extra[0]})
                                cache.written_pages[str(t.id)] = pages_key
                                e = cache.fresh[str(t.id)]
                                e["line"], e["summary"] = extra[2], extra[3]
                        writer.owner = ""
                        views[slot] = view
                del to_make
        if index_of_site is None:
            index_of_site = _site_index(views)
        else:
            index_of_site.update(touched, views)
        lists = _report_lists(site, report_views)
        site_view = C.SiteView(
            name=site.settings.site.name, base_url=base_url, today=today,
            threads=tuple(index_of_site.threads()),
            authorities=_with_reports(C.grouped_authority_views(
                site.rules.authorities, site.rules.laws, index_of_site.slugs(),
                functools.partial(index_of_site.record, make=C.record)), report_views),
            reports=lists)
        _write_pages(site, site_view, writer, cache, psalt, index_of_site)
        # Files kept unchanged were checked when they were written, against the private
        # values of that day: check them against the values added since (a new citizen's
        # address that an older page happens to contain), or all of them without a record.
        known = (saved_digests if saved_digests is not None
                 else load_secret_digests(secrets_path))
        dkey = site.settings.site.secret.encode("utf-8")
        if known is None:
            writer.check_kept(writer.guard)
        elif digests is not known and not digests <= known:   # (the set kept: no scan)
            writer.check_kept(LeakGuard([(v, label) for v, label in secrets
                                         if _secret_digest(v, dkey) not in known]))
        index.begin()
        result = writer.commit()
        generation = os.urandom(8).hex()
        index.set_meta("generation", generation)
        cache.save()
        index.commit()
        if digests is not known and digests != known:
            save_secret_digests(secrets_path, digests)
        if memory_key is not None:
            _MEMORY[memory_key] = _remember(
                cache, kept, need, rows, psalt, today, mark, generation, rules_id, load_view,
                (guard, secrets, digests), writer.owners_now, report_ids, index_of_site)
            if mem is None and len(rows) >= SETTLE_THREADS:
                _settle()
    except BaseException:
        if writer is not None:
            writer.abort()
        index.rollback()
        raise
    finally:
        index.close()
    # Attachments withheld, for the admin queue: those of the views made or checked now (a
    # kept thread's were reported by the build that made its view).
    withheld = [{"thread_id": t.id, "message_id": m.pk, "n": a.n, "filename": a.filename,
                 "reason": a.withheld}
                for t in [*views, *report_views] if not isinstance(t, ThreadSummary)
                for m in t.messages for a in m.attachments if a.withheld]
    return BuildReport(out=root, written=len(result.written),
                       unchanged=len(result.unchanged) + result.kept_whole,
                       removed=len(result.removed), threads=len(site_view.threads),
                       reports=len(report_views),
                       authorities=len(site_view.authorities),
                       written_paths=sorted(result.written), removed_paths=result.removed,
                       withheld=sorted(withheld, key=lambda w: (w["message_id"], w["n"])))


def _cached_thread(site: Site, inp: C.ThreadInput, cache: ThreadCache, writer: Writer,
                   today: date) -> tuple[str, C.ThreadView | None]:
    """A thread's fingerprint, and its public view from the cache when nothing it shows has
    changed (its files are then kept). `inp` holds message summaries: enough for the
    fingerprint."""
    t = inp.thread
    fp = cache.fingerprint(inp, site.rules.authorities.get(t.authority),
                           site.rules.laws.get(t.law))
    return fp, cache.get(t, fp, writer, today)


def _cached_probe(cache: ThreadCache, t: Any, probe: str | None) -> None:
    e = cache.fresh.get(str(t.id))
    if e is not None:
        e["probe"] = probe


def _thread_view(site: Site, inp: C.ThreadInput, rules: list[Any], verify: C.Verifier,
                 today: date) -> tuple[C.ThreadView, C.ThreadFiles]:
    """A thread's public view made from its whole messages (`inp.messages`)."""
    t = inp.thread
    red = Redactor(rules, thread_id=t.id, authority=t.authority,
                   private=private_values(t, site.domain))
    return C.thread_view(inp, authority=site.rules.authorities.get(t.authority),
                         law=site.rules.laws.get(t.law), red=red, verify=verify, today=today)


# A view, its files (attachments, as `Writer.checked` or `Writer.ahead` answer), whether a
# DKIM answer was transient, and when a worker made it (not transient), its own pages
# (`_thread_files`, as `Writer.ahead` answers), its JSON for the cache (`_view_json`), its
# line of the data dump and its summary (`_write_pages`).
Checked = tuple[str, bytes | None, str]
ViewMade = tuple[C.ThreadView, list[Checked], bool,
                 tuple[list[Checked], str, str, str] | None]


def _report_lists(site: Site, report_views: list[R.ReportView]) -> R.ReportLists | None:
    report_rules = getattr(site.rules, "reports", None)
    if report_rules is None and not report_views:
        return None
    geography = R.Geography(getattr(report_rules, "areas", None) or ())
    return R.report_lists(report_views, rules=report_rules, authorities=site.rules.authorities,
                          geography=geography)


def _made_views(site: Site, to_make: list[tuple[int, C.ThreadInput, str, str | None]],
                rules: list[Any], verify: DkimCache, today: date,
                page_site: Callable[[], C.SiteView], writer: Writer) -> Iterator[ViewMade]:
    """The views of `to_make`, in order: in worker processes when there are many of them
    (`pool`), else here. A view is made from the message summaries the fingerprint was
    made from (`reading.MessageSummary`: every column `thread_view` reads, from the build's
    transaction), and for a worker the raw bytes of the messages it shows are read here. A
    worker also renders each
    thread's own pages (`_thread_files`; `page_site`: the site as those pages see it), the
    largest part of `_write_pages`, and checks every file it makes (`Writer.ahead`, with the
    build's guard: in a fresh folder it writes them too), its data line and summary: what
    the build's own process did for each thread, the critical path of a full build."""
    workers = pool.workers_for(site.settings)
    if len(to_make) < pool.POOL_MIN or workers < 2:
        return _views_here(site, to_make, rules, verify, today, writer)
    get_raw = to_make[0][1].raw
    sv = page_site()

    def prepare(item: tuple[int, C.ThreadInput, str, str | None]) -> Any:
        inp = item[1]
        messages = inp.messages
        raws = {m.raw_sha256: get_raw(m.raw_sha256) for m in messages
                if (m.direction, m.kind) in C.SHOWN and not m.hidden}
        return inp.thread, messages, inp.events, raws

    def work(batch: list[Any]) -> tuple[list[ViewMade], dict[str, Any]]:
        # In a worker: `verify` is its copy of the build's DKIM cache; the answers it adds
        # go back to the build with the batch.
        answers: dict[str, Any] = {}

        def check(sha: str, raw: bytes) -> tuple[bool, str | None]:
            known = sha in verify.results
            result = verify(sha, raw)
            if not known and sha in verify.results:
                answers[sha] = verify.results[sha]
            return result

        out: list[ViewMade] = []
        r = _renderer(site, sv)
        for t, messages, events, raws in batch:
            transient = verify.transient
            view, files = _thread_view(site, C.ThreadInput(t, messages, events, raws.__getitem__),
                                       rules, check, today)
            moved = verify.transient != transient
            made = [writer.ahead(rel, data) for rel, data in files.files]
            # A transient view is not cached: `_write_pages` renders its pages.
            if moved:
                out.append((view, made, moved, None))
                continue
            data = thread_json(view, sv.base_url)
            out.append((view, made, moved, (
                [writer.ahead(rel, b) for rel, b in _thread_files(r, sv, view, data)],
                _view_json(view), json.dumps(data, ensure_ascii=False) + "\n",
                ThreadSummary.encode(view))))
        return out, answers

    def merge(answers: dict[str, Any]) -> None:
        if answers:
            verify.results.update(answers)
            verify.changed = True

    def counted() -> Iterator[ViewMade]:
        with contextlib.closing(pool.in_workers(
                to_make, prepare, work, merge, workers,
                lambda: _views_here(site, to_make, rules, verify, today, writer))) as it:
            for made in it:
                verify.transient += made[2]
                yield made

    return counted()


def _views_here(site: Site, to_make: list[tuple[int, C.ThreadInput, str, str | None]],
                rules: list[Any], verify: DkimCache, today: date,
                writer: Writer) -> Iterator[ViewMade]:
    for _, inp, _, _ in to_make:
        transient = verify.transient
        view, files = _thread_view(site, inp, rules, verify, today)
        yield (view, [writer.checked(rel, data) for rel, data in files.files],
               verify.transient != transient, None)


def _report(site: Site, inp: C.ThreadInput, messages_of: Callable[[int], list[Any]],
            row: Any, rules: list[Any], verify: DkimCache, cache: ThreadCache,
            writer: Writer) -> R.ReportView:
    """One fault report's public view: from the cache when nothing it shows has changed
    (its state, fixed_at and place are in the fingerprint, so a fix rebuilds its page).
    `inp` and `messages_of` as for `_thread`."""
    t = inp.thread
    authority = site.rules.authorities.get(t.authority)
    report_rules = getattr(site.rules, "reports", None)
    category = getattr(row, "category", None) or ""
    area = getattr(row, "area", None) or ""
    cat = (getattr(report_rules, "categories", None) or {}).get(category)
    area_rule = next((a for a in getattr(report_rules, "areas", None) or () if a.id == area), None)
    category_name = cat.name if cat else category
    area_name = area_rule.name if area_rule else area
    categories = getattr(report_rules, "categories", None) or {}
    history = R.history(
        inp.events,
        lambda slug: getattr(site.rules.authorities.get(slug), "name", slug),
        lambda slug: getattr(categories.get(slug), "name", slug))
    fp = cache.fingerprint(inp, authority, None,
                           extra=R.fingerprint_data(row, category_name, area_name, history))
    view = cache.get_report(t, fp, writer)
    if view is not None:
        return view
    inp = replace(inp, messages=messages_of(t.id))
    red = Redactor(rules, thread_id=t.id, authority=t.authority,
                   private=private_values(t, site.domain))
    transient = verify.transient
    view, files = R.report_view(inp, row,
                                authority_name=authority.name if authority else t.authority,
                                category_name=category_name, area_name=area_name, red=red,
                                verify=verify, history=history)
    written = {rel: writer.write(rel, data) for rel, data in files.files}
    if verify.transient == transient:
        cache.put_report(t, fp, view, written)
    return view


def _with_reports(authorities: tuple[C.AuthorityView, ...],
                  reports: list[R.ReportView]) -> tuple[C.AuthorityView, ...]:
    """Each authority with the reports it was sent and its record of fixing them; an
    authority that only reports still name (gone from the rules) gets a page too."""
    if not reports:
        return authorities
    by_slug: dict[str, list[R.ReportView]] = {}
    for r in sorted(reports, key=lambda r: (r.sent_at, r.id), reverse=True):
        if r.authority:
            by_slug.setdefault(r.authority, []).append(r)
    views = list(authorities)
    known = {a.slug for a in views}
    for slug, mine in by_slug.items():
        if slug not in known:
            views.append(C.AuthorityView(slug, mine[0].authority_name, "", (), "", (), (),
                                         C.record([])))
    views = [replace(a, reports=tuple(by_slug[a.slug]),
                     report_record=R.report_record(by_slug[a.slug]))
             if a.slug in by_slug else a for a in views]
    return tuple(sorted(views, key=lambda v: v.name.lower()))


# Threads per listing page (the lists by state, an authority's requests): one new message
# changes a bounded number of pages, whatever the size of the site.
PAGE_SIZE = 100


def _chunks(items: list[Any] | tuple[Any, ...]) -> list[list[Any]]:
    """The pages of a list: [[]] for an empty one (its first page says so)."""
    return [list(items[i:i + PAGE_SIZE]) for i in range(0, len(items), PAGE_SIZE)] or [[]]


def page_path(first: str, n: int) -> str:
    """Page `n` of the list at `first` ("list/refused/"): page 1 keeps the list's own URL,
    the others are "list/refused/page/2/" and so on (static names, no query strings)."""
    return f"{first}index.html" if n == 1 else f"{first}page/{n}/index.html"


_ID = operator.attrgetter("id")
# The last key of each listing file this process computed, by path: (head, thread ids,
# their page keys, key, the threads).
_LISTING_KEYS: dict[str, tuple[str, tuple[int, ...], tuple[Any, ...], str,
                              list[Any] | None]] = {}


def _if_kept(threads: Any) -> list[Any] | None:
    """The threads, if all are kept summaries (whose page keys never change), else None."""
    threads = list(threads)
    return threads if all(isinstance(t, ThreadSummary) for t in threads) else None


class _Listings:
    """Files rendered only when what they show changed: a page of a list, an authority's
    first page, JSON twin and feed, a part of the data dump. Each is keyed by the page salt,
    its own arguments and the page key of every thread it shows (`pages_keys`: the view's
    fingerprint and list state, see `_write_pages`); an unchanged key keeps the file (the
    keys are kept in the cache index, `listings`)."""

    def __init__(self, cache: ThreadCache | None, salt: str, w: Writer,
                 pages_keys: dict[int, str | None]):
        self.cache, self.salt, self.w, self.pages_keys = cache, salt, w, pages_keys
        self.old: dict[str, list[str]] = cache.listings if cache is not None else {}
        self.new: dict[str, list[str]] = {}

    def key(self, rel: str, threads: Any, words: Any) -> str | None:
        if self.cache is None:
            return None
        head = json.dumps([self.salt, rel, words], default=str)
        hit = _LISTING_KEYS.get(rel)
        # The very same kept summaries as this process's last build: the same ids and page
        # keys (a summary's page key is fixed), so the same key, without looking at each.
        if (hit is not None and hit[0] == head and hit[4] is not None
                and len(hit[4]) == len(threads) and all(map(operator.is_, hit[4], threads))):
            return hit[3]
        ids = tuple(map(_ID, threads))
        pks = tuple(map(self.pages_keys.get, ids))
        if None in pks or "" in pks:
            return None
        # The same threads with the same page keys: its key (comparing the tuples is
        # cheaper than hashing them, once per page and build).
        if hit is not None and hit[0] == head and hit[1] == ids and hit[2] == pks:
            _LISTING_KEYS[rel] = (*hit[:4], _if_kept(threads))
            return hit[3]
        h = hashlib.sha256(head.encode("utf-8"))
        h.update("".join(f"\n{tid}:{k}" for tid, k in zip(ids, pks)).encode("utf-8"))
        found = h.hexdigest()
        if len(_LISTING_KEYS) > 100_000:
            _LISTING_KEYS.clear()
        _LISTING_KEYS[rel] = (head, ids, pks, found, _if_kept(threads))
        return found

    def keep_all(self, rels: list[str], key: str | None) -> bool:
        """Keep all of `rels` if each was made under `key` and is on disk as made."""
        if key is None:
            return False
        hits = [self.old.get(rel) for rel in rels]
        # The index's manifest has each file as its listing row says (both are written in
        # one transaction): only whether the file is still there is asked.
        if not all(hit is not None and hit[0] == key and self.w.on_disk(rel)
                   for rel, hit in zip(rels, hits)):
            return False
        for rel, hit in zip(rels, hits):
            self.w.keep(rel, hit[1], checked=True)  # type: ignore[index]
            self.new[rel] = hit       # type: ignore[assignment]
        return True

    def keep_unchanged(self, rels: list[str]) -> bool:
        """Keep all of `rels` as the last build made them, without keying them: the site
        index says nothing they show has changed since (`SiteIndex.changed_pages`). False
        (nothing kept) if one was not made under a key then."""
        hits = [self.old.get(rel) for rel in rels]
        if None in hits:
            return False
        for rel, hit in zip(rels, hits):
            self.w.keep(rel, hit[1], checked=True)   # type: ignore[index]
            self.new[rel] = hit       # type: ignore[assignment]
        return True

    def old_key(self, rel: str) -> str | None:
        hit = self.old.get(rel)
        return hit[0] if hit is not None else None

    def put(self, rel: str, key: str | None, digest: str) -> None:
        if key is not None:
            self.new[rel] = [key, digest]

    def write(self, rel: str, threads: Any, words: Any, render: Callable[[], str],
              same: bool = False) -> None:
        """Keep or render one file. `same`: the site index says it shows what it showed
        (`keep_unchanged`); otherwise it is keyed, and kept only under the same key."""
        if same and self.keep_unchanged([rel]):
            return
        key = self.key(rel, threads, words)
        if not self.keep_all([rel], key):
            self.put(rel, key, self.w.write(rel, render()))

    def save(self) -> None:
        if self.cache is not None:
            self.cache.listings = self.new


def _json(data: Any) -> str:
    if isinstance(data, _RequestsJson):
        return data.text()
    return json.dumps(data, ensure_ascii=False, indent=1) + "\n"


# Each request's entry in its authority's JSON, as `_json` indents it there, by its page key
# (its view and list state, the site's base URL: everything the entry shows).
_ENTRIES: dict[str, str] = {}
# The page keys of the entries in each authority's JSON as this process last wrote it, by its
# path: (the file's digest, page keys). The file on disk with that digest was checked whole,
# and its kept content since against every value added.
_AUTHORITY_ENTRIES: dict[str, tuple[str, frozenset[str]]] = {}


class _RequestsJson:
    """An authority's JSON (`render.authority_json`) whose list of every request is put
    together from each request's entry, kept by page key: a new message encodes one entry
    again, not every request of the authority (json.dumps with an indent is pure Python).
    `text()` is byte for byte `_json` of the whole dict (tests/test_archive_changes.py)."""

    def __init__(self, head: dict[str, Any], a: C.AuthorityView, base: str,
                 pages_keys: dict[int, str | None]):
        self.head, self.a, self.base, self.pages_keys = head, a, base, pages_keys
        # After `text()`: the text around the entries, and each entry with its page key
        # (None when the text was made whole).
        self.around = ""
        self.entries: list[tuple[str | None, str]] | None = None

    def write(self, w: Writer, rel: str) -> str:
        """Write the text; only the entries the file on disk did not hold as they are (by
        page key, `_AUTHORITY_ENTRIES`) and the text around them are checked now, the others
        against the private values added since (`Writer.kept_content`, like the data dump's
        lines). A private value with a line break could span two entries: then all is."""
        text = self.text()
        prev = _AUTHORITY_ENTRIES.get(rel)
        checked: frozenset[str] = frozenset()
        has = getattr(w, "has", None)    # (the benchmark's bare writer checks nothing)
        if (prev is not None and self.entries is not None and has is not None
                and not _multiline(w.guard) and has(rel, prev[0])):
            checked = prev[1]
        if not checked:
            digest = w.write(rel, text)
        else:
            old = [e for pk, e in self.entries if pk in checked]  # type: ignore[union-attr]
            new = [e for pk, e in self.entries if pk not in checked]  # type: ignore[union-attr]
            if old:
                w.kept_content(rel, "\n".join(old).encode("utf-8"))
            digest = w.write(rel, text, scan="\n".join([self.around, *new]).encode("utf-8"))
        if self.entries is not None:
            if len(_AUTHORITY_ENTRIES) > 10_000:
                _AUTHORITY_ENTRIES.clear()
            _AUTHORITY_ENTRIES[rel] = (digest, frozenset(pk for pk, _ in self.entries if pk))
        return digest

    def text(self) -> str:
        self.entries = None
        head = json.dumps(self.head, ensure_ascii=False, indent=1)
        if not self.a.threads or list(self.head)[-1] != "requests" \
                or not head.endswith('\n "requests": []\n}'):
            whole = dict(self.head)
            whole["requests"] = authority_json(self.a, self.base)["requests"]
            return json.dumps(whole, ensure_ascii=False, indent=1) + "\n"
        entries = []
        keyed: list[tuple[str | None, str]] = []
        for t in self.a.threads:
            pk = self.pages_keys.get(t.id)
            entry = _ENTRIES.get(pk) if pk else None
            if entry is None:
                [data] = authority_json(replace(self.a, threads=(t,)), self.base)["requests"]
                entry = "  " + json.dumps(data, ensure_ascii=False, indent=1).replace(
                    "\n", "\n  ")
                if pk:
                    if len(_ENTRIES) > 1_000_000:
                        _ENTRIES.clear()
                    _ENTRIES[pk] = entry
            entries.append(entry)
            keyed.append((pk, entry))
        self.entries = keyed
        self.around = head[:-len("[]\n}")] + "[\n ]\n}\n"
        return head[:-len("[]\n}")] + "[\n" + ",\n".join(entries) + "\n ]\n}\n"


def _renderer(site: Site, sv: C.SiteView) -> Renderer:
    r = Renderer(sv, site.settings.site.templates, site.settings.site.language)
    r.env.globals.update(report_chart=report_chart, LOCATION_SOURCES=R.LOCATION_SOURCES,
                         NO_CATEGORY=R.NO_CATEGORY, NO_AREA=R.NO_AREA, FIXED_NOTE=R.FIXED_NOTE,
                         HISTORY_WORDS=R.HISTORY_WORDS, HISTORY_BY=R.HISTORY_BY)
    return r


def _thread_files(r: Renderer, sv: C.SiteView, t: C.ThreadView,
                  data: dict[str, Any] | None = None) -> list[tuple[str, Any]]:
    """A thread's own files: its page, JSON twin and feed. They show the thread and only
    the site's name, address and whether it takes fault reports, so a view worker renders
    them as `_write_pages` would (`_made_views`). `data`: `thread_json(t, sv.base_url)`."""
    base = sv.base_url
    if data is None:
        data = thread_json(t, base)
    return [(f"{t.path}index.html", r.page("thread.html", f"{t.path}index.html", t=t)),
            (f"{t.path}index.json", _json(data)),
            (f"{t.path}feed.atom", feeds.atom(
                title=t.title, base_url=base, page=t.path, feed=f"{t.path}feed.atom",
                entries=feeds.thread_entries([t]), author=sv.name))]


# Requests per part of the data dump (`data/threads-<n>.jsonl.gz` holds ids n*100 to
# n*100+99): a new message rewrites one part, whatever the size of the site.
DUMP_PART = 100


def _site_index(threads: Any) -> SiteIndex:
    """The site index of `threads` (views or kept summaries), from scratch."""
    return SiteIndex(threads, top=_top, responses=_responses,
                     summary=lambda t: isinstance(t, ThreadSummary))


def _write_pages(site: Site, sv: C.SiteView, w: Writer, cache: ThreadCache | None = None,
                 salt: str | None = None, index: SiteIndex | None = None) -> None:
    """Render and write every page, feed and data file of the site. With `cache`, a thread
    whose view and page inputs are unchanged keeps its own three files (see ThreadCache),
    and so do the listing pages, authorities' files and data parts that show only such
    threads. `sv.threads` may hold `ThreadSummary`s: threads whose files the builder kept.
    `index`: `sv.threads` grouped and ordered (the builder keeps it between builds)."""
    r = _renderer(site, sv)
    base = sv.base_url
    if index is None:
        index = _site_index(sv.threads)
    by_state: dict[str, list[Any]] = {k: index.state(k) for k in C.LIST_STATES}
    counts = {k: len(v) for k, v in by_state.items()}
    responses = index.responses
    sitemap: list[tuple[str, date | None]] = [("", None), ("body/", None), ("list/", None)]
    # The threads with the newest messages, once for the home page and the feed (a prefix
    # of `nlargest`'s answer is the answer for fewer).
    newest = index.newest(max(20, feeds.FEED_SIZE))
    recent = sorted(((t, m) for t in newest[:20] for m in t.messages
                     if m.placeholder is None),
                    key=lambda p: (p[1].at, p[1].pk), reverse=True)[:20]

    w.write("index.html", r.page("index.html", "index.html", counts=counts,
                                 responses=responses, recent=recent))
    w.write("feed.atom", feeds.atom(title=sv.name, base_url=base, page="", feed="feed.atom",
                                    entries=feeds.thread_entries(newest[:feeds.FEED_SIZE]),
                                    author=sv.name))
    if salt is None:
        salt = pages_salt(site, sv) if cache is not None else ""
    # The kept summaries' page keys are in the index already; the views' are made now.
    pages_keys = index.pages_keys
    lines: dict[int, str] = {}
    for t in index.fresh:
        key = str(t.id)
        pages_key = None
        e = cache.fresh.get(key) if cache is not None else None
        line = e.get("line") if e is not None else None   # a view worker's (`_made_views`)
        if line is None:
            line = json.dumps(thread_json(t, base), ensure_ascii=False) + "\n"
        lines[t.id] = line
        if e is not None:
            pages_key = _pages_key(salt, e["fp"], t.list_state)
            if e.get("summary") is None:
                e["summary"] = ThreadSummary.encode(t)
            e["line"] = line
        pages_keys[t.id] = pages_key
        w.owner = key
        try:
            if pages_key and cache.keep_pages(key, pages_key, w):  # type: ignore[union-attr]
                continue
            files = {rel: w.write(rel, data) for rel, data in _thread_files(r, sv, t)}
            if pages_key:
                cache.put_pages(key, pages_key, files)  # type: ignore[union-attr]
        finally:
            w.owner = ""
    listings = _Listings(cache, salt, w, pages_keys)

    def unchanged(kind: str, name: Any, page: int | None, size: int = PAGE_SIZE) -> bool:
        """Whether the site index says the list's page (0 the first; None: all of them)
        shows exactly what the last build's did (see `SiteIndex.changed_pages`: an index
        made from scratch, as without a cache, says every page changed)."""
        pages, start = index.changed_pages(kind, name, size)
        if page is None:
            return not pages and start is None
        return page not in pages and (start is None or page < start)

    w.write("body/index.html", r.page("authorities.html", "body/index.html"))
    for a in sv.authorities:
        chunks = _chunks(a.threads)
        own = [page_path(a.path, 1), f"{a.path}feed.atom", f"{a.path}index.json"]
        # Its first page (record, contact details), JSON (every request) and feed: rendered
        # when one of its requests or its entry in the rules changed (always with reports).
        # None of its requests changed since the last build: kept, under the same key.
        same = not a.reports and unchanged("slug", a.slug, None) and listings.keep_unchanged(own)
        akey = None if a.reports else listings.old_key(own[0]) if same else listings.key(
            a.path, a.threads, [a.name, a.url, list(a.emails), a.law_name, list(a.tags),
                                len(chunks)])
        if not same and not listings.keep_all(own, akey):
            listings.put(own[0], akey, w.write(own[0], r.page(
                "authority.html", own[0], a=a, threads=chunks[0], page=1, pages=len(chunks))))
            data = (authority_json(a, base) if a.reports
                    else _RequestsJson(authority_json(replace(a, threads=()), base),
                                       a, base, pages_keys))
            if a.reports:
                data["report_record"] = R.record_json(a.report_record)
                data["reports"] = [R.summary_json(rp, base) for rp in a.reports]
                feed = feeds.atom_feed(
                    title=a.name, base_url=base, page=a.path, feed=own[1],
                    entries=feeds.message_entries(
                        feeds.thread_entries(index.newest(feeds.FEED_SIZE, a.slug)), base,
                        feeds.FEED_SIZE) + feeds.report_entries(a.reports, base),
                    author=sv.name)
            else:
                feed = feeds.atom(title=a.name, base_url=base, page=a.path, feed=own[1],
                                  entries=feeds.thread_entries(
                                      index.newest(feeds.FEED_SIZE, a.slug)), author=sv.name)
            listings.put(own[1], akey, w.write(own[1], feed))
            listings.put(own[2], akey, data.write(w, own[2]) if isinstance(data, _RequestsJson)
                         else w.write(own[2], _json(data)))
        for n, chunk in enumerate(chunks[1:], 2):
            path = page_path(a.path, n)
            listings.write(path, chunk, [a.name, len(chunks)], lambda path=path, chunk=chunk,
                           n=n, a=a: r.page("authority.html", path, a=a, threads=chunk,
                                            page=n, pages=len(chunks)),
                           same=unchanged("slug", a.slug, n - 1))
        lastmod = _AUTHORITY_LASTMOD.get(akey) if akey is not None else None
        if lastmod is None:
            lastmod = max([*(t.last_activity.date() for t in a.threads),
                           *(rp.last_activity.date() for rp in a.reports)], default=None)
            if akey is not None and lastmod is not None:
                if len(_AUTHORITY_LASTMOD) > 100_000:
                    _AUTHORITY_LASTMOD.clear()
                _AUTHORITY_LASTMOD[akey] = lastmod
        sitemap.append((a.path, lastmod))
    if sv.reports is not None:
        _write_reports(site, r, sv, sv.reports, w, sitemap, listings)
    w.write("list/index.html", r.page("lists.html", "list/index.html", counts=counts))
    for key, words in C.LIST_STATES.items():
        first = f"list/{key}/"
        chunks = _chunks(by_state[key])
        for n, chunk in enumerate(chunks, 1):
            path = page_path(first, n)
            listings.write(path, chunk, [words, len(chunks)], lambda path=path, chunk=chunk,
                           n=n, words=words, first=first: r.page(
                               "list.html", path, words=words, threads=chunk, page=n,
                               pages=len(chunks), first=first),
                           same=unchanged("state", key, n - 1))
        sitemap.append((first, None))
    w.write("search/index.html", r.page("search.html", "search/index.html", csp=SEARCH_CSP))
    w.write("static/style.css", r.static("style.css"))
    w.write("static/search.js", r.static("search.js"))
    w.write("sitemap/site.xml", feeds.sitemap(sv, sitemap))
    parts = ["sitemap/site.xml"]
    # The requests' pages in parts of SITEMAP_PART ids, each kept while its requests' page
    # keys (hence their paths and days of last activity) are unchanged.
    for n, ts in index.id_parts(SITEMAP_PART):
        rel = f"sitemap/threads-{n}.xml"
        parts.append(rel)
        listings.write(rel, ts, [SITEMAP_PART], lambda ts=ts: feeds.sitemap(
            sv, [(t.path, t.last_activity.date()) for t in ts]),
            same=unchanged("part", n, None, SITEMAP_PART))
    w.write("sitemap.xml", feeds.sitemap_index(sv, parts))
    w.write("robots.txt", feeds.robots(base))
    _write_data(sv, w, cache, listings, lines, index.id_parts(DUMP_PART),
                lambda n: unchanged("part", n, None, DUMP_PART))
    listings.save()


# Requests per part of the sitemap (`sitemap/threads-<n>.xml` lists ids n*1000 to
# n*1000+999): a new message rewrites one part, whatever the size of the site.
SITEMAP_PART = 1000
# An authority's latest day of activity, by the key of its files (`_Listings.key`: the page
# keys of its requests), as this process last computed it.
_AUTHORITY_LASTMOD: dict[str, date] = {}


def _id_parts(by_id: list[Any], size: int) -> list[tuple[int, list[Any]]]:
    """Threads in id order, in parts of `size` ids: [(n, threads with ids n*size...)]."""
    parts: dict[int, list[Any]] = {}
    for t in by_id:
        parts.setdefault(t.id // size, []).append(t)
    return sorted(parts.items())


def _multiline(guard: Any) -> bool:
    """Whether a private value holds a line break (then every line of the data is checked),
    once per guard."""
    found = getattr(guard, "_multiline", None)
    if found is None:
        found = any(b"\n" in v for v in guard.labels)
        try:
            guard._multiline = found
        except AttributeError:
            pass
    return bool(found)


def _write_data(sv: C.SiteView, w: Writer, cache: ThreadCache | None, listings: _Listings,
                lines: dict[int, str], parts: list[tuple[int, list[Any]]] | None = None,
                unchanged: Callable[[int], bool] | None = None) -> None:
    """Every request as data, in parts of DUMP_PART ids (`data/threads-<n>.jsonl.gz`), and
    `data/index.json` listing them. A part whose requests' page keys did not change is kept;
    in a part written again, a kept thread's line is the one an earlier build wrote and
    checked (same view, same page key): only the other lines are checked now, and the kept
    ones against the private values added since (with the kept files). A value with a line
    break could span two lines: then all are checked."""
    base = sv.base_url
    if parts is None:
        parts = _id_parts(sorted(sv.threads, key=_ID), DUMP_PART)
    whole = _multiline(w.guard)
    listed = []
    for n, ts in parts:
        rel = f"data/threads-{n}.jsonl.gz"
        if unchanged is not None and unchanged(n) and listings.keep_unchanged([rel]):
            key, kept_now = None, True
        else:
            key = listings.key(rel, ts, [DUMP_PART])
            kept_now = listings.keep_all([rel], key)
        if not kept_now:
            kept = [str(t.id) for t in ts if isinstance(t, ThreadSummary)]
            stored = cache.index.lines(kept) if cache is not None and kept else {}
            all_lines, scan, old = [], [], []
            for t in ts:
                line = stored.get(str(t.id)) if isinstance(t, ThreadSummary) else lines.get(t.id)
                if line is not None and isinstance(t, ThreadSummary) and not whole:
                    old.append(line)
                else:
                    if line is None:
                        line = json.dumps(thread_json(t.full() if isinstance(t, ThreadSummary)
                                                      else t, base), ensure_ascii=False) + "\n"
                    scan.append(line)
                all_lines.append(line)
            if old:
                w.kept_content(rel, "".join(old).encode("utf-8"))
            data = "".join(all_lines).encode("utf-8")
            # compresslevel 6 (gzip's own default): level 9 took twice as long for 1 % less.
            listings.put(rel, key, w.write(rel, gzip.compress(data, compresslevel=6, mtime=0),
                                           scan="".join(scan).encode("utf-8")))
        listed.append({"url": f"{base}{rel}", "first_id": ts[0].id, "last_id": ts[-1].id,
                       "requests": len(ts)})
    w.write("data/index.json", _json({
        "requests": {"format": "JSON Lines, gzip: one request per line, as its index.json",
                     "count": sum(p["requests"] for p in listed), "parts": listed}}))


def _write_reports(site: Site, r: Renderer, sv: C.SiteView, lists: R.ReportLists, w: Writer,
                   sitemap: list[tuple[str, date | None]],
                   listings: _Listings | None = None) -> None:
    """Each fault report's page, JSON twin and feed; the list of all reports and the lists by
    area and by category, each with its map and feed; the reports as data. Rendered from the
    views, so a report fixed since the last build changes its page, its lists, their maps and
    feeds together; with `listings`, all of them are kept when the lists (every report view,
    area and category) and the site's areas and map link are as the last build had them."""
    base = sv.base_url
    geo = lists.geography
    link = getattr(getattr(site.settings, "reports", None), "map_link", "") or ""
    items_of = (("area", lists.areas), ("category", lists.categories))
    rels = [f"{rp.path}{name}" for rp in lists.reports
            for name in ("index.html", "index.json", "feed.atom")]
    rels += ["report/index.html", "report/feed.atom", "data/reports.jsonl.gz"]
    rels += [f"{item.path}{name}" for _, items in items_of for item in items
             for name in ("index.html", "feed.atom")]
    key = None
    if listings is not None and listings.cache is not None:
        areas = getattr(getattr(site.rules, "reports", None), "areas", None) or ()
        shapes = hashlib.sha256()
        for area in areas:    # their outlines (not in their repr)
            g = maps.geometry_of(area)
            shapes.update(g.wkb if g is not None else b"-")
        text = repr([lists, areas, link, shapes.hexdigest()])
        if " at 0x" not in text:    # an object without a value repr: render every time
            key = hashlib.sha256(f"{listings.salt}:reports:{text}".encode(
                "utf-8", "surrogatepass")).hexdigest()
    for rp in lists.reports:
        sitemap.append((rp.path, rp.last_activity.date()))
    sitemap.append(("report/", max((rp.last_activity.date() for rp in lists.reports),
                                   default=None)))
    for _, items in items_of:
        for item in items:
            sitemap.append((item.path, max((rp.last_activity.date() for rp in item.reports),
                                           default=None)))
    if listings is not None and listings.keep_all(rels, key):
        return

    def write(rel: str, data: str | bytes, **kw: Any) -> None:
        digest = w.write(rel, data, **kw)
        if listings is not None:
            listings.put(rel, key, digest)

    for rp in lists.reports:
        page = f"{rp.path}index.html"
        map_url = (link.replace("{lat}", f"{rp.lat:.6f}").replace("{lon}", f"{rp.lon:.6f}")
                   if link and rp.has_location else "")
        write(page, r.page("report.html", page, rp=rp, geo=geo, map_url=map_url))
        write(f"{rp.path}index.json", _json(R.report_json(rp, base)))
        write(f"{rp.path}feed.atom", feeds.atom_feed(
            title=rp.title, base_url=base, page=rp.path, feed=f"{rp.path}feed.atom",
            entries=feeds.report_entries([rp], base), author=sv.name))
    write("report/index.html", r.page("reports.html", "report/index.html", lists=lists, geo=geo))
    write("report/feed.atom", feeds.atom_feed(
        title=f"{sv.name}: fault reports", base_url=base, page="report/", feed="report/feed.atom",
        entries=feeds.report_entries(lists.reports, base), author=sv.name))
    for kind, items in items_of:
        for item in items:
            page = f"{item.path}index.html"
            write(page, r.page("report_list.html", page, geo=geo,
                               area=item if kind == "area" else None,
                               category=item if kind == "category" else None))
            write(f"{item.path}feed.atom", feeds.atom_feed(
                title=f"{sv.name}: fault reports, {item.name}", base_url=base, page=item.path,
                feed=f"{item.path}feed.atom", entries=feeds.report_entries(item.reports, base),
                author=sv.name))
    lines = "".join(json.dumps(R.report_json(rp, base), ensure_ascii=False) + "\n"
                    for rp in sorted(lists.reports, key=lambda rp: rp.id)).encode("utf-8")
    write("data/reports.jsonl.gz", gzip.compress(lines, mtime=0), scan=lines)
