"""2. Pipeline: spool → parsed, classified, matched, stored (and the mail it causes queued).

A diagnostic row then times the notify stage over what the pipeline queued (the outbox sender:
composing and signing the forwards, writing the Maildir outbox), as the processor runs it
after each batch.

Driven in-process as the daemon's processor drives it under a burst: the spooled ids are
claimed by name, up to 50 at a time, and handed to `Pipeline.process_items` (one transaction
for them; a savepoint each only when one of them raises). A diagnostic row does the same one message per transaction
(`Pipeline.process_item`, what the processor does when mail arrives one at a time). The
baseline parses the same bytes with `email.message_from_bytes(policy=default)` and nothing
else.

`database="postgresql"` runs the same on a site whose store is a fresh PostgreSQL database
(same messages, same threads, same baseline), then once more on another fresh database with
`synchronous_commit = off`, to show how much of the time is the commit's WAL fsync. `size` is
the number of messages.
"""
from __future__ import annotations

import email
import email.policy
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common
from bench.common import (PgWatch, Row, Section, Timer, _pg_admin, db_name, fmt_rate, make_site,
                          open_site, runqueue_wait)
from bench.world import make_threads, mixed_corpus

NAME = "pipeline"
BATCH = 50


@dataclass
class Measured:
    n: int
    seconds: float
    base_rate: float
    cpu: float                   # this process (mailflow's pipeline), during the timed loop
    waited: float | None         # … and the time it was runnable but had no core
    pg_cpu: float | None         # the PostgreSQL backend(s) serving it
    wal_syncs: int | None
    outcomes: Counter[str]
    failed: int
    kinds: Counter[str]
    total_bytes: int
    notify: "Notified | None" = None
    base_cpu: float | None = None   # the baseline's CPU (the steadier figure on a busy machine)
    dns_wait: float | None = None   # waiting for DNS answers (SPF, DKIM keys, DMARC), not CPU
    dns_queries: int = 0            # lookups that were not answered from the resolver's cache

    @property
    def rate(self) -> float:
        return self.n / self.seconds

    def split(self) -> str:
        """Where a message's time went: this process's CPU, PostgreSQL's, the rest waiting."""
        per = self.seconds / self.n * 1e3
        out = f"{per:.1f} ms per message: {self.cpu / self.n * 1e3:.1f} ms CPU in mailflow"
        if self.waited is not None:
            out += f", {self.waited / self.n * 1e3:.1f} ms waiting for a core"
        if self.pg_cpu is not None:
            out += f", {self.pg_cpu / self.n * 1e3:.1f} ms CPU in PostgreSQL"
        if self.dns_wait is not None:
            out += (f", {self.dns_wait / self.n * 1e3:.1f} ms waiting for DNS answers "
                    f"({self.dns_queries:,} lookups the cache could not answer, sent to the "
                    "resolver)")
        rest = per - (self.cpu + (self.waited or 0.0) + (self.pg_cpu or 0.0)
                      + (self.dns_wait or 0.0)) / self.n * 1e3
        out += (f", {max(rest, 0.0):.1f} ms the rest (disk and fsync, "
                + ("round trips, PostgreSQL waiting for a core" if self.pg_cpu is not None
                   else "the file system") + ")")
        if self.wal_syncs is not None:
            out += f"; {self.wal_syncs / self.n:.1f} WAL fsyncs per message (server-wide)"
        if self.base_cpu:
            out += (f"; by CPU: {self.base_cpu / self.n * 1e3:.2f} ms a message for `email` "
                    f"parse, {self.base_cpu / self.cpu:.1%} of mailflow's")
        return out


@dataclass
class Notified:
    """The notify stage after the pipeline: the outbox sender composes what is still to be
    composed (the forwards to citizens, since they left the pipeline), signs it, writes it to
    the site's Maildir outbox and marks it sent (`mailflow.delivery.deliver`, as the
    processor runs it after each batch)."""
    seconds: float
    cpu: float
    counts: dict[str, int]


def notify(site: Any) -> Notified:
    import asyncio
    from mailflow.delivery import deliver
    cpu0 = time.process_time()
    with Timer() as t:
        counts = asyncio.run(deliver(site))
    return Notified(t.seconds, time.process_time() - cpu0, counts)


