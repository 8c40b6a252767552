"""3. Archive: a full build and an incremental update, against a bare render-and-write.

The site is generated straight into the store (`world.bulk_archive_site`): sent requests with
five messages each (the request, answers, a follow-up, an automatic reply), a third of the
answers with a PDF, a CSV or an image attached. mailflow builds it with `archive.build.build`
(search off, timed apart: Pagefind runs on the result afterwards).

The baseline renders the same pages from the same public views with the same Jinja2
templates and filters, and writes every file with a plain open()/write(): mailflow's own page
list (`_write_pages`) is called with a writer that only writes, on views taken from the cache
the full build left, with the attachments' bytes already in memory. What it leaves out is
exactly mailflow's logic: reading the store, parsing and redacting every message, checking
attachments, the leak check of every file, staging and the manifest, the thread cache.

The incremental update: one authority reply to one thread goes through the real pipeline,
then `build` (not full) brings the published site up to date, in the same process, as the
daemon does; six times (`_one_reply` answers the newest request still waiting). The figure
is the median of the last five (the first after a full build also compiles the templates
here: it is in the notes). It is measured on a site of a tenth of the size first, then on
the full one, to show whether it depends on the site's size.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.common import Row, Section, Timer, fmt_rate, fmt_s, make_site, open_site
from bench.world import authority_reply, bulk_archive_site, RealThread

NAME = "archive"
INCREMENTAL_ROUNDS = 5    # incremental builds after the first, each after one more reply


def _cpu() -> float:
    """CPU seconds of this process and of its children that ended (a full build's view
    workers, `archive/pool.py`)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def no_dns(name: bytes) -> None:
    return None


class _NoGuard:
    labels: dict[bytes, str] = {}


