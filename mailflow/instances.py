"""Several daemons, one site: who is running, whether it is alive, and what it was holding.

Each `mailflow serve` registers itself in the `instances` table when it starts and beats
every few seconds with its spool's depth. That serves three purposes:

- `mailflow status` shows every instance, its last heartbeat and its queues;
- a health file (`health.json` in the instance's spool folder) that a supervisor or a monitoring check can read, and
  `mailflow status --check` that exits non-zero when this host's daemon is not healthy;
- claims outlive their holder only as long as needed: an outbox row leased by an instance
  that is known to be dead (it stopped, its process is gone from this host, or its heartbeat
  stopped) is released at once instead of when its lease runs out.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, select, update

from mailflow import logs
from mailflow.store.repository import Store, utcnow
from mailflow.store.tables import instances, outbox

HEARTBEAT = timedelta(seconds=10)
STALE_AFTER = 3 * HEARTBEAT      # no heartbeat for this long: the instance is taken for dead


def new_instance_id() -> str:
    """host:pid, as every log line and every outbox lease of this process names it."""
    return logs.INSTANCE


@dataclass(frozen=True)
class Instance:
    id: str
    hostname: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    state: str
    version: str
    detail: dict[str, Any]

    def alive(self, now: datetime) -> bool:
        return self.state == "running" and now - _aware(self.heartbeat_at) <= STALE_AFTER


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Registry:
    def __init__(self, store: Store, instance_id: str | None = None):
        self.store = store
        self.id = instance_id or new_instance_id()

    def register(self, version: str, detail: dict[str, Any]) -> None:
        now = utcnow()
        with self.store.tx() as tx:
            # A pid this host used before, for a daemon long gone: the old row makes way.
            tx.c.execute(instances.delete().where(instances.c.id == self.id))
            tx.c.execute(instances.insert().values(
                id=self.id, hostname=socket.gethostname(), pid=os.getpid(), started_at=now,
                heartbeat_at=now, state="running", version=version, detail=detail))

    def beat(self, detail: dict[str, Any]) -> None:
        with self.store.tx() as tx:
            tx.c.execute(update(instances).where(instances.c.id == self.id)
                         .values(heartbeat_at=utcnow(), state="running", detail=detail))

    def stopped(self) -> None:
        with self.store.tx() as tx:
            tx.c.execute(update(instances).where(instances.c.id == self.id)
                         .values(heartbeat_at=utcnow(), state="stopped"))

    def all(self) -> list[Instance]:
        with self.store.read() as tx:
            rows = tx.c.execute(select(instances).order_by(instances.c.started_at)).mappings()
            return [Instance(**{**r, "detail": r["detail"] or {}}) for r in rows]

    def dead(self, now: datetime | None = None) -> list[str]:
        """Instances whose claims can be released: stopped, gone from this host, or silent."""
        now = now or utcnow()
        host = socket.gethostname()
        out = []
        for i in self.all():
            if i.id == self.id:
                continue
            if i.state != "running" or now - _aware(i.heartbeat_at) > STALE_AFTER or (
                    i.hostname == host and not _pid_alive(i.pid)):
                out.append(i.id)
        return out

    def release_claims(self, now: datetime | None = None) -> int:
        """Give back the outbox rows that dead instances were sending. Their mail may or may
        not have gone: the transports are idempotent per row (Maildir by file name; SMTP
        relays dedupe nothing, so such a row is marked as possibly sent twice)."""
        dead = self.dead(now)
        if not dead:
            return 0
        with self.store.tx() as tx:
            r = tx.c.execute(update(outbox).where(and_(
                outbox.c.state == "sending", outbox.c.claimed_by.in_(dead)))
                .values(state="queued", claimed_until=None, claimed_by=None,
                        next_attempt_at=utcnow()))
            n = r.rowcount or 0
            tx.c.execute(update(instances).where(and_(instances.c.id.in_(dead),
                                                      instances.c.state == "running"))
                         .values(state="dead"))
        return n

    def release_own_claims(self) -> int:
        """Give back the outbox rows this instance's id holds as being sent.

        For a daemon starting a new processor after the last one died: only the processor
        sends for its instance and the daemon starts one only after the previous has exited,
        so such a row was the dead one's. Released now rather than when its lease runs out,
        as `release_claims` does for instances that died whole."""
        with self.store.tx() as tx:
            r = tx.c.execute(update(outbox).where(and_(
                outbox.c.state == "sending", outbox.c.claimed_by == self.id))
                .values(state="queued", claimed_until=None, claimed_by=None,
                        next_attempt_at=utcnow()))
            return r.rowcount or 0

    def forget_old(self, older_than: timedelta = timedelta(days=7)) -> None:
        """Stopped instances stay listed for a week, then go."""
        with self.store.tx() as tx:
            tx.c.execute(instances.delete().where(and_(
                instances.c.state != "running",
                or_(instances.c.heartbeat_at < utcnow() - older_than))))


def spool_depth(spool: Any) -> dict[str, Any]:
    """How much this instance's spool holds, and how long the oldest item has waited (spool
    ids start with the arrival time in nanoseconds)."""
    pending, in_work, failed = spool.pending(), spool.in_work(), spool.failed()
    waiting = pending + in_work
    oldest = None
    if waiting:
        first = min((int(i.split("-", 1)[0]) for i in waiting
                     if i.split("-", 1)[0].isdigit()), default=None)
        if first is not None:
            oldest = max(0.0, round(time.time() - first / 1e9, 1))
    return {"pending": len(pending), "in_work": len(in_work), "failed": len(failed),
            "oldest": oldest}


def health_path(site: Any) -> Path:
    """Next to the spool: each instance has its own spool, so its own health file, even when
    several run from one folder."""
    return Path(site.settings.spool.dir) / "health.json"


def write_health(path: Path, data: dict[str, Any]) -> None:
    """Atomically, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_health(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
