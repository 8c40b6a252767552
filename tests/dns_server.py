"""A small DNS server over UDP on 127.0.0.1, answering from a dict: for tests that check
mailflow asks the resolvers it is configured with (`[classify] nameservers`), and for the
benchmarks, which stand it in for the local caching resolver a production site runs.

The zone has the shape of `StubResolver`'s: `{"example.org": {"TXT": ["v=spf1 -all"],
"A": ["192.0.2.1"], "AAAA": [...], "MX": [(10, "mx.example.org")]}}`. A name that is not in
it is NXDOMAIN, a type it lacks is an empty answer, a name in `fail` is SERVFAIL. Every
question is counted in `asked`, so a test can see which server was asked.

Run as a script (`python tests/dns_server.py [--port N]`) it answers NXDOMAIN to everything
(what a resolver cut off from the internet answers, as this machine's is) and prints its port
on the first line; it stops when its standard input closes.
"""
from __future__ import annotations

import socket
import sys
import threading
from collections import Counter
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Zone = dict[str, dict[str, list[Any]]]


class DnsServer:
    def __init__(self, zone: Zone | None = None, fail: set[str] | None = None,
                 host: str = "127.0.0.1", port: int = 0, ttl: int = 300) -> None:
        self.ttl = ttl   # of every record; an NXDOMAIN carries no SOA (negative TTL 300 s)
        self.zone = {k.lower().rstrip("."): v for k, v in (zone or {}).items()}
        self.fail = {f.lower().rstrip(".") for f in (fail or set())}
        self.asked: Counter[tuple[str, str]] = Counter()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.address, self.port = self.sock.getsockname()[:2]
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - not DNS: a real server drops it too
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(q.rdtype)
        self.asked[(name, rdtype)] += 1
        if name in self.fail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif name not in self.zone:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            records = self.zone[name].get(rdtype, [])
            if records:
                texts = [_text(rdtype, r) for r in records]
                response.answer.append(dns.rrset.from_text_list(
                    q.name, self.ttl, dns.rdataclass.IN, rdtype, texts))
        return response.to_wire()

    def serve_forever(self) -> None:
        # Closing the socket does not wake a recvfrom blocked in another thread (each test
        # waited out the join's 5 s): the loop looks at `_stop` every 0.1 s instead.
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                wire, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:   # closed
                return
            out = self.answer(wire)
            if out is not None:
                self.sock.sendto(out, peer)

    def __enter__(self) -> "DnsServer":
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sock.close()


def _text(rdtype: str, record: Any) -> str:
    if rdtype == "TXT":   # one string per 255 bytes, as a zone file would hold a long record
        data = str(record).encode()
        return " ".join('"' + data[i:i + 255].decode().replace('"', '\\"') + '"'
                        for i in range(0, max(len(data), 1), 255))
    if rdtype == "MX":
        preference, exchange = record
        return f"{preference} {exchange.rstrip('.')}."
    return str(record)


def main(argv: list[str]) -> int:
    port = int(argv[argv.index("--port") + 1]) if "--port" in argv else 0
    server = DnsServer(port=port)
    print(server.port, flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()   # until the parent closes our stdin (or goes away)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
