"""Outbound faults: a local SMTP sink that answers 4xx, 5xx, 421, drops the connection in the
middle of DATA or after the final dot, or stalls; the outbox retries on an RFC 5321-style
schedule read with a clock the test moves (no sleeping), never retries a 5xx, gives up after
five days with an admin notice, and records a connection lost after the final dot as "maybe
delivered" where `mailflow outbox list --json` shows it.
"""
from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest

from conftest import DOMAIN, Site
from mailflow.config import SmarthostSettings
from mailflow.errors import PermanentDeliveryError, TemporaryDeliveryError
from mailflow.outbound.compose import Outgoing
from mailflow.outbound.outbox import GIVE_UP_AFTER, LEASE, deliver_due, next_attempt, queue_message
from mailflow.outbound.transports import MaybeDeliveredError, SmtpTransport
from mailflow.site import Site as MfSite
from mailflow.store.repository import utcnow

AUTHORITY = "foi@council.example"
SENDER = f"request-1-abc@{DOMAIN}"
SMALL = (b"From: <request-1-abc@ask.example>\r\nTo: <foi@council.example>\r\n"
         b"Subject: Request\r\nMessage-ID: <r1@ask.example>\r\n\r\nPlease send me the file.\r\n")


# -- a scripted SMTP sink ----------------------------------------------------------------------
@dataclass
class Sink:
    """An SMTP server on 127.0.0.1 that misbehaves on cue. `mode` may be changed between
    attempts. Blocking sockets in a thread, so the test decides exactly what is read."""
    mode: str = "ok"
    connections: int = 0
    messages: list[bytes] = field(default_factory=list)   # complete messages received
    stall: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stall.set()
        self.listener.close()

    def settings(self, timeout: float = 5.0) -> SmarthostSettings:
        return SmarthostSettings(host="127.0.0.1", port=self.port, tls="none", user=None,
                                 password=None, timeout=timeout)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._session, args=(conn, self.mode), daemon=True).start()

    def _session(self, conn: socket.socket, mode: str) -> None:
        f = conn.makefile("rb")

        def say(line: str) -> None:
            conn.sendall(line.encode() + b"\r\n")

        try:
            if mode == "stall_greeting":
                self.stall.wait(30)
                return
            if mode == "greet_421":
                say("421 4.3.2 sink.test shutting down")
                return
            say("220 sink.test ESMTP")
            while True:
                line = f.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    say("250-sink.test\r\n250 8BITMIME")
                elif verb == b"MAIL":
                    if mode == "mail_421":
                        say("421 4.7.0 sink.test too busy, closing")
                        return
                    say("250 2.1.0 ok")
                elif verb == b"RCPT":
                    say({"rcpt_451": "451 4.3.0 try later", "rcpt_550": "550 5.1.1 no such user",
                         "rcpt_452": "452 4.2.2 mailbox full"}.get(mode, "250 2.1.5 ok"))
                elif verb == b"DATA":
                    say("354 go ahead")
                    if mode == "drop_mid_data":
                        conn.recv(1024)    # read a little, then hang up with the rest unread
                        conn.close()
                        return
                    data = b""
                    while not data.endswith(b"\r\n.\r\n"):
                        chunk = f.readline()
                        if not chunk:
                            return
                        data += chunk
                    self.messages.append(data)
                    if mode == "drop_after_dot":
                        return             # the whole message, then silence and a FIN
                    if mode == "stall_after_dot":
                        self.stall.wait(30)
                        return
                    say({"data_451": "451 4.3.0 local error", "data_554": "554 5.7.1 rejected",
                         "data_421": "421 4.3.2 shutting down"}.get(mode, "250 2.0.0 queued as X"))
                elif verb == b"RSET":
                    say("250 ok")
                elif verb == b"QUIT":
                    say("221 bye")
                    return
                else:
                    say("502 5.5.2 what?")
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass


@pytest.fixture()
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


def transport(sink: Sink, timeout: float = 5.0) -> SmtpTransport:
    return SmtpTransport(sink.settings(timeout), local_hostname="mailflow.test")


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


