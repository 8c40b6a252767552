"""Outgoing mail as a queue in the store: recorded first, delivered after, retried with backoff.

Sending is two steps on purpose. `queue_message` runs inside the pipeline's transaction, so a
message is queued exactly when the state change that caused it is committed (no mail for a
change that rolled back, no change without its mail). `deliver_due` then hands rows to a
transport; a row is leased while it is being sent, so a crashed sender's rows come back after
the lease and nothing is sent twice by two workers. The forward of a reply to the citizen is
queued uncomposed (`queue_forward`) and composed by `deliver_due` when it claims the row: the
pipeline then stores what came in without building and signing what goes out.

Retries follow RFC 5321 §4.5.4.1: a temporary failure is tried again after the intervals of
`retry_schedule` (the last one repeating: the interval is capped), until GIVE_UP_AFTER (5 days)
after the message was queued; then it fails with an admin notice, like a permanent failure. A
5xx answer is never retried. When the server may have taken the message but never said so (the
connection was lost or timed out after the whole message was sent, or a sender crashed
mid-delivery and its lease ran out) the attempt is recorded as "maybe delivered" and retried
anyway, as RFC 5321 §6.1 asks: a letter that arrives twice is better than one that is lost.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from mailflow.errors import PermanentDeliveryError, TemporaryDeliveryError
from mailflow.outbound.compose import Outgoing, build
from mailflow.outbound.signing import Signer
from mailflow.outbound.transports import MaybeDeliveredError, Transport
from mailflow.store.repository import OutboxRow, Store, Tx, is_conflict, utcnow

log = logging.getLogger("mailflow.outbox")
LEASE = timedelta(minutes=10)
# A row whose composing clashed with another transaction (`is_conflict`) is tried again this
# soon, not on the retry schedule: nothing is wrong with it.
CONFLICT_RETRY = timedelta(seconds=2)
GIVE_UP_AFTER = timedelta(days=5)
MAYBE = "maybe delivered"


def queue_message(tx: Tx, signer: Signer | None, out: Outgoing, *, thread_id: int | None,
                  kind: str, mail_from: str) -> tuple[int, int]:
    """Build, sign and store one outgoing message and queue it; returns (message pk, outbox id)."""
    pk = store_message(tx, signer, out, thread_id=thread_id, kind=kind)
    row = tx.enqueue(pk, thread_id, mail_from, out.to_addr)
    return pk, row


def store_message(tx: Tx, signer: Signer | None, out: Outgoing, *, thread_id: int | None,
                  kind: str) -> int:
    """Build, sign and store one outgoing message (not queued); returns its pk.

    The signature header and the message are stored as two pieces (the store joins them, a
    piece at a time on SQLite): a forwarded 25 MB attachment is not copied once more."""
    raw = build(out)
    sha = tx.put_raw(raw if signer is None else (signer.signature_header(raw), raw))
    del raw
    return tx.add_message(thread_id=thread_id, direction="out", kind=kind,
                          message_id=out.message_id, from_addr=out.from_addr.lower(),
                          from_name=out.from_name, to_addrs=[out.to_addr.lower()],
                          subject=out.subject, date=utcnow(), text=out.text, raw_sha256=sha)


def queue_forward(tx: Tx, message_pk: int, *, thread_id: int, mail_from: str, rcpt: str) -> int:
    """Queue the forward of a stored message to the citizen, to be composed when it is sent.

    Recorded in the caller's transaction like any queued mail (so it is never lost nor
    doubled), but only as "forward message `message_pk`": building, signing and storing the
    forward (a DKIM signature, and the attachments encoded again) is the sender's work, done
    in the transaction that claims the row (`deliver_due`), so the pipeline's stores what
    came in without it. Returns the outbox id."""
    return tx.enqueue(message_pk, thread_id, mail_from, rcpt, compose="forward")


OnSent = Callable[[Tx, OutboxRow], None]
Composer = Callable[[Tx, OutboxRow], int]
"""Composes, signs and stores the message of a row queued with `queue_forward` (in the
claiming transaction) and returns the new message's pk."""


