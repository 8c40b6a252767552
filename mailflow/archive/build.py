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
import gzip
import hashlib
import importlib.util
import json
import logging
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

from mailflow import __version__
from mailflow.archive import context as C
from mailflow.archive import feeds
from mailflow.archive import reports as R
from mailflow.archive.reading import events_by_thread, message_summaries_by_thread
from mailflow.archive.charts import report_chart
from mailflow.archive.render import SEARCH_CSP, Renderer, authority_json, thread_json
from mailflow.archive.writer import (CACHE_DIR, LeakGuard, Writer, _exchange, load_manifest,
                                     swap_in, write_private_json)
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
    """

    def __init__(self, path: Path, dns_txt: DnsTxt | None):
        self.path = path
        self.dns_txt = dns_txt
        try:
            self.results: dict[str, list[Any]] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.results = {}
        self.changed = False
        self.transient = 0      # lookups that failed for a passing reason, this build

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
            self.results[sha] = [ok, domain]
            self.changed = True
        return ok, domain

    def save(self, path: Path | None = None) -> None:
        if self.changed or path is not None:
            write_private_json(path or self.path, self.results)


# -- threads whose inputs did not change ----------------------------------------------------------
CACHE_VERSION = 2
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
    listing pages whose threads did not change (`listings`, see `_Listings`). The home page,
    the first page of each authority and the site-wide files are rendered every build. Lives
    in the output's cache folder, so `--full` (a fresh folder) starts without it.
    """

    def __init__(self, path: Path, salt: bytes):
        self.path = path
        self.salt = salt
        self.entries: dict[str, Any] = {}
        self.listings: dict[str, list[str]] = {}   # listing page -> [key, digest] (_Listings)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("salt") == salt.hex():
                self.entries = data["threads"]
                self.listings = data.get("listings") or {}
        except (OSError, ValueError, KeyError, AttributeError):
            self.entries, self.listings = {}, {}
        self.fresh: dict[str, Any] = {}

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
        e = self.entries.get(key)
        if not e or e.get("fp") != fp or not all(writer.has(r, d) for r, d in e["files"].items()):
            return None
        try:
            view = decode(e["view"])
        except (KeyError, TypeError, ValueError):
            return None
        for rel, digest in e["files"].items():
            writer.keep(rel, digest)
        self.fresh[key] = e
        return view

    def put(self, t: Any, fp: str, view: C.ThreadView, files: dict[str, str]) -> None:
        self.fresh[str(t.id)] = {"fp": fp, "view": C.view_to_dict(view), "files": files}

    def put_report(self, t: Any, fp: str, view: R.ReportView, files: dict[str, str]) -> None:
        self.fresh[f"report-{t.id}"] = {"fp": fp, "view": R.view_to_dict(view), "files": files}

    def keep_pages(self, key: str, pages_key: str, writer: Writer) -> bool:
        """Keep the thread's own files if they were rendered under `pages_key` and are on
        disk as written; False if they must be rendered."""
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
        write_private_json(self.path, {"salt": self.salt.hex(), "threads": self.fresh,
                                       "listings": self.listings})


# The code and data a thread's own files are rendered with, besides its view: a change to any
# of them renders every thread's files again.
_PAGE_CODE = ("mailflow/archive/render.py", "mailflow/archive/feeds.py",
              "mailflow/archive/build.py", "mailflow/archive/charts.py",
              "mailflow/archive/context.py", "mailflow/templating.py", "mailflow/i18n.py")


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
    h = hashlib.sha256(f"{CACHE_VERSION}:{__version__}:".encode())
    h.update(json.dumps([sv.name, sv.base_url, site.settings.site.language,
                         sv.reports is not None]).encode("utf-8"))
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


def _secret_digest(value: str) -> bytes:
    return hashlib.sha256(value.strip().lower().encode("utf-8")).digest()[:16]