# -- the transport: what each fault means ----------------------------------------------------
@pytest.mark.parametrize("mode", ["rcpt_451", "rcpt_452", "data_451", "greet_421", "mail_421",
                                  "data_421"])
def test_4xx_and_421_are_temporary(sink: Sink, mode: str) -> None:
    sink.mode = mode
    with pytest.raises(TemporaryDeliveryError) as info:
        run(transport(sink).deliver(SENDER, AUTHORITY, SMALL, delivery_id="1"))
    assert not isinstance(info.value, MaybeDeliveredError)   # the server answered
    assert "4" in str(info.value)


@pytest.mark.parametrize("mode", ["rcpt_550", "data_554"])
def test_5xx_is_permanent(sink: Sink, mode: str) -> None:
    sink.mode = mode
    with pytest.raises(PermanentDeliveryError, match="5[0-9][0-9]"):
        run(transport(sink).deliver(SENDER, AUTHORITY, SMALL, delivery_id="1"))


def test_drop_after_the_final_dot_is_maybe_delivered(sink: Sink) -> None:
    sink.mode = "drop_after_dot"
    with pytest.raises(MaybeDeliveredError, match="may have been delivered"):
        run(transport(sink).deliver(SENDER, AUTHORITY, SMALL, delivery_id="1"))
    assert len(sink.messages) == 1          # it really did get the whole message


def test_stall_after_the_final_dot_is_maybe_delivered(sink: Sink) -> None:
    sink.mode = "stall_after_dot"
    with pytest.raises(MaybeDeliveredError):
        run(transport(sink, timeout=0.5).deliver(SENDER, AUTHORITY, SMALL, delivery_id="1"))


def test_drop_in_the_middle_of_data_is_not_delivered(sink: Sink) -> None:
    """The sink reads 1 KB of a 4 MB message and hangs up: the final dot never reached it."""
    big = SMALL[:-2] + b"x" * 76 * 55_000 + b"\r\n"
    sink.mode = "drop_mid_data"
    with pytest.raises(TemporaryDeliveryError) as info:
        run(transport(sink).deliver(SENDER, AUTHORITY, big, delivery_id="1"))
    assert not isinstance(info.value, MaybeDeliveredError), info.value
    assert sink.messages == []


def test_stall_before_the_greeting_is_temporary_not_maybe(sink: Sink) -> None:
    sink.mode = "stall_greeting"
    with pytest.raises(TemporaryDeliveryError) as info:
        run(transport(sink, timeout=0.5).deliver(SENDER, AUTHORITY, SMALL, delivery_id="1"))
    assert not isinstance(info.value, MaybeDeliveredError)


# -- the outbox: the schedule, read with a clock the test moves --------------------------------
class Clock:
    def __init__(self, start: datetime) -> None:
        self.t = start

    def __call__(self) -> datetime:
        return self.t


_OPENED: list[MfSite] = []


@pytest.fixture(autouse=True)
def _close_opened_sites() -> Iterator[None]:
    """Each test's site is closed after it: left to the garbage collector, its engine's
    PostgreSQL connections were deleted while still open (ResourceWarning)."""
    yield
    while _OPENED:
        _OPENED.pop().close()


def make_site(site: Site) -> MfSite:
    s = MfSite.open(site.config)
    _OPENED.append(s)
    return s


def queue_one(mf: MfSite, text: str = "Please send me the file.") -> int:
    with mf.store.tx() as tx:
        _, row = queue_message(tx, None, Outgoing(
            from_addr=SENDER, to_addr=AUTHORITY, subject="Request", text=text, domain=DOMAIN),
            thread_id=None, kind="notice", mail_from=SENDER)
    return row


def queued_at(mf: MfSite, row_id: int) -> datetime:
    with mf.store.read() as tx:
        r = next(r for r in tx.outbox_rows() if r.id == row_id)
        msg = tx.message(r.message_pk)
    assert msg is not None
    return msg.created_at


def row(mf: MfSite, row_id: int):  # type: ignore[no-untyped-def]
    with mf.store.read() as tx:
        return next(r for r in tx.outbox_rows() if r.id == row_id)


