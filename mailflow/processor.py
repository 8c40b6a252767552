"""The processing half of `mailflow serve`, in a child process of its own.

`mailflow serve` is two processes. The parent (`daemon.py`) takes mail in: SMTP/LMTP, IMAP
polling, the RCPT checks, the heartbeat and the health file. This child does everything that
follows the 250: it claims spooled messages and runs the pipeline on them, sends the outbox,
sweeps the reminders, rebuilds the archive and cleans the spool. Why a process and not a
thread: processing is CPU work in Python (parsing, matching, SQLAlchemy, DKIM signing,
rendering), and in the same process it holds the GIL that the SMTP loop needs to answer its
clients; under a burst the accept rate halved and the end-of-DATA latency doubled. A second
process uses the machine's other core and leaves the accept loop alone.

Where each job runs, and why:

- processing the spool, here: it is the CPU work that had to leave the accept loop;
- the outbox sender, here: most of its work is what processing produced (forwards and
  notices, flushed as soon as an item is done), and signing and sending cost CPU too;
- the reminder sweep, here: seconds of CPU on a large site, and it too fills the outbox;
- archive rebuilds (after a burst, and nightly), here: the heaviest CPU work of all, and
  triggered by processing;
- spool and registry clean-up, here: housekeeping of what this process works on;
- the heartbeat and the health file, in the parent: they speak for the whole instance and
  must say when this process is down; the parent knows, since it waits for it.

The parent tells this process about each new message through its stdin, one line per event
(``spool <id>``, or ``outbox`` when the outbox should be flushed now); a lost line costs
nothing but latency, since a sweep of the spool every 30 s finds anything a line did not
announce, as it finds what a crash or another process left. End of file on stdin means that
the parent is gone: stop. Should the parent die without closing it (SIGKILL), the kernel
kills this process too (``PR_SET_PDEATHSIG``), as the single process used to die whole, so
that the next start finds its half-done work exactly as a crash leaves it.

Those lines also say when mail is coming in, and processing keeps out of the way of a burst
(`Deferral`): it starts once no new message has been announced for `QUIET_SECONDS`, or once
the oldest message waiting has waited `MAX_DELAY_SECONDS`. Running beside the burst, its CPU
and, above all, its fsyncs (SQLite commits, outbox files) made the spool's fsyncs, which every
250 waits for, queue behind them; at nice 10 it yielded the CPU but not the disk.

Run by the daemon only: ``python -m mailflow.processor --config C --instance ID --parent PID``.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import sys
import random
import time
from collections.abc import Coroutine
from datetime import datetime, timezone
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from mailflow import heap
from mailflow.archive.build import ArchiveBusy, build as build_archive
from mailflow.archive.queue import queue_withheld
from mailflow.delivery import deliver
from mailflow.instances import Registry
from mailflow.pipeline import Pipeline
from mailflow.reminders import Reminders
from mailflow.site import Site
from mailflow.store.repository import is_conflict

log = logging.getLogger("mailflow.processor")

SPOOL_SWEEP_SECONDS = 30
OUTBOX_SWEEP_SECONDS = 30
NICENESS = 10
"""The processor runs at a lower CPU priority than the daemon: under a burst, answering the
clients comes first, and the backlog is processed in the time the accept loop leaves (a few
seconds later; the spool holds it safely meanwhile)."""
BATCH_MAX = 50
"""Wake-ups taken together into one `Pipeline.process_items` (one commit) when a burst has
queued them: each commit is an fsync, which the accepting process waits on too."""
STOP_TIMEOUT = 30.0
"""How long the item being processed may take to finish once asked to stop."""
QUIET_SECONDS = 0.1
"""Processing waits until the daemon has announced no new message for this long: while a
burst is being accepted, the accepting process has the CPU and the disk to itself (the
processor's commits and outbox files are fsyncs that the spool's fsyncs would queue behind)."""
MAX_DELAY_SECONDS = 2.0
"""...but a message never waits longer than this for that quiet: under a steady stream the
processor works as it always did, a little behind (see `Deferral`)."""


class Deferral:
    """When to start processing what the daemon announced: once the ingress has been quiet
    for `quiet` seconds (no wake-up since), or once the oldest waiting message has waited
    `max_delay`, whichever comes first. So a burst is accepted first and processed right
    after it; a lone message is processed `quiet` seconds after it arrives; and no message
    waits more than `max_delay` beyond its arrival for the processor to start on it, however
    long the stream lasts (only the backlog itself can hold it longer, as it always could).

    Pure bookkeeping, no clock of its own (the times are passed in), so the rule is tested
    without timing anything."""

    def __init__(self, quiet: float = QUIET_SECONDS, max_delay: float = MAX_DELAY_SECONDS):
        self.quiet, self.max_delay = quiet, max_delay
        self.last_arrival = float("-inf")

    def arrived(self, now: float) -> None:
        """The daemon announced a message it has just spooled."""
        self.last_arrival = now

    def wait(self, oldest: float, now: float) -> float:
        """Seconds still to wait before processing, the oldest waiting message having been
        queued at `oldest`; 0 means now."""
        until = min(self.last_arrival + self.quiet, oldest + self.max_delay)
        return max(0.0, until - now)


class Processor:
    """Claims spooled messages one at a time and runs everything that follows them."""

    def __init__(self, site: Site, instance_id: str | None = None, *, recover: bool = True):
        self.site = site
        # `mailflow serve` recovers the spool itself, before it accepts mail and before each
        # processor it starts: a processor still importing when the first `mailflow ingest`
        # arrives would otherwise move that live item out of work/ under it.
        self.recover = recover
        self.pipeline = Pipeline(site)
        self.reminders = Reminders(site)
        self.registry = Registry(site.store, instance_id)
        # (spool id, time.monotonic() it was queued), or None: stop.
        self.wakeup: asyncio.Queue[tuple[str, float] | None] = asyncio.Queue()
        self.deferral = Deferral()
        self.stopping = asyncio.Event()
        self._outbox_lock = asyncio.Lock()
        self._archive_lock = asyncio.Lock()
        self._archive_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the worker --------------------------------------------------------------------------
    def queue(self, spool_id: str) -> None:
        self.wakeup.put_nowait((spool_id, time.monotonic()))

    async def worker(self) -> None:
        while True:
            first = await self.wakeup.get()
            if first is None:
                return
            # Let a burst being accepted finish first (bounded: see Deferral).
            while not self.stopping.is_set() and (
                    delay := self.deferral.wait(first[1], time.monotonic())) > 0:
                try:
                    await asyncio.wait_for(self.stopping.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            if self.stopping.is_set():
                return  # not started: it stays in new/ for the next processor
            ids = [first[0]]
            last = False
            while len(ids) < BATCH_MAX and not self.wakeup.empty():
                nxt = self.wakeup.get_nowait()
                if nxt is None:
                    last = True
                    break
                ids.append(nxt[0])
            if len(ids) == 1:
                await self.process(ids[0])
            else:
                await self.process_many(ids)
            if last:
                return

    async def process_many(self, spool_ids: list[str]) -> None:
        """Claim what is still there of `spool_ids` and process it in one transaction."""
        spool = self.site.spool
        items = [i for i in await asyncio.to_thread(lambda: [spool.claim(x) for x in spool_ids])
                 if i is not None]
        if not items:
            return
        try:
            results = await asyncio.to_thread(self.pipeline.process_items, spool, items)
        except Exception as e:  # noqa: BLE001 - given back to the spool by process_items
            log.warning("%d spool items not processed yet: %s", len(items), e)
            if is_conflict(e):
                # A deadlock with another daemon's batch (PostgreSQL chose this one): nothing
                # of it was written and the database is fine. Again in a moment (the other
                # goes first), not at the next sweep of the spool, 30 s away.
                await asyncio.sleep(random.uniform(0.05, 0.5))
                for item in items:
                    self.queue(item.id)
            return
        outbox_ids = [o for r in results if not isinstance(r, BaseException)
                      for o in r.outbox_ids]
        if outbox_ids:
            await self.flush_outbox(outbox_ids)
        self.archive_soon()

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

    async def sweep_spool(self) -> None:
        """Anything in new/ that no wake-up covered (retries, a crash, another process)."""
        for spool_id in await asyncio.to_thread(self.site.spool.pending):
            self.queue(spool_id)

    # -- the parent's messages -----------------------------------------------------------------
    async def listen(self, reader: asyncio.StreamReader) -> None:
        """Read the parent's lines until end of file, which means it is gone: stop."""
        try:
            while line := await reader.readline():
                word, _, arg = line.decode("ascii", "replace").strip().partition(" ")
                if word == "spool" and arg:
                    self.deferral.arrived(time.monotonic())
                    self.queue(arg)
                elif word == "outbox":
                    self._spawn(self.flush_outbox())
                elif word == "stop":
                    break
                elif word:
                    log.warning("processor: unknown command from the daemon: %r", word[:40])
        finally:
            self.stopping.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the public archive ------------------------------------------------------------------
    def archive_soon(self) -> None:
        """Rebuild what changed a little after the last change (debounced: a burst of mail
        makes one rebuild, not one per message)."""
        if self._archive_timer is not None:
            self._archive_timer.cancel()
        delay = self.site.settings.archive.debounce_seconds if self.site.settings.archive else 20
        self._archive_timer = asyncio.get_running_loop().call_later(
            delay, lambda: self._spawn(self.refresh_archive()))

    async def refresh_archive(self) -> None:
        async with self._archive_lock:
            try:
                # Pagefind has no incremental mode (a minute at 10,000 pages): it runs in
                # the background, at most every few minutes, not inside each build.
                report = await asyncio.to_thread(build_archive, self.site, None, False,
                                                 wait=False, search="background")
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

    # -- outbox, reminders, housekeeping --------------------------------------------------------
    async def flush_outbox(self, ids: list[int] | None = None) -> None:
        async with self._outbox_lock:
            try:
                counts = await deliver(self.site, ids)
            except Exception:  # noqa: BLE001 - the rows stay queued; the next sweep retries
                log.exception("outbox delivery failed")
                return
        if any(counts.values()):
            log.info("outbox: %s", counts)
        if counts.get("retry"):
            self._spawn(self._flush_when_due())

    async def _flush_when_due(self) -> None:
        """A row given back to be tried again before the next sweep (one whose composing
        clashed with another transaction is due in seconds) is sent when it is due."""
        def next_due() -> datetime | None:
            with self.site.store.read() as tx:
                return tx.next_outbox_due()
        try:
            due = await asyncio.to_thread(next_due)
        except Exception:  # noqa: BLE001 - the next sweep sends it
            return
        if due is None:
            return
        wait = (due - datetime.now(timezone.utc)).total_seconds()
        if wait < OUTBOX_SWEEP_SECONDS:
            await asyncio.sleep(max(0.0, wait))
            await self.flush_outbox()

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

    async def cleanup(self) -> None:
        await asyncio.to_thread(self.registry.forget_old)
        n = await asyncio.to_thread(self.site.spool.cleanup_done,
                                    self.site.settings.spool.keep_done_days)
        if n:
            log.info("removed %d processed spool files", n)

    # -- running -----------------------------------------------------------------------------
    async def run(self, commands: asyncio.StreamReader | None = None) -> None:
        """Process until SIGTERM/SIGINT, a ``stop`` line or the end of `commands`."""
        s = self.site.settings
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.site.store  # noqa: B018 - the parent migrated it; opened here before work
        released = await asyncio.to_thread(self.registry.release_own_claims)
        if released:
            log.info("released %d outbox rows the previous processor was sending", released)
        if self.recover:
            recovered = await asyncio.to_thread(self.site.spool.recover)
            if recovered:
                log.info("recovered %d spool items left by a crash", recovered)
        listener = (asyncio.create_task(self.listen(commands), name="daemon-commands")
                    if commands is not None else None)
        worker = asyncio.create_task(self.worker(), name="spool-worker")
        scheduler = AsyncIOScheduler()
        scheduler.add_job(self.sweep_spool, "interval", seconds=SPOOL_SWEEP_SECONDS, id="spool",
                          max_instances=1, coalesce=True)
        scheduler.add_job(self.flush_outbox, "interval", seconds=OUTBOX_SWEEP_SECONDS,
                          id="outbox", max_instances=1, coalesce=True)
        scheduler.add_job(self.sweep_reminders, "interval", seconds=s.reminders.sweep_seconds,
                          id="reminders", max_instances=1, coalesce=True)
        # Overdue lists move with the date even when no mail comes.
        scheduler.add_job(self.refresh_archive, "cron", hour=0, minute=10, id="archive",
                          max_instances=1, coalesce=True)
        scheduler.add_job(self.cleanup, "interval", hours=6, id="cleanup",
                          max_instances=1, coalesce=True)
        scheduler.start()
        try:
            await self.sweep_spool()
            await self.flush_outbox()
            await self.sweep_reminders()
            log.info("processor started (pid %d)", os.getpid())
            await self.stopping.wait()
        finally:
            scheduler.shutdown(wait=False)
            if self._archive_timer is not None:
                self._archive_timer.cancel()
            if listener is not None:
                listener.cancel()
            # Finish the item in hand, not the queue: what waits stays in new/ for next time.
            while not self.wakeup.empty():
                self.wakeup.get_nowait()
            self.wakeup.put_nowait(None)
            try:
                await asyncio.wait_for(worker, timeout=STOP_TIMEOUT)
            except asyncio.TimeoutError:
                log.warning("worker did not finish in %.0f s; its item stays in the spool",
                            STOP_TIMEOUT)
            for t in list(self._tasks):
                t.cancel()
            self.site.close()
            log.info("processor stopped")


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when the parent dies (Linux); elsewhere the end
    of stdin still stops it, only less abruptly. Exits at once if the parent is gone."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            log.debug("processor: no PR_SET_PDEATHSIG", exc_info=True)
    if parent and os.getppid() != parent:
        os._exit(0)  # the parent died before the request took effect