def measure(folder: Path, database: str, n_threads: int, n_msgs: int, profile: Any = None,
            synchronous_commit: bool = True, batch: int = 1,
            with_notify: bool = False, dns: str | None = "default") -> Measured:
    """`batch` > 1: claim that many at a time and hand them to `Pipeline.process_items`
    (one transaction) instead of `process_item` one by one. `with_notify`:
    then deliver the outbox it filled, timed apart (`Measured.notify`)."""
    config = make_site(folder, database=database, dns=dns)
    if not synchronous_commit:
        url = open_site(config).settings.database.url
        with _pg_admin() as c:
            c.execute(f'ALTER DATABASE "{db_name(url)}" SET synchronous_commit = off')
    site = open_site(config)
    threads = make_threads(site, n_threads)
    try:   # as the processor does once it has started (mailflow.processor._main)
        from mailflow.heap import settle
        settle()
    except ImportError:   # mailflow as committed before it did (--commit)
        pass
    corpus = mixed_corpus(threads, n_msgs)
    kinds = Counter(k for k, *_ in corpus)
    total_bytes = sum(len(raw) for _, raw, _, _ in corpus)

    from mailflow.pipeline import Pipeline
    from mailflow.spool import Envelope
    pipeline = Pipeline(site)
    spool = site.spool
    for _, raw, sender, rcpt in corpus:
        spool.put(raw, Envelope(mail_from=sender, rcpt_tos=[rcpt], via="smtp",
                                peer="127.0.0.1:1"))
    ids = spool.pending()

    # Baseline first (it warms the page cache for nothing: the bytes are in memory).
    raws = [raw for _, raw, _, _ in corpus]
    base_cpu0 = time.process_time()
    with Timer() as base:
        for raw in raws:
            email.message_from_bytes(raw, policy=email.policy.default)
    base_cpu = time.process_time() - base_cpu0
    base_rate = len(raws) / base.seconds

    outcomes: Counter[str] = Counter()
    failed = 0
    watch = None
    if database == "postgresql":
        watch = PgWatch(db_name(site.settings.database.url), None)
        pg0, wal0 = watch.sample()
    dns = _DnsWatch(pipeline)
    cpu0, wait0 = time.process_time(), runqueue_wait()
    if profile is not None:
        profile.enable()
    with Timer() as mf:
        for start in range(0, len(ids), batch):
            items = [item for id in ids[start:start + batch]
                     if (item := spool.claim(id)) is not None]
            if not items:
                continue
            try:
                results: list[Any] = ([pipeline.process_item(spool, items[0])] if batch == 1
                                      else pipeline.process_items(spool, items))
            except Exception:  # noqa: BLE001 - left in the spool for a retry, counted
                failed += len(items)
                continue
            for result in results:
                if isinstance(result, Exception):
                    failed += 1
                    continue
                for o in result.outcomes:
                    outcomes[o.outcome] += 1
    if profile is not None:
        profile.disable()
    cpu = time.process_time() - cpu0
    wait1 = runqueue_wait()
    waited = wait1 - wait0 if wait0 is not None and wait1 is not None else None
    pg_cpu = wal = None
    if watch is not None:
        pg1, wal1 = watch.sample()
        pg_cpu, wal = PgWatch.delta(pg0, pg1)["db"], wal1 - wal0
        watch.close()
    sent = notify(site) if with_notify else None
    site.close()
    return Measured(len(ids), mf.seconds, base_rate, cpu, waited, pg_cpu, wal, outcomes, failed, kinds,
                    total_bytes, sent, base_cpu, dns.wait, dns.queries)


class _DnsWatch:
    """Time spent waiting for DNS during the timed loop: the corpus's senders are real domains,
    and their SPF, DKIM and DMARC records are asked of this machine's resolver (each answer,
    NXDOMAIN included, then cached for its TTL by mailflow's resolver). That wait is the
    network's, not mailflow's CPU nor the disk's, so the split says it apart. Measured around
    dnspython's `Nameserver.query` (only what the cache could not answer goes there), as
    wall-clock less this process's CPU in it (plain DNS: `Do53Nameserver`)."""

    def __init__(self, pipeline: Any) -> None:
        self.wait: float | None = None
        self.queries = 0
        try:
            import dns.nameserver
        except ImportError:   # mailflow as committed before DNS was asked through dnspython
            return
        real = dns.nameserver.Do53Nameserver.query
        self.wait = 0.0
        watch = self

        def query(ns: Any, *args: Any, **kw: Any) -> Any:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return real(ns, *args, **kw)
            finally:
                watch.queries += 1
                watch.wait += max(0.0, (time.perf_counter() - t0) - (time.process_time() - c0))  # type: ignore[operator]

        dns.nameserver.Do53Nameserver.query = query  # type: ignore[method-assign]
        import atexit
        atexit.register(setattr, dns.nameserver.Do53Nameserver, "query", real)


