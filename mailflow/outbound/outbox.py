"""Outgoing mail as a queue in the store: recorded first, delivered after, retried with backoff.

Sending is two steps on purpose. `queue_message` runs inside the pipeline's transaction, so a
message is queued exactly when the state change that caused it is committed (no mail for a
change that rolled back, no change without its mail). `deliver_due` then hands rows to a
transport; a row is leased while it is being sent, so a crashed sender's rows come back after
the lease and nothing is sent twice by two workers.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta

from mailflow.errors import PermanentDeliveryError, TemporaryDeliveryError
from mailflow.outbound.compose import Outgoing, build
from mailflow.outbound.signing import Signer
from mailflow.outbound.transports import Transport
from mailflow.store.repository import OutboxRow, Store, Tx, utcnow

log = logging.getLogger("mailflow.outbox")
LEASE = timedelta(minutes=10)


def queue_message(tx: Tx, signer: Signer | None, out: Outgoing, *, thread_id: int | None,
                  kind: str, mail_from: str) -> tuple[int, int]:
    """Build, sign and store one outgoing message and queue it; returns (message pk, outbox id)."""
    raw = build(out)
    if signer is not None:
        raw = signer.sign(raw)
    sha = tx.put_raw(raw)
    pk = tx.add_message(thread_id=thread_id, direction="out", kind=kind,
                        message_id=out.message_id, from_addr=out.from_addr.lower(),
                        from_name=out.from_name, to_addrs=[out.to_addr.lower()],
                        subject=out.subject, date=utcnow(), text=out.text, raw_sha256=sha)
    row = tx.enqueue(pk, thread_id, mail_from, out.to_addr)
    return pk, row


OnSent = Callable[[Tx, OutboxRow], None]


async def deliver_due(store: Store, transport: Transport, retry_schedule: Sequence[int],
                      ids: list[int] | None = None, on_sent: OnSent | None = None) -> dict[str, int]:
    """Make one delivery attempt for each due row (or the named rows); returns counts."""
    counts = {"sent": 0, "retry": 0, "failed": 0}

    def claim():  # type: ignore[no-untyped-def]
        with store.tx() as tx:
            rows = tx.claim_outbox(utcnow(), LEASE, ids=ids)
            return [(r, tx.get_raw(tx.message(r.message_pk).raw_sha256)) for r in rows]  # type: ignore[union-attr]

    while True:   # in batches: a large outbox is claimed a slice at a time, never all at once
        batch = await asyncio.to_thread(claim)
        if not batch:
            return counts
        await _deliver_batch(batch, store, transport, retry_schedule, on_sent, counts)


async def _deliver_batch(batch, store: Store, transport: Transport,  # type: ignore[no-untyped-def]
                         retry_schedule: Sequence[int], on_sent: OnSent | None,
                         counts: dict[str, int]) -> None:
    for row, raw in batch:
        try:
            result = await transport.deliver(row.mail_from, row.rcpt, raw,
                                             delivery_id=f"outbox-{row.id}")
        except PermanentDeliveryError as e:
            await asyncio.to_thread(_failed, store, row, str(e))
            counts["failed"] += 1
            log.warning("outbox %s to %s failed permanently: %s", row.id, row.rcpt, e)
        except (TemporaryDeliveryError, OSError) as e:
            attempt = row.attempts + 1
            if attempt >= len(retry_schedule) + 1:
                await asyncio.to_thread(_failed, store, row,
                                        f"gave up after {attempt} attempts: {e}")
                counts["failed"] += 1
            else:
                at = utcnow() + timedelta(seconds=retry_schedule[min(attempt - 1, len(retry_schedule) - 1)])
                await asyncio.to_thread(_retry, store, row.id, str(e), at)
                counts["retry"] += 1
                log.info("outbox %s to %s: temporary failure, retry at %s: %s",
                         row.id, row.rcpt, at.isoformat(timespec="seconds"), e)
        else:
            await asyncio.to_thread(_sent, store, row, result, on_sent)
            counts["sent"] += 1
            log.info("outbox %s delivered to %s: %s", row.id, row.rcpt, result)


def _sent(store: Store, row: OutboxRow, result: str, on_sent: OnSent | None) -> None:
    """Record the delivery, and let the caller react in the same transaction (the clock of a
    request runs from when it actually went out)."""
    with store.tx() as tx:
        tx.outbox_sent(row.id, result)
        if on_sent is not None:
            on_sent(tx, row)


def _retry(store: Store, row_id: int, error: str, at) -> None:  # type: ignore[no-untyped-def]
    with store.tx() as tx:
        tx.outbox_retry(row_id, error, at)


def _failed(store: Store, row: OutboxRow, error: str) -> None:
    """A permanent failure is recorded on the thread and put before an admin."""
    with store.tx() as tx:
        tx.outbox_failed(row.id, error)
        msg = tx.message(row.message_pk)
        if row.thread_id is not None and msg is not None and msg.kind in ("request", "followup"):
            tx.update_thread(row.thread_id, delivery_status="failed", delivery_detail=error)
        tx.add_queue_item("delivery_failed", f"to {row.rcpt}: {error}"[:500],
                          thread_id=row.thread_id,
                          detail={"outbox_id": row.id, "rcpt": row.rcpt, "error": error})
