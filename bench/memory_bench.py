"""4. Memory: the peak while processing a 25 MB attachment; the daemon at rest.

The peak is measured in a fresh subprocess (`bench.memwork`) that first processes a small
reply, so that everything a daemon holds anyway is loaded, then resets the kernel's peak-RSS
mark and processes the big message from the spool as the daemon's worker does, then makes
the one delivery attempt for what that queued (the forward to the citizen is composed, signed
and written by the outbox sender since the fourth round, so it is measured there). The figure is
(peak − resting RSS) / message size. The reference row does the same with the standard
library alone: parse the bytes and decode every attachment.

At rest: `mailflow serve` on a site whose store holds 10,000 sent threads (50,000 messages,
generated as for the archive benchmark), against the same daemon on an empty site, after
start-up and its first sweeps have finished.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (process_family, Daemon, Row, Section, env, fmt_mb, make_site, open_site, rss_of,
                          set_config)
from bench.world import authority_reply, bulk_archive_site, make_threads

NAME = "memory"


def _work(tmp: Path, *args: str) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "bench.memwork", *args], capture_output=True,
                       cwd=tmp, env=env(), timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"memwork {args[0]} failed: {r.stderr.decode()[-3000:]}")
    return json.loads(r.stdout)


def _cpu_ticks(pid: int) -> int:
    total = 0
    for p in process_family(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def _at_rest(daemon: Daemon, settle: float = 3.0, timeout: float = 600) -> tuple[int, float]:
    """RSS (of the daemon and its processor together) once they have used no CPU for
    `settle` seconds (start-up sweeps done)."""
    assert daemon.proc is not None
    pid = daemon.proc.pid
    t0 = time.monotonic()
    last, quiet_since = _cpu_ticks(pid), time.monotonic()
    while time.monotonic() - t0 < timeout:
        time.sleep(0.5)
        now = _cpu_ticks(pid)
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= settle:
            break
    return sum(rss_of(p).get("VmRSS", 0) for p in process_family(pid)), time.monotonic() - t0


def run(tmp: Path, quick: bool, profile: Any = None) -> Section:
    from mailflow.spool import Envelope
    sec = Section(NAME)
    att_size = (2 if quick else 25) * 2**20
    config = make_site(tmp / "memory-site")
    site = open_site(config)
    t = make_threads(site, 1)[0]
    warm = site.spool.put(authority_reply(t, 1, size=2000),
                          Envelope(mail_from=t.contact, rcpt_tos=[t.request_address]))
    raw = authority_reply(t, 2, size=2000, attachments=[
        ("disclosure.pdf", "application/pdf", b"%PDF-1.4\n" + os.urandom(att_size - 9))])
    eml = tmp / "big.eml"
    eml.write_bytes(raw)
    big = site.spool.put(raw, Envelope(mail_from=t.contact, rcpt_tos=[t.request_address]))
    size = len(raw)
    del raw
    site.close()
    m = _work(tmp, "mailflow", "--config", str(config), "--warm", warm, "--item", big)
    e = _work(tmp, "email", "--eml", str(eml))
    mx = (m["peak"] - m["before_rss"]) / size
    ex = (e["peak"] - e["before_rss"]) / size
    label = f"{att_size // 2**20} MB attachment ({size / 2**20:.1f} MB message)"
    sec.rows.append(Row("memory", f"peak RSS processing a {label}", fmt_mb(m["peak"]),
                        f"{fmt_mb(m['before_rss'])} at rest", f"{mx:.1f}× message size",
                        "< 4× size over rest", mx < 4,
                        f"outcome {', '.join(m['outcome'])}"
                        + ("" if m["reset"] else "; peak could not be reset")))
    sec.rows.append(Row("memory", "reference: email.message_from_bytes + decode attachments",
                        fmt_mb(e["peak"]), f"{fmt_mb(e['before_rss'])} at rest",
                        f"{ex:.1f}× message size", "", None))

    # The daemon at rest: empty site vs 10,000 threads.
    n = 200 if quick else 10_000
    empty_cfg = make_site(tmp / "rest-empty")
    full_cfg = make_site(tmp / "rest-full")
    fsite = open_site(full_cfg)
    counts = bulk_archive_site(fsite, n, seed=7)
    fsite.close()
    rss = {}
    for name, cfg in (("empty", empty_cfg), ("full", full_cfg)):
        set_config(cfg, "archive", "debounce_seconds", "3600")
        d = Daemon(cfg, tmp / f"rest-{name}.log")
        t0 = time.monotonic()
        d.start(timeout=600)
        started = time.monotonic() - t0
        try:
            rss[name] = (*_at_rest(d), started)
        finally:
            d.stop()
    (e_rss, e_settle, e_start), (f_rss, f_settle, f_start) = rss["empty"], rss["full"]
    sec.rows.append(Row("memory", f"daemon RSS at rest, {counts['threads']:,} threads / "
                        f"{counts['messages']:,} msgs", fmt_mb(f_rss), f"{fmt_mb(e_rss)} (empty site)",
                        f"{f_rss / e_rss:.2f}×", "", None,
                        f"listening after {f_start:.1f} s (empty: {e_start:.1f} s), idle "
                        f"{f_settle:.1f} s later"))
    sec.notes.append(
        "Peak RSS is the kernel's VmHWM of a subprocess, reset after warm-up; the message is an "
        "authority's reply to a real thread, so processing also forwards it (with its "
        "attachment, DKIM-signed) to the citizen. The daemon's RSS at rest is that of both of "
        "`mailflow serve`'s processes (the accepting one and its processor child) added up.")
    return sec
