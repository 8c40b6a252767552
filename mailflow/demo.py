"""`mailflow demo`: watch one request go round, against the running daemon, over real SMTP.

It plays both outsiders: Jane the citizen and the authority's FOI officer. Each sends mail to
the daemon's SMTP port exactly as a remote server would, then waits for what mailflow writes
into the Maildir outbox and shows it. Needs `mailflow serve` running with the maildir
transport (the default).
"""
from __future__ import annotations

import email
import email.policy
import smtplib
import time
from email.message import EmailMessage
from email.utils import getaddresses, make_msgid
from pathlib import Path

from rich.console import Console
from rich.panel import Panel

from mailflow.site import Site


class _Outbox:
    def __init__(self, root: Path):
        self.root = root
        self.seen = {p.name for p in self._files()}

    def _files(self) -> list[Path]:
        return [p for sub in ("new", "cur") if (self.root / sub).is_dir()
                for p in (self.root / sub).iterdir()]

    def wait_for(self, rcpt: str, timeout: float) -> EmailMessage | None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for p in sorted(self._files(), key=lambda p: p.stat().st_mtime):
                if p.name in self.seen:
                    continue
                msg = email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
                if rcpt.lower() in str(msg.get("Delivered-To", "")).lower():
                    self.seen.add(p.name)
                    return msg  # type: ignore[return-value]
            time.sleep(0.3)
        return None


def _send(host: str, port: int, frm: str, to: str, subject: str, body: str,
          in_reply_to: str | None = None) -> None:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = frm, to, subject
    m["Message-ID"] = make_msgid(domain=frm.rpartition("@")[2].rstrip(">"))
    if in_reply_to:
        m["In-Reply-To"] = m["References"] = in_reply_to
    m.set_content(body)
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.send_message(m)


def _show(console: Console, title: str, msg: EmailMessage) -> None:
    body = msg.get_body(preferencelist=("plain",))
    text = body.get_content() if body is not None else ""
    head = "\n".join(f"{h}: {msg[h]}" for h in ("From", "To", "Reply-To", "Subject") if msg[h])
    signed = "DKIM-signed" if msg["DKIM-Signature"] else "NOT signed"
    console.print(Panel(f"{head}\n[dim]({signed})[/]\n\n{text.strip()[:1200]}", title=title,
                        expand=False), highlight=False)


def _first_addr(msg: EmailMessage, *headers: str) -> str:
    for h in headers:
        for _, a in getaddresses([str(v) for v in msg.get_all(h, [])]):
            if a:
                return a
    return ""


def run_demo(site: Site, *, citizen: str, slug: str | None, timeout: float, console: Console) -> int:
    s = site.settings
    if s.outbound.transport != "maildir":
        console.print("[red]The demo reads the Maildir outbox: set [outbound] transport = \"maildir\".")
        return 1
    authorities = [a for a in site.rules.authorities.values() if a.contact]
    authority = next((a for a in authorities if a.slug == slug), None) if slug else (
        authorities[0] if authorities else None)
    if authority is None:
        console.print("[red]No authority with an email address in rules/authorities.toml.")
        return 1
    host, port = s.smtp.listen_host, s.smtp.listen_port
    box = _Outbox(s.outbound.maildir)
    domain = site.domain
    jane = f"Jane Citizen <{citizen}>"

    def step(n: int, text: str) -> None:
        console.print(f"\n[bold cyan]{n}.[/] {text}")

    try:
        step(1, f"Jane emails [bold]{authority.slug}@{domain}[/] over SMTP ({host}:{port}).")
        _send(host, port, jane, f"{authority.slug}@{domain}", "Pothole repairs in 2025",
              "How much did you spend on pothole repairs in 2025, by month?")
    except OSError as e:
        console.print(f"[red]Could not reach the daemon at {host}:{port}: {e}. "
                      "Is `mailflow serve` running?")
        return 1
    conf = box.wait_for(citizen, timeout)
    if conf is None:
        console.print("[red]No confirmation reached Jane. See the daemon's log and `mailflow queue list`.")
        return 1
    _show(console, "mailflow → Jane: please confirm", conf)

    confirm_addr = _first_addr(conf, "Reply-To", "From")
    step(2, f"Jane replies to the single-use address [bold]{confirm_addr}[/].")
    _send(host, port, jane, confirm_addr, "Re: " + str(conf["Subject"]), "Yes, send it.",
          str(conf["Message-ID"]))
    req = box.wait_for(authority.contact or "", timeout)
    if req is None:
        console.print("[red]The request did not reach the authority.")
        return 1
    _show(console, f"mailflow → {authority.name}", req)

    req_addr = _first_addr(req, "From")
    step(3, f"The authority answers to the thread's address [bold]{req_addr}[/].")
    _send(host, port, f"FOI Team <{authority.contact}>", req_addr, "RE: " + str(req["Subject"]),
          "We spent 1,234,567 pounds on pothole repairs in 2025. A monthly breakdown is attached.",
          str(req["Message-ID"]))
    fwd = box.wait_for(citizen, timeout)
    if fwd is None:
        console.print("[red]The answer was not forwarded to Jane.")
        return 1
    _show(console, "mailflow → Jane: the authority's answer", fwd)

    reply_addr = _first_addr(fwd, "Reply-To", "From")
    step(4, f"Jane follows up through her own secret address [bold]{reply_addr}[/].")
    _send(host, port, jane, reply_addr, "Re: " + str(fwd["Subject"]),
          "Thank you. Could you also break that down by ward?", str(fwd["Message-ID"]))
    fu = box.wait_for(authority.contact or "", timeout)
    if fu is None:
        console.print("[red]The follow-up did not reach the authority.")
        return 1
    _show(console, f"mailflow → {authority.name}: follow-up", fu)
    console.print("\n[bold green]Round trip complete.[/] The authority never saw Jane's address; "
                  "Jane never needed theirs. See it all with `mailflow thread list`.")
    return 0
