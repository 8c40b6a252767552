"""Delivering the outbox for a site: the transport, the retry schedule and what a delivery means.

The one thing a delivery changes beyond the outbox: a request's statutory clock runs from the
day it actually went out, which is later than the day it was queued when the first attempts
failed.
"""
from __future__ import annotations

from mailflow.clock import Clock
from mailflow.outbound.outbox import deliver_due
from mailflow.site import Site
from mailflow.store.repository import OutboxRow, Tx, utcnow


def _request_went_out(site: Site):  # type: ignore[no-untyped-def]
    clock = Clock(site.settings, site.rules)

    def on_sent(tx: Tx, row: OutboxRow) -> None:
        if row.thread_id is None:
            return
        msg = tx.message(row.message_pk)
        thread = tx.thread(row.thread_id)
        if msg is None or thread is None or msg.kind != "request":
            return
        today = utcnow().date()
        if thread.clock_start != today and thread.state == "waiting_response":
            clock.start(tx, thread.id, today, actor="mailflow",
                        why="the request was delivered later than it was queued")
        tx.update_thread(thread.id, delivery_status="delivered")
    return on_sent


def _composer(site: Site):  # type: ignore[no-untyped-def]
    """Composes the forwards the pipeline queued (`Pipeline.compose_forward`); one pipeline
    made on first use per delivery run."""
    pipeline = None

    def compose(tx: Tx, row: OutboxRow) -> int:
        nonlocal pipeline
        if row.compose != "forward":
            raise ValueError(f"unknown kind of message to compose: {row.compose!r}")
        if pipeline is None:
            from mailflow.pipeline import Pipeline   # it imports this module's callers
            pipeline = Pipeline(site)
        return pipeline.compose_forward(tx, row)
    return compose


async def deliver(site: Site, ids: list[int] | None = None) -> dict[str, int]:
    return await deliver_due(site.store, site.transport, site.settings.outbound.retry_schedule,
                             ids=ids, on_sent=_request_went_out(site), compose=_composer(site))