async def _stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    return reader


async def _main(config: str, instance: str | None, recover: bool = True) -> None:
    site = Site.open(config)
    processor = Processor(site, instance, recover=recover)
    heap.settle()   # what it loaded to start is kept as long as it runs: out of full collections
    await processor.run(await _stdin_reader())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="mailflow.processor", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--instance", default=None, help="the daemon's instance id (host:pid)")
    ap.add_argument("--parent", type=int, default=0, help="the daemon's pid")
    ap.add_argument("--log-level", type=int, default=logging.INFO)
    ap.add_argument("--log-format", choices=["text", "json"], default=None)
    ap.add_argument("--nice", type=int, default=NICENESS,
                    help="lower this process's priority by this much "
                         "(`[spool] processor_niceness`)")
    ap.add_argument("--no-recover", action="store_true",
                    help="leave work/ alone at start (the daemon that starts this recovered it)")
    args = ap.parse_args(argv)
    _die_with_parent(args.parent)
    try:
        if args.nice:
            os.nice(args.nice)
    except OSError:
        pass  # not allowed here: same priority as the daemon, which works, only less well
    from mailflow import logs
    logs.configure(args.log_level, args.log_format)
    if args.instance:
        # Log lines and outbox leases name the instance the daemon registered (it is the
        # instance that is alive or dead, not this process on its own).
        logs.INSTANCE = args.instance
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    asyncio.run(_main(args.config, args.instance, recover=not args.no_recover))


if __name__ == "__main__":
    main()
