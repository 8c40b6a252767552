"""The processor keeps out of the way of a burst being accepted, for a bounded time.

`mailflow.processor.Deferral` decides when processing starts: once the daemon has announced
nothing new for `quiet` seconds, or once the oldest waiting message has waited `max_delay`.
The rule is tested on a made-up clock; the worker is tested for what it must never do (hold a
message for as long as a stream lasts) by ordering, never by timing.
"""
from __future__ import annotations

import asyncio

from mailflow.processor import Deferral, Processor


def start_time(d: Deferral, arrivals: list[float], oldest: float) -> float:
    """When a worker holding the message queued at `oldest` starts processing, the daemon
    announcing messages at `arrivals` (a made-up clock, stepped as the worker would sleep)."""
    now = oldest
    pending = sorted(a for a in arrivals if a > oldest)
    d.arrived(oldest)
    while True:
        wait = d.wait(oldest, now)
        if wait == 0:
            return now
        wake = now + wait
        while pending and pending[0] <= wake:   # announcements during the sleep
            d.arrived(pending.pop(0))
        now = wake


def test_a_lone_message_waits_only_for_the_quiet() -> None:
    d = Deferral(quiet=0.1, max_delay=2.0)
    assert start_time(d, [], oldest=10.0) == 10.1


def test_nothing_announced_means_no_wait() -> None:
    assert Deferral(quiet=0.1, max_delay=2.0).wait(oldest=5.0, now=5.0) == 0


def test_a_burst_is_processed_once_it_ends() -> None:
    d = Deferral(quiet=0.1, max_delay=2.0)
    burst = [10.0 + i * 0.002 for i in range(300)]        # 0.6 s of mail
    assert abs(start_time(d, burst, oldest=10.0) - (burst[-1] + 0.1)) < 1e-9


def test_an_endless_stream_holds_a_message_at_most_max_delay() -> None:
    d = Deferral(quiet=0.1, max_delay=2.0)
    stream = [10.0 + i * 0.01 for i in range(100_000)]   # 1,000 s of mail, never quiet
    assert start_time(d, stream, oldest=10.0) == 12.0
    # The backlog behind it is not held again: what is older than max_delay goes at once.
    assert d.wait(oldest=10.5, now=12.6) == 0


# -- the worker ---------------------------------------------------------------------------
def bare_processor(quiet: float, max_delay: float) -> tuple[Processor, list[list[str]]]:
    """A Processor without a site: the worker and the parent's lines, processing recorded."""
    p = Processor.__new__(Processor)
    p.wakeup = asyncio.Queue()
    p.stopping = asyncio.Event()
    p.deferral = Deferral(quiet, max_delay)
    done: list[list[str]] = []

    async def process(spool_id: str | None) -> None:
        done.append([spool_id])  # type: ignore[list-item]

    async def process_many(ids: list[str]) -> None:
        done.append(list(ids))

    p.process = process  # type: ignore[method-assign]
    p.process_many = process_many  # type: ignore[method-assign]
    return p, done


def test_the_worker_starts_on_the_oldest_while_the_stream_goes_on() -> None:
    """Announcements every few milliseconds for up to a minute: the first message is
    processed while they are still coming (max_delay 0.3 s), not after the stream."""
    async def main() -> tuple[list[list[str]], bool]:
        p, done = bare_processor(quiet=0.2, max_delay=0.3)
        reader = asyncio.StreamReader()
        listener = asyncio.create_task(p.listen(reader))
        worker = asyncio.create_task(p.worker())
        stream_over = False
        loop = asyncio.get_running_loop()
        end = loop.time() + 60
        n = 0
        while not done:
            if loop.time() > end:
                stream_over = True
                break
            reader.feed_data(f"spool m{n}\n".encode())
            n += 1
            await asyncio.sleep(0.005)
        reader.feed_eof()
        await listener
        p.wakeup.put_nowait(None)
        await worker
        return done, stream_over

    done, stream_over = asyncio.run(main())
    assert not stream_over, "the first message waited for the whole stream"
    assert done[0][0] == "m0"


def test_a_burst_announced_at_once_is_processed_in_one_batch() -> None:
    async def main() -> list[list[str]]:
        p, done = bare_processor(quiet=0.05, max_delay=30)
        reader = asyncio.StreamReader()
        reader.feed_data(b"".join(f"spool m{i}\n".encode() for i in range(20)))
        listener = asyncio.create_task(p.listen(reader))
        worker = asyncio.create_task(p.worker())
        while not done:
            await asyncio.sleep(0.01)
        reader.feed_eof()
        await listener
        p.wakeup.put_nowait(None)
        await worker
        return done

    assert asyncio.run(main()) == [[f"m{i}" for i in range(20)]]


def test_stopping_while_deferring_leaves_the_message_in_the_spool() -> None:
    """A processor asked to stop does not start on a message it was still holding back:
    the message is in new/, and the next processor's sweep finds it."""
    async def main() -> list[list[str]]:
        p, done = bare_processor(quiet=30, max_delay=60)
        reader = asyncio.StreamReader()
        reader.feed_data(b"spool m0\n")
        listener = asyncio.create_task(p.listen(reader))
        worker = asyncio.create_task(p.worker())
        while p.wakeup.qsize() or p.deferral.last_arrival == float("-inf"):
            await asyncio.sleep(0.01)   # the worker holds m0 now
        reader.feed_data(b"stop\n")
        await listener                  # a stop line sets `stopping`
        await asyncio.wait_for(worker, 30)
        return done

    assert asyncio.run(main()) == []
