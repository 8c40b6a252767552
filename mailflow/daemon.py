"""`mailflow serve`: the composition root that wires the adapters around the pipeline.

Two processes. This one takes mail in: the SMTP/LMTP server with its RCPT checks, the IMAP
pollers, the heartbeat and the health file; it spools each message (fsynced before the 250)
and tells the processor about it. The processor (`mailflow.processor`, a child process this
one starts, and restarts if it dies) does everything after: processing the spool, the outbox,
reminders, the archive, clean-up (its module says why each job is there). Processing is CPU
work in Python; in the same process it held the GIL the accept loop needed, and the accept
rate and latency suffered under every burst.

Each process runs one asyncio loop, with APScheduler jobs that only *sweep* state kept on disk
and in the database. Nothing important lives only in memory: a restart (of either) finds every
unfinished message in the spool and every undelivered mail in the outbox. SIGTERM stops both:
this one stops accepting and finishes the messages being spooled, then tells the processor to
finish its item and waits for it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import select

from mailflow.core.addresses import OurAddress
from mailflow.errors import MailflowError
from mailflow.ingress.imap import parse_accounts, run_pollers
from mailflow.ingress.smtp import IngressHandler, RcptDecision, start_server
from mailflow.instances import HEARTBEAT, Registry, health_path, spool_depth, write_health
from mailflow.pipeline import Gatekeeper
from mailflow.site import Site
from mailflow.store.tables import blocked_senders

log = logging.getLogger("mailflow.daemon")

BLOCKLIST_REFRESH_SECONDS = 5.0
"""How stale the RCPT check's copy of the blocked senders may be (see `Daemon.check_rcpt`)."""
LET_IN_SECONDS = 5.0
"""How long the RCPT check reuses a thread policy's "let in" for one sender and address."""
LET_IN_MAX = 10_000
"""Entries of that memory at most (it is emptied of old ones, or wholly, beyond)."""
UNREAD_MAX = 1 << 20
"""Bytes of wake-ups the processor has not read yet beyond which more are dropped (it is
stuck or starting; its sweep of the spool finds those messages), so memory stays bounded."""
PROCESSOR_STOP_SECONDS = 45.0
"""How long a stopping daemon waits for its processor (which gives its item 30 s) before
killing it; safe either way, the item stays in the spool. (mailflow.processor is not
imported here: its archive and delivery modules would only weigh on this process.)"""
RESTART_DELAY = (1.0, 60.0)
"""A processor that died is started again after the first delay, doubling up to the second
while it keeps dying young (a broken config or database is not a reason to spin)."""
STEADY_SECONDS = 60.0
"""A processor that ran this long died of something new: back to the first delay."""

_BLOCKED_REPLY = "550 5.7.1 Mail from this sender is not accepted here"