def next_attempt(attempts: int, queued_at: datetime, now: datetime,
                 retry_schedule: Sequence[int],
                 give_up_after: timedelta = GIVE_UP_AFTER) -> datetime | None:
    """When to try again after `attempts` failed attempts, or None to give up.

    The n-th retry waits `retry_schedule[n-1]` seconds, the last interval repeating; the
    final attempt is made when the give-up time is reached, never after it."""
    deadline = queued_at + give_up_after
    if now >= deadline:
        return None
    wait = timedelta(seconds=retry_schedule[min(max(attempts, 1) - 1, len(retry_schedule) - 1)])
    return min(now + wait, deadline)


async def deliver_due(store: Store, transport: Transport, retry_schedule: Sequence[int],
                      ids: list[int] | None = None, on_sent: OnSent | None = None, *,
                      now: Callable[[], datetime] = utcnow,
                      give_up_after: timedelta = GIVE_UP_AFTER,
                      compose: Composer | None = None) -> dict[str, int]:
    """Make one delivery attempt for each due row (or the named rows); returns counts.

    A row queued with `queue_forward` is composed first, by `compose`, in the transaction
    that claims it: the stored message and the row's claim commit together, so once a row
    is being sent its message exists and never changes (a crash before that commit leaves
    the row queued and uncomposed; one after it is the usual interrupted send, whose
    idempotency key is the row's id). Two senders cannot compose the same row: the claim
    takes the row first (SQLite's write lock, PostgreSQL's FOR UPDATE SKIP LOCKED), and
    `outbox_composed` only changes a row that is still uncomposed.

    `now` is the clock the schedule is read and written with (tests move it forward instead
    of sleeping)."""
    counts = {"sent": 0, "retry": 0, "failed": 0}

    def claim():  # type: ignore[no-untyped-def]
        with store.tx() as tx:
            rows = tx.claim_outbox(now(), LEASE, ids=ids)
            batch = []
            # Composing stores a message on the row's thread, which locks the thread's row
            # of `thread_changes` until commit: taken in thread order, two senders (or a
            # sender and the pipeline) wait for each other instead of deadlocking.
            for r in sorted(rows, key=lambda r: (r.thread_id or 0, r.id)):
                msg = tx.message(r.message_pk)
                assert msg is not None
                if r.compose is not None:
                    pk = _compose(tx, r, msg.created_at, compose, counts, now,
                                  retry_schedule, give_up_after)
                    if pk is None:
                        continue
                    queued_at = msg.created_at   # when the forwarded message arrived
                    r = replace(r, message_pk=pk, compose=None)
                    msg = tx.message(pk)
                    assert msg is not None
                else:
                    queued_at = msg.created_at
                batch.append((r, queued_at, tx.get_raw(msg.raw_sha256)))
            return batch

    while True:   # in batches: a large outbox is claimed a slice at a time, never all at once
        batch = await asyncio.to_thread(claim)
        if not batch:
            return counts
        await _deliver_batch(batch, store, transport, retry_schedule, on_sent, counts, now,
                             give_up_after)


def _compose(tx: Tx, row: OutboxRow, queued_at: datetime, compose: Composer | None,
             counts: dict[str, int], now: Callable[[], datetime],
             retry_schedule: Sequence[int], give_up_after: timedelta) -> int | None:
    """Compose a claimed row's message in a savepoint; its pk, or None when that failed (a
    bug, or the message it forwards cannot be read): the row is then retried on the
    schedule like a temporary failure, and in the end put before an admin."""
    try:
        with tx.c.begin_nested():
            if compose is None:
                raise RuntimeError(f"no composer for a {row.compose!r} row")
            pk = compose(tx, row)
            if not tx.outbox_composed(row.id, pk):
                raise RuntimeError("composed by another sender")
            return pk
    except Exception as e:  # noqa: BLE001 - this row waits, the others go on
        tx.forget()
        if is_conflict(e):
            # Not the row's fault: another transaction held what composing needed. Again in
            # a moment, without using up one of its attempts (it once waited 300 s here).
            log.warning("outbox %s: composing the %s clashed with another transaction (%s); "
                        "again in %d s", row.id, row.compose, type(getattr(e, "orig", e)).__name__,
                        CONFLICT_RETRY.total_seconds())
            tx.outbox_requeue(row.id, f"composing the {row.compose} clashed with another "
                              "transaction; trying again", now() + CONFLICT_RETRY)
            counts["retry"] += 1
            return None
        log.exception("outbox %s: could not compose the %s", row.id, row.compose)
        error = f"composing the {row.compose}: {type(e).__name__}: {e}"
        at = next_attempt(row.attempts + 1, queued_at, now(), retry_schedule, give_up_after)
        if at is None:
            _record_failure(tx, row, f"gave up after {row.attempts + 1} attempts: {error}")
            counts["failed"] += 1
        else:
            tx.outbox_retry(row.id, error, at)
            counts["retry"] += 1
        return None


