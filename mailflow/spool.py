"""The durable hand-off between ingress and processing.

Ingress may only say 250 once a message survives a power cut, and processing must be free to
crash at any point without losing or duplicating a message. The spool gives both with nothing
but the file system (the Mailman "switchboard" idea, maildir-style). One message is one file,
``<id>.mail``: a first line ``mailflow-spool/1 {...}\n`` holding the SMTP envelope and the
processing history as JSON (on one line: JSON escapes every line break inside it), then the raw
message bytes, never re-encoded. JSON rather than pickle, so that an admin can read and repair
an item with a text editor (``tail -n +2 X.mail`` is the message) and a spool written by one
version is never code for another. One file because durability is paid per file: each costs an
fsync before the 250, and the second file was what kept accepting from keeping up with the disk.

What changes after arrival (attempts, errors, ``failed_at``) goes into a ``<id>.json`` beside
the ``.mail``, written only by ``retry``, ``fail`` and ``requeue``; when present it supersedes
the first line, which is never rewritten (that would mean copying the whole message). This is
also the older layout: mailflow before this format wrote ``<id>.eml`` (the raw bytes alone)
with its ``<id>.json``, and every reader here takes both, so a spool left by an older version,
or an ``.eml`` dropped in by hand, is processed as before. An item's *file* below means its
``.mail``, or its ``.eml`` in the older layout.

Layout under the root::

    tmp/     being written; never read by anyone else
    new/     durable and waiting to be processed
    work/    claimed by a processor
    done/    processed; kept ``keep_done_days`` for re-processing, then removed
    failed/  gave up; waits for a human (``requeue`` puts it back)

The item's file's directory *is* the item's state: moving it is the state change, and a
``.json`` follows. Into ``new/`` the ``.json`` moves first, so a claimer that sees the file
finds the newest metadata next to it; out of ``new/`` and ``work/`` the file moves first, so a
rename that wins is the claim. ``recover()`` reunites the pairs a crash split.

Durability costs fsyncs, and waiting for them is what limits how fast mail can be taken in.
``put`` writes the file in ``tmp/`` (which itself is never synced: nothing there survives a
crash on purpose) with one write and fsyncs it; then, after the rename, it shares the fsync of
``new/`` with every ``put`` running at the same time (group commit, `_DirSync`): each waits for
an fsync of ``new/`` that *started after its own rename*, and one such fsync covers every
rename made before it began. A put thus waits for two fsyncs, and N puts that overlap share as
few as one fsync of ``new/`` instead of making N.

The file's modification time says when the item entered its state (in ``new/``: when it
becomes due, which a delayed retry sets in the future). ``cleanup_done``, the delay and
``recover(min_age_seconds=...)`` read it; nothing else relies on it, so losing it in a crash
costs at most an early retry or an early clean-up.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from mailflow.errors import SpoolError

log = logging.getLogger(__name__)

MAIL = ".mail"
"""An item's file: the envelope line, then the message."""
EML = ".eml"
"""An item's file in the older layout (and a hand-dropped message): the message alone."""
META = ".json"
"""Metadata beside an item's file: written on retry/fail/requeue, or the older layout's."""
HEADER_MAGIC = b"mailflow-spool/1 "
"""How a ``.mail`` file begins; the JSON metadata follows on the same line."""
HEADER_LIMIT = 4 << 20
"""The longest first line read: a recipient list at its cap is tens of kilobytes, so longer
is damage, and the file is then taken as all message rather than read without end."""
STATES = ("tmp", "new", "work", "done", "failed")
META_VERSION = 1
STALE_TMP_SECONDS = 3600.0
"""A ``tmp/`` file this old belongs to a writer that died: no put() takes an hour."""
ORPHAN_META_SECONDS = 3600.0
"""A ``.json`` without its ``.eml`` may be mid-move by a live claimer; only this old is it debris."""
ERRORS_KEPT = 50
"""An item's errors kept in its metadata: the last ones (a day's outage retried every 30 s
would otherwise grow it by thousands)."""

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
        # What dataclasses.asdict gave, written out: asdict deep-copies field by field and was
        # a third of Spool.put's CPU. A new field goes here too (test_spool checks).
        return {"mail_from": self.mail_from, "rcpt_tos": list(self.rcpt_tos), "via": self.via,
                "peer": self.peer, "helo": self.helo, "received_at": self.received_at,
                "rcpt_from_headers": self.rcpt_from_headers}

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
    """The item's file: ``<id>.mail`` (envelope line, then the message), or ``<id>.eml`` in
    the older layout. Not the raw message by itself: ``read()`` gives that."""
    meta: Path
    envelope: Envelope
    attempts: int
    errors: list[str]
    sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys of the metadata this version does not know; written back so nothing is lost."""
    offset: int = 0
    """Bytes before the message in ``eml`` (the envelope line of a ``.mail``)."""

    def read(self) -> bytes:
        """The raw message, exactly the bytes that were spooled (no envelope line)."""
        with open(self.eml, "rb") as f:
            if self.offset:
                f.seek(self.offset)
            return f.read()


def read_header(f: BinaryIO) -> tuple[dict[str, Any] | None, int, str | None]:
    """Read the envelope line of a ``.mail`` file open at its start.

    Returns (metadata, offset of the message, problem). A file whose first line is not a
    readable envelope line (damage, or an admin's edit gone wrong) is all message: offset 0
    and a problem to record, so that no byte of the message is skipped on a guess where the
    line ended; the bytes are processed rather than lost.
    """
    head = f.read(len(HEADER_MAGIC))
    if head != HEADER_MAGIC:
        return None, 0, "no envelope line"
    line = f.readline(HEADER_LIMIT)
    if not line.endswith(b"\n"):
        return None, 0, "envelope line unterminated"
    try:
        meta = json.loads(line)
        if not isinstance(meta, dict):
            raise ValueError("metadata is not a JSON object")
    except ValueError as e:
        return None, 0, f"envelope line unreadable: {e}"
    return meta, len(head) + len(line), None


def split_envelope_line(data: bytes) -> tuple[dict[str, Any] | None, bytes]:
    """A spool ``.mail``'s bytes as (metadata, message); other bytes as (None, bytes), as
    they are. For tools given a file that may be either (``mailflow explain X.mail``)."""
    if not data.startswith(HEADER_MAGIC):
        return None, data
    import io
    meta, offset, _ = read_header(io.BytesIO(data))
    return (meta, data[offset:]) if meta is not None else (None, data)


def read_spool_file(path: Path) -> tuple[dict[str, Any], bytes]:
    """The metadata and the raw message of any spool file, for tools and admins: a ``.mail``
    (its envelope line, superseded by a ``.json`` beside it) or an older ``.eml`` (its
    ``.json``, if any). Raises OSError if the file cannot be read."""
    path = Path(path)
    meta: dict[str, Any] = {}
    with open(path, "rb") as f:
        if path.name.endswith(MAIL):
            embedded, offset, _ = read_header(f)
            meta = embedded or {}
            f.seek(offset)
        raw = f.read()
    side = path.with_name(path.name[: -len(path.suffix)] + META)
    try:
        loaded = json.loads(side.read_bytes())
        if isinstance(loaded, dict):
            meta = loaded
    except (OSError, ValueError):
        pass
    return meta, raw


_now_cache: tuple[int, str] = (0, "")


def _utc_now() -> str:
    """The time in ISO 8601 UTC to the second (formatted once per second: put() needs it
    for every message)."""
    global _now_cache
    second = int(time.time())
    cached = _now_cache
    if cached[0] != second:
        cached = _now_cache = (second, datetime.fromtimestamp(second, timezone.utc).isoformat())
    return cached[1]


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


def _write_durable(path: str | os.PathLike[str], *parts: bytes) -> None:
    """Create a file (O_EXCL, so two writers can never share one), write the parts one after
    the other without joining them (no copy of a large message), and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
    try:
        views = [memoryview(p) for p in parts if p]
        while views:
            n = os.writev(fd, views)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
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
        self._tmp_prefix = os.path.join(self.dirs["tmp"], "")
        self._new_prefix = os.path.join(self.dirs["new"], "")

    # -- paths ------------------------------------------------------------------------------

    def _file(self, state: str, id: str, suffix: str = MAIL) -> Path:
        return self.dirs[state] / (id + suffix)

    def _find(self, state: str, id: str) -> Path | None:
        """The item's file in `state`, in either layout, or None."""
        for suffix in (MAIL, EML):
            p = self._file(state, id, suffix)
            if os.path.lexists(p):
                return p
        return None

    def _meta(self, state: str, id: str) -> Path:
        return self.dirs[state] / (id + META)

    def _ids(self, state: str, suffix: str | None = None) -> list[str]:
        """Ids in `state`: of items (a ``.mail`` or an older ``.eml``), or of files ending in
        `suffix`."""
        try:
            names = os.listdir(self.dirs[state])
        except OSError as e:
            raise SpoolError(f"cannot list {self.dirs[state]}: {e}") from e
        suffixes = (MAIL, EML) if suffix is None else (suffix,)
        return sorted({n[: -len(x)] for n in names for x in suffixes
                       if n.endswith(x) and not n.startswith(".") and len(n) > len(x)})

    def in_work(self) -> list[str]:
        """Ids claimed by a processor (or left in work/ by one that died)."""
        return self._ids("work")

    def ids(self, state: str) -> list[str]:
        """Ids of the items in `state` (one of new, work, done, failed), oldest first."""
        if state not in self.dirs or state == "tmp":
            raise ValueError(f"not a spool state: {state!r}")
        return self._ids(state)

    def peek(self, id: str) -> tuple[str, SpoolItem] | None:
        """Where an item is and what its metadata says, for an admin: read only, it claims
        nothing and moves nothing (a processor may take it a moment later). None when no
        state holds it (done/ items are removed after ``keep_done_days``), or when `id` could
        not name one (it is typed by a person: a path is not an id)."""
        try:
            _check_id(id)
        except ValueError:
            return None
        for state in ("failed", "new", "work", "done"):
            eml = self._find(state, id)
            if eml is None:
                continue
            try:
                return state, self._load(id, eml, self._meta(state, id))
            except SpoolError:
                continue   # moved on between the look and the read: try the next state
        return None

    # -- ingress ----------------------------------------------------------------------------

    def put(self, raw: bytes, envelope: Envelope) -> str:
        """Take a message durably; the returned id is the promise that it survives a crash.

        One file (envelope line, then the message) is written and fsynced in ``tmp/``,
        renamed into ``new/``, and ``new/`` is fsynced before returning: only then may SMTP
        answer 250. That fsync may be one shared with concurrent puts, but it always began
        after this put's rename. Thread-safe. The caller's envelope is not modified.
        """
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise TypeError(f"raw must be bytes, not {type(raw).__name__}")
        env = envelope.to_json()
        if not env["received_at"]:
            env["received_at"] = _utc_now()
        id = _new_id()
        sha = hashlib.sha256(raw).hexdigest()
        meta = {"version": META_VERSION, "id": id, "size": len(raw), "sha256": sha,
                "envelope": env, "attempts": 0, "errors": []}
        name = id + MAIL  # str paths: pathlib's joins were a tenth of put's CPU
        tmp, new = self._tmp_prefix + name, self._new_prefix + name
        try:
            # Durable in tmp/ before its name appears in new/: a rename that outran its data
            # would show a claimer an empty file after a crash.
            _write_durable(tmp, _header(meta), raw)
            os.rename(tmp, new)
            self._sync_new.sync()
        except OSError as e:
            # Leave nothing half-taken behind: the client will be told 4xx and send again,
            # and a second copy of the same message must not appear out of the debris.
            _unlink_quietly(tmp)
            if os.path.lexists(new):
                # The rename succeeded but the directory sync did not: the message may or
                # may not survive a crash, so it is not promised. Withdraw it if we still
                # can; if a claimer already took it, it will be processed, and the resend is
                # a duplicate that processing dedupes by hash and Message-ID.
                _unlink_quietly(new)
            raise SpoolError(f"cannot spool message in {self.root}: {e}") from e
        return id

    # -- processing -------------------------------------------------------------------------

    def pending(self) -> list[str]:
        return self._ids("new")

    def failed(self) -> list[str]:
        return self._ids("failed")

    def claim(self, id: str | None = None, *, force: bool = False) -> SpoolItem | None:
        """Take one item for processing, oldest first, or the named one.

        The rename of the item's file from ``new/`` to ``work/`` is the claim: exactly one of any
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
        for suffix in (MAIL, EML):
            try:
                # The slack absorbs file-system timestamp granularity and small clock steps,
                # so a fresh put() is always due; delays are meant in seconds to hours anyway.
                mtime = os.stat(self._file("new", id, suffix)).st_mtime
            except FileNotFoundError:
                continue  # the other layout, or claimed by someone else since the listing
            except OSError as e:
                raise SpoolError(f"cannot read spool item {id}: {e}") from e
            return mtime <= now + _DUE_SLACK_SECONDS
        return False

    def _try_claim(self, id: str) -> SpoolItem | None:
        for suffix in (MAIL, EML):
            work_eml = self._file("work", id, suffix)
            try:
                os.rename(self._file("new", id, suffix), work_eml)
                break
            except FileNotFoundError:
                continue
            except OSError as e:
                raise SpoolError(f"cannot claim spool item {id}: {e}") from e
        else:
            return None
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
        message that cannot be processed for want of an envelope would be lost mail.

        The metadata is the ``.json`` beside the file when there is one (it is newer than
        any envelope line), else the ``.mail``'s envelope line, else none (a hand-dropped
        ``.eml``)."""
        errors: list[str] = []
        meta: dict[str, Any] | None = None
        offset = 0
        if eml.name.endswith(MAIL):
            try:
                with open(eml, "rb") as f:
                    meta, offset, problem = read_header(f)
            except OSError as e:
                raise SpoolError(f"cannot read spool item {id}: {e}") from e
            if problem is not None:
                log.warning("spool: %s: %s", id, problem)
                errors.append(f"{problem}; envelope lost, the whole file taken as the message")
        try:
            side = json.loads(meta_path.read_bytes())
            if not isinstance(side, dict):
                raise ValueError("metadata is not a JSON object")
            meta = side
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            log.warning("spool: unreadable metadata for %s: %s", id, e)
            errors.append(f"metadata unreadable, envelope "
                          f"{'lost' if meta is None else 'from the first line'}: {e}")
        if meta is None:
            meta = {}
        try:
            envelope = Envelope.from_json(meta["envelope"])
        except (KeyError, ValueError, TypeError):
            envelope = Envelope(mail_from="", rcpt_tos=[], via="unknown")
        old_errors = meta.get("errors")
        errors = ([str(e) for e in old_errors] if isinstance(old_errors, list) else []) + errors
        attempts = meta.get("attempts", 0)
        known = {"version", "id", "sha256", "envelope", "attempts", "errors"}
        return SpoolItem(
            id=id, eml=eml, meta=meta_path, envelope=envelope,
            attempts=attempts if isinstance(attempts, int) and attempts >= 0 else 0,
            errors=errors, sha256=str(meta.get("sha256") or ""),
            extra={k: v for k, v in meta.items() if k not in known}, offset=offset,
        )

    def done(self, item: SpoolItem) -> None:
        """Finish an item. Not fsynced on purpose: if the rename is lost in a crash the item
        comes back through recover() and is processed again, which processing makes harmless."""
        try:
            self._move(item, "done")
        except OSError as e:
            raise SpoolError(f"cannot mark spool item {item.id} done: {e}") from e
        self._touch(item.eml)  # cleanup_done counts from now, not from arrival

    def retry(self, item: SpoolItem, error: str, *, delay: float = 0.0,
              counted: bool = True) -> None:
        """Give an item back for another attempt, with the reason kept for the admin.

        ``delay`` seconds keep it from being claimed again at once, so a transient outage
        (database down) is not a busy loop. The daemon decides when to ``fail`` instead.
        ``counted=False``: the attempt failed for a reason that was not the message's (the
        database unavailable, a deadlock with another daemon), so it does not bring the
        message nearer to ``spool.max_attempts``: an hour's outage must not leave a later
        bug one try to be looked at. The reason is kept all the same; of a long run of
        them, the last ERRORS_KEPT.
        """
        if counted:
            item.attempts += 1
            item.errors.append(f"{_utc_now()} attempt {item.attempts}: {error}")
        else:
            item.errors.append(f"{_utc_now()} not counted as an attempt: {error}")
        del item.errors[:-ERRORS_KEPT]
        try:
            self._write_meta(item)
            if delay > 0:
                due = time.time() + delay
                os.utime(item.eml, (due, due))
            # Into new/ the .json goes first, so a claimer never finds the file without it.
            new_meta, new_eml = self._meta("new", item.id), self.dirs["new"] / item.eml.name
            os.rename(item.meta, new_meta)
            item.meta = new_meta
            os.rename(item.eml, new_eml)
            item.eml = new_eml
            self._sync_new.sync()
        except OSError as e:
            raise SpoolError(f"cannot return spool item {item.id} for retry: {e}") from e

    def fail(self, item: SpoolItem, error: str) -> None:
        """Park an item for a human, durably: it must not silently come back or vanish.
        The attempt that failed it counts, so an admin sees how many times it was tried."""
        item.attempts += 1
        item.errors.append(f"{_utc_now()} attempt {item.attempts} failed: {error}")
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
        eml, meta = self._find("failed", id), self._meta("failed", id)
        if eml is None:
            return False
        try:
            item = self._load(id, eml, meta)
        except SpoolError:
            return False  # gone since we looked
        item.attempts = 0
        new = self.dirs["new"] / eml.name
        try:
            self._write_meta(item)
            os.rename(item.meta, self._meta("new", id))
            os.rename(eml, new)
            self._touch(new)
            self._sync_new.sync()
        except FileNotFoundError:
            return False
        except OSError as e:
            raise SpoolError(f"cannot requeue spool item {id}: {e}") from e
        return True

    def _move(self, item: SpoolItem, state: str) -> None:
        """Out of work/ the file moves first: its location is the state, the .json follows."""
        eml, meta = self.dirs[state] / item.eml.name, self._meta(state, item.id)
        os.rename(item.eml, eml)
        item.eml = eml
        try:
            os.rename(item.meta, meta)
        except FileNotFoundError:
            pass  # the item never had metadata
        item.meta = meta

    def _write_meta(self, item: SpoolItem) -> None:
        """Replace the item's .json atomically (write aside, fsync, rename over)."""
        meta = dict(item.extra)  # the first line's "size" too, if there was one
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
                eml = self._find("work", id)
                age = None if eml is None else _age(eml, now)
                if eml is None or age is None or age < min_age_seconds:
                    continue
                meta = self._meta("work", id)
                if meta.exists():
                    os.rename(meta, self._meta("new", id))  # .json first into new/
                new = self.dirs["new"] / eml.name
                try:
                    os.rename(eml, new)
                except FileNotFoundError:
                    continue
                self._touch(new)
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
        """A .json without its file: a crash between the two renames of a move. Put it where
        its file is; if the file is nowhere (removed by hand), drop it once it is old."""
        for state in ("new", "work", "done", "failed"):
            emls = set(self._ids(state))
            for id in self._ids(state, META):
                if id in emls:
                    continue
                meta = self._meta(state, id)
                home = next((s for s in ("new", "work", "done", "failed")
                             if s != state and self._find(s, id) is not None), None)
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
                eml = self._find("done", id)
                if eml is None:
                    continue
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


def _header(meta: dict[str, Any]) -> bytes:
    """The first line of a ``.mail``: one line whatever the metadata holds, since JSON
    escapes line breaks inside strings (and ensure_ascii, as in `_dump`)."""
    return HEADER_MAGIC + json.dumps(meta, ensure_ascii=True, sort_keys=True,
                                     separators=(",", ":")).encode("ascii") + b"\n"


def _dump(meta: dict[str, Any]) -> bytes:
    # ensure_ascii: SMTPUTF8 addresses may carry surrogate-escaped raw bytes, which UTF-8
    # cannot encode but \u escapes round-trip exactly.
    return (json.dumps(meta, ensure_ascii=True, indent=1, sort_keys=True) + "\n").encode("ascii")
