"""The crash test: mail over SMTP while the daemon is killed with SIGKILL, again and again.

RFC 5321 §6.1: once a server has answered 250 to the end of DATA, the message is its
responsibility. This script is the proof that mailflow keeps that promise, and that nothing
it does afterwards (storing, forwarding, reminding, publishing) happens twice when it is cut
off in the middle:

1. makes a site, and `--threads` requests that went out long ago, so that every reminder
   the law calls for is due the moment the daemon starts;
2. runs the real `mailflow serve` and, from several client connections at once, sends
   `--messages` authority replies to those requests, each with its own Message-ID, retrying
   (as an MTA would) every message that did not get a 250;
3. kills the daemon with SIGKILL at a random moment `--kills` times, restarting it each time;
4. lets the last daemon drain, then checks: every message acknowledged with 250 is stored
   exactly once on its thread; every stored reply was forwarded once; no reminder went out
   twice; the archive has every reply once.

Run it by hand at full length (the figures in docs/guarantees.md come from this):

    .venv/bin/python tests/crash_test.py --messages 5000 --kills 200
    createdb crash && .venv/bin/python tests/crash_test.py --daemons 3 \
        --database postgresql://postgres@127.0.0.1/crash --messages 3000 --kills 30

With `--daemons N` several `mailflow serve` share the database, each with its own port and
spool, the clients spread over them (and fail over, as MTAs do between MX hosts), and each
kill hits one of them at random while the others carry on.

The suite runs a shortened form (tests/adversarial/test_crash_safety.py). Exit status 0 when
every check holds, 1 with the failures listed otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import json
import os
import random
import re
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAILFLOW = [sys.executable, "-m", "mailflow"]
DOMAIN = "ask.example"
CITIZEN = "jane.citizen@citizen.example"
AUTHORITY = "foi@camden.gov.example"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_key(config: Path, table: str, key: str, value: str) -> None:
    text = config.read_text()
    m = re.search(rf"(?ms)^(\[{re.escape(table)}\]\n)(.*?)(?=^\[|\Z)", text)
    if m is None:
        text += f"\n[{table}]\n{key} = {value}\n"
    else:
        body = re.sub(rf"(?m)^#?\s*{key} = .*\n", "", m.group(2))
        text = text[:m.start()] + m.group(1) + f"{key} = {value}\n" + body + text[m.end():]
    config.write_text(text)


def letter(frm: str, to: str, subject: str, body: str, msgid: str) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = frm, to, subject
    m["Date"] = formatdate()
    m["Message-ID"] = msgid
    m.set_content(body)
    return m.as_bytes(policy=email.policy.SMTP)


# -- the site ----------------------------------------------------------------------------------
def make_site(where: Path, threads: int, database: str | None = None
              ) -> tuple[Path, list[tuple[int, str]]]:
    """A site with `threads` requests sent 60 days ago: every reminder is due at once."""
    site_dir = where / "site"
    subprocess.run([*MAILFLOW, "init", str(site_dir), "--domain", DOMAIN], check=True,
                   capture_output=True)
    config = site_dir / "config.toml"
    if database:
        set_key(config, "database", "url", f'"{database}"')
    set_key(config, "reminders", "sweep_seconds", "1")
    set_key(config, "archive", "debounce_seconds", "1")
    # Beside other busy tests, processors at the default nice 10 starved (41 s became 8 min).
    set_key(config, "spool", "processor_niceness", "0")

    from mailflow.clock import Clock
    from mailflow.delivery import deliver
    from mailflow.pipeline import Pipeline
    from mailflow.site import Site
    from mailflow.spool import Envelope

    site = Site.open(config)
    pipeline = Pipeline(site)
    sent_on = date.today() - timedelta(days=60)
    out: list[tuple[int, str]] = []
    for i in range(threads):
        first = letter(f"Jane <{CITIZEN}>", f"camden@{DOMAIN}", f"Gritting routes {i}",
                       f"Which roads are gritted, part {i}?", f"<setup-{i}@citizen.example>")
        pipeline.process(first, Envelope(mail_from=CITIZEN, rcpt_tos=[f"camden@{DOMAIN}"],
                                         via="test"))
        with site.store.read() as tx:
            t = tx.threads()[-1]
        confirm = f"confirm-{t.confirm_token}@{DOMAIN}"
        sent = pipeline.process(letter(f"Jane <{CITIZEN}>", confirm, "Re", "Yes",
                                       f"<confirm-{i}@citizen.example>"),
                                Envelope(mail_from=CITIZEN, rcpt_tos=[confirm], via="test"))
        # Delivered now, so the clock does not restart when the daemon delivers it.
        asyncio.run(deliver(site, sent.outbox_ids))
        with site.store.tx() as tx:
            Clock(site.settings, site.rules).start(tx, t.id, sent_on, actor="crash-test",
                                                   why="as if sent 60 days ago")
            t = tx.thread(t.id)
        out.append((t.id, site.request_address(t)))
    site.close()
    return site_dir, out


# -- the daemon ----------------------------------------------------------------------------------
class Daemon:
    """One `mailflow serve` of the site, with its own port and its own spool (as on its own
    machine behind one of the site's MX records), sharing the site's database."""

    def __init__(self, site_dir: Path, n: int):
        self.site_dir, self.port = site_dir, free_port()
        self.config = site_dir / f"config-{n}.toml"
        self.config.write_text((site_dir / "config.toml").read_text())
        set_key(self.config, "smtp", "listen", f'"127.0.0.1:{self.port}"')
        set_key(self.config, "spool", "dir", f'"var/spool-{n}"')
        self.log = site_dir / f"crash-serve-{n}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 60) -> None:
        self.proc = subprocess.Popen([*MAILFLOW, "--config", str(self.config),
                                      "serve"], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, cwd=self.site_dir,
                                     start_new_session=True)
        self.starts += 1
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("the daemon exited at start-up: see " + str(self.log))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(100).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the daemon did not start in time")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(60)


# -- the senders ---------------------------------------------------------------------------------
@dataclass
class Ledger:
    """What the clients know: which messages got a 250, and how often each was tried."""
    pending: list[int]
    acked: set[int] = field(default_factory=set)
    attempts: Counter[int] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> int | None:
        with self.lock:
            return self.pending.pop() if self.pending else None

    def give_back(self, n: int, why: str) -> None:
        with self.lock:
            self.pending.insert(0, n)
            self.refusals[why] += 1


def sender(ports: list[int], ledger: Ledger, messages: dict[int, tuple[str, bytes]],
           stop: threading.Event, first: int) -> None:
    """One client connection at a time, many messages on it, like a busy MTA's queue runner;
    when a server fails it, the next MX (the next daemon) is tried."""
    conn: smtplib.SMTP | None = None
    which = first
    while not stop.is_set():
        port = ports[which % len(ports)]
        n = ledger.take()
        if n is None:
            time.sleep(0.05)
            continue
        rcpt, raw = messages[n]
        ledger.attempts[n] += 1
        try:
            if conn is None:
                conn = smtplib.SMTP("127.0.0.1", port, timeout=10)
                conn.ehlo("mta.authority.example")
            conn.sendmail(AUTHORITY, [rcpt], raw)
        except smtplib.SMTPResponseException as e:
            code = getattr(e, "smtp_code", 0)
            if 500 <= code < 600:
                # A 5xx would make a real MTA bounce the message: the test fails on it.
                with ledger.lock:
                    ledger.refusals[f"5xx:{code}"] += 1
                continue
            ledger.give_back(n, f"{code}")
            conn = _drop(conn)
            which += 1
            time.sleep(0.05)
            continue
        except (OSError, smtplib.SMTPException) as e:
            ledger.give_back(n, type(e).__name__)
            conn = _drop(conn)
            which += 1
            time.sleep(0.05)
            continue
        with ledger.lock:
            ledger.acked.add(n)
    _drop(conn)


def _drop(conn: smtplib.SMTP | None) -> None:
    if conn is not None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass
    return None


# -- the checks ----------------------------------------------------------------------------------
def check(site_dir: Path, threads: list[tuple[int, str]], messages: dict[int, tuple[str, bytes]],
          ledger: Ledger) -> list[str]:
    from mailflow.site import Site
    from mailflow.store import tables as T
    from sqlalchemy import select

    failures: list[str] = []
    if len(ledger.acked) != len(messages):
        failures.append(f"only {len(ledger.acked)} of {len(messages)} messages were ever "
                        f"acknowledged")
    five = {k: v for k, v in ledger.refusals.items() if k.startswith("5xx")}
    if five:
        failures.append(f"the daemon answered 5xx (a real MTA would bounce): {five}")
    site = Site.open(site_dir / "config.toml")
    thread_of = {addr: tid for tid, addr in threads}
    with site.store.read() as tx:
        rows = tx.c.execute(select(T.messages.c.thread_id, T.messages.c.message_id,
                                      T.messages.c.kind, T.messages.c.direction)).all()
        outbox = tx.c.execute(select(T.outbox.c.thread_id, T.outbox.c.rcpt,
                                        T.outbox.c.state, T.messages.c.kind,
                                        T.messages.c.message_id)
                                 .join(T.messages, T.messages.c.id == T.outbox.c.message_pk)
                                 ).all()
        reminders = tx.c.execute(select(T.reminders.c.thread_id, T.reminders.c.kind,
                                           T.reminders.c.event, T.reminders.c.state)).all()
    stored = Counter(r.message_id for r in rows if r.direction == "in"
                     and (r.message_id or "").startswith("<chaos-"))
    for n in sorted(ledger.acked):
        msgid = f"<chaos-{n}@authority.example>"
        if stored[msgid] != 1:
            failures.append(f"{msgid}: acknowledged with 250, stored {stored[msgid]} times")
    wrong = [r for r in rows if (r.message_id or "").startswith("<chaos-")
             and r.thread_id != thread_of[messages[int(r.message_id[7:].split("@")[0])][0]]]
    if wrong:
        failures.append(f"{len(wrong)} messages stored on the wrong thread")
    forwards = Counter(r.thread_id for r in outbox if r.kind == "forward")
    replies = Counter(r.thread_id for r in rows if r.direction == "in" and r.kind == "response"
                      and (r.message_id or "").startswith("<chaos-"))
    if forwards != replies:
        diff = {t: (replies[t], forwards[t]) for t in set(forwards) | set(replies)
                if forwards[t] != replies[t]}
        failures.append(f"forwards differ from replies (thread: replies, forwards): {diff}")
    unsent = Counter(r.state for r in outbox if r.state != "sent")
    if unsent:
        failures.append(f"outbox rows not sent at the end: {dict(unsent)}")
    # Every outgoing message is in the Maildir once: one file per outbox row, and no two files
    # with the same Message-ID (a reminder or forward written twice would show here).
    seen: Counter[str] = Counter()
    for sub in ("new", "cur"):
        for f in (site_dir / "var" / "outbox" / sub).iterdir():
            with open(f, "rb") as fh:
                head = email.message_from_binary_file(fh, policy=email.policy.default,
                                                      _class=EmailMessage)
            seen[str(head["Message-ID"])] += 1
    doubled = {k: v for k, v in seen.items() if v > 1}
    if doubled:
        failures.append(f"{len(doubled)} outgoing messages delivered more than once")
    if sum(seen.values()) != len(outbox):
        failures.append(f"{sum(seen.values())} files in the outbox Maildir for {len(outbox)} "
                        f"outbox rows")
    sent_reminders = Counter((r.thread_id, r.kind) for r in reminders if r.state == "sent")
    reminder_mail = Counter((r.thread_id, r.kind) for r in outbox if r.kind.startswith("reminder"))
    if not sent_reminders:
        failures.append("no reminder was sent: the test did not exercise the reminders")
    # Archive: every public reply appears once on its thread's JSON page.
    from mailflow.archive.build import build
    build(site, None, False)
    archive = Path(site.settings.archive.dir) if site.settings.archive else site_dir / "var/archive"
    archive = archive if archive.is_absolute() else site_dir / archive
    found: Counter[str] = Counter()
    for page in archive.rglob("*.json"):
        try:
            data = json.loads(page.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("messages"), list):
            for m in data["messages"]:
                hit = re.match(r"Reply (\d+) to request", str(m.get("text") or ""))
                if hit:
                    found[hit.group(1)] += 1
    doubled_pages = {k: v for k, v in found.items() if v > 1}
    if doubled_pages:
        failures.append(f"{len(doubled_pages)} replies appear more than once in the archive")
    if found and len(found) != sum(stored.values()):
        failures.append(f"the archive shows {len(found)} replies, the store has "
                        f"{sum(stored.values())}")
    site.close()
    print(f"stored {sum(stored.values())} replies, {sum(forwards.values())} forwards, "
          f"{sum(sent_reminders.values())} reminders sent ({len(reminder_mail)} reminder mails), "
          f"{len(found)} replies in the archive", flush=True)
    return failures


# -- the run -------------------------------------------------------------------------------------
def run(messages_n: int, kills: int, threads_n: int, clients: int, seed: int,
        where: Path, daemons_n: int = 1, database: str | None = None) -> int:
    rng = random.Random(seed)
    t0 = time.monotonic()
    site_dir, threads = make_site(where, threads_n, database)
    messages = {}
    # Half the requests get the replies; the other half stay unanswered, so that their
    # reminders (due since the day the daemon first starts) go out while it is being killed.
    answered = threads[: max(1, len(threads) // 2)]
    for n in range(messages_n):
        tid, addr = answered[n % len(answered)]
        body = f"Reply {n} to request {tid}.\n" + ("The roads are listed below.\n" * rng.randint(1, 60))
        messages[n] = (addr, letter(f"FOI Officer <{AUTHORITY}>", addr,
                                    f"RE: Freedom of Information request {tid}", body,
                                    f"<chaos-{n}@authority.example>"))
    ledger = Ledger(pending=list(range(messages_n)))
    daemons = [Daemon(site_dir, n) for n in range(daemons_n)]
    ports = [d.port for d in daemons]
    stop = threading.Event()
    workers = [threading.Thread(target=sender, args=(ports, ledger, messages, stop, i),
                                daemon=True) for i in range(clients)]
    print(f"site ready with {threads_n} threads in {time.monotonic() - t0:.1f} s; sending "
          f"{messages_n} messages over {clients} connections to {daemons_n} daemon(s) on "
          f"{'PostgreSQL' if database and database.startswith('postgres') else 'SQLite'}, "
          f"{kills} kills", flush=True)
    for d in daemons:
        d.start()
    for w in workers:
        w.start()
    for k in range(kills):
        # Kill at a random point: mostly while mail is flowing, sometimes the moment it starts.
        time.sleep(rng.choice([0.0, 0.05, rng.uniform(0.05, 1.5)]))
        victim = rng.choice(daemons)
        victim.kill()
        if (k + 1) % 10 == 0:
            print(f"  {k + 1} kills, {len(ledger.acked)} acknowledged", flush=True)
        if daemons_n > 1:
            time.sleep(rng.uniform(0, 0.5))   # the others carry on meanwhile
        victim.start()
    # The last daemon lives: everything left is sent, then processed and published.
    end = time.monotonic() + 600
    while len(ledger.acked) < messages_n and time.monotonic() < end:
        time.sleep(0.2)
    stop.set()
    for w in workers:
        w.join(30)
    print(f"  {len(ledger.acked)} acknowledged after {time.monotonic() - t0:.0f} s", flush=True)
    # What `mailflow status --json` says, asked in this process: a status process a poll
    # for each daemon (about a second of CPU each) slowed the daemons it waited for.
    from mailflow.instances import spool_depth
    from mailflow.site import Site
    sites = [Site.open(d.config) for d in daemons]
    try:
        while time.monotonic() < end:
            depths = [spool_depth(s.spool) for s in sites]
            with sites[0].store.read() as tx:
                counts = tx.counts()
            if all(d["pending"] == 0 and d["in_work"] == 0 for d in depths) \
                    and not _outbox_busy(counts):
                break
            time.sleep(0.5)
    finally:
        for s in sites:
            s.close()
    print(f"  spools and outbox drained after {time.monotonic() - t0:.0f} s", flush=True)
    time.sleep(3)  # one more reminder sweep and archive build of the drained site
    for d in daemons:
        d.kill(signal.SIGTERM)
    failures = check(site_dir, threads, messages, ledger)
    print(f"{sum(d.starts for d in daemons)} daemon starts, {kills} kills, {len(ledger.acked)} acknowledged, "
          f"{sum(ledger.attempts.values())} attempts; refusals seen: {dict(ledger.refusals)}; "
          f"{time.monotonic() - t0:.0f} s", flush=True)
    for f in failures:
        print("FAIL:", f, flush=True)
    if not failures:
        print("crash test holds", flush=True)
    return 1 if failures else 0


def _outbox_busy(s: dict) -> bool:  # type: ignore[type-arg]
    for key, value in s.items():
        if key.startswith("outbox") and key not in ("outbox_sent", "outbox_failed") \
                and isinstance(value, int) and value:
            return True
    return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--kills", type=int, default=200)
    p.add_argument("--threads", type=int, default=20)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--daemons", type=int, default=1,
                   help="daemons sharing the site's database, each with its own spool")
    p.add_argument("--database", default=None,
                   help="an EMPTY database URL (default: the site's own SQLite file)")
    p.add_argument("--dir", type=Path, default=None, help="work here (default: a temp dir)")
    a = p.parse_args()
    print(f"seed {a.seed}", flush=True)
    args = (a.messages, a.kills, a.threads, a.clients, a.seed)
    if a.dir:
        a.dir.mkdir(parents=True, exist_ok=True)
        return run(*args, a.dir, a.daemons, a.database)
    with tempfile.TemporaryDirectory() as d:
        return run(*args, Path(d), a.daemons, a.database)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