def load_secret_digests(path: Path) -> set[bytes] | None:
    """The digests (never the values) of the private values the last build checked against;
    None when there is no record (nothing kept can then be trusted unchecked)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return {data[i:i + 16] for i in range(0, len(data) - len(data) % 16, 16)}


def save_secret_digests(path: Path, digests: set[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(b"".join(sorted(digests)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
            work = out.with_name(f".{out.name}.new-{os.getpid()}")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
        else:
            work = out
            work.mkdir(parents=True, exist_ok=True)
        previous = load_manifest(out)
        dkim = DkimCache(out / CACHE_DIR / "dkim.json", dns_txt)
        try:
            report = _build_into(site, work, base_url, today, dkim, fresh=full)
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


def _build_into(site: Site, root: Path, base_url: str, today: date,
                verify: DkimCache, fresh: bool = False) -> BuildReport:
    path = site.settings.site.rules / "redactions.toml"
    redactions = path.read_text(encoding="utf-8") if path.exists() else ""
    rules = load_redactions(redactions, str(path)) if redactions else []
    cache = ThreadCache(root / CACHE_DIR / "threads.json", ThreadCache.salt_for(site, redactions))
    domain = site.domain
    views: list[C.ThreadView] = []
    report_views: list[R.ReportView] = []
    writer: Writer | None = None
    secrets_path = root / CACHE_DIR / SECRETS_FILE
    try:
        with site.store.read() as tx:
            every = tx.threads()
            secrets: list[tuple[str, str]] = [(site.settings.site.secret, "the site's secret")]
            for t in every:
                # Literal secrets only: the patterns (any thread-shaped address, a local part
                # as a word) are for redaction, too broad to scan other threads' pages with.
                secrets.extend((v, label) for v, label in private_values(t, domain)
                               if not isinstance(v, PrivatePattern))
            writer = Writer(root, LeakGuard(secrets), fresh=fresh)
            rows = ({r.thread_id: r for r in tx.reports()}
                    if any(R.is_public(t) for t in every) else {})
            public = [t for t in every if R.is_public(t) or C.is_public(t)]
            # Summaries of every thread's messages for the fingerprints; whole messages
            # (tx.messages) only for the threads whose views are made again.
            msgs = message_summaries_by_thread(tx) if public else {}
            events = events_by_thread(tx) if public else {}
            for t in public:
                inp = C.ThreadInput(t, msgs.get(t.id, []), events.get(t.id, []),  # type: ignore[arg-type]
                                    tx.get_raw)
                if R.is_public(t):
                    report_views.append(_report(site, inp, tx.messages, rows.get(t.id), rules,
                                                verify, cache, writer))
                else:
                    views.append(_thread(site, inp, tx.messages, rules, verify, cache, writer,
                                         today))
            del msgs, events
        views.sort(key=lambda v: (v.sent, v.id), reverse=True)
        report_rules = getattr(site.rules, "reports", None)
        lists = None
        if report_rules is not None or report_views:
            geography = R.Geography(getattr(report_rules, "areas", None) or ())
            lists = R.report_lists(report_views, rules=report_rules,
                                   authorities=site.rules.authorities, geography=geography)
        site_view = C.SiteView(
            name=site.settings.site.name, base_url=base_url, today=today, threads=tuple(views),
            authorities=_with_reports(
                C.authority_views(site.rules.authorities, site.rules.laws, views), report_views),
            reports=lists)
        _write_pages(site, site_view, writer, cache)
        # Files kept unchanged were checked when they were written, against the private
        # values of that day: check them against the values added since (a new citizen's
        # address that an older page happens to contain), or all of them without a record.
        digests = {_secret_digest(v) for v, _ in secrets}
        known = load_secret_digests(secrets_path)
        if known is None:
            writer.check_kept(writer.guard)
        else:
            added = [(v, label) for v, label in secrets if _secret_digest(v) not in known]
            if added:
                writer.check_kept(LeakGuard(added))
        result = writer.commit()
        cache.save()
        if digests != known:
            save_secret_digests(secrets_path, digests)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    withheld = [{"thread_id": t.id, "message_id": m.pk, "n": a.n, "filename": a.filename,
                 "reason": a.withheld}
                for t in [*views, *report_views] for m in t.messages for a in m.attachments
                if a.withheld]
    return BuildReport(out=root, written=len(result.written), unchanged=len(result.unchanged),
                       removed=len(result.removed), threads=len(views),
                       reports=len(report_views),
                       authorities=len(site_view.authorities),
                       written_paths=sorted(result.written), removed_paths=result.removed,
                       withheld=sorted(withheld, key=lambda w: (w["message_id"], w["n"])))


def _thread(site: Site, inp: C.ThreadInput, messages_of: Callable[[int], list[Any]],
            rules: list[Any], verify: DkimCache, cache: ThreadCache, writer: Writer,
            today: date) -> C.ThreadView:
    """One thread's public view: from the cache when nothing it shows has changed. `inp`
    holds message summaries (enough for the fingerprint); `messages_of` reads the whole
    messages when the view must be made."""
    t = inp.thread
    authority = site.rules.authorities.get(t.authority)
    law = site.rules.laws.get(t.law)
    fp = cache.fingerprint(inp, authority, law)
    view = cache.get(t, fp, writer, today)
    if view is not None:
        return view
    inp = replace(inp, messages=messages_of(t.id))
    red = Redactor(rules, thread_id=t.id, authority=t.authority,
                   private=private_values(t, site.domain))
    transient = verify.transient
    view, files = C.thread_view(inp, authority=authority, law=law, red=red, verify=verify,
                                today=today)
    written = {rel: writer.write(rel, data) for rel, data in files.files}
    if verify.transient == transient:   # a DKIM answer that may change is not kept
        cache.put(t, fp, view, written)
    return view


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
    fp = cache.fingerprint(inp, authority, None,
                           extra=R.fingerprint_data(row, category_name, area_name))
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
                                verify=verify)
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


class _Listings:
    """Listing pages rendered only when what they show changed: each is keyed by its page
    salt, its template and arguments, and the fingerprint and list state of every thread on
    it; an unchanged key keeps the file (kept in the ThreadCache file, `listings`)."""

    def __init__(self, cache: ThreadCache | None, salt: str, w: Writer):
        self.cache, self.salt, self.w = cache, salt, w
        self.old: dict[str, list[str]] = cache.listings if cache is not None else {}
        self.new: dict[str, list[str]] = {}

    def write(self, rel: str, threads: list[C.ThreadView], words: Any,
              render: Callable[[], str]) -> None:
        fps = [self.cache.fresh.get(str(t.id), {}).get("fp") if self.cache else None
               for t in threads]
        key = None
        if self.cache is not None and all(fps):
            key = hashlib.sha256(json.dumps(
                [self.salt, rel, words, [(t.id, fp, t.list_state) for t, fp in zip(threads, fps)]],
                default=str).encode("utf-8")).hexdigest()
            hit = self.old.get(rel)
            if hit is not None and hit[0] == key and self.w.has(rel, hit[1]):
                self.w.keep(rel, hit[1])
                self.new[rel] = hit
                return
        digest = self.w.write(rel, render())
        if key is not None:
            self.new[rel] = [key, digest]

    def save(self) -> None:
        if self.cache is not None:
            self.cache.listings = self.new


def _json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, indent=1) + "\n"


def _write_pages(site: Site, sv: C.SiteView, w: Writer, cache: ThreadCache | None = None) -> None:
    """Render and write every page, feed and data file of the site. With `cache`, a thread
    whose view and page inputs are unchanged keeps its own three files (see ThreadCache)."""
    r = Renderer(sv, site.settings.site.templates, site.settings.site.language)
    r.env.globals.update(report_chart=report_chart, LOCATION_SOURCES=R.LOCATION_SOURCES,
                         NO_CATEGORY=R.NO_CATEGORY, NO_AREA=R.NO_AREA, FIXED_NOTE=R.FIXED_NOTE)
    base = sv.base_url
    counts = {k: len(sv.by_state(k)) for k in C.LIST_STATES}
    responses = sum(1 for t in sv.threads for m in t.messages
                    if m.kind == "response")
    sitemap: list[tuple[str, date | None]] = [("", None), ("body/", None), ("list/", None)]

    w.write("index.html", r.page("index.html", "index.html", counts=counts,
                                 responses=responses, recent=sv.recent()))
    w.write("feed.atom", feeds.atom(title=sv.name, base_url=base, page="", feed="feed.atom",
                                    entries=feeds.thread_entries(sv.threads), author=sv.name))
    salt = pages_salt(site, sv) if cache is not None else ""
    kept: set[int] = set()
    for t in sv.threads:
        sitemap.append((t.path, t.last_activity.date()))
        key = str(t.id)
        pages_key = ""
        if cache is not None and key in cache.fresh:
            pages_key = hashlib.sha256(
                f"{salt}:{cache.fresh[key]['fp']}:{t.list_state}".encode()).hexdigest()
            if cache.keep_pages(key, pages_key, w):
                kept.add(t.id)
                continue
        files = {
            f"{t.path}index.html": w.write(f"{t.path}index.html",
                                           r.page("thread.html", f"{t.path}index.html", t=t)),
            f"{t.path}index.json": w.write(f"{t.path}index.json", _json(thread_json(t, base))),
            f"{t.path}feed.atom": w.write(f"{t.path}feed.atom", feeds.atom(
                title=t.title, base_url=base, page=t.path, feed=f"{t.path}feed.atom",
                entries=feeds.thread_entries([t]), author=sv.name))}
        if pages_key:
            cache.put_pages(key, pages_key, files)  # type: ignore[union-attr]
    listings = _Listings(cache, salt, w)
    w.write("body/index.html", r.page("authorities.html", "body/index.html"))
    for a in sv.authorities:
        chunks = _chunks(a.threads)
        for n, chunk in enumerate(chunks, 1):
            path = page_path(a.path, n)
            if n == 1:   # its record and reports too: rendered every build
                w.write(path, r.page("authority.html", path, a=a, threads=chunk, page=1,
                                     pages=len(chunks)))
                continue
            listings.write(path, chunk, [a.name, len(chunks)], lambda path=path, chunk=chunk,
                           n=n, a=a: r.page("authority.html", path, a=a, threads=chunk,
                                            page=n, pages=len(chunks)))
        data = authority_json(a, base)
        if a.reports:
            data["report_record"] = R.record_json(a.report_record)
            data["reports"] = [R.summary_json(rp, base) for rp in a.reports]
            w.write(f"{a.path}feed.atom", feeds.atom_feed(
                title=a.name, base_url=base, page=a.path, feed=f"{a.path}feed.atom",
                entries=feeds.message_entries(feeds.thread_entries(a.threads), base,
                                              feeds.FEED_SIZE)
                + feeds.report_entries(a.reports, base), author=sv.name))
        else:
            w.write(f"{a.path}feed.atom", feeds.atom(
                title=a.name, base_url=base, page=a.path, feed=f"{a.path}feed.atom",
                entries=feeds.thread_entries(a.threads), author=sv.name))
        w.write(f"{a.path}index.json", _json(data))
        sitemap.append((a.path, max([*(t.last_activity.date() for t in a.threads),
                                     *(rp.last_activity.date() for rp in a.reports)],
                                    default=None)))
    if sv.reports is not None:
        _write_reports(site, r, sv, sv.reports, w, sitemap)
    w.write("list/index.html", r.page("lists.html", "list/index.html", counts=counts))
    for key, words in C.LIST_STATES.items():
        first = f"list/{key}/"
        chunks = _chunks(sv.by_state(key))
        for n, chunk in enumerate(chunks, 1):
            path = page_path(first, n)
            listings.write(path, chunk, [words, len(chunks)], lambda path=path, chunk=chunk,
                           n=n, words=words, first=first: r.page(
                               "list.html", path, words=words, threads=chunk, page=n,
                               pages=len(chunks), first=first))
        sitemap.append((first, None))
    listings.save()
    w.write("search/index.html", r.page("search.html", "search/index.html", csp=SEARCH_CSP))
    w.write("static/style.css", r.static("style.css"))
    w.write("static/search.js", r.static("search.js"))
    w.write("sitemap.xml", feeds.sitemap(sv, sitemap))
    w.write("robots.txt", feeds.robots(base))
    # Every request as data. A kept thread's line is the one the last build wrote and checked
    # (the same view, under the same page key): only the other lines are checked now, and
    # the kept ones against the private values added since (with the kept files). A value
    # with a line break could span two lines: then all are checked.
    rows = [(t.id, json.dumps(thread_json(t, base), ensure_ascii=False) + "\n")
            for t in sorted(sv.threads, key=lambda t: t.id)]
    lines = "".join(line for _, line in rows).encode("utf-8")
    if kept and not any(b"\n" in v for v in w.guard.labels):
        scan = "".join(line for tid, line in rows if tid not in kept).encode("utf-8")
        w.kept_content("data/threads.jsonl.gz",
                       "".join(line for tid, line in rows if tid in kept).encode("utf-8"))
    else:
        scan = lines
    # compresslevel 6 (gzip's own default): level 9 took twice as long for 1 % less.
    w.write("data/threads.jsonl.gz", gzip.compress(lines, compresslevel=6, mtime=0), scan=scan)


def _write_reports(site: Site, r: Renderer, sv: C.SiteView, lists: R.ReportLists, w: Writer,
                   sitemap: list[tuple[str, date | None]]) -> None:
    """Each fault report's page, JSON twin and feed; the list of all reports and the lists by
    area and by category, each with its map and feed; the reports as data. Rendered from the
    views every build (the writer keeps what did not change), so a report fixed since the last
    build changes its page, its lists, their maps and feeds together."""
    base = sv.base_url
    geo = lists.geography
    link = getattr(getattr(site.settings, "reports", None), "map_link", "") or ""
    for rp in lists.reports:
        page = f"{rp.path}index.html"
        map_url = (link.replace("{lat}", f"{rp.lat:.6f}").replace("{lon}", f"{rp.lon:.6f}")
                   if link and rp.has_location else "")
        w.write(page, r.page("report.html", page, rp=rp, geo=geo, map_url=map_url))
        w.write(f"{rp.path}index.json", _json(R.report_json(rp, base)))
        w.write(f"{rp.path}feed.atom", feeds.atom_feed(
            title=rp.title, base_url=base, page=rp.path, feed=f"{rp.path}feed.atom",
            entries=feeds.report_entries([rp], base), author=sv.name))
        sitemap.append((rp.path, rp.last_activity.date()))
    w.write("report/index.html", r.page("reports.html", "report/index.html", lists=lists, geo=geo))
    w.write("report/feed.atom", feeds.atom_feed(
        title=f"{sv.name}: fault reports", base_url=base, page="report/", feed="report/feed.atom",
        entries=feeds.report_entries(lists.reports, base), author=sv.name))
    sitemap.append(("report/", max((rp.last_activity.date() for rp in lists.reports),
                                   default=None)))
    for kind, items in (("area", lists.areas), ("category", lists.categories)):
        for item in items:
            page = f"{item.path}index.html"
            w.write(page, r.page("report_list.html", page, geo=geo,
                                 area=item if kind == "area" else None,
                                 category=item if kind == "category" else None))
            w.write(f"{item.path}feed.atom", feeds.atom_feed(
                title=f"{sv.name}: fault reports, {item.name}", base_url=base, page=item.path,
                feed=f"{item.path}feed.atom", entries=feeds.report_entries(item.reports, base),
                author=sv.name))
            sitemap.append((item.path, max((rp.last_activity.date() for rp in item.reports),
                                           default=None)))
    lines = "".join(json.dumps(R.report_json(rp, base), ensure_ascii=False) + "\n"
                    for rp in sorted(lists.reports, key=lambda rp: rp.id)).encode("utf-8")
    w.write("data/reports.jsonl.gz", gzip.compress(lines, mtime=0), scan=lines)