class PlainWriter:
    """What the baseline writes with: open(), write(), nothing else."""

    guard = _NoGuard()
    owner = ""

    def __init__(self, root: Path):
        self.root = root
        self.files = 0
        self.pages = 0
        self.cpu = 0.0
        self._dirs: set[Path] = set()

    def write(self, rel: str, data: bytes | str, *, scan: bytes | None = None) -> str:
        path = self.root / rel
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        with open(path, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        self.files += 1
        self.pages += rel.endswith(".html")
        return ""


def bare_build(site: Any, out: Path, dest: Path, today: Any) -> tuple[float, PlainWriter]:
    """Render and write the site mailflow built in `out` again, into `dest`, the bare way."""
    from mailflow.archive import build as B
    from mailflow.archive import context as C
    from mailflow.archive.cachedb import INDEX_FILE
    from mailflow.archive.writer import CACHE_DIR
    db = sqlite3.connect(out / CACHE_DIR / INDEX_FILE)
    try:
        cache = [(json.loads(view), json.loads(files)) for key, view, files in db.execute(
            "SELECT key, view, files FROM threads") if not key.startswith("report-")]
    finally:
        db.close()
    views = [C.view_from_dict(view) for view, _ in cache]
    views.sort(key=lambda v: (v.sent, v.id), reverse=True)
    blobs = [(rel, (out / rel).read_bytes()) for _, files in cache for rel in files]
    _, base_url = B.archive_settings(site)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    w = PlainWriter(dest)
    cpu0 = time.process_time()
    with Timer() as t:
        for rel, data in blobs:
            w.write(rel, data)
        sv = C.SiteView(name=site.settings.site.name, base_url=base_url, today=today,
                        threads=tuple(views),
                        authorities=C.authority_views(site.rules.authorities, site.rules.laws,
                                                      views))
        B._write_pages(site, sv, w)
    w.cpu = time.process_time() - cpu0
    return t.seconds, w


def _one_reply(site: Any, n: int) -> int:
    """An authority's answer to the newest thread still waiting, through the pipeline."""
    from mailflow.pipeline import Pipeline
    from mailflow.spool import Envelope
    with site.store.read() as tx:
        t = next(t for t in reversed(tx.threads("waiting_response")) if t.allow == "anybody")
        sent = [m for m in tx.messages(t.id) if m.direction == "out" and m.message_id]
    a = site.rules.authorities[t.authority]
    rt = RealThread(t.id, t.authority, a.contact, site.request_address(t),
                    site.reply_address(t), sent[0].message_id if sent else "<none@x>")
    raw = authority_reply(rt, n, size=1500)
    r = Pipeline(site).process(raw, Envelope(mail_from=a.contact, rcpt_tos=[rt.request_address],
                                             via="smtp"))
    assert r.outcomes and r.outcomes[0].outcome == "response", r.outcomes
    return t.id


def run(tmp: Path, quick: bool, profile: Any = None, *, size: int | None = None) -> Section:
    """`size`: threads of the larger site (default 10,000; the smaller is a tenth of it)."""
    from mailflow.archive.build import build, run_pagefind
    sec = Section(NAME)
    sizes = (20, 50) if quick else (1_000, 10_000)
    if size is not None:
        sizes = (max(1, size // 10), size)
    site = open_site(make_site(tmp / "archive-site"))
    out = tmp / "archive-out"
    today = datetime.now(timezone.utc).date()
    made = {"threads": 0, "messages": 0, "attachments": 0, "raw_bytes": 0}
    incremental: list[tuple[int, float, int]] = []
    for size in sizes:
        with Timer() as gen:
            c = bulk_archive_site(site, size - made["threads"], seed=size)
        for k in made:
            made[k] += c[k]
        with site.store.read() as tx:
            counts = tx.counts()
        # Full build (search apart).
        if profile is not None and size == sizes[-1]:
            profile.enable()
        full_cpu0 = _cpu()
        with Timer() as full:
            rep = build(site, out, full=True, dns_txt=no_dns, today=today, search=False)
        full_cpu = _cpu() - full_cpu0
        if profile is not None and size == sizes[-1]:
            profile.disable()
        pages = sum(1 for p in rep.written_paths if p.endswith(".html"))
        files = len(rep.written_paths)
        bare_s, w = bare_build(site, out, tmp / "archive-bare", today)
        rate, bare_rate = pages / full.seconds, w.pages / bare_s
        ratio = rate / bare_rate
        big = size == sizes[-1]
        label = f"{counts['threads']:,} threads / {counts['messages']:,} msgs"
        sec.rows.append(Row(
            "archive", f"full build, {label}", f"{fmt_rate(rate)} pages ({fmt_s(full.seconds)})",
            f"{fmt_rate(bare_rate)} pages ({fmt_s(bare_s)})", f"{ratio:.1%}",
            "≥ 50 % of bare" if big else "", (ratio >= 0.5) if big else None,
            f"{pages:,} pages, {files:,} files (bare: {w.pages:,} / {w.files:,}); "
            f"generated in {gen.seconds:.0f} s; CPU {fmt_s(full_cpu)}, with its view workers "
            f"(bare: {fmt_s(w.cpu)})"))
        if big:
            sec.rows.append(Row("archive", f"full build time, {label}", fmt_s(full.seconds),
                                "", "", "< 60 s", full.seconds < 60))
        # Incremental: one new message, then bring the site up to date; again for other
        # threads, as the daemon does after each message. The first build after the full
        # one also compiles the templates in this process (the full build rendered in its
        # workers); the median of the next ones is the figure (one build varied ±30 % from
        # run to run on this kind of machine).
        rounds = []
        for n in range(1 if quick else INCREMENTAL_ROUNDS + 1):
            tid = _one_reply(site, 900_000 + size * 10 + n)
            cpu0 = time.process_time()
            with Timer() as inc:
                rep2 = build(site, out, full=False, dns_txt=no_dns, today=today, search=False)
            rounds.append((inc.seconds, time.process_time() - cpu0, tid, rep2))
        first = rounds[0]
        rest = sorted(rounds[1:] or rounds, key=lambda r: r[0])
        seconds, cpu, tid, rep2 = rest[len(rest) // 2]
        incremental.append((counts["threads"], seconds, len(rep2.written_paths)))
        sec.rows.append(Row(
            "archive", f"incremental after 1 message, {label}", fmt_s(seconds),
            f"{fmt_s(full.seconds)} (full build)", f"{seconds / full.seconds:.1%} of full",
            "< 0.5 s" if big else "", (seconds < 0.5) if big else None,
            f"median of {len(rest)} (one reply each, to {len({r[2] for r in rest})} "
            f"thread(s): {fmt_s(rest[0][0])} to {fmt_s(rest[-1][0])}); the first after the "
            f"full build "
            f"{fmt_s(first[0])}; {len(rep2.written_paths)} files rewritten, "
            f"{rep2.unchanged:,} unchanged (thread {tid}); CPU {fmt_s(cpu)}"))
    # Pagefind on the big site, by itself.
    with Timer() as pf:
        status = run_pagefind(out)
    html = sum(1 for _ in out.rglob("*.html"))
    sec.rows.append(Row("archive", f"Pagefind index, {html:,} pages", fmt_s(pf.seconds), "",
                        f"{fmt_rate(html / pf.seconds)} pages", "", None, status))
    if len(incremental) == 2:
        (n1, s1, _), (n2, s2, _) = incremental
        sec.notes.append(
            f"Incremental update: {fmt_s(s1)} at {n1:,} threads, {fmt_s(s2)} at {n2:,} "
            f"({s2 / s1:.1f}× for {n2 / n1:.0f}× the threads).")
    sec.notes.append(
        f"Generated site: {made['threads']:,} sent requests, {made['messages']:,} messages "
        f"({made['raw_bytes'] / 2**20:.0f} MB raw), {made['attachments']:,} attachments "
        "(PDF from the corpus, CSV, PNG), written straight into the store's tables. "
        "Pages/s counts the HTML pages of the build over its whole time.")
    site.close()
    return sec
