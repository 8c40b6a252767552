"""Helpers for the adversarial suite: a raw SMTP client that sends exactly the bytes it is
given, an ingress server on its own loop (start_server, as the daemon runs it), a throw-away
TLS certificate, and a higher open-file limit for tests that hold hundreds of sockets."""
from __future__ import annotations

import asyncio
import datetime as dt
import re
import resource
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mailflow.ingress.smtp import IngressHandler, RcptDecision, start_server
from mailflow.spool import Spool

FOI = "foi.example"
KNOWN = {f"request-1-abc@{FOI}", f"request-2-def@{FOI}", f"reply-1-xyz@{FOI}"}


def check_rcpt(mail_from: str, rcpt: str) -> RcptDecision:
    if rcpt.lower() in KNOWN:
        return RcptDecision(True, "")
    return RcptDecision(False, f"550 5.1.1 <{rcpt}>: no such address here")


class RawSMTP:
    """A socket that speaks SMTP byte for byte: nothing is normalised, dot-stuffed or waited
    for unless the test asks. Replies are read whole (multi-line replies joined)."""

    def __init__(self, port: int, host: str = "127.0.0.1", *, source: str | None = None,
                 timeout: float = 20, banner: bool = True) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buf = b""
        self.banner = self.reply() if banner else None

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; unread: {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, bytes]:
        """One reply: (code, text of all its lines joined by newlines)."""
        lines = [self._line()]
        while len(lines[-1]) > 3 and lines[-1][3:4] == b"-":
            lines.append(self._line())
        return int(lines[0][:3]), b"\n".join(l[4:] for l in lines)

    def cmd(self, line: str | bytes) -> tuple[int, bytes]:
        self.send((line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line)
                  + b"\r\n")
        return self.reply()

    def rest(self) -> list[bytes]:
        """Every reply line until the server closes the connection."""
        lines = []
        while True:
            try:
                lines.append(self._line())
            except EOFError:
                return lines

    def closed_by_server(self) -> bool:
        """True when the server has closed its end (reads hit EOF), False if it is open."""
        try:
            self.sock.settimeout(5)
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawSMTP":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def queued_id(text: bytes) -> str:
    m = re.search(rb"queued as (\S+)", text)
    assert m, text
    return m.group(1).decode()


class Ingress:
    """mailflow's ingress server on its own event loop in a thread (start_server, exactly as
    the daemon calls it), for the checks whose honest unit is the SMTP layer and the spool."""

    def __init__(self, handler: IngressHandler, **kw: Any) -> None:
        self.handler = handler
        self.kw = kw
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        kw = {"hostname": f"mx.{FOI}", "max_message_size": 1_000_000, **self.kw}
        server = await start_server(self.handler, "127.0.0.1", 0, **kw)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()
        await server.wait_closed()
        await self.handler.drain()
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not me]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def __enter__(self) -> "Ingress":
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive()
        if self._error is not None:
            raise self._error


@contextmanager
def ingress(spool: Spool, *, rcpt: Callable[[str, str], RcptDecision] = check_rcpt,
            max_recipients: int = 100, **kw: Any) -> Iterator[Ingress]:
    handler = IngressHandler(spool, rcpt, lambda id: None, max_recipients=max_recipients)
    with Ingress(handler, **kw) as srv:
        yield srv


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def raise_fd_limit(need: int) -> None:
    """Hundreds of sockets in one test: raise this process's soft limit (children such as
    `mailflow serve` inherit it) or skip when the hard limit forbids it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


@dataclass
class TlsFiles:
    cert: Path
    key: Path


def make_tls_files(directory: Path, hostname: str) -> TlsFiles:
    """A self-signed certificate and key (PEM) for `hostname`, made with cryptography."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "cert.pem", directory / "key.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return files


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path / "tls", f"mx.{FOI}")