def deliver(mf: MfSite, sink: Sink, clock: Clock, timeout: float = 5.0) -> dict[str, int]:
    return run(deliver_due(mf.store, transport(sink, timeout), mf.settings.outbound.retry_schedule,
                           now=clock))


def test_temporary_failures_follow_a_capped_schedule_and_give_up_after_five_days(
        site: Site, sink: Sink) -> None:
    mf = make_site(site)
    schedule = mf.settings.outbound.retry_schedule
    rid = queue_one(mf)
    start = queued_at(mf, rid)
    clock = Clock(row(mf, rid).next_attempt_at)
    sink.mode = "rcpt_451"
    waits: list[float] = []
    for attempt in range(1, 1000):
        counts = deliver(mf, sink, clock)
        r = row(mf, rid)
        if r.state == "failed":
            break
        assert counts == {"sent": 0, "retry": 1, "failed": 0}
        assert r.state == "queued" and r.attempts == attempt and "451" in (r.last_error or "")
        waits.append((r.next_attempt_at - clock.t).total_seconds())
        # nothing is due before the scheduled time: an earlier sweep makes no attempt
        clock.t = r.next_attempt_at - timedelta(seconds=1)
        assert deliver(mf, sink, clock) == {"sent": 0, "retry": 0, "failed": 0}
        clock.t = r.next_attempt_at
    assert r.state == "failed"
    assert counts == {"sent": 0, "retry": 0, "failed": 1}
    # first retry after minutes, the interval grows to the schedule's cap and stays there
    assert 60 <= waits[0] <= 15 * 60
    assert waits[:len(schedule)] == [float(s) for s in schedule]
    assert all(0 < w <= schedule[-1] for w in waits)
    assert waits[len(schedule):-1] == [float(schedule[-1])] * (len(waits) - len(schedule) - 1)
    # the last attempt is made exactly at the give-up time, and then it gives up
    assert clock.t - start == GIVE_UP_AFTER
    assert sink.connections == len(waits) + 1 == r.attempts
    assert "gave up" in (r.last_error or "") and "5 days" in (r.last_error or "")
    with mf.store.read() as tx:
        (item,) = tx.queue(reason="delivery_failed")
    assert AUTHORITY in item.summary and "gave up" in item.summary
    # and a failed row is never tried again
    clock.t += timedelta(days=30)
    assert deliver(mf, sink, clock) == {"sent": 0, "retry": 0, "failed": 0}
    assert sink.connections == r.attempts


def test_a_temporary_failure_then_success(site: Site, sink: Sink) -> None:
    mf = make_site(site)
    rid = queue_one(mf)
    clock = Clock(utcnow())
    sink.mode = "mail_421"
    assert deliver(mf, sink, clock)["retry"] == 1
    sink.mode = "ok"
    clock.t = row(mf, rid).next_attempt_at
    assert deliver(mf, sink, clock)["sent"] == 1
    assert row(mf, rid).state == "sent" and len(sink.messages) == 1


@pytest.mark.parametrize("mode", ["rcpt_550", "data_554"])
def test_5xx_is_never_retried(site: Site, sink: Sink, mode: str) -> None:
    mf = make_site(site)
    rid = queue_one(mf)
    clock = Clock(utcnow())
    sink.mode = mode
    assert deliver(mf, sink, clock) == {"sent": 0, "retry": 0, "failed": 1}
    for days in (1, 3, 6):
        clock.t += timedelta(days=days)
        assert deliver(mf, sink, clock) == {"sent": 0, "retry": 0, "failed": 0}
    assert sink.connections == 1
    r = row(mf, rid)
    assert r.state == "failed" and r.attempts == 1
    with mf.store.read() as tx:
        assert [q.reason for q in tx.queue()] == ["delivery_failed"]


def outbox_json(site: Site) -> list[dict]:  # type: ignore[type-arg]
    return site.json("outbox", "list")


