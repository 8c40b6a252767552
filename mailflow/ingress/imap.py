"""IMAP ingress: take mail from a mailbox the group already has (a hosting provider's catch-all).

The order is what makes it safe. Each message is fetched with ``BODY.PEEK[]`` (reading does
not mark it), put in the spool (``Spool.put`` fsyncs), and only then flagged ``\\Seen`` or
moved to ``processed_folder``. Per account and folder the folder's UIDVALIDITY and the last
spooled UID are kept in ``<state_dir>/imap-state.json`` (written atomically: tmp, fsync,
rename), so a restart resumes after the last message it took.

Nothing lost, nothing twice: a crash between spooling and flagging, a lost connection
before the state was saved, or a UIDVALIDITY change (the server renumbered the folder, so
stored UIDs mean nothing any more) makes a message be fetched and spooled again. That is
harmless: the pipeline is idempotent by the raw bytes (every (sha256, recipient) pair is
recorded), so a second copy of a processed message changes nothing. After a UIDVALIDITY
change (and on the first run) the folder is re-scanned: every message when a
``processed_folder`` is set (what is still there was not processed), otherwise every
message not flagged ``\\Seen`` (what we took was flagged; a message read by a person
before mailflow first saw the folder is left alone: mark it unread to have it taken).

The envelope recipient is lost in a catch-all mailbox, so the spool item says
``rcpt_from_headers=True`` and the pipeline reads Delivered-To / X-Original-To / To / Cc.

Push with a safety net: IDLE when the server offers it, re-issued every ``idle_seconds``
(default 600, well under the 29 minutes of RFC 2177), with a timeout of our own around it
(a ``* BYE`` during IDLE can hang aioimaplib, upstream issue #110); polling every
``poll_seconds`` otherwise. Any error closes the connection and retries with exponential
backoff up to 5 minutes, logged, without touching the rest of the daemon.
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from mailflow.errors import ConfigError, MailflowError

log = logging.getLogger("mailflow.imap")

STATE_FILE = "imap-state.json"
BACKOFF_START, BACKOFF_CAP = 1.0, 300.0


class ImapError(MailflowError):
    """The IMAP server refused or broke off; the poller retries, the CLI says it and exits 1."""


class ImapLoginError(ImapError):
    pass


# -- config ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImapAccount:
    host: str
    port: int
    tls: bool
    user: str
    password: str = field(repr=False)
    folders: tuple[str, ...] = ("INBOX",)
    processed_folder: str | None = None
    poll_seconds: float = 60.0
    idle_seconds: float = 600.0
    timeout: float = 30.0

    @property
    def name(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


_KEYS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "host": (str, None), "port": (int, 0), "tls": (bool, True), "user": (str, None),
    "password": (str, ""), "password_env": (str, ""), "folders": (list, ["INBOX"]),
    "processed_folder": (str, ""), "poll_seconds": ((int, float), 60),
    "idle_seconds": ((int, float), 600), "timeout": ((int, float), 30),
}


def parse_accounts(raw_imap_table: Any, path: Path | str) -> list[ImapAccount]:
    """The ``[[imap.accounts]]`` tables of a config file; a ConfigError names the key."""
    if raw_imap_table is None:
        return []
    if not isinstance(raw_imap_table, dict):
        raise ConfigError(f"{path}: [imap]: expected a table")
    for key in raw_imap_table:
        if key != "accounts":
            raise ConfigError(f"{path}: [imap] {key}: unknown key; known keys: accounts "
                              "(one [[imap.accounts]] table per mailbox)")
    accounts = raw_imap_table.get("accounts") or []
    if not isinstance(accounts, list):
        raise ConfigError(f"{path}: [imap] accounts: expected [[imap.accounts]] tables")
    out = []
    for i, acc in enumerate(accounts):
        where = f"{path}: [[imap.accounts]] #{i + 1}"
        if not isinstance(acc, dict):
            raise ConfigError(f"{where}: expected a table")
        v: dict[str, Any] = {}
        for key, value in acc.items():
            if key not in _KEYS:
                raise ConfigError(f"{where} {key}: unknown key; known keys: {', '.join(_KEYS)}")
            typ = _KEYS[key][0]
            if (typ is int or typ == (int, float)) and isinstance(value, bool) \
                    or not isinstance(value, typ):
                raise ConfigError(f"{where} {key}: expected "
                                  f"{getattr(typ, '__name__', 'a number')}, got {value!r}")
            v[key] = value
        for key, (_, default) in _KEYS.items():
            if key not in v:
                if default is None:
                    raise ConfigError(f"{where} {key}: missing, and it has no default")
                v[key] = default
        if not v["host"].strip():
            raise ConfigError(f"{where} host: expected a host name")
        port = v["port"] or (993 if v["tls"] else 143)
        if not 0 < port < 65536:
            raise ConfigError(f"{where} port: expected 1-65535, got {port}")
        password = v["password"]
        if v["password_env"]:
            if v["password_env"] not in os.environ:
                raise ConfigError(f"{where} password_env: environment variable "
                                  f"{v['password_env']} is not set")
            password = os.environ[v["password_env"]]
        if not password:
            raise ConfigError(f"{where} password: missing (or password_env naming a variable)")
        folders = v["folders"]
        if not folders or not all(isinstance(f, str) and f.strip() for f in folders):
            raise ConfigError(f"{where} folders: expected a list of folder names, got {folders!r}")
        for key in ("poll_seconds", "idle_seconds", "timeout"):
            if v[key] <= 0:
                raise ConfigError(f"{where} {key}: expected a positive number")
        if v["idle_seconds"] >= 29 * 60:
            raise ConfigError(f"{where} idle_seconds: expected under 1740 (29 minutes)")
        processed = v["processed_folder"] or None
        if processed is not None and processed in folders:
            raise ConfigError(f"{where} processed_folder: must not be one of the folders read")
        out.append(ImapAccount(host=v["host"].strip(), port=port, tls=v["tls"], user=v["user"],
                               password=password, folders=tuple(folders),
                               processed_folder=processed,
                               poll_seconds=float(v["poll_seconds"]),
                               idle_seconds=float(v["idle_seconds"]),
                               timeout=float(v["timeout"])))
    return out


# -- state -----------------------------------------------------------------------------------
class ImapState:
    """``{"user@host:port/folder": {"uidvalidity": int, "last_uid": int}}`` in one JSON file.

    Every update re-reads and rewrites the file under an flock, so a ``fetch --once`` from
    cron and a running daemon never lose each other's progress.
    """

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / STATE_FILE
        self.lock_path = Path(state_dir) / (STATE_FILE + ".lock")

    @staticmethod
    def key(account: ImapAccount, folder: str) -> str:
        return f"{account.name}/{folder}"

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise ImapError(f"{self.path} is not valid JSON ({e}); repair or remove it "
                            "(removing it re-scans: nothing is lost, nothing processed twice)")
        return data if isinstance(data, dict) else {}

    def get(self, account: ImapAccount, folder: str) -> tuple[int, int] | None:
        entry = self._read().get(self.key(account, folder))
        if not isinstance(entry, dict):
            return None
        try:
            return int(entry["uidvalidity"]), int(entry["last_uid"])
        except (KeyError, TypeError, ValueError):
            return None

    def set(self, account: ImapAccount, folder: str, uidvalidity: int, last_uid: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            data[self.key(account, folder)] = {"uidvalidity": uidvalidity, "last_uid": last_uid}
            tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# -- the IMAP side ---------------------------------------------------------------------------
def _mailbox(name: str) -> str:
    """A folder name as an IMAP astring (quoted when it needs to be)."""
    if re.fullmatch(r"[A-Za-z0-9_.\-/]+", name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _text(lines: Iterable[Any]) -> str:
    return " ".join(bytes(x).decode("utf-8", "replace") for x in lines if isinstance(x, bytes))


class Connection:
    """One logged-in aioimaplib client. Create it inside a running event loop."""

    def __init__(self, account: ImapAccount):
        self.account = account
        self.client: Any = None
        self.lost = asyncio.Event()

    async def open(self) -> "Connection":
        import aioimaplib
        a = self.account
        cls = aioimaplib.IMAP4_SSL if a.tls else aioimaplib.IMAP4
        self.client = cls(host=a.host, port=a.port, timeout=a.timeout)
        self.client.protocol.conn_lost_cb = lambda exc: self.lost.set()
        try:
            await self.client.wait_hello_from_server()
        except (OSError, asyncio.TimeoutError) as e:
            raise ImapError(f"{a.name}: cannot connect: {type(e).__name__}: {e}") from e
        r = await self.client.login(a.user, a.password)
        if r.result != "OK":
            raise ImapLoginError(f"{a.name}: login refused: {_text(r.lines) or r.result}")
        return self

    async def close(self) -> None:
        if self.client is None:
            return
        try:
            if not self.lost.is_set():
                await asyncio.wait_for(self.client.logout(), 5)
        except Exception:  # noqa: BLE001 - the connection is being dropped anyway
            pass
        transport = getattr(self.client.protocol, "transport", None)
        if transport is not None:
            transport.close()
        self.client = None

    async def _ok(self, what: str, coro: Any) -> Any:
        r = await coro
        if r.result != "OK":
            raise ImapError(f"{self.account.name}: {what}: {r.result} {_text(r.lines)}")
        return r

    def has(self, capability: str) -> bool:
        return bool(self.client.has_capability(capability))

    async def folders(self) -> list[str]:
        r = await self._ok("LIST", self.client.list('""', '"*"'))
        names = []
        for line in r.lines[:-1]:
            m = re.match(rb'\((?P<flags>[^)]*)\) (?:"[^"]*"|NIL) (?P<name>.+)$', bytes(line))
            if m:
                name = m.group("name").decode("utf-8", "replace")
                if name.startswith('"') and name.endswith('"'):
                    name = name[1:-1].replace('\\"', '"').replace("\\\\", "\\")
                names.append(name)
        return names

    async def select(self, folder: str) -> tuple[int, int]:
        """Select a folder; returns its UIDVALIDITY and UIDNEXT (0 when not sent).

        (Not EXAMINE even for `check`: aioimaplib does not count it as a selected state and
        refuses SEARCH after it. SELECT changes no flag; only BODY without PEEK would.)"""
        r = await self._ok(f"SELECT {folder}", self.client.select(_mailbox(folder)))
        m = re.search(r"\[UIDVALIDITY (\d+)\]", _text(r.lines))
        if not m:
            raise ImapError(f"{self.account.name}: {folder}: the server sent no UIDVALIDITY")
        n = re.search(r"\[UIDNEXT (\d+)\]", _text(r.lines))
        return int(m.group(1)), int(n.group(1)) if n else 0

    async def search(self, *criteria: str) -> list[int]:
        r = await self._ok("UID SEARCH", self.client.uid_search(*criteria, charset=None))
        uids: list[int] = []
        for line in r.lines[:-1]:
            words = bytes(line).split()
            if words[:1] == [b"SEARCH"]:
                words = words[1:]
            uids.extend(int(w) for w in words if w.isdigit())
        return sorted(set(uids))

    async def fetch(self, uid: int) -> bytes | None:
        r = await self._ok("UID FETCH", self.client.uid("fetch", str(uid), "(UID BODY.PEEK[])"))
        for line in r.lines:
            if isinstance(line, bytearray):
                return bytes(line)
        return None  # expunged meanwhile

    async def settle(self, uid: int) -> None:
        """The message is safely spooled: flag it, or move it out of the way."""
        a, c = self.account, self.client
        if a.processed_folder is None:
            await self._ok("UID STORE", c.uid("store", str(uid), "+FLAGS.SILENT", r"(\Seen)"))
        elif self.has("MOVE"):
            await self._ok("UID MOVE", c.uid("move", str(uid), _mailbox(a.processed_folder)))
        else:
            await self._ok("UID COPY", c.uid("copy", str(uid), _mailbox(a.processed_folder)))
            await self._ok("UID STORE",
                           c.uid("store", str(uid), "+FLAGS.SILENT", r"(\Seen \Deleted)"))
            if self.has("UIDPLUS"):
                await self._ok("UID EXPUNGE", c.uid("expunge", str(uid)))


async def to_fetch(conn: Connection, state: ImapState, folder: str) -> tuple[int, int, list[int], int | None]:
    """Select ``folder``; returns (uidvalidity, last_uid, the UIDs still to take, and after a
    re-scan the UID the cursor may move to once they are all taken, else None)."""
    account = conn.account
    uidvalidity, uidnext = await conn.select(folder)
    known = await asyncio.to_thread(state.get, account, folder)
    if known is not None and known[0] == uidvalidity:
        last = known[1]
        uids = await conn.search("UID", f"{last + 1}:*", "UNDELETED")
        return uidvalidity, last, [u for u in uids if u > last], None  # "n:*" names the last
    if known is not None:
        log.warning("imap %s/%s: UIDVALIDITY changed (%d -> %d); re-scanning the folder (a "
                    "message taken before is recognised and not processed twice)",
                    account.name, folder, known[0], uidvalidity)
    crit = ("UNDELETED",) if account.processed_folder else ("UNSEEN", "UNDELETED")
    uids = await conn.search(*crit)
    # Anything below UIDNEXT that the search left out was deliberately skipped (\Seen).
    return uidvalidity, 0, uids, max([uidnext - 1, *uids, 0])


def _return_path(raw: bytes) -> str:
    """The Return-Path an MTA left in a fetched message: its envelope sender, as a hint."""
    from mailflow.mail.parse import parse
    try:
        rp = parse(raw).header("Return-Path")
    except Exception:  # noqa: BLE001 - the sender is only a hint here
        rp = None
    return (rp or "").strip().strip("<>").strip().lower()


async def fetch_folder(conn: Connection, spool: Any, on_spooled: Callable[[str], None],
                       state: ImapState, folder: str,
                       stop_event: asyncio.Event | None = None) -> list[str]:
    """Take every new message of one folder: fetch, spool (durable), settle, remember."""
    from mailflow.spool import Envelope

    account = conn.account
    uidvalidity, last, uids, rescan_to = await to_fetch(conn, state, folder)
    spooled: list[str] = []
    for uid in uids:
        if stop_event is not None and stop_event.is_set():
            break
        raw = await conn.fetch(uid)
        if raw is not None:
            # Parsing is CPU work: off the loop, which also serves the SMTP clients.
            sender = await asyncio.to_thread(_return_path, raw)
            env = Envelope(mail_from=sender, rcpt_tos=[], via="imap", rcpt_from_headers=True,
                           peer=f"{account.host}:{account.port}")
            spool_id = await asyncio.to_thread(spool.put, raw, env)  # fsynced
            spooled.append(spool_id)
            on_spooled(spool_id)
            await conn.settle(uid)
            log.info("imap %s/%s: UID %d spooled as %s", account.name, folder, uid, spool_id)
        await asyncio.to_thread(state.set, account, folder, uidvalidity, max(uid, last))
        last = max(uid, last)
    else:
        if rescan_to is not None:  # the re-scan is complete: resume after it from now on
            await asyncio.to_thread(state.set, account, folder, uidvalidity, rescan_to)
    return spooled


async def fetch_account(account: ImapAccount, spool: Any, on_spooled: Callable[[str], None],
                        state_dir: Path) -> list[str]:
    """One pass over every folder of one account (what ``fetch --once`` does)."""
    state = ImapState(state_dir)
    conn = Connection(account)
    try:
        await conn.open()
        spooled = []
        for folder in account.folders:
            spooled += await fetch_folder(conn, spool, on_spooled, state, folder)
        return spooled
    finally:
        await conn.close()


# -- the poller ------------------------------------------------------------------------------
async def _idle(conn: Connection, stop_event: asyncio.Event, seconds: float) -> None:
    """IDLE on the selected folder until new mail, ``seconds`` or a stop; our own timeouts."""
    c = conn.client
    idle_task = await asyncio.wait_for(c.idle_start(timeout=seconds), conn.account.timeout)
    stopper = asyncio.ensure_future(stop_event.wait())
    lost = asyncio.ensure_future(conn.lost.wait())
    try:
        deadline = asyncio.get_running_loop().time() + seconds + 5
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            push = asyncio.ensure_future(c.wait_server_push(timeout=left))
            done, _ = await asyncio.wait({push, stopper, lost}, timeout=left + 1,
                                         return_when=asyncio.FIRST_COMPLETED)
            if push not in done:
                push.cancel()
                if lost in done:
                    raise ImapError(f"{conn.account.name}: connection lost during IDLE")
                break  # stop asked, or our own timeout
            try:
                lines = push.result()
            except asyncio.TimeoutError:
                break
            text = _text(lines)
            if "BYE" in text:
                raise ImapError(f"{conn.account.name}: server said BYE during IDLE: {text}")
            if "stop_wait_server_push" in text or re.search(r"\d+ (EXISTS|RECENT)", text):
                break
            # "OK Still here" and flag changes: keep idling
    finally:
        stopper.cancel()
        lost.cancel()
    if c.has_pending_idle():
        c.idle_done()
    try:
        await asyncio.wait_for(idle_task, conn.account.timeout)
    except asyncio.TimeoutError:
        raise ImapError(f"{conn.account.name}: the server did not end IDLE") from None


async def _sleep(stop_event: asyncio.Event, seconds: float, *others: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in (stop_event, *others)]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def poll_account(account: ImapAccount, spool: Any, on_spooled: Callable[[str], None],
                       state_dir: Path, stop_event: asyncio.Event) -> None:
    """Keep one account's folders drained until ``stop_event``; reconnect with backoff."""
    state = ImapState(state_dir)
    delay = BACKOFF_START
    while not stop_event.is_set():
        conn = Connection(account)
        try:
            await conn.open()
            idle = conn.has("IDLE")
            log.info("imap %s: connected (%s)", account.name,
                     "IDLE" if idle else f"polling every {account.poll_seconds:g} s")
            while not stop_event.is_set():
                for folder in account.folders:
                    await fetch_folder(conn, spool, on_spooled, state, folder, stop_event)
                delay = BACKOFF_START  # a whole pass worked: the next error starts over
                if stop_event.is_set():
                    break
                if idle:
                    if len(account.folders) > 1:
                        await conn.select(account.folders[0])  # IDLE watches the first
                    # IDLE watches one folder: with more, the others are polled meanwhile
                    seconds = (min(account.idle_seconds, account.poll_seconds)
                               if len(account.folders) > 1 else account.idle_seconds)
                    await _idle(conn, stop_event, seconds)
                else:
                    await _sleep(stop_event, account.poll_seconds, conn.lost)
                if conn.lost.is_set():
                    raise ImapError(f"{account.name}: connection lost")
        except asyncio.CancelledError:
            await conn.close()
            raise
        except Exception as e:  # noqa: BLE001 - logged, retried; SMTP keeps working
            level = logging.ERROR if isinstance(e, ImapLoginError) else logging.WARNING
            log.log(level, "imap %s: %s; retrying in %g s", account.name,
                    e if isinstance(e, ImapError) else f"{type(e).__name__}: {e}", delay)
            await conn.close()
            await _sleep(stop_event, delay)
            delay = min(delay * 2, BACKOFF_CAP)
            continue
        await conn.close()
    log.info("imap %s: stopped", account.name)


async def run_pollers(accounts: list[ImapAccount], spool: Any, on_spooled: Callable[[str], None],
                      state_dir: Path, stop_event: asyncio.Event) -> None:
    """One poller per account until ``stop_event`` is set (the daemon makes this a task)."""
    if not accounts:
        return
    await asyncio.gather(*(poll_account(a, spool, on_spooled, state_dir, stop_event)
                           for a in accounts))