def run(tmp: Path, quick: bool, profile: Any = None, *, database: str = "sqlite",
        size: int | None = None) -> Section:
    sec = Section(NAME)
    n_threads, n_msgs = (6, 60) if quick else (40, 2000)
    n_msgs = size or n_msgs
    from mailflow.pipeline import Pipeline
    batched = hasattr(Pipeline, "process_items")   # not in mailflow before 4861150 (--commit)
    m = measure(tmp / "pipeline-site", database, n_threads, n_msgs, profile,
                batch=BATCH if batched else 1, with_notify=True)
    rate, ratio = m.rate, m.rate / m.base_rate
    how = f"batches of {BATCH}" if batched else "one per transaction"
    sec.rows.append(Row(
        "pipeline", f"mixed corpus, {m.n:,} msgs ({how})", fmt_rate(rate),
        f"{fmt_rate(m.base_rate)} (email parse)", f"{ratio:.1%}",
        "≥ 50 % of parse", ratio >= 0.5, m.split(), value=rate))
    sec.rows.append(Row(
        "pipeline", "absolute rate", fmt_rate(rate), "", "", "≥ 500 msg/s", rate >= 500))
    if m.notify is not None:
        # The later "notify" stage (DESIGN.md: … store → notify and publish), so that the
        # CPU the forwards' composing and signing takes is seen: since the forward left the
        # pipeline it is here, not in the row above. Its rate is per message of the corpus.
        nt = m.notify
        sent = nt.counts.get("sent", 0)
        both = (m.cpu + nt.cpu) / m.n * 1e3
        sec.rows.append(Row(
            "pipeline", f"diagnostic: notify stage after it (the outbox: {sent:,} sent, "
            "forwards composed and signed)", fmt_rate(m.n / nt.seconds) if nt.seconds else "-",
            f"{fmt_rate(m.base_rate)} (email parse)",
            f"{m.n / nt.seconds / m.base_rate:.1%}" if nt.seconds else "", "", None,
            f"{nt.cpu / m.n * 1e3:.1f} ms CPU per corpus message ({nt.cpu / max(sent, 1) * 1e3:.1f} "
            f"ms per mail sent); pipeline + notify: {both:.1f} ms CPU per message"
            + (f"; not sent: {nt.counts}" if nt.counts.get("retry") or nt.counts.get("failed")
               else ""),
            value=m.n / nt.seconds if nt.seconds else None))
    if batched:
        # One message per transaction: what the processor does with mail that arrives one
        # at a time (each commit is then an fsync on PostgreSQL, the write lock on SQLite).
        b = measure(tmp / "pipeline-site-single", database, n_threads, n_msgs, batch=1)
        sec.rows.append(Row(
            "pipeline", f"mixed corpus, {b.n:,} msgs: diagnostic: one message per "
            "transaction (process_item)",
            fmt_rate(b.rate), f"{fmt_rate(b.base_rate)} (email parse)",
            f"{b.rate / b.base_rate:.1%}", "", None, b.split(), value=b.rate))
    if common.DNS is not None:
        # The same with the sites asking this machine's resolver (/etc/resolv.conf) instead of
        # the local server: what a site without a caching resolver beside it pays per lookup.
        r = measure(tmp / "pipeline-site-system-dns", database, n_threads, n_msgs,
                    batch=BATCH if batched else 1, dns=None)
        sec.rows.append(Row(
            "pipeline", f"mixed corpus, {r.n:,} msgs: diagnostic: asking this machine's "
            "resolver (`--dns system`), not a local one",
            fmt_rate(r.rate), f"{fmt_rate(r.base_rate)} (email parse)",
            f"{r.rate / r.base_rate:.1%}", "", None, r.split(), value=r.rate))
    if database == "postgresql":
        # How much of PostgreSQL's cost is waiting for its WAL fsync at every commit (SQLite,
        # in WAL mode with synchronous=NORMAL as mailflow sets it, does not fsync at commit).
        # One message per transaction, against the row that does the same.
        d = measure(tmp / "pipeline-site-async", database, n_threads, n_msgs,
                    synchronous_commit=False)
        on = b.rate if batched else rate
        sec.rows.append(Row(
            "pipeline", f"mixed corpus, {d.n:,} msgs: diagnostic: synchronous_commit = off",
            fmt_rate(d.rate), f"{fmt_rate(on)} (synchronous_commit = on)",
            f"{d.rate / on:.0%}", "", None, d.split(), value=d.rate))
    sec.notes.append(
        f"Mixed corpus: {m.n:,} messages, {m.total_bytes / 2**20:.1f} MB, to {n_threads} real "
        f"threads (made through the pipeline: written, confirmed, sent); kinds sent: "
        + ", ".join(f"{k} {v}" for k, v in sorted(m.kinds.items()))
        + ". Outcomes recorded by mailflow: "
        + ", ".join(f"{k} {v}" for k, v in m.outcomes.most_common())
        + (f"; {m.failed} raised and were left for retry" if m.failed else "") + "."
        + (" The diagnostic row runs the same on a second fresh database with "
           "`synchronous_commit = off` (a commit does not wait for its WAL fsync): what is left "
           "of the difference from SQLite is round trips and PostgreSQL's own CPU."
           if database == "postgresql" else ""))
    return sec