def test_drop_after_data_is_recorded_as_maybe_delivered_and_shown(site: Site, sink: Sink) -> None:
    mf = make_site(site)
    rid = queue_one(mf)
    clock = Clock(utcnow())
    sink.mode = "drop_after_dot"
    assert deliver(mf, sink, clock) == {"sent": 0, "retry": 1, "failed": 0}
    (shown,) = [r for r in outbox_json(site) if r["id"] == rid]
    assert shown["state"] == "queued"
    assert shown["last_error"].startswith("maybe delivered")
    # a later failure does not hide the doubt
    sink.mode = "rcpt_451"
    clock.t = row(mf, rid).next_attempt_at
    assert deliver(mf, sink, clock)["retry"] == 1
    assert row(mf, rid).last_error.startswith("maybe delivered")
    # retried (RFC 5321 prefers a duplicate to a loss), and the result says it may be twice
    sink.mode = "ok"
    clock.t = row(mf, rid).next_attempt_at
    assert deliver(mf, sink, clock)["sent"] == 1
    (shown,) = [r for r in outbox_json(site) if r["id"] == rid]
    assert shown["state"] == "sent" and shown["last_error"].startswith("maybe delivered")
    with mf.store.read() as tx:
        from mailflow.store.tables import outbox
        result = tx.c.execute(outbox.select().where(outbox.c.id == rid)).first().result
    assert "may also have been delivered" in result
    assert len(sink.messages) == 2


def test_stall_after_data_is_maybe_delivered(site: Site, sink: Sink) -> None:
    mf = make_site(site)
    rid = queue_one(mf)
    sink.mode = "stall_after_dot"
    assert deliver(mf, sink, Clock(utcnow()), timeout=0.5)["retry"] == 1
    assert row(mf, rid).last_error.startswith("maybe delivered")


def test_a_sender_that_died_mid_delivery_leaves_a_maybe_delivered_row(site: Site,
                                                                      sink: Sink) -> None:
    """A claim whose sender crashed: after the lease it is retried, and the doubt recorded."""
    mf = make_site(site)
    rid = queue_one(mf)
    clock = Clock(utcnow())
    with mf.store.tx() as tx:
        assert [r.id for r in tx.claim_outbox(clock.t, LEASE)] == [rid]   # ... and then died
    assert deliver(mf, sink, clock) == {"sent": 0, "retry": 0, "failed": 0}   # still leased
    clock.t += LEASE + timedelta(seconds=1)
    sink.mode = "ok"
    assert deliver(mf, sink, clock)["sent"] == 1
    with mf.store.read() as tx:
        from mailflow.store.tables import outbox
        result = tx.c.execute(outbox.select().where(outbox.c.id == rid)).first().result
    assert "may also have been delivered" in result


class Broken:
    """A transport with a bug: it raises something it should not."""

    def __init__(self) -> None:
        self.calls = 0

    async def deliver(self, mail_from: str, rcpt: str, raw: bytes, *, delivery_id: str) -> str:
        self.calls += 1
        raise RuntimeError("bug in a transport")


def test_a_transport_bug_is_retried_and_never_leaves_a_row_stuck(site: Site) -> None:
    mf = make_site(site)
    rid = queue_one(mf)
    clock = Clock(utcnow())
    broken = Broken()
    counts = run(deliver_due(mf.store, broken, (60,), now=clock))
    assert counts == {"sent": 0, "retry": 1, "failed": 0}
    r = row(mf, rid)
    assert r.state == "queued" and "bug in a transport" in (r.last_error or "")
    clock.t += GIVE_UP_AFTER
    assert run(deliver_due(mf.store, broken, (60,), now=clock))["failed"] == 1


def test_next_attempt_schedule() -> None:
    t0 = datetime(2030, 1, 1, 12, 0)
    sched = (300, 900, 3600)
    assert next_attempt(1, t0, t0, sched) == t0 + timedelta(seconds=300)
    assert next_attempt(2, t0, t0, sched) == t0 + timedelta(seconds=900)
    assert next_attempt(9, t0, t0, sched) == t0 + timedelta(seconds=3600)   # capped
    late = t0 + GIVE_UP_AFTER - timedelta(seconds=10)
    assert next_attempt(30, t0, late, sched) == t0 + GIVE_UP_AFTER          # one last try
    assert next_attempt(31, t0, t0 + GIVE_UP_AFTER, sched) is None          # then give up
