"""7. Ingest: one process per message, as an MTA's pipe transport runs `mailflow ingest`.

Issue #10 starts from Alaveteli, which starts a whole Rails process for each incoming message.
The daemon does not (the pipeline benchmark), but a site that delivers through Postfix's or
Exim's pipe transport (docs/operations.md) runs `mailflow ingest` once a message: this measures
what that costs. Messages are the pipeline benchmark's mixed corpus (replies written for real
threads, and the real corpus mail delivered to them), each piped into a new
`python -m mailflow --config … ingest --sender S --rcpt R`, one after the other, as Postfix's
pipe does with `maxproc` 1; the command spools, processes and makes one delivery attempt of
the mail it causes before it exits (its contract).

Baselines, also one process per message: a bare Python process that parses the same bytes with
`email.message_from_bytes(policy=default)` and writes and fsyncs them to a file (what any
per-process delivery must do at least), and a process that only imports what `ingest` imports
and exits (so the table says how much of the cost is starting up). The rows have no target:
the issue sets none for this path; they say what a pipe transport costs beside the daemon.
CPU is the processes' own (user + system, from `wait4`).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import MAILFLOW, Row, Section, env, fmt_rate, make_site, open_site
from bench.world import make_threads, mixed_corpus

NAME = "ingest"

BARE = """
import email, email.policy, os, sys
raw = sys.stdin.buffer.read()
email.message_from_bytes(raw, policy=email.policy.default)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.write(fd, raw); os.fsync(fd); os.close(fd)
"""
IMPORTS = "import mailflow.cli, mailflow.ingest, mailflow.site"


def _run(cmd: list[str], raw: bytes, cwd: Path) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (the child's user + system) and exit status of one process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, cwd=cwd, env=env())
    assert p.stdin is not None and p.stderr is not None
    p.stdin.write(raw)
    p.stdin.close()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode not in (0, 67) and err:
        print(err.decode(errors="replace")[-400:], file=sys.stderr)
    return wall, usage.ru_utime + usage.ru_stime, p.returncode


def run(tmp: Path, quick: bool, profile: Any = None, *, size: int | None = None) -> Section:
    sec = Section(NAME)
    n = size or (4 if quick else 40)
    config = make_site(tmp / "ingest-site")
    site = open_site(config)
    try:
        threads = make_threads(site, 3 if quick else 8)
        corpus = mixed_corpus(threads, n)
    finally:
        site.close()
    mf_wall = mf_cpu = base_wall = base_cpu = imp_wall = imp_cpu = 0.0
    codes: dict[int, int] = {}
    out = tmp / "bare.eml"
    for _, raw, sender, rcpt in corpus:
        # Interleaved, so that drift on a shared machine falls on all three alike.
        w, c, code = _run([*MAILFLOW, "--config", str(config), "ingest", "--sender", sender,
                           "--rcpt", rcpt], raw, tmp)
        mf_wall, mf_cpu = mf_wall + w, mf_cpu + c
        codes[code] = codes.get(code, 0) + 1
        w, c, _ = _run([sys.executable, "-c", BARE, str(out)], raw, tmp)
        base_wall, base_cpu = base_wall + w, base_cpu + c
        w, c, _ = _run([sys.executable, "-c", IMPORTS], b"", tmp)
        imp_wall, imp_cpu = imp_wall + w, imp_cpu + c
    rate, base_rate = n / mf_wall, n / base_wall
    sec.rows.append(Row(
        "ingest", f"`mailflow ingest`, a process per message, {n} msgs (mixed corpus)",
        fmt_rate(rate), f"{fmt_rate(base_rate)} (a Python process: parse, write, fsync)",
        f"{rate / base_rate:.1%}", "", None,
        f"{mf_wall / n * 1e3:.0f} ms a message ({mf_cpu / n * 1e3:.0f} ms CPU) against "
        f"{base_wall / n * 1e3:.0f} ms ({base_cpu / n * 1e3:.0f} ms CPU) for the bare process; "
        f"exit statuses {dict(sorted(codes.items()))} (0 accepted, 67 not ours, 75 retry)",
        value=rate))
    sec.rows.append(Row(
        "ingest", "diagnostic: starting up alone (importing what `ingest` imports)",
        f"{imp_wall / n * 1e3:.0f} ms", f"{base_wall / n * 1e3:.0f} ms (the bare process)",
        f"{imp_cpu / mf_cpu:.0%} of ingest's CPU", "", None,
        f"{imp_cpu / n * 1e3:.0f} ms CPU a process; what is left of ingest's "
        f"{mf_cpu / n * 1e3:.0f} ms is opening the site (config, rules, store) and the "
        "message's own work", value=imp_wall / n, higher_is_better=False))
    sec.notes.append(
        f"{n} messages piped one at a time into a new process each, interleaved with the two "
        "baselines. The daemon (pipeline benchmark) pays none of the start-up: sites that can "
        "should deliver over SMTP or LMTP to it rather than through a pipe "
        "(docs/operations.md).")
    return sec
