"""Diagnostic server: mailflow's own SMTP ingress without the processing worker.

`python -m bench.ingress_only --config C --port P`: the daemon's RCPT check (the door and the
gatekeeper's store lookups) and its `IngressHandler` (spool with fsyncs, then the wake-up),
served by `start_server` as `mailflow serve` does, but nothing consumes the spool. Between the
bare server and the full daemon, it shows what the accept path costs by itself and what the
processing running beside it costs.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    from mailflow.daemon import Daemon
    from mailflow.ingress.smtp import IngressHandler, start_server
    from mailflow.site import Site
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    site = Site.open(args.config)
    site.store  # noqa: B018 - migrated before accepting mail, as the daemon does
    d = Daemon(site)
    s = site.settings
    handler = IngressHandler(site.spool, d.check_rcpt, lambda spool_id: None,
                             max_recipients=s.smtp.max_recipients)
    server = await start_server(handler, "127.0.0.1", args.port, hostname=s.smtp.hostname,
                                max_message_size=s.smtp.max_message_size)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()
    await handler.drain()
    site.close()


if __name__ == "__main__":
    asyncio.run(main())
