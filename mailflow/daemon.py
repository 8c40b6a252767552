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
from datetime import datetime, timezone

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from mailflow.archive.build import build as build_archive
from mailflow.archive.queue import queue_withheld
from mailflow.ingress.imap import parse_accounts, run_pollers
from mailflow.ingress.smtp import IngressHandler, RcptDecision, start_server
from mailflow.delivery import deliver
from mailflow.instances import HEARTBEAT, Registry, health_path, spool_depth, write_health
from mailflow.pipeline import Gatekeeper, Pipeline
from mailflow.reminders import Reminders
from mailflow.site import Site

log = logging.getLogger("mailflow.daemon")


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

    # -- the door ----------------------------------------------------------------------------
    async def check_rcpt(self, mail_from: str, rcpt: str) -> RcptDecision:
        d = self.site.check_recipient(rcpt)
        if d.accept and mail_from and await asyncio.to_thread(self.gatekeeper.blocked, mail_from):
            return RcptDecision(False, "550 5.7.1 Mail from this sender is not accepted here")
        if d.accept and d.address is not None and d.address.thread_id is not None:
            refusal = await asyncio.to_thread(self.gatekeeper.refusal, d.address, mail_from)
            if refusal is not None:
                return RcptDecision(False, refusal)
        return RcptDecision(d.accept, d.reply)

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
                report = await asyncio.to_thread(build_archive, self.site, None, False)
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
