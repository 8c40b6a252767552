"""The durable hand-off between ingress and processing.

Ingress may only say 250 once a message survives a power cut, and processing must be free to
crash at any point without losing or duplicating a message. The spool gives both with nothing
but the file system (the Mailman "switchboard" idea, maildir-style): one message is two files,
``<id>.eml`` (the raw bytes, never re-encoded) and ``<id>.json`` (the SMTP envelope and the
processing history). JSON rather than pickle, so that an admin can read and repair an item
with a text editor and a spool written by one version is never code for another.

Layout under the root::

    tmp/     being written; never read by anyone else
    new/     durable and waiting to be processed
    work/    claimed by a processor
    done/    processed; kept ``keep_done_days`` for re-processing, then removed
    failed/  gave up; waits for a human (``requeue`` puts it back)

The ``.eml`` file's directory *is* the item's state: moving it is the state change, and the
``.json`` follows. Into ``new/`` the ``.json`` moves first, so a claimer that sees an ``.eml``
finds its envelope next to it; out of ``new/`` and ``work/`` the ``.eml`` moves first, so a
rename that wins is the claim. ``recover()`` reunites the pairs a crash split.

Durability costs fsyncs, and waiting for them is what limits how fast mail can be taken in.
``put`` fsyncs the ``.eml`` and the ``.json`` in ``tmp/`` (which itself is never synced:
nothing there survives a crash on purpose) at the same time, in two threads, so the file
system can commit them together; then, after the renames, it shares the fsync of ``new/``
with every ``put`` running at the same time (group commit, `_DirSync`): each waits for an
fsync of ``new/`` that *started after its own renames*, and one such fsync covers every rename
made before it began. A put thus waits for two fsyncs where it waited for three one after the
other, and N puts that overlap share as few as one fsync of ``new/`` instead of making N.

The ``.eml``'s modification time says when the item entered its state (in ``new/``: when it
becomes due, which a delayed retry sets in the future). ``cleanup_done``, the delay and
``recover(min_age_seconds=...)`` read it; nothing else relies on it, so losing it in a crash
costs at most an early retry or an early clean-up.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mailflow.errors import SpoolError

log = logging.getLogger(__name__)

EML = ".eml"
META = ".json"
STATES = ("tmp", "new", "work", "done", "failed")
META_VERSION = 1
STALE_TMP_SECONDS = 3600.0
"""A ``tmp/`` file this old belongs to a writer that died: no put() takes an hour."""
ORPHAN_META_SECONDS = 3600.0
"""A ``.json`` without its ``.eml`` may be mid-move by a live claimer; only this old is it debris."""

_DUE_SLACK_SECONDS = 1.0
_FILE_MODE = 0o600  # raw mail holds citizens' private addresses
_DIR_MODE = 0o700


@dataclass
class Envelope:
    """What the SMTP conversation said, which the message's own headers may contradict.

    The envelope recipient is the strongest matching evidence there is (a BCC'd authority
    reply carries the reply address nowhere else), so it is stored beside the raw bytes.
    """

    mail_from: str  # "" for the null sender <>
    rcpt_tos: list[str]
    via: str = "smtp"  # "smtp" | "lmtp" | "ingest" | "imap" | "unknown"
    peer: str | None = None  # "ip:port" of the client
    helo: str | None = None
    received_at: str = ""  # ISO 8601 UTC, filled by put() when empty
    rcpt_from_headers: bool = False  # recipients were read from headers (ingest without --rcpt)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Envelope:
        """Tolerant on purpose: a spool outlives versions, and an item must never be stuck
        because its metadata came from an older (or newer) mailflow."""
        if not isinstance(d, dict):
            raise ValueError(f"envelope must be a JSON object, not {type(d).__name__}")
        rcpts = d.get("rcpt_tos") or []
        if isinstance(rcpts, str):
            rcpts = [rcpts]
        return cls(
            mail_from=str(d.get("mail_from") or ""),
            rcpt_tos=[str(r) for r in rcpts],
            via=str(d.get("via") or "unknown"),
            peer=None if d.get("peer") is None else str(d["peer"]),
            helo=None if d.get("helo") is None else str(d["helo"]),
            received_at=str(d.get("received_at") or ""),
            rcpt_from_headers=bool(d.get("rcpt_from_headers", False)),
        )


@dataclass
class SpoolItem:
    """A claimed message. Paths follow the item through done()/retry()/fail()."""

    id: str
    eml: Path
    meta: Path
    envelope: Envelope
    attempts: int
    errors: list[str]
    sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys of the .json this version does not know; written back so nothing is lost."""

    def read(self) -> bytes:
        return self.eml.read_bytes()


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _new_id() -> str:
    """Sortable by arrival (zero-padded ns clock) and unique across processes and hosts
    sharing one spool (48 random bits make a same-nanosecond clash negligible)."""
    return f"{time.time_ns():020d}-{secrets.token_hex(6)}"


