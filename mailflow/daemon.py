"""`mailflow serve`: the composition root that wires the adapters around the pipeline.

One asyncio loop runs the SMTP server, a worker that processes spooled messages one at a
time, and APScheduler jobs that only *sweep* state kept on disk and in the database (spool
leftovers, due outbox rows, old spool files). Nothing important lives only in memory: a
restart finds every unfinished message in the spool and every undelivered mail in the outbox.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from datetime import datetime, timezone

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import select

from mailflow.archive.build import ArchiveBusy, build as build_archive
from mailflow.archive.queue import queue_withheld
from mailflow.core.addresses import OurAddress
from mailflow.ingress.imap import parse_accounts, run_pollers
from mailflow.ingress.smtp import IngressHandler, RcptDecision, start_server
from mailflow.delivery import deliver
from mailflow.instances import HEARTBEAT, Registry, health_path, spool_depth, write_health
from mailflow.pipeline import Gatekeeper, Pipeline
from mailflow.reminders import Reminders
from mailflow.site import Site
from mailflow.store.tables import blocked_senders

log = logging.getLogger("mailflow.daemon")

BLOCKLIST_REFRESH_SECONDS = 5.0
"""How stale the RCPT check's copy of the blocked senders may be (see `Daemon.check_rcpt`)."""

_BLOCKED_REPLY = "550 5.7.1 Mail from this sender is not accepted here"


