"""6. Instances: one site's end-to-end throughput with 1 and with 2 `mailflow serve` on PostgreSQL.

Each case gets a fresh PostgreSQL database and a fresh site (`mailflow init`, then 40 real
threads made through the pipeline). Every daemon runs from its own copy of the config with its
own `[smtp] listen` port and its own `[spool] dir`, and the same `[database] url`, as
tests/crash_test.py runs several daemons of one site (and as docs/operations.md tells an admin
to). Once the daemons are idle (their start-up sweeps over), one asyncio client process opens
8 SMTP connections, spread over the daemons' ports (4 + 4 with two daemons), and sends the
authorities' 5 KB replies to those threads, each connection its share one after the other.

The clock runs from the moment the first MAIL FROM is written until every message is stored:
a poller counts the replies in the `messages` table (one `count(*)` every 0.1 s on its own
connection) and the case ends when all that got a 250 are there. At the end each daemon's
`mailflow status --json` must show its spool empty. The rows give messages per second end to
end; the notes, how fast they were accepted (the last 250), when the forwards to the citizens
had all been delivered too, and where the CPU went while it ran:

- each daemon's CPU (its process, all threads: SMTP loop, pipeline worker, outbox);
- PostgreSQL's: the backends connected to this case's database (not the poller's), and the
  server's background processes (WAL writer, checkpointer, …: shared with anything else using
  that server, as is `pg_stat_wal`'s count of WAL fsyncs);
- the client's (this process);
- the machine's busy time over all cores (/proc/stat): what is not ours is other work.

Full runs measure 1, 2, 2, 1 daemons (each on a fresh database) and report the mean of each, so
that the machine's drift over the minutes weighs on both alike. With SQLite in `--database`, one
more case runs 1 daemon on the site's own SQLite file, for reference (several daemons need a
shared database server: that is what PostgreSQL is for).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (process_family, MAILFLOW, Daemon, PgWatch, Row, Section, cpu_seconds, db_name,
                          drop_pg_databases, env, fmt_rate, machine_cpu, make_site, open_site,
                          runqueue_wait, set_config, wait_quiet)
from bench.smtp_bench import connect, wire
from bench.world import authority_reply, make_threads

NAME = "instances"
CONNS = 8
FORWARD_WAIT = 60.0   # how long after the last message is stored to wait for the forwards


@dataclass
class Case:
    database: str
    daemons: int
    sent: int = 0
    errors: int = 0
    seconds: float = 0.0           # first send → every accepted message stored
    accept_seconds: float = 0.0    # first send → the last 250
    forwarded_seconds: float | None = None   # … and the outbox empty as well
    cpu: dict[str, float] = field(default_factory=dict)
    busy_cores: float = 0.0
    wal_syncs: int | None = None
    status: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    @property
    def accept_rate(self) -> float:
        return self.sent / self.accept_seconds if self.accept_seconds else 0.0


class Probe:
    """Counts the stored replies and the outbox rows not yet sent, on its own connection."""

    SQL = ("SELECT (SELECT count(*) FROM messages WHERE direction = 'in' AND message_id LIKE "
           "'<reply-%'), (SELECT count(*) FROM outbox WHERE state IN ('queued', 'sending'))")

    def __init__(self, url: str):
        if url.startswith("sqlite"):
            self.con: Any = sqlite3.connect(url.split("///", 1)[1], isolation_level=None,
                                              check_same_thread=False)
            self.backend_pid = None
        else:
            import psycopg
            scheme, rest = url.split("://", 1)     # psycopg wants no "+driver"
            self.con = psycopg.connect(scheme.split("+")[0] + "://" + rest, autocommit=True)
            self.backend_pid = self.con.execute("SELECT pg_backend_pid()").fetchone()[0]

    def __call__(self) -> tuple[int, int]:
        stored, queued = self.con.execute(self.SQL).fetchone()
        return int(stored), int(queued)

    def close(self) -> None:
        self.con.close()


def _status(config: Path) -> dict[str, Any]:
    r = subprocess.run([*MAILFLOW, "--config", str(config), "status", "--json"],
                       capture_output=True, timeout=120, cwd=config.parent, env=env())
    if r.returncode not in (0, 1):
        raise RuntimeError(f"mailflow status failed: {r.stderr.decode()[-2000:]}")
    return json.loads(r.stdout)


def _site(folder: Path, database: str, n_threads: int) -> tuple[Path, list[Any]]:
    config = make_site(folder, database=database)
    # A rebuild of the archive is not what is measured (one message → one rebuild, later).
    set_config(config, "archive", "debounce_seconds", "3600")
    site = open_site(config)
    threads = make_threads(site, n_threads)
    site.close()
    return config, threads


async def _drive(ports: list[int], jobs: list[tuple[str, str, bytes]], probe: Probe,
                 timeout: float) -> tuple[int, int, float, float, float | None]:
    clients = await connect(ports, CONNS, jobs)
    t0 = time.perf_counter()
    clients.go.set()
    accepted_at: list[float] = []

    async def send() -> None:
        await asyncio.gather(*clients.tasks)
        accepted_at.append(time.perf_counter())

    sender = asyncio.create_task(send())
    stored_at = forwarded_at = None
    while True:
        await asyncio.sleep(0.1)
        if sender.done() and sender.exception():
            raise sender.exception()  # type: ignore[misc]
        stored, queued = await asyncio.to_thread(probe)
        target = len(clients.lat) if sender.done() else len(jobs)
        now = time.perf_counter()
        if stored_at is None and stored >= target and sender.done():
            stored_at = now
        if stored_at is not None and queued == 0:
            forwarded_at = now
            break
        if stored_at is not None and now - stored_at > FORWARD_WAIT:
            break                 # stored, but forwards still queued: noted, not waited for
        if stored_at is None and now - t0 > timeout:
            raise RuntimeError(f"only {stored} of {target} messages stored after "
                               f"{timeout:.0f} s")
    await sender
    return (len(clients.lat), len(clients.errors), stored_at - t0, accepted_at[0] - t0,
            None if forwarded_at is None else forwarded_at - t0)


def run_case(folder: Path, database: str, daemons: int, n_msgs: int, n_threads: int,
             timeout: float) -> Case:
    case = Case(database, daemons)
    folder.mkdir(parents=True)
    config, threads = _site(folder / "site", database, n_threads)
    url = open_site(config).settings.database.url
    jobs = []
    for k in range(n_msgs):
        t = threads[k % len(threads)]
        jobs.append((t.contact, t.request_address,
                     wire(authority_reply(t, k, size=4500))))
    procs: list[Daemon] = []
    probe = watch = None
    try:
        for i in range(daemons):
            # One config per daemon: its own port and spool, the same database (crash_test).
            cfg = config.parent / f"config-{i}.toml"
            shutil.copy(config, cfg)
            set_config(cfg, "spool", "dir", f'"var/spool-{i}"')
            procs.append(Daemon(cfg, folder / f"serve-{i}.log"))   # sets [smtp] listen
        for d in procs:
            d.start()
        wait_quiet([p for d in procs if d.proc for p in process_family(d.proc.pid)], settle=2.0,
                   timeout=120)
        probe = Probe(url)
        if database == "postgresql":
            watch = PgWatch(db_name(url), probe.backend_pid)
            pg0, wal0 = watch.sample()
        d0 = [_family_sum(cpu_seconds, d.proc.pid) for d in procs if d.proc]
        q0 = [_family_sum(runqueue_wait, d.proc.pid) for d in procs if d.proc]
        me0, (busy0, _) = time.process_time(), machine_cpu()
        w0 = time.monotonic()
        (case.sent, case.errors, case.seconds, case.accept_seconds,
         case.forwarded_seconds) = asyncio.run(
            _drive([d.port for d in procs], jobs, probe, timeout))
        wall = time.monotonic() - w0
        busy1, _ = machine_cpu()
        case.cpu["client"] = time.process_time() - me0
        case.cpu["daemons"] = sum(_family_sum(cpu_seconds, d.proc.pid) - c
                                  for d, c in zip(procs, d0) if d.proc)
        case.cpu["daemons wait"] = sum(_family_sum(runqueue_wait, d.proc.pid) - q
                                       for d, q in zip(procs, q0) if d.proc)
        if watch is not None:
            pg1, wal1 = watch.sample()
            pg = PgWatch.delta(pg0, pg1)
            case.cpu["postgresql"], case.cpu["pg background"] = pg["db"], pg["bg"]
            case.cpu["postgresql wait"] = pg["db wait"]
            case.wal_syncs = wal1 - wal0
        case.cpu["machine"] = busy1 - busy0
        case.busy_cores = (busy1 - busy0) / wall if wall else 0.0
        case.cpu["wall"] = wall
        # Every daemon's own spool is empty: everything it accepted was processed.
        end = time.monotonic() + 60
        while True:
            case.status = [_status(d.config) for d in procs]
            if all(s.get("spool_pending") == 0 and s.get("spool_in_work") == 0
                   for s in case.status) or time.monotonic() > end:
                break
            time.sleep(0.5)
        left = [(s.get("spool_pending"), s.get("spool_in_work")) for s in case.status]
        if any(p or w for p, w in left):
            raise RuntimeError(f"spools not empty after the case: (pending, in work) {left}")
    finally:
        for d in procs:
            d.stop()
        if probe is not None:
            probe.close()
        if watch is not None:
            watch.close()
        drop_pg_databases()
    return case


def fsync_ms(folder: Path, n: int = 100) -> float:
    """Median time of a 4 KB write + fsync on the disk the spools are on."""
    path = folder / "fsync-probe"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(n):
            os.write(fd, b"x" * 4096)
            t = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(times) * 1e3


def _ms(x: float, n: int) -> str:
    return f"{x / n * 1e3:.1f}" if n else "?"


def _family_sum(measure: Any, pid: int) -> float:
    return sum(measure(p) or 0.0 for p in process_family(pid))


def _cpu_note(cases: list[Case]) -> str:
    n = sum(c.sent for c in cases)
    tot = {k: sum(c.cpu.get(k, 0.0) for c in cases) for k in
           ("daemons", "postgresql", "pg background", "client", "machine", "wall",
            "daemons wait", "postgresql wait")}
    ours = tot["daemons"] + tot["postgresql"] + tot["pg background"] + tot["client"]
    parts = [f"daemons {_ms(tot['daemons'], n)}"]
    if cases[0].database == "postgresql":
        parts.append(f"PostgreSQL {_ms(tot['postgresql'], n)} (+ {_ms(tot['pg background'], n)}"
                     " background)")
    parts.append(f"client {_ms(tot['client'], n)}")
    waits = [f"daemons {_ms(tot['daemons wait'], n)}"]
    if cases[0].database == "postgresql":
        waits.append(f"PostgreSQL {_ms(tot['postgresql wait'], n)}")
    wall = tot["wall"] or 1.0
    syncs = [c.wal_syncs for c in cases if c.wal_syncs is not None]
    return ("CPU ms per message: " + ", ".join(parts)
            + "; ms per message runnable but waiting for a core: " + ", ".join(waits)
            + f"; machine busy {tot['machine'] / wall:.2f} cores of {os.cpu_count()}, "
            f"{max(tot['machine'] - ours, 0.0) / wall:.2f} of them not this benchmark's"
            + (f"; WAL fsyncs per message {sum(syncs) / n:.2f} (server-wide)" if syncs else ""))


def _runs_note(cases: list[Case]) -> str:
    acc = statistics.mean(c.accept_rate for c in cases)
    fwd = [c for c in cases if c.forwarded_seconds]
    out = [f"accepted at {fmt_rate(acc)}"]
    if len(fwd) == len(cases):
        out.append("stored and every forward delivered at "
                   + fmt_rate(statistics.mean(c.sent / c.forwarded_seconds for c in fwd)))
    if len(cases) > 1:
        out.append("runs: " + ", ".join(fmt_rate(c.rate) for c in cases))
    errs = sum(c.errors for c in cases)
    if errs:
        out.append(f"{errs} not accepted")
    return "; ".join(out) + ". " + _cpu_note(cases)


def run(tmp: Path, quick: bool, profile: Any = None, *,
        databases: tuple[str, ...] = ("postgresql",), size: int | None = None) -> Section:
    sec = Section(NAME, database="postgresql")
    n_msgs = size or (40 if quick else 1500)
    n_threads = 4 if quick else 40
    plan = [1, 2] if quick else [1, 2, 2, 1]
    timeout = 600.0
    results: dict[tuple[str, int], list[Case]] = {}
    for k, daemons in enumerate(plan):
        c = run_case(tmp / f"case-{k}-pg-{daemons}", "postgresql", daemons, n_msgs, n_threads,
                     timeout)
        print(f"   PostgreSQL, {daemons} daemon(s): {fmt_rate(c.rate)} end to end, "
              f"accepted at {fmt_rate(c.accept_rate)}, {c.busy_cores:.2f} cores busy", flush=True)
        results.setdefault(("postgresql", daemons), []).append(c)
    if "sqlite" in databases:
        c = run_case(tmp / "case-sqlite-1", "sqlite", 1, n_msgs, n_threads, timeout)
        print(f"   SQLite, 1 daemon: {fmt_rate(c.rate)} end to end", flush=True)
        results[("sqlite", 1)] = [c]
    one = statistics.mean(c.rate for c in results[("postgresql", 1)])
    two = statistics.mean(c.rate for c in results[("postgresql", 2)])
    what = f"{n_msgs:,} msgs of 5 KB over {CONNS} conn"
    sec.rows.append(Row("instances", f"PostgreSQL, 1 daemon: {what}, end to end",
                        fmt_rate(one), "", "", "", None, _runs_note(results[("postgresql", 1)]),
                        value=one))
    sec.rows.append(Row("instances", f"PostgreSQL, 2 daemons: {what}, end to end",
                        fmt_rate(two), f"{fmt_rate(one)} (1 daemon)", f"{two / one:.0%}",
                        "(200 % = linear)", None, _runs_note(results[("postgresql", 2)]),
                        value=two))
    if ("sqlite", 1) in results:
        s = results[("sqlite", 1)][0].rate
        sec.rows.append(Row("instances", f"SQLite, 1 daemon (reference): {what}, end to end",
                            fmt_rate(s), f"{fmt_rate(one)} (PostgreSQL, 1 daemon)",
                            f"{s / one:.0%}", "", None, _runs_note(results[("sqlite", 1)]),
                            value=s))
    sec.notes.append(
        f"Each case: a fresh site and database, {n_threads} real threads, {n_msgs:,} authority "
        f"replies (5 KB) sent over {CONNS} connections spread over the daemons' ports; the clock "
        "runs from the first MAIL FROM until every accepted reply is in the `messages` table "
        "(polled every 0.1 s), and each daemon's `mailflow status --json` shows an empty spool "
        "afterwards. Every reply is forwarded to its citizen, DKIM-signed, by the daemons' outbox. "
        + ("Order of the PostgreSQL cases: " + ", ".join(f"{d}" for d in plan)
           + " daemons (the mean of each is shown). " if len(plan) > 2 else "")
        + f"A 4 KB write + fsync takes {fsync_ms(tmp):.1f} ms (median) on this disk. "
        "PostgreSQL's background CPU and WAL fsync counts are server-wide: other work on the "
        "same server lands in them too. What limits the second daemon on 2 cores: "
        "README.md, \"PostgreSQL, and two instances\".")
    return sec