def _check_id(id: str) -> str:
    """An id names a file: refuse anything that could step out of the spool."""
    if (not id or "/" in id or "\\" in id or "\0" in id or id.startswith(".")
            or len(id) > 200):
        raise ValueError(f"not a spool id: {id!r}")
    return id


def _fsync_dir(path: Path) -> None:
    """A rename is only durable once the directory holding the new name is synced."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _DirSync:
    """Group commit of one directory's fsync, for the threads of one process.

    ``sync()`` returns once an fsync of the directory that began after the call has finished
    (so every rename the caller made before calling is durable), or raises the OSError of
    that fsync. At most one fsync runs at a time; callers that arrive while it runs form the
    next batch, whose fsync one of them starts as soon as the running one ends, and all of
    whom it answers. A batch whose fsync fails fails as a whole, even if a later fsync
    succeeds: after an fsync error Linux may report a later fsync as clean although the
    earlier changes were lost, so only the fsync that covered a rename can vouch for it.

    Processes sharing a spool each have their own: correctness does not depend on sharing
    it, only the saving does.
    """

    class _Batch:
        __slots__ = ("done", "error")

        def __init__(self) -> None:
            self.done = False
            self.error: OSError | None = None

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._running = False                      # an fsync is under way
        self._pending: _DirSync._Batch | None = None  # callers waiting for the next fsync

    def sync(self) -> None:
        with self._cond:
            batch = self._pending
            if batch is None:
                batch = self._pending = _DirSync._Batch()
            while not batch.done:
                if not self._running:
                    # A batch leaves _pending only when its fsync starts, and is done before
                    # _running drops: so ours is still pending and nobody syncs for it. Lead.
                    self._running = True
                    self._pending = None
                    break
                self._cond.wait()
            else:
                if batch.error is not None:
                    raise OSError(batch.error.errno, batch.error.strerror, str(self.path))
                return
        try:
            _fsync_dir(self.path)
        except BaseException as e:
            # Whatever stopped it (even a KeyboardInterrupt), the batch was not synced.
            batch.error = e if isinstance(e, OSError) else OSError(
                errno.EIO, f"directory fsync interrupted: {e!r}")
            raise
        finally:
            with self._cond:
                batch.done = True
                self._running = False
                self._cond.notify_all()


def _write_new(path: Path, data: bytes) -> int:
    """Create a file (O_EXCL, so two writers can never share one), write it, return its fd."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_durable(path: Path, data: bytes) -> None:
    """Write a new file and fsync it."""
    fd = _write_new(path, data)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_side: tuple[int, ThreadPoolExecutor] | None = None
_side_lock = threading.Lock()