async def _deliver_batch(batch, store: Store, transport: Transport,  # type: ignore[no-untyped-def]
                         retry_schedule: Sequence[int], on_sent: OnSent | None,
                         counts: dict[str, int], now: Callable[[], datetime],
                         give_up_after: timedelta) -> None:
    for row, queued_at, raw in batch:
        # A row still "sending" when claimed: its sender stopped mid-delivery (a crash).
        earlier_maybe = row.state == "sending" or (row.last_error or "").startswith(MAYBE)
        try:
            result = await transport.deliver(row.mail_from, row.rcpt, raw,
                                             delivery_id=f"outbox-{row.id}")
        except PermanentDeliveryError as e:
            await asyncio.to_thread(_failed, store, row, str(e))
            counts["failed"] += 1
            log.warning("outbox %s to %s failed permanently: %s", row.id, row.rcpt, e)
        except Exception as e:  # noqa: BLE001 - temporary, OSError, or a transport's bug
            # Anything else a transport raises is a bug there; retrying (and, in the end,
            # giving up with an admin notice) is safe, leaving the row leased is not.
            if not isinstance(e, (TemporaryDeliveryError, OSError)):
                log.exception("outbox %s: the transport raised %s", row.id, type(e).__name__)
            error = str(e) or type(e).__name__
            if isinstance(e, MaybeDeliveredError):
                error = f"{MAYBE}: {error}"
            elif row.state == "sending":
                error = f"{MAYBE} (an earlier attempt was interrupted); then: {error}"
            elif earlier_maybe:   # keep saying so: a later retry must not hide it
                error = f"{MAYBE} (an earlier attempt); then: {error}"
            t = now()
            at = next_attempt(row.attempts + 1, queued_at, t, retry_schedule, give_up_after)
            if at is None:
                days = give_up_after.total_seconds() / 86400
                await asyncio.to_thread(
                    _failed, store, row,
                    f"gave up after {row.attempts + 1} attempts over {days:g} days: {error}")
                counts["failed"] += 1
                log.warning("outbox %s to %s: gave up: %s", row.id, row.rcpt, error)
            else:
                await asyncio.to_thread(_retry, store, row.id, error, at)
                counts["retry"] += 1
                log.info("outbox %s to %s: temporary failure, retry at %s: %s",
                         row.id, row.rcpt, at.isoformat(timespec="seconds"), error)
        else:
            if earlier_maybe:
                result = f"{result} (an earlier attempt may also have been delivered)"
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
    """A permanent failure (or giving up) is recorded on the thread and put before an admin."""
    with store.tx() as tx:
        _record_failure(tx, row, error)


def _record_failure(tx: Tx, row: OutboxRow, error: str) -> None:
    tx.outbox_failed(row.id, error)
    msg = tx.message(row.message_pk) if row.compose is None else None
    if row.thread_id is not None and msg is not None and msg.kind in ("request", "followup"):
        tx.update_thread(row.thread_id, delivery_status="failed", delivery_detail=error)
    tx.add_queue_item("delivery_failed", f"to {row.rcpt}: {error}"[:500],
                      thread_id=row.thread_id,
                      detail={"outbox_id": row.id, "rcpt": row.rcpt, "error": error})