class Daemon:
    def __init__(self, site: Site):
        self.site = site
        self.gatekeeper = Gatekeeper(site)
        self.stopping = asyncio.Event()
        self.registry = Registry(site.store)
        self.processor: asyncio.subprocess.Process | None = None
        self.processor_restarts = 0
        self._processor_exit: int | None = None  # the last one's exit status, while down
        # The RCPT check's copy of the blocked_senders table (see check_rcpt).
        self._blocked: frozenset[str] = frozenset()
        self._blocked_read_at = float("-inf")  # time.monotonic() of the last read (or try)
        # (thread address, sender) -> time.monotonic() when the policy let it in (check_rcpt)
        self._let_in: dict[tuple[str, str], float] = {}

    # -- the door ----------------------------------------------------------------------------
    async def check_rcpt(self, mail_from: str, rcpt: str) -> RcptDecision:
        """Refuse at RCPT what the pipeline would only drop or queue: unknown addresses,
        blocked senders, senders a thread's policy does not let in.

        At most one thread hop and one read transaction per RCPT (the thread's policy, for a
        thread address), because every RCPT of every connection waits for it. Blocked senders
        are checked against a copy of the table held here and read again at most every
        `BLOCKLIST_REFRESH_SECONDS`, in the same hop: blocks are rare, made by an admin
        command in another process (so nothing here could be told), and a block is never
        lifted. A sender blocked in the last few seconds may still get a 250; the pipeline
        checks the table itself and drops that message, so the only cost is its bytes in
        the spool. If the table cannot be read, the last copy stays in use: the check fails
        open, as the thread policy does, since losing mail is worse than taking spam.

        The thread policy's answer is remembered too, but only a "let in", and only for
        `LET_IN_SECONDS`, per thread address and sender: a burst of replies from one
        authority (an MTA flushing its queue) then costs one store read, not one per
        message, and the hop to a thread that it costs was most of the RCPT's latency. A
        policy tightened in those seconds lets a message in that it would have refused; the
        pipeline applies the same policy and queues it, as when the store cannot answer. A
        refusal is never reused, so loosening a policy takes effect at once.
        """
        d = self.site.check_recipient(rcpt)
        if not d.accept:
            return RcptDecision(d.accept, d.reply)
        addr = d.address if d.address is not None and d.address.thread_id is not None else None
        now = time.monotonic()
        refresh = now - self._blocked_read_at >= BLOCKLIST_REFRESH_SECONDS
        if refresh:
            self._blocked_read_at = now  # concurrent RCPTs use the old copy meanwhile
        key = None if addr is None else (addr.address.lower(), mail_from.strip().lower())
        known = key is not None and now - self._let_in.get(key, float("-inf")) < LET_IN_SECONDS
        if not refresh and (addr is None or known):
            refusal = _BLOCKED_REPLY if self._is_blocked(mail_from) else None  # no hop
        else:
            refusal = await asyncio.to_thread(self._rcpt_refusal, mail_from, addr, refresh)
            if refusal is None and key is not None:
                self._remember_let_in(key, now)
        if refusal is not None:
            return RcptDecision(False, refusal)
        return RcptDecision(d.accept, d.reply)

    def _remember_let_in(self, key: tuple[str, str], when: float) -> None:
        """`when` is the time before the store was asked, so an entry never outlives the
        answer it copies by more than LET_IN_SECONDS."""
        if len(self._let_in) >= LET_IN_MAX:
            self._let_in = {k: t for k, t in self._let_in.items() if when - t < LET_IN_SECONDS}
            if len(self._let_in) >= LET_IN_MAX:
                self._let_in.clear()
        self._let_in[key] = when

    def _rcpt_refusal(self, mail_from: str, addr: OurAddress | None,
                      refresh: bool) -> str | None:
        """check_rcpt's work off the event loop (one hop)."""
        if refresh:
            self._read_blocked()
        if self._is_blocked(mail_from):
            return _BLOCKED_REPLY
        if addr is not None:
            return self.gatekeeper.refusal(addr, mail_from)  # fails open by itself
        return None

    def _read_blocked(self) -> None:
        try:
            with self.site.store.read() as tx:
                patterns = frozenset(r[0] for r in tx.c.execute(select(blocked_senders.c.pattern)))
        except Exception as e:  # noqa: BLE001 - fail open: keep the last copy, try again later
            log.warning("cannot read the blocked senders; using the list read before: %s", e)
            return
        self._blocked = patterns

    def _is_blocked(self, sender: str) -> bool:
        """`Tx.is_blocked` on the copy: the address, or "@" + its domain, is a pattern."""
        sender = sender.strip().lower()
        if not sender or "@" not in sender:
            return False
        return sender in self._blocked or "@" + sender.rpartition("@")[2] in self._blocked

    def on_spooled(self, spool_id: str) -> None:
        """Tell the processor about a message just spooled (one line on its stdin, buffered
        by the loop: never blocks the accept path). With no processor running the line is
        dropped: the next one sweeps the spool when it starts."""
        self._tell(f"spool {spool_id}")

    def _tell(self, line: str) -> None:
        p = self.processor
        if p is None or p.returncode is not None or p.stdin is None:
            return
        try:
            if p.stdin.is_closing() or p.stdin.transport.get_write_buffer_size() > UNREAD_MAX:
                return
            p.stdin.write(line.encode("ascii", "replace") + b"\n")
        except (ConnectionError, RuntimeError, OSError):
            pass  # it is dying; supervise() starts the next, which sweeps

    # -- the processor ---------------------------------------------------------------------------
    def _processor_command(self) -> list[str]:
        root = logging.getLogger()
        fmt = "json" if any(type(h.formatter).__name__ == "JsonFormatter"
                            for h in root.handlers) else "text"
        return [sys.executable, "-m", "mailflow.processor",
                "--config", str(self.site.settings.path), "--instance", self.registry.id,
                "--parent", str(os.getpid()), "--log-level", str(root.getEffectiveLevel()),
                "--log-format", fmt, "--no-recover",
                "--nice", str(self.site.settings.spool.processor_niceness)]

    async def start_processor(self) -> asyncio.subprocess.Process:
        """Start the processor with this very mailflow (its package first on the path, so a
        checkout or `bench --commit` runs the same code in both processes).

        What a crash (of the daemon, or of the processor before this one) left in work/ goes
        back to new/ here, before the processor starts: at the daemon's start that is before
        it accepts mail, as it always was. The processor does not do it itself, as it would
        do it a second or two later, when a `mailflow ingest` may be holding a live item."""
        recovered = await asyncio.to_thread(self.site.spool.recover)
        if recovered:
            log.info("recovered %d spool items left by a crash", recovered)
        env = dict(os.environ)
        here = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        proc = await asyncio.create_subprocess_exec(
            *self._processor_command(), stdin=asyncio.subprocess.PIPE, env=env)
        self.processor = proc
        self._processor_exit = None
        log.info("started the processor (pid %d)", proc.pid)
        return proc

    async def supervise(self, first: asyncio.subprocess.Process) -> None:
        """Wait for the processor; while the daemon runs, start a new one when it dies.

        Nothing is lost meanwhile: messages keep being spooled, and the new processor
        recovers what the dead one had claimed and sweeps the spool when it starts."""
        delay = RESTART_DELAY[0]
        proc: asyncio.subprocess.Process | None = first
        while True:
            started = time.monotonic()
            assert proc is not None
            code = await proc.wait()
            if self.stopping.is_set():
                return
            self._processor_exit = code
            self.processor_restarts += 1
            if time.monotonic() - started >= STEADY_SECONDS:
                delay = RESTART_DELAY[0]
            log.error("the processor (pid %d) exited with status %s; starting another in "
                      "%.0f s", proc.pid, code, delay)
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=delay)
                return
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, RESTART_DELAY[1])
            proc = None
            while proc is None:
                try:
                    proc = await self.start_processor()
                except OSError as e:
                    log.error("cannot start the processor: %s; trying again in %.0f s", e, delay)
                    try:
                        await asyncio.wait_for(self.stopping.wait(), timeout=delay)
                        return
                    except asyncio.TimeoutError:
                        pass

    async def stop_processor(self, timeout: float = PROCESSOR_STOP_SECONDS) -> None:
        """Ask the processor to finish its item and stop (a ``stop`` line, then the end of
        its stdin; a SIGTERM to the whole group reaches it anyway), and wait; kill it if
        it does not stop in time, which is safe: its item stays in the spool."""
        p = self.processor
        if p is None or p.returncode is not None:
            return
        self._tell("stop")
        try:
            if p.stdin is not None:
                p.stdin.close()
        except (ConnectionError, RuntimeError, OSError):
            pass
        try:
            await asyncio.wait_for(p.wait(), timeout=timeout)
        except asyncio.TimeoutError:
            log.warning("the processor did not stop in %.0f s; killing it", timeout)
            p.kill()
            await p.wait()

    def processor_problem(self) -> str | None:
        """Why the health file should say not ok, as far as the processor goes."""
        p = self.processor
        if p is None or p.returncode is not None:
            return (f"the processor is not running (exit status {self._processor_exit}, "
                    f"{self.processor_restarts} restart(s)); starting it again")
        return None

    # -- being one of several ------------------------------------------------------------------
    def _health(self) -> dict[str, object]:
        depth = spool_depth(self.site.spool)
        with self.site.store.read() as tx:
            counts = tx.counts()
        p = self.processor
        return {"spool_pending": depth["pending"], "spool_in_work": depth["in_work"],
                "spool_failed": depth["failed"], "oldest_unprocessed_seconds": depth["oldest"],
                "outbox_backlog": counts["outbox_queued"], "queue_open": counts["queue_open"],
                "processor_pid": p.pid if p is not None and p.returncode is None else None,
                "processor_restarts": self.processor_restarts}

    async def heartbeat(self) -> None:
        """Say we are alive (database and health file), and free what dead instances held."""
        path = health_path(self.site)
        now = datetime.now(timezone.utc)
        try:
            detail = await asyncio.to_thread(self._health)
            await asyncio.to_thread(self.registry.beat, detail)
            released = await asyncio.to_thread(self.registry.release_claims)
        except Exception as e:  # noqa: BLE001 - the health file says so; the next beat retries
            log.warning("heartbeat failed: %s", e)
            await asyncio.to_thread(write_health, path, {
                "ok": False, "instance": self.registry.id, "at": now.isoformat(),
                "problem": f"database: {type(e).__name__}: {e}"[:500]})
            return
        problem = self.processor_problem()
        health = {"ok": problem is None, "instance": self.registry.id, "at": now.isoformat(),
                  **detail}
        if problem is not None:
            health["problem"] = problem
        await asyncio.to_thread(write_health, path, health)
        if released:
            log.info("released %d outbox rows held by instances that died", released)
            self._tell("outbox")

    # -- running -----------------------------------------------------------------------------
    async def run(self) -> None:
        s = self.site.settings
        loop = asyncio.get_running_loop()
        # aiosmtpd logs every command with its addresses at INFO: citizens' addresses in logs.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.site.store  # migrate before accepting mail (and before the processor opens it)  # noqa: B018
        self.site.signer  # a missing DKIM key is an error now, not at the first send  # noqa: B018
        from mailflow import __version__
        await asyncio.to_thread(self.registry.register, __version__,
                                {"spool": str(s.spool.dir), "listen":
                                 f"{s.smtp.listen_host}:{s.smtp.listen_port}"})
        await asyncio.to_thread(self._read_blocked)  # before the first RCPT, not during it
        self._blocked_read_at = time.monotonic()
        handler = IngressHandler(self.site.spool, self.check_rcpt, self.on_spooled,
                                 max_recipients=s.smtp.max_recipients,
                                 via="lmtp" if s.smtp.lmtp else "smtp")
        # The port is bound first, not yet listening: a port another program holds is one
        # clear error at once, without a processor started only to be stopped again.
        try:
            server = await start_server(handler, s.smtp.listen_host, s.smtp.listen_port,
                                        hostname=s.smtp.hostname,
                                        max_message_size=s.smtp.max_message_size,
                                        lmtp=s.smtp.lmtp, timeout=s.smtp.idle_timeout,
                                        max_connections=s.smtp.max_connections,
                                        max_connections_per_ip=s.smtp.max_connections_per_ip,
                                        tls_cert=s.smtp.tls_cert, tls_key=s.smtp.tls_key,
                                        start_serving=False)
        except OSError as e:
            # A port already taken or a host that is not this machine's: one line that names
            # the setting, not a traceback from inside asyncio.
            self.registry.stopped()
            raise MailflowError(
                f"cannot listen on {s.smtp.listen_host}:{s.smtp.listen_port} ([smtp] listen in "
                f"{s.path}): {e.strerror or e}") from e
        try:
            # start_processor recovers what a crash left in the spool, before the processor
            # claims anything and before this process accepts mail.
            supervisor = asyncio.create_task(self.supervise(await self.start_processor()),
                                             name="processor-supervisor")
        except BaseException:
            server.close()
            raise
        try:
            await self.heartbeat()
            await server.start_serving()
        except BaseException:
            self.stopping.set()
            server.close()
            await self.stop_processor()
            supervisor.cancel()
            raise
        imap_accounts = parse_accounts(s.raw.get("imap"), s.path)
        imap_task = asyncio.create_task(
            run_pollers(imap_accounts, self.site.spool, self.on_spooled, s.var, self.stopping),
            name="imap-pollers")
        scheduler = AsyncIOScheduler()
        scheduler.add_job(self.heartbeat, "interval", seconds=HEARTBEAT.total_seconds(),
                          id="heartbeat", max_instances=1, coalesce=True)
        scheduler.start()
        log.info("mailflow for %s listening on %s:%d (%s)%s", self.site.domain,
                 s.smtp.listen_host, s.smtp.listen_port, "LMTP" if s.smtp.lmtp else "SMTP",
                 f"; IMAP: {len(imap_accounts)} account(s)" if imap_accounts else "")
        try:
            await self.stopping.wait()
        finally:
            log.info("shutting down")
            server.close()
            await server.wait_closed()
            await handler.drain()  # messages still being written get their 250 and a wake-up
            try:
                await asyncio.wait_for(imap_task, timeout=15)
            except asyncio.TimeoutError:
                imap_task.cancel()
            scheduler.shutdown(wait=False)
            await self.stop_processor()
            supervisor.cancel()
            try:
                self.registry.stopped()
                write_health(health_path(self.site), {
                    "ok": False, "instance": self.registry.id,
                    "at": datetime.now(timezone.utc).isoformat(), "problem": "stopped"})
            except Exception:  # noqa: BLE001 - a stale heartbeat says the same, a little later
                log.warning("could not record the stop", exc_info=True)
            self.site.close()
            log.info("stopped")


async def run(site: Site) -> None:
    await Daemon(site).run()