class Daemon:
    def __init__(self, site: Site):
        self.site = site
        self.pipeline = Pipeline(site)
        self.gatekeeper = Gatekeeper(site)
        self.reminders = Reminders(site)
        self.wakeup: asyncio.Queue[str | None] = asyncio.Queue()
        self.stopping = asyncio.Event()
        self._outbox_lock = asyncio.Lock()
        self._archive_lock = asyncio.Lock()
        self._archive_timer: asyncio.TimerHandle | None = None
        self.registry = Registry(site.store)
        # The RCPT check's copy of the blocked_senders table (see check_rcpt).
        self._blocked: frozenset[str] = frozenset()
        self._blocked_read_at = float("-inf")  # time.monotonic() of the last read (or try)

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
        """
        d = self.site.check_recipient(rcpt)
        if not d.accept:
            return RcptDecision(d.accept, d.reply)
        addr = d.address if d.address is not None and d.address.thread_id is not None else None
        now = time.monotonic()
        refresh = now - self._blocked_read_at >= BLOCKLIST_REFRESH_SECONDS
        if refresh:
            self._blocked_read_at = now  # concurrent RCPTs use the old copy meanwhile
        if not refresh and addr is None:
            refusal = _BLOCKED_REPLY if self._is_blocked(mail_from) else None  # no hop
        else:
            refusal = await asyncio.to_thread(self._rcpt_refusal, mail_from, addr, refresh)
        if refusal is not None:
            return RcptDecision(False, refusal)
        return RcptDecision(d.accept, d.reply)

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
        self.wakeup.put_nowait(spool_id)

    # -- the worker --------------------------------------------------------------------------
    async def worker(self) -> None:
        while True:
            spool_id = await self.wakeup.get()
            if spool_id is None:
                return
            await self.process(spool_id)

    async def process(self, spool_id: str | None) -> None:
        item = await asyncio.to_thread(self.site.spool.claim, spool_id)
        if item is None:
            return
        try:
            result = await asyncio.to_thread(self.pipeline.process_item, self.site.spool, item)
        except Exception as e:  # noqa: BLE001 - logged and left in the spool by process_item
            log.warning("spool item %s not processed yet: %s", item.id, e)
            return
        if result.outbox_ids:
            await self.flush_outbox(result.outbox_ids)
        self.archive_soon()

    # -- the public archive ------------------------------------------------------------------
    def archive_soon(self) -> None:
        """Rebuild what changed a little after the last change (debounced: a burst of mail
        makes one rebuild, not one per message)."""
        if self._archive_timer is not None:
            self._archive_timer.cancel()
        delay = self.site.settings.archive.debounce_seconds if self.site.settings.archive else 20
        self._archive_timer = asyncio.get_running_loop().call_later(
            delay, lambda: asyncio.ensure_future(self.refresh_archive()))

    async def refresh_archive(self) -> None:
        async with self._archive_lock:
            try:
                report = await asyncio.to_thread(build_archive, self.site, None, False,
                                                 wait=False)
            except ArchiveBusy as e:
                # Another instance is the writer just now: what changed here is in the
                # database, so a build a little later picks it up (ours, or theirs).
                log.info("archive: %s; trying again later", e)
                self.archive_soon()
                return
            except Exception:  # noqa: BLE001 - the published archive stays as it was
                log.exception("archive build failed; the published archive is unchanged")
                return
            if report.withheld:
                await asyncio.to_thread(queue_withheld, self.site, report.withheld)
            if report.written or report.removed:
                log.info("archive: %d files written, %d removed", report.written, report.removed)

    async def sweep_spool(self) -> None:
        """Anything in new/ that no wake-up covered (retries, a crash, another process)."""
        for spool_id in await asyncio.to_thread(self.site.spool.pending):
            self.wakeup.put_nowait(spool_id)

    async def flush_outbox(self, ids: list[int] | None = None) -> None:
        async with self._outbox_lock:
            try:
                counts = await deliver(self.site, ids)
            except Exception:  # noqa: BLE001 - the rows stay queued; the next sweep retries
                log.exception("outbox delivery failed")
                return
        if any(counts.values()):
            log.info("outbox: %s", counts)

    async def sweep_reminders(self) -> None:
        """Send what is due; a missed window (the daemon was down) sends late, never not."""
        try:
            result = await asyncio.to_thread(self.reminders.run, datetime.now(timezone.utc))
        except Exception:  # noqa: BLE001 - the next sweep tries again; nothing was half-sent
            log.exception("reminder sweep failed")
            return
        if result.outbox_ids:
            await self.flush_outbox(result.outbox_ids)
        if result.sent or result.recomputed:
            self.archive_soon()
            log.info("reminders: %d sent, %d skipped, %d due dates moved", len(result.sent),
                     len(result.skipped), len(result.recomputed))

    # -- being one of several ------------------------------------------------------------------
    def _health(self) -> dict[str, object]:
        depth = spool_depth(self.site.spool)
        with self.site.store.read() as tx:
            counts = tx.counts()
        return {"spool_pending": depth["pending"], "spool_in_work": depth["in_work"],
                "spool_failed": depth["failed"], "oldest_unprocessed_seconds": depth["oldest"],
                "outbox_backlog": counts["outbox_queued"], "queue_open": counts["queue_open"]}

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
        await asyncio.to_thread(write_health, path, {
            "ok": True, "instance": self.registry.id, "at": now.isoformat(), **detail})
        if released:
            log.info("released %d outbox rows held by instances that died", released)
            await self.flush_outbox()

    async def cleanup(self) -> None:
        await asyncio.to_thread(self.registry.forget_old)
        n = await asyncio.to_thread(self.site.spool.cleanup_done,
                                    self.site.settings.spool.keep_done_days)
        if n:
            log.info("removed %d processed spool files", n)

    # -- running -----------------------------------------------------------------------------
    async def run(self) -> None:
        s = self.site.settings
        loop = asyncio.get_running_loop()
        # aiosmtpd logs every command with its addresses at INFO: citizens' addresses in logs.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.site.store  # migrate before accepting mail  # noqa: B018
        self.site.signer  # a missing DKIM key is an error now, not at the first send  # noqa: B018
        from mailflow import __version__
        await asyncio.to_thread(self.registry.register, __version__,
                                {"spool": str(s.spool.dir), "listen":
                                 f"{s.smtp.listen_host}:{s.smtp.listen_port}"})
        await self.heartbeat()
        await asyncio.to_thread(self._read_blocked)  # before the first RCPT, not during it
        self._blocked_read_at = time.monotonic()
        recovered = await asyncio.to_thread(self.site.spool.recover)
        if recovered:
            log.info("recovered %d spool items left by a crash", recovered)
        handler = IngressHandler(self.site.spool, self.check_rcpt, self.on_spooled,
                                 max_recipients=s.smtp.max_recipients,
                                 via="lmtp" if s.smtp.lmtp else "smtp")
        server = await start_server(handler, s.smtp.listen_host, s.smtp.listen_port,
                                    hostname=s.smtp.hostname,
                                    max_message_size=s.smtp.max_message_size, lmtp=s.smtp.lmtp,
                                    timeout=s.smtp.idle_timeout,
                                    max_connections=s.smtp.max_connections,
                                    max_connections_per_ip=s.smtp.max_connections_per_ip,
                                    tls_cert=s.smtp.tls_cert, tls_key=s.smtp.tls_key)
        worker = asyncio.create_task(self.worker(), name="spool-worker")
        imap_accounts = parse_accounts(s.raw.get("imap"), s.path)
        imap_task = asyncio.create_task(
            run_pollers(imap_accounts, self.site.spool, self.on_spooled, s.var, self.stopping),
            name="imap-pollers")
        scheduler = AsyncIOScheduler()
        scheduler.add_job(self.sweep_spool, "interval", seconds=30, id="spool",
                          max_instances=1, coalesce=True)
        scheduler.add_job(self.flush_outbox, "interval", seconds=30, id="outbox",
                          max_instances=1, coalesce=True)
        scheduler.add_job(self.sweep_reminders, "interval", seconds=s.reminders.sweep_seconds,
                          id="reminders", max_instances=1, coalesce=True)
        # Overdue lists move with the date even when no mail comes.
        scheduler.add_job(self.refresh_archive, "cron", hour=0, minute=10, id="archive",
                          max_instances=1, coalesce=True)
        scheduler.add_job(self.heartbeat, "interval", seconds=HEARTBEAT.total_seconds(),
                          id="heartbeat", max_instances=1, coalesce=True)
        scheduler.add_job(self.cleanup, "interval", hours=6, id="cleanup",
                          max_instances=1, coalesce=True)
        scheduler.start()
        await self.sweep_spool()
        await self.flush_outbox()
        await self.sweep_reminders()
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
            if self._archive_timer is not None:
                self._archive_timer.cancel()
            self.wakeup.put_nowait(None)
            try:
                await asyncio.wait_for(worker, timeout=30)
            except asyncio.TimeoutError:
                log.warning("worker did not finish in 30 s; its item stays in the spool")
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
