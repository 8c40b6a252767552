"""`mailflow serve` as two processes: the accepting daemon and its processor child.

What the split must not change: mail is processed, a dead processor is replaced and its
half-done work finished, SIGTERM stops both, a daemon killed outright takes its processor
with it, and the health file says when processing is down.
"""
from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess

from conftest import DOMAIN, JANE, Daemon, Site, compose, wait_for


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def processor_of(d: Daemon) -> int:
    def find() -> int | None:
        for pid in children(d.proc.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"mailflow.processor" in f.read():
                        return pid
            except OSError:
                pass
        return None
    return wait_for(find, what="the processor child")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is as good as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def ask_by_smtp(d: Daemon, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", d.port, timeout=20) as s:
        s.sendmail(JANE, [f"camden@{DOMAIN}"],
                   compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", subject, "Which roads?"))


def health(site: Site) -> dict:  # type: ignore[type-arg]
    return json.loads((site.dir / "var" / "spool" / "health.json").read_text())


def test_processing_runs_in_a_child_and_a_dead_one_is_replaced(site: Site) -> None:
    d = Daemon(site)
    try:
        first = processor_of(d)
        ask_by_smtp(d, "Before")
        wait_for(lambda: len(site.mail_to(JANE)) == 1, what="confirmation")
        os.kill(first, signal.SIGKILL)
        # Accepting goes on while there is no processor; the next one processes it.
        ask_by_smtp(d, "While it was down")
        second = wait_for(lambda: (p := processor_of(d)) != first and p, timeout=30,
                          what="a new processor")
        assert second != first and alive(d.proc.pid)
        wait_for(lambda: len(site.mail_to(JANE)) == 1, timeout=30, what="second confirmation")
        wait_for(lambda: health(site).get("processor_restarts") == 1
                 and health(site).get("processor_pid") == second, timeout=30,
                 what="the restart in the health file")
        assert health(site)["ok"] is True
        r = site.run("status", "--check")
        assert r.returncode == 0, r.stderr.decode()
    finally:
        assert d.stop(signal.SIGTERM) == 0


def nice_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(") ", 1)[1].split()[16])


def test_the_processor_runs_at_the_configured_niceness(site: Site) -> None:
    """`[spool] processor_niceness`: 10 by default (answering clients first), 0 on a
    machine where other busy work would starve it (the suite sets 0 for its sites)."""
    base = nice_of(os.getpid())    # (whatever this suite runs at: nice(2) adds to it)
    for value in (7, 0):
        site.set("spool", "processor_niceness", str(value))
        d = Daemon(site)
        try:
            pid = processor_of(d)     # (found as it starts: it lowers itself a moment later)
            want = min(base + value, 19)
            wait_for(lambda: nice_of(pid) == want, timeout=15, what=f"the processor at nice {want}")
            assert nice_of(d.proc.pid) == base
        finally:
            assert d.stop(signal.SIGTERM) == 0


def test_sigterm_to_the_daemon_alone_stops_its_processor(site: Site) -> None:
    """systemd may signal only the main process; the processor must stop with it."""
    d = Daemon(site)
    child = processor_of(d)
    os.kill(d.proc.pid, signal.SIGTERM)
    assert d.proc.wait(40) == 0
    wait_for(lambda: not alive(child), timeout=10, what="the processor to stop")
    assert health(site)["ok"] is False and health(site)["problem"] == "stopped"


def test_a_killed_daemon_takes_its_processor_with_it(site: Site) -> None:
    """SIGKILL to the daemon alone (not its group): no orphan goes on processing beside the
    next daemon, and the next daemon finishes what was spooled."""
    d = Daemon(site)
    child = processor_of(d)
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait(10)
    wait_for(lambda: not alive(child), timeout=10, what="the orphaned processor to die")
    d.start()
    try:
        ask_by_smtp(d, "After the crash")
        wait_for(lambda: len(site.mail_to(JANE)) == 1, what="confirmation")
    finally:
        d.stop()


def test_health_says_when_the_processor_is_down(site: Site) -> None:
    """A processor that cannot start (here: it dies at once, every time) makes the health file
    not ok, while the daemon goes on accepting into the spool."""
    d = Daemon(site)
    try:
        processor_of(d)
        # Break the processor's config path for its next starts: a directory is no config.
        cfg = site.config
        saved = cfg.read_bytes()
        try:
            os.rename(cfg, cfg.with_suffix(".moved"))
            cfg.mkdir()
            os.kill(processor_of(d), signal.SIGKILL)
            wait_for(lambda: not health(site).get("ok") and "processor" in
                     health(site).get("problem", ""), timeout=40, what="an unhealthy health file")
            ask_by_smtp(d, "Accepted while processing is down")
            assert list((site.dir / "var" / "spool" / "new").glob("*.mail"))
        finally:
            if cfg.is_dir():
                cfg.rmdir()
            cfg.write_bytes(saved)
            cfg.with_suffix(".moved").unlink(missing_ok=True)
        wait_for(lambda: health(site).get("ok") is True, timeout=90, what="healthy again")
        wait_for(lambda: len(site.mail_to(JANE)) == 1, timeout=30, what="the confirmation")
    finally:
        d.stop()
