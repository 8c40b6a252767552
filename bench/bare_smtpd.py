"""The SMTP baseline: aiosmtpd that writes and fsyncs each message and does nothing else.

Run as `python -m bench.bare_smtpd --port P --dir D`. Same aiosmtpd settings as mailflow's
ingress (raw bytes, SMTPUTF8, a size limit, a fixed hostname); the write and fsync happen in a
worker thread, as mailflow's do, so one slow fsync does not stall the other connections.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal

from aiosmtpd.smtp import SMTP

_seq = itertools.count()


class Handler:
    def __init__(self, folder: str, spool: bool = False):
        self.folder = folder
        self.spool = None
        if spool:   # diagnostic: mailflow's Spool.put under the bare server, nothing else
            from mailflow.spool import Envelope, Spool
            self.spool, self.envelope = Spool(folder), Envelope

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # type: ignore[no-untyped-def]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        if self.spool is not None:
            await asyncio.to_thread(self.spool.put, envelope.original_content,
                                    self.envelope(mail_from=envelope.mail_from,
                                                  rcpt_tos=list(envelope.rcpt_tos)))
        else:
            await asyncio.to_thread(self._write, envelope.original_content)
        return "250 OK"

    def _write(self, raw: bytes) -> None:
        path = os.path.join(self.folder, f"{os.getpid()}-{next(_seq)}.eml")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--spool", action="store_true", help="write with mailflow's Spool.put")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    loop = asyncio.get_running_loop()
    handler = Handler(args.dir, args.spool)

    def factory() -> SMTP:
        return SMTP(handler, hostname="bare.example", ident="bare", data_size_limit=26214400,
                    enable_SMTPUTF8=True, decode_data=False, timeout=300, loop=loop)

    server = await loop.create_server(factory, "127.0.0.1", args.port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    import logging
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    asyncio.run(main())
