"""1. SMTP accept: mailflow's durable accept path vs a bare aiosmtpd that writes and fsyncs.

Both servers run as subprocesses on free ports of 127.0.0.1: the real `mailflow serve` on a
site made by `mailflow init`, and `bench.bare_smtpd`. The client is one asyncio process that
speaks SMTP over raw streams, so it costs little CPU and can time exactly what the issue asks:
from the moment the final ".\\r\\n" of DATA is written to the moment the 250 arrives.
Connections are opened and greeted before the clock starts; each sends its share of the
messages one after another (no pipelining).

The daemon processes what it accepts as it would in production: its processor (a child
process of `mailflow serve`, at a lower CPU priority) starts on a burst once the daemon has
announced nothing new for 0.1 s, or once a message has waited 2 s (`mailflow.processor.
Deferral`), so a case of a few hundred messages is mostly accepted before it is processed;
the archive rebuild it schedules is pushed back (`debounce_seconds`) so that it does not land
in the middle of a measurement. Between
cases the benchmark waits for the daemon's spool to drain, so a case never pays for the
previous one's backlog; that drain time gives the daemon's end-to-end rate as a by-product.

At 8 connections two diagnostic servers split the difference between the bare server and
the daemon: the bare server writing with mailflow's `Spool.put`, and mailflow's own ingress
(RCPT checks, `IngressHandler`, `start_server`) with nothing processing the spool
(`bench.ingress_only`, on a copy of the site).

`database="postgresql"` runs it all on a site whose store is a fresh PostgreSQL database (the
ingress-only copy shares it); the bare servers do not touch a database either way.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (Daemon, Row, Section, cpu_seconds, env, fmt_rate, fmt_s, free_port,
                          make_site, open_site, percentile, set_config, wait_for_banner)
from bench.world import authority_reply, make_threads

NAME = "smtp"
_DOT = re.compile(rb"(?m)^\.")


def wire(raw: bytes) -> bytes:
    """A message as DATA carries it: CRLF line ends, dot-stuffed, ending in CRLF."""
    data = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return _DOT.sub(b"..", data)


@dataclass
class Result:
    sent: int
    seconds: float
    latencies: list[float]
    errors: int

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


async def _reply(reader: asyncio.StreamReader) -> bytes:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            return b"".join(lines)


async def _connection(port: int, jobs: list[tuple[str, str, bytes]], go: asyncio.Event,
                      ready: list[int], lat: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
    try:
        await _reply(reader)
        writer.write(b"EHLO client.example\r\n")
        await _reply(reader)
        ready.append(1)
        await go.wait()
        for sender, rcpt, data in jobs:
            writer.write(f"MAIL FROM:<{sender}>\r\n".encode())
            r1 = await _reply(reader)
            writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
            r2 = await _reply(reader)
            if not (r1.startswith(b"250") and r2.startswith(b"250")):
                errors.append(1)
                writer.write(b"RSET\r\n")
                await _reply(reader)
                continue
            writer.write(b"DATA\r\n")
            if not (await _reply(reader)).startswith(b"354"):
                errors.append(1)
                continue
            writer.write(data)
            await writer.drain()
            t0 = time.perf_counter()
            writer.write(b".\r\n")
            r = await _reply(reader)
            t1 = time.perf_counter()
            if r.startswith(b"250"):
                lat.append(t1 - t0)
            else:
                errors.append(1)
        writer.write(b"QUIT\r\n")
        await writer.drain()
    finally:
        writer.close()


@dataclass
class Clients:
    """`conns` connections, opened and greeted, each with its share of the jobs; connection
    i goes to `ports[i % len(ports)]` (several daemons: the clients spread over them)."""
    tasks: list[asyncio.Task[None]]
    go: asyncio.Event
    lat: list[float]
    errors: list[int]


async def connect(ports: list[int], conns: int, jobs: list[tuple[str, str, bytes]]) -> Clients:
    per = [jobs[i::conns] for i in range(conns)]
    go = asyncio.Event()
    ready: list[int] = []
    lat: list[float] = []
    errors: list[int] = []
    tasks = [asyncio.create_task(_connection(ports[i % len(ports)], p, go, ready, lat, errors))
             for i, p in enumerate(per)]
    while len(ready) < conns:
        if any(t.done() for t in tasks):
            for t in tasks:
                if t.done():
                    t.result()
        await asyncio.sleep(0.01)
    return Clients(tasks, go, lat, errors)


async def blast(port: int, conns: int, jobs: list[tuple[str, str, bytes]]) -> Result:
    c = await connect([port], conns, jobs)
    t0 = time.perf_counter()
    c.go.set()
    await asyncio.gather(*c.tasks)
    return Result(len(c.lat), time.perf_counter() - t0, c.lat, len(c.errors))


def blast_cpu(pid: int, port: int, conns: int,
              jobs: list[tuple[str, str, bytes]]) -> tuple[Result, float | None]:
    """`blast`, and the CPU seconds per message the accepting process `pid` used meanwhile
    (its own threads, not its children: the daemon's processor is a child process)."""
    before = cpu_seconds(pid)
    r = asyncio.run(blast(port, conns, jobs))
    after = cpu_seconds(pid)
    cpu = (after - before) / r.sent if before is not None and after is not None and r.sent else None
    return r, cpu


def _cpu_note(mailflow: float | None, bare: float | None) -> str:
    if mailflow is None or bare is None:
        return ""
    return f"accepting process {mailflow * 1000:.2f} ms CPU/msg (bare {bare * 1000:.2f})"


class Bare:
    """The bare server (or, with `spool`, the bare server writing with mailflow's Spool.put;
    with `config`, mailflow's own ingress without the processing worker)."""

    def __init__(self, folder: Path, spool: bool = False, config: Path | None = None):
        self.port = free_port()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        cmd = ([sys.executable, "-m", "bench.ingress_only", "--config", str(config), "--port",
                str(self.port)] if config else
               [sys.executable, "-m", "bench.bare_smtpd", "--port", str(self.port), "--dir",
                str(folder), *(["--spool"] if spool else [])])
        self.proc = subprocess.Popen(
            cmd, cwd=folder.parent, env=env(), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_banner(self.port, self.proc, 30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def _spool_busy(spool_dir: Path) -> int:
    return sum(1 for d in ("new", "work") for n in os.listdir(spool_dir / d)
               if n.endswith((".mail", ".eml")))


def _drain(spool_dir: Path, timeout: float) -> float:
    t0 = time.monotonic()
    while _spool_busy(spool_dir) and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
    return time.monotonic() - t0


def run(tmp: Path, quick: bool, profile: Any = None, *, database: str = "sqlite",
        size: int | None = None) -> Section:
    """`size` (`--size smtp=N`): only the cases of that message size (1,000,000 or 5,000;
    anything under 100,000 is a text reply, anything over a reply with a PDF attached)."""
    sec = Section(NAME)
    config = make_site(tmp / "smtp-site", database=database)
    # The debounced archive rebuild would otherwise fire between cases; see the module doc.
    set_config(config, "archive", "debounce_seconds", "3600")
    site = open_site(config)
    threads = make_threads(site, 8 if not quick else 3)
    spool_dir = Path(site.settings.spool.dir)
    site.close()
    bare = Bare(tmp / "bare-spool")
    bare_spool = Bare(tmp / "bare-mailflow-spool", spool=True)
    # mailflow's ingress alone serves a copy of the site (same threads; paths are relative).
    shutil.copytree(config.parent, tmp / "ingress-site")
    ingress = Bare(tmp / "ingress-site" / "x", config=tmp / "ingress-site" / "config.toml")
    daemon = Daemon(config, tmp / "smtp-daemon.log").start()
    sizes = {"5 KB": 5_000, "1 MB": 1_000_000}
    counts = ({"5 KB": {1: 8, 8: 16, 32: 32}, "1 MB": {1: 2, 8: 8, 32: 32}} if quick else
              {"5 KB": {1: 300, 8: 800, 32: 960}, "1 MB": {1: 30, 8: 80, 32: 96}})
    if size is not None:
        label = "5 KB" if size < 100_000 else "1 MB"
        sizes, counts = {label: size}, {label: counts[label]}
    seq = 0
    processed = 0
    drain_s = 0.0
    try:
        for label, size in sizes.items():
            for conns, n in counts[label].items():
                jobs = []
                for _ in range(n):
                    t = threads[seq % len(threads)]
                    seq += 1
                    if size < 100_000:
                        raw = authority_reply(t, seq, size=size - 500)
                    else:
                        att = os.urandom(int(size * 0.73))
                        raw = authority_reply(t, seq, size=2000, attachments=[
                            ("scan.pdf", "application/pdf", b"%PDF-1.4\n" + att)])
                    jobs.append((t.contact, t.request_address, wire(raw)))
                mean = sum(len(j[2]) for j in jobs) / len(jobs)
                b, b_cpu = blast_cpu(bare.proc.pid, bare.port, conns, jobs)
                assert daemon.proc is not None
                m, m_cpu = blast_cpu(daemon.proc.pid, daemon.port, conns, jobs)
                drain_s += _drain(spool_dir, 600)
                processed += m.sent
                ratio = m.rate / b.rate if b.rate else 0.0
                p50, p99 = percentile(m.latencies, 50), percentile(m.latencies, 99)
                bp50, bp99 = percentile(b.latencies, 50), percentile(b.latencies, 99)
                shown = f"{mean / 1000:,.1f} KB" if mean < 100_000 else f"{mean / 1e6:,.2f} MB"
                case = f"{shown}, {conns} conn, {n} msgs:"
                at8 = conns == 8
                sec.rows.append(Row("smtp", case + " rate", fmt_rate(m.rate),
                                    fmt_rate(b.rate), f"{ratio:.0%}",
                                    "≥ 75 % of bare" if at8 else "",
                                    (ratio >= 0.75) if at8 else None,
                                    "; ".join(n for n in (
                                        f"{m.errors} errors" if m.errors or b.errors else "",
                                        _cpu_note(m_cpu, b_cpu)) if n),
                                    value=m.rate))
                sec.rows.append(Row("smtp", case + " p50 / p99", f"{fmt_s(p50)} / {fmt_s(p99)}",
                                    f"{fmt_s(bp50)} / {fmt_s(bp99)}",
                                    f"{p99 / bp99:.1f}× p99" if bp99 else "",
                                    "p99 < 50 ms" if at8 else "", (p99 < 0.050) if at8 else None,
                                    value=p99, higher_is_better=False))
                if at8:
                    # Where the difference goes: mailflow's Spool.put (one fsynced file, a
                    # rename and a shared directory fsync) under the bare server, no daemon.
                    s = asyncio.run(blast(bare_spool.port, conns, jobs))
                    sec.rows.append(Row(
                        "smtp", case + " diagnostic: bare server + mailflow's Spool.put",
                        fmt_rate(s.rate), fmt_rate(b.rate), f"{s.rate / b.rate:.0%}", "", None,
                        f"p50 {fmt_s(percentile(s.latencies, 50))}, "
                        f"p99 {fmt_s(percentile(s.latencies, 99))}"))
                    # mailflow's ingress (RCPT checks, Spool.put) without processing.
                    g = asyncio.run(blast(ingress.port, conns, jobs))
                    sec.rows.append(Row(
                        "smtp", case + " diagnostic: mailflow's ingress, no processing",
                        fmt_rate(g.rate), fmt_rate(b.rate), f"{g.rate / b.rate:.0%}", "", None,
                        f"p50 {fmt_s(percentile(g.latencies, 50))}, "
                        f"p99 {fmt_s(percentile(g.latencies, 99))}", value=g.rate))
    finally:
        daemon.stop()
        bare.stop()
        bare_spool.stop()
        ingress.stop()
    sec.notes.append(
        "Latency is from writing the final `.` of DATA to reading the 250. mailflow's daemon "
        "processed what it accepted in its processor, a child process at nice 10 beside the "
        "accepting one, which holds back while a burst is coming in (until 0.1 s without a new "
        f"message, 2 s at most); it had processed all {processed} accepted messages "
        f"{drain_s:.1f} s after the cases' ends in total. Every message is an authority's reply "
        "to a real thread, so RCPT runs the gatekeeper's store lookups and processing forwards "
        "each reply (DKIM-signed) to the citizen. The bare server fsyncs the message file only "
        "(mailflow fsyncs its one spool file and, shared among concurrent messages, the spool "
        "directory).")
    return sec