def _side_fsync(fd: int) -> Future[None]:
    """fsync `fd` in a helper thread, so that a put's two file fsyncs run at the same time
    (the file system commits them together; one after the other they cost two waits).
    One pool per process: a pool inherited through fork() has no threads behind it."""
    global _side
    with _side_lock:
        if _side is None or _side[0] != os.getpid():
            _side = (os.getpid(), ThreadPoolExecutor(16, thread_name_prefix="spool-fsync"))
        pool = _side[1]
    return pool.submit(os.fsync, fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass  # never created, or its directory is what broke
    except OSError:
        log.warning("spool: could not remove %s", path, exc_info=True)


def _age(path: Path, now: float) -> float | None:
    """Seconds since the file's mtime, or None if it vanished (someone else moved it)."""
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:
        return None


class Spool:
    """A directory of messages that several processes may share.

    Every state change is one ``rename(2)``, atomic on a local file system, which is what makes
    a claim exclusive without locks. Not safe on NFS and the like, where rename is not.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.dirs: dict[str, Path] = {s: self.root / s for s in STATES}
        try:
            for d in self.dirs.values():
                d.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"cannot create spool directories under {self.root}: {e}") from e
        self._sync_new = _DirSync(self.dirs["new"])

    # -- paths ------------------------------------------------------------------------------

    def _eml(self, state: str, id: str) -> Path:
        return self.dirs[state] / (id + EML)

    def _meta(self, state: str, id: str) -> Path:
        return self.dirs[state] / (id + META)

    def _ids(self, state: str, suffix: str = EML) -> list[str]:
        try:
            names = os.listdir(self.dirs[state])
        except OSError as e:
            raise SpoolError(f"cannot list {self.dirs[state]}: {e}") from e
        return sorted(n[: -len(suffix)] for n in names
                      if n.endswith(suffix) and not n.startswith(".") and len(n) > len(suffix))

    # -- ingress ----------------------------------------------------------------------------

    def put(self, raw: bytes, envelope: Envelope) -> str:
        """Take a message durably; the returned id is the promise that it survives a crash.

        Both files are fsynced in ``tmp/`` (concurrently), renamed (``.json`` first, so a
        claimer never sees an ``.eml`` without its envelope) and ``new/`` is fsynced before
        returning: only then may SMTP answer 250. That fsync may be one shared with concurrent
        puts, but it always began after this put's renames. Thread-safe. The caller's envelope
        is not modified.
        """
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise TypeError(f"raw must be bytes, not {type(raw).__name__}")
        raw = bytes(raw)
        if not envelope.received_at:
            envelope = dataclasses.replace(envelope, received_at=_utc_now())
        id = _new_id()
        sha = hashlib.sha256(raw).hexdigest()
        meta = {"version": META_VERSION, "id": id, "size": len(raw), "sha256": sha,
                "envelope": envelope.to_json(), "attempts": 0, "errors": []}
        tmp_eml, tmp_meta = self._eml("tmp", id), self._meta("tmp", id)
        new_eml, new_meta = self._eml("new", id), self._meta("new", id)
        try:
            # Both files durable in tmp/ before either name appears in new/: a rename that
            # outran its data would show a claimer an empty file after a crash.
            fd = _write_new(tmp_eml, raw)
            try:
                eml_synced = _side_fsync(fd)
                try:
                    _write_durable(tmp_meta, _dump(meta))
                finally:
                    error = eml_synced.exception()  # waits; never close an fd being synced
                if error is not None:
                    raise error
            finally:
                os.close(fd)
            os.rename(tmp_meta, new_meta)
            os.rename(tmp_eml, new_eml)
            self._sync_new.sync()
        except OSError as e:
            # Leave nothing half-taken behind: the client will be told 4xx and send again,
            # and a second copy of the same message must not appear out of the debris.
            for p in (tmp_eml, tmp_meta, new_meta):
                _unlink_quietly(p)
            if new_eml.exists():
                # The last rename succeeded but the directory sync did not: the message may
                # or may not survive a crash, so it is not promised. Withdraw it if we still
                # can; if a claimer already took it, it will be processed, and the resend is
                # a duplicate that processing dedupes by hash and Message-ID.
                _unlink_quietly(new_eml)
            raise SpoolError(f"cannot spool message in {self.root}: {e}") from e
        return id

    # -- processing -------------------------------------------------------------------------

    def pending(self) -> list[str]:
        return self._ids("new")

    def failed(self) -> list[str]:
        return self._ids("failed")

    def claim(self, id: str | None = None, *, force: bool = False) -> SpoolItem | None:
        """Take one item for processing, oldest first, or the named one.

        The rename of the ``.eml`` from ``new/`` to ``work/`` is the claim: exactly one of any
        number of racing processes succeeds, the others get ENOENT and move on. An item whose
        due time (``retry(delay=...)``) lies in the future is not claimed, even by name, so a
        sweep that feeds every id of ``pending()`` to ``claim(id)`` keeps the delay;
        ``force=True`` takes it anyway (an admin asking for it now).
        """
        if id is not None:
            _check_id(id)
            if not force and not self._due(id, time.time()):
                return None
            return self._try_claim(id)
        now = time.time()
        for cand in self._ids("new"):
            if self._due(cand, now):
                item = self._try_claim(cand)
                if item is not None:
                    return item
        return None

    def _due(self, id: str, now: float) -> bool:
        try:
            # The slack absorbs file-system timestamp granularity and small clock steps, so a
            # fresh put() is always due; delays are meant in seconds to hours anyway.
            return os.stat(self._eml("new", id)).st_mtime <= now + _DUE_SLACK_SECONDS
        except FileNotFoundError:
            return False  # claimed by someone else since the listing
        except OSError as e:
            raise SpoolError(f"cannot read spool item {id}: {e}") from e

    def _try_claim(self, id: str) -> SpoolItem | None:
        work_eml = self._eml("work", id)
        try:
            os.rename(self._eml("new", id), work_eml)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SpoolError(f"cannot claim spool item {id}: {e}") from e
        self._touch(work_eml)  # records the claim time for recover(min_age_seconds=...)
        work_meta = self._meta("work", id)
        try:
            os.rename(self._meta("new", id), work_meta)
        except FileNotFoundError:
            pass  # none was written (a hand-dropped .eml), or recover() already moved it
        except OSError as e:
            log.warning("spool: cannot move metadata of %s: %s", id, e)
        return self._load(id, work_eml, work_meta)

    def _load(self, id: str, eml: Path, meta_path: Path) -> SpoolItem:
        """Build the item even from broken metadata: the raw message is what matters, and a
        message that cannot be processed for want of an envelope would be lost mail."""
        errors: list[str] = []
        try:
            meta = json.loads(meta_path.read_bytes())
            if not isinstance(meta, dict):
                raise ValueError("metadata is not a JSON object")
        except FileNotFoundError:
            meta = {}
        except (OSError, ValueError) as e:
            log.warning("spool: unreadable metadata for %s: %s", id, e)
            meta = {}
            errors.append(f"metadata unreadable, envelope lost: {e}")
        try:
            envelope = Envelope.from_json(meta["envelope"])
        except (KeyError, ValueError, TypeError):
            envelope = Envelope(mail_from="", rcpt_tos=[], via="unknown")
        old_errors = meta.get("errors")
        errors = ([str(e) for e in old_errors] if isinstance(old_errors, list) else []) + errors
        attempts = meta.get("attempts", 0)
        known = {"version", "id", "size", "sha256", "envelope", "attempts", "errors"}
        return SpoolItem(
            id=id, eml=eml, meta=meta_path, envelope=envelope,
            attempts=attempts if isinstance(attempts, int) and attempts >= 0 else 0,
            errors=errors, sha256=str(meta.get("sha256") or ""),
            extra={k: v for k, v in meta.items() if k not in known},
        )

    def done(self, item: SpoolItem) -> None:
        """Finish an item. Not fsynced on purpose: if the rename is lost in a crash the item
        comes back through recover() and is processed again, which processing makes harmless."""
        try:
            self._move(item, "done")
        except OSError as e:
            raise SpoolError(f"cannot mark spool item {item.id} done: {e}") from e
        self._touch(item.eml)  # cleanup_done counts from now, not from arrival

    def retry(self, item: SpoolItem, error: str, *, delay: float = 0.0) -> None:
        """Give an item back for another attempt, with the reason kept for the admin.

        ``delay`` seconds keep it from being claimed again at once, so a transient outage
        (database down) is not a busy loop. The daemon decides when to ``fail`` instead.
        """
        item.attempts += 1
        item.errors.append(f"{_utc_now()} attempt {item.attempts}: {error}")
        try:
            self._write_meta(item)
            if delay > 0:
                due = time.time() + delay
                os.utime(item.eml, (due, due))
            # Into new/ the .json goes first, so a claimer never finds the .eml without it.
            new_meta, new_eml = self._meta("new", item.id), self._eml("new", item.id)
            os.rename(item.meta, new_meta)
            item.meta = new_meta
            os.rename(item.eml, new_eml)
            item.eml = new_eml
            self._sync_new.sync()
        except OSError as e:
            raise SpoolError(f"cannot return spool item {item.id} for retry: {e}") from e

    def fail(self, item: SpoolItem, error: str) -> None:
        """Park an item for a human, durably: it must not silently come back or vanish."""
        item.errors.append(f"{_utc_now()} failed: {error}")
        item.extra["failed_at"] = _utc_now()
        try:
            self._write_meta(item)
            self._move(item, "failed")
            self._touch(item.eml)
            _fsync_dir(self.dirs["failed"])
        except OSError as e:
            raise SpoolError(f"cannot move spool item {item.id} to failed: {e}") from e

    def requeue(self, id: str) -> bool:
        """Put a failed item back into new/ (after a human fixed the cause); attempts reset."""
        _check_id(id)
        eml, meta = self._eml("failed", id), self._meta("failed", id)
        if not eml.exists():
            return False
        item = self._load(id, eml, meta)
        item.attempts = 0
        try:
            self._write_meta(item)
            os.rename(item.meta, self._meta("new", id))
            os.rename(eml, self._eml("new", id))
            self._touch(self._eml("new", id))
            self._sync_new.sync()
        except FileNotFoundError:
            return False
        except OSError as e:
            raise SpoolError(f"cannot requeue spool item {id}: {e}") from e
        return True

    def _move(self, item: SpoolItem, state: str) -> None:
        """Out of work/ the .eml moves first: its location is the state, the .json follows."""
        eml, meta = self._eml(state, item.id), self._meta(state, item.id)
        os.rename(item.eml, eml)
        item.eml = eml
        try:
            os.rename(item.meta, meta)
        except FileNotFoundError:
            pass  # the item never had metadata
        item.meta = meta

    def _write_meta(self, item: SpoolItem) -> None:
        """Replace the item's .json atomically (write aside, fsync, rename over)."""
        meta = dict(item.extra)
        meta.update({"version": META_VERSION, "id": item.id, "sha256": item.sha256,
                     "envelope": item.envelope.to_json(), "attempts": item.attempts,
                     "errors": item.errors})
        tmp = item.meta.with_name(f".{item.id}.{secrets.token_hex(4)}{META}.tmp")
        try:
            _write_durable(tmp, _dump(meta))
            os.rename(tmp, item.meta)
        except OSError:
            _unlink_quietly(tmp)
            raise

    @staticmethod
    def _touch(path: Path) -> None:
        try:
            os.utime(path)
        except OSError:
            log.debug("spool: cannot set mtime of %s", path, exc_info=True)

    # -- housekeeping -----------------------------------------------------------------------

    def recover(self, *, min_age_seconds: float = 0.0) -> int:
        """Undo what a crash left half-done; call at start-up, before processing.

        Everything in ``work/`` was being processed by a process that is gone, so it goes
        back to ``new/``. With several daemons sharing one spool, a daemon that starts must
        not steal its peers' live work: pass ``min_age_seconds`` longer than any processing
        takes. Also reunites ``.json`` files a crash separated from their ``.eml``, and
        removes ``tmp/`` files and ``.json`` orphans older than an hour. Returns the number
        of items put back into ``new/``.
        """
        now = time.time()
        recovered = 0
        try:
            for id in self._ids("work"):
                eml = self._eml("work", id)
                age = _age(eml, now)
                if age is None or age < min_age_seconds:
                    continue
                meta = self._meta("work", id)
                if meta.exists():
                    os.rename(meta, self._meta("new", id))  # .json first into new/
                try:
                    os.rename(eml, self._eml("new", id))
                except FileNotFoundError:
                    continue
                self._touch(self._eml("new", id))
                recovered += 1
                log.info("spool: recovered %s from work/", id)
            if recovered:
                self._sync_new.sync()
            self._reunite_orphan_meta(now)
            for name in os.listdir(self.dirs["tmp"]):
                p = self.dirs["tmp"] / name
                age = _age(p, now)
                if age is not None and age > STALE_TMP_SECONDS:
                    log.info("spool: removing stale %s", p)
                    _unlink_quietly(p)
        except OSError as e:
            raise SpoolError(f"cannot recover spool {self.root}: {e}") from e
        return recovered

    def _reunite_orphan_meta(self, now: float) -> None:
        """A .json without its .eml: a crash between the two renames of a move. Put it where
        its .eml is; if the .eml is nowhere (removed by hand), drop it once it is old."""
        for state in ("new", "work", "done", "failed"):
            emls = set(self._ids(state))
            for id in self._ids(state, META):
                if id in emls:
                    continue
                meta = self._meta(state, id)
                home = next((s for s in ("new", "work", "done", "failed")
                             if s != state and self._eml(s, id).exists()), None)
                if home is not None:
                    if not self._meta(home, id).exists():
                        os.rename(meta, self._meta(home, id))
                        log.info("spool: moved metadata of %s from %s/ to %s/", id, state, home)
                    else:
                        age = _age(meta, now)
                        if age is not None and age > ORPHAN_META_SECONDS:
                            _unlink_quietly(meta)
                    continue
                age = _age(meta, now)
                if age is not None and age > ORPHAN_META_SECONDS:
                    log.warning("spool: removing metadata %s whose message is gone", meta)
                    _unlink_quietly(meta)
            # Leftovers of an interrupted _write_meta.
            for name in os.listdir(self.dirs[state]):
                if name.startswith(".") and name.endswith(META + ".tmp"):
                    p = self.dirs[state] / name
                    age = _age(p, now)
                    if age is not None and age > STALE_TMP_SECONDS:
                        _unlink_quietly(p)

    def cleanup_done(self, older_than_days: int) -> int:
        """Drop processed messages once they are too old to want re-processing; the store
        keeps its own copy. Returns the number of messages removed."""
        cutoff = time.time() - older_than_days * 86400
        removed = 0
        try:
            for id in self._ids("done"):
                eml = self._eml("done", id)
                try:
                    if eml.stat().st_mtime >= cutoff:
                        continue
                except FileNotFoundError:
                    continue
                _unlink_quietly(self._meta("done", id))
                _unlink_quietly(eml)
                removed += 1
            emls = set(self._ids("done"))
            for id in self._ids("done", META):
                meta = self._meta("done", id)
                if id not in emls:
                    try:
                        if meta.stat().st_mtime < cutoff:
                            _unlink_quietly(meta)
                    except FileNotFoundError:
                        pass
        except OSError as e:
            raise SpoolError(f"cannot clean up {self.dirs['done']}: {e}") from e
        return removed


def _dump(meta: dict[str, Any]) -> bytes:
    # ensure_ascii: SMTPUTF8 addresses may carry surrogate-escaped raw bytes, which UTF-8
    # cannot encode but \u escapes round-trip exactly.
    return (json.dumps(meta, ensure_ascii=True, indent=1, sort_keys=True) + "\n").encode("ascii")
