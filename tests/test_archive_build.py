"""The public archive, built in-process from threads made through the real pipeline.

One small world (`World`) is made once per module: three requests to two authorities, with a
DKIM-signed answer, quoted text and a signature, attachments (one published, one withheld),
an HTML-only answer full of script, an automatic reply, a follow-up, a hidden message, an
`X-No-Archive` message, and a draft that was never confirmed. The tests read what the build
wrote; the ones that change the store make their own world.
"""
from __future__ import annotations

import gzip
import json
import re
import sqlite3
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from email.message import EmailMessage
from email.utils import formataddr, formatdate, make_msgid
from email import policy
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import update

from conftest import DOMAIN, JANE, MAILFLOW, compose
from mailflow.archive import build as build_mod
from mailflow.archive import writer as writer_mod
from mailflow.archive.build import BuildReport, build
from mailflow.archive.writer import CACHE_DIR, LeakError, LeakGuard, Writer
from mailflow.core.redaction import Redactor
from mailflow.outbound.signing import Signer, dns_record
from mailflow.pipeline import Pipeline
from mailflow.site import Site as MfSite
from mailflow.spool import Envelope
from mailflow.store.tables import messages as messages_table

CAMDEN = "foi@camden.gov.example"
HOME = "foirequests@homeoffice.gov.example"
BOB = "bob.private@citizen.example"
TODAY = datetime.now(timezone.utc).date()
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'")


# -- making a world -----------------------------------------------------------------------------
def make_site(folder: Path) -> MfSite:
    r = subprocess.run([*MAILFLOW, "init", str(folder), "--domain", DOMAIN], capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    return MfSite.open(folder / "config.toml")


def ingest(mf: MfSite, raw: bytes, rcpt: str, sender: str) -> None:
    Pipeline(mf).process(raw, Envelope(mail_from=sender, rcpt_tos=[rcpt], via="test"))


def ask(mf: MfSite, slug: str, title: str, body: str, *, citizen: str = JANE,
        name: str = "Jane Citizen", confirm: bool = True) -> int:
    frm = formataddr((name, citizen))
    ingest(mf, compose(frm, f"{slug}@{DOMAIN}", title, body), f"{slug}@{DOMAIN}", citizen)
    with mf.store.read() as tx:
        t = tx.threads()[-1]
    assert t.citizen_email == citizen and t.state == "awaiting_confirmation", t
    if confirm:
        addr = f"confirm-{t.confirm_token}@{DOMAIN}"
        ingest(mf, compose(frm, addr, "Re", "Yes"), addr, citizen)
    return t.id


def addresses_of(mf: MfSite, tid: int) -> tuple[str, str]:
    with mf.store.read() as tx:
        t = tx.thread(tid)
    assert t is not None
    return (f"request-{tid}-{t.request_token}@{DOMAIN}", f"reply-{tid}-{t.reply_token}@{DOMAIN}")


def mail(frm: str, to: str, subject: str, text: str | None, *, html: str | None = None,
         attachments: list[tuple[str, str, bytes]] = (), headers: dict[str, str] | None = None
         ) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = frm, to, subject
    m["Date"] = formatdate()
    m["Message-ID"] = make_msgid(domain="camden.gov.example")
    for k, v in (headers or {}).items():
        m[k] = v
    if text is not None:
        m.set_content(text)
        if html is not None:
            m.add_alternative(html, subtype="html")
    elif html is not None:
        m.set_content(html, subtype="html")
    for filename, ctype, data in attachments:
        maintype, subtype = ctype.split("/")
        m.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return m.as_bytes(policy=policy.SMTP)


@dataclass
class World:
    mf: MfSite
    out: Path
    dns: Callable[[bytes], bytes | None]
    signer: Signer
    a: int          # Camden: answered (signed), followed up, auto reply, HTML answer
    b: int          # Home Office: no answer; one hidden follow-up
    c: int          # Camden: an answer marked X-No-Archive
    draft: int      # never confirmed
    secrets: list[str]

    def build(self, **kw: object) -> BuildReport:
        kw.setdefault("dns_txt", self.dns)
        kw.setdefault("today", TODAY)
        kw.setdefault("search", False)
        return build(self.mf, self.out, **kw)  # type: ignore[arg-type]

    def read(self, rel: str) -> str:
        return (self.out / rel).read_text(encoding="utf-8")

    def sitemap(self) -> str:
        """The sitemap index and every part it lists, as one text."""
        index = self.read("sitemap.xml")
        parts = re.findall(r"<loc>https://[^/]+/(sitemap/[^<]+)</loc>", index)
        assert parts and parts[0] == "sitemap/site.xml", index
        return index + "".join(self.read(p) for p in parts)

    def thread_dir(self, tid: int) -> str:
        [d] = [p.name for p in (self.out / "request").iterdir() if p.name.startswith(f"{tid}-")]
        return f"request/{d}/"


def make_world(folder: Path) -> World:
    mf = make_site(folder / "site")
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    signer = Signer(pem, "sel", "camden.gov.example")
    record = dns_record(pem, "sel", "camden.gov.example")
    txt = "".join(re.findall(r'"([^"]*)"', record)).encode("ascii")
    zone = {b"sel._domainkey.camden.gov.example.": txt}

    a = ask(mf, "camden", 'Gritting <script>alert("t")</script> & salt',
            "Which roads were gritted last winter?\nPlease reply to me at " + JANE)
    req_a, reply_a = addresses_of(mf, a)
    answer = mail(f"John Smith <{CAMDEN}>", req_a, "RE: Gritting",
                  "Dear Jane Citizen,\n\nThe list of roads is attached.\n\nKind regards,\n"
                  f"-- \nJohn Smith\nFOI officer\n\nOn 1 March, Jane <{req_a}> wrote:\n"
                  f"> Which roads were gritted?\n> Reply to {JANE}\n",
                  attachments=[("roads for jane.citizen@citizen.example.csv", "text/csv",
                                f"road,date\nHigh St,2026-12-01\ncontact,{JANE}\n".encode()),
                               ("bundle.zip", "application/zip", b"PK\x03\x04" + b"\0" * 40)])
    ingest(mf, signer.sign(answer), req_a, CAMDEN)
    ingest(mf, compose(f"Jane Citizen <{JANE}>", reply_a, "Re: Gritting",
                       "Thank you. Could you also say how much salt was used?\n\n"
                       f"On Tue, John <{reply_a}> wrote:\n> The list is attached"),
           reply_a, JANE)
    ingest(mf, mail(f"Out of office <{CAMDEN}>", req_a, "Automatic reply: Gritting",
                    "I am away until Monday.", headers={"Auto-Submitted": "auto-replied"}),
           req_a, CAMDEN)
    ingest(mf, mail(f"John Smith <{CAMDEN}>", req_a, "RE: salt", None,
                    html=('<p onclick="alert(1)">We used <b>4,000 tonnes</b>.</p>'
                          '<script>alert(2)</script><img src="https://tracker.example/p.gif">'
                          f'<a href="javascript:alert(3)">x</a> <a href="mailto:{JANE}">you</a>'
                          '<p style="color:red">red</p>')),
           req_a, CAMDEN)

    b = ask(mf, "home-office", "Visa processing times", "How long did visas take in 2026?",
            citizen=BOB, name="Bob Private")
    _, reply_b = addresses_of(mf, b)
    ingest(mf, compose(f"Bob Private <{BOB}>", reply_b, "Re", "Any news? My number is 0777."),
           reply_b, BOB)
    with mf.store.tx() as tx:   # a moderator hid the follow-up
        tx.c.execute(update(messages_table).where(messages_table.c.thread_id == b,
                                                  messages_table.c.kind == "followup")
                     .values(hidden=True))

    c = ask(mf, "camden", "Parking fines", "How many parking fines in 2026?")
    req_c, _ = addresses_of(mf, c)
    ingest(mf, mail(f"FOI team <{CAMDEN}>", req_c, "RE: Parking fines", "Secret numbers here.",
                    headers={"X-No-Archive": "yes"}), req_c, CAMDEN)

    draft = ask(mf, "camden", "Never sent", "This draft is private.",
                citizen="carol.draft@citizen.example", name="Carol", confirm=False)

    secrets = [JANE, BOB, "carol.draft@citizen.example", mf.settings.site.secret]
    with mf.store.read() as tx:
        for t in tx.threads():
            secrets += [t.request_token, t.reply_token] + ([t.confirm_token] if t.confirm_token else [])
    return World(mf, folder / "out", zone.get, signer, a, b, c, draft, secrets)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    w = make_world(tmp_path_factory.mktemp("archive"))
    w.report = w.build()  # type: ignore[attr-defined]
    yield w
    w.mf.close()


@pytest.fixture()
def fresh(tmp_path: Path) -> World:
    w = make_world(tmp_path)
    yield w
    w.mf.close()


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# -- what is published --------------------------------------------------------------------------
def test_layout(world: World) -> None:
    files = {str(p.relative_to(world.out)) for p in all_files(world.out)}
    a, b, c = (world.thread_dir(t) for t in (world.a, world.b, world.c))
    for rel in ["index.html", "feed.atom", "sitemap.xml", "robots.txt", "static/style.css",
                "static/search.js", "search/index.html", "data/threads-0.jsonl.gz",
                "data/index.json",
                "body/index.html", "list/index.html", "body/camden/index.html",
                "body/camden/index.json", "body/camden/feed.atom", "body/home-office/index.html",
                "body/edinburgh/index.html", f"{a}index.html", f"{a}index.json", f"{a}feed.atom",
                f"{b}index.html", f"{c}index.html",
                *[f"list/{s}/index.html" for s in ("waiting-response", "overdue",
                                                   "very-overdue", "successful", "refused")]]:
        assert rel in files, rel
    assert a.startswith(f"request/{world.a}-gritting-script-alert-t-script-salt/")
    # The draft is not public; the cache is not in the sitemap.
    assert not any(f.startswith(f"request/{world.draft}-") for f in files)
    sitemap = world.sitemap()
    assert f"https://{DOMAIN}/{a}" in sitemap and CACHE_DIR not in sitemap
    report = world.report  # type: ignore[attr-defined]
    assert report.threads == 3 and report.written == len(
        [f for f in files if not f.startswith(CACHE_DIR)])
    # What was withheld is reported, for the admin queue.
    assert [(w["thread_id"], w["filename"]) for w in report.withheld] == [(world.a, "bundle.zip")]
    assert report.withheld[0]["reason"].startswith("a ZIP archive")


def test_nothing_private_anywhere(world: World) -> None:
    secrets = [s.lower().encode() for s in world.secrets]
    for path in all_files(world.out):
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        low = data.lower()
        for s in secrets:
            assert s not in low, f"{s!r} in {path}"


def test_thread_page(world: World) -> None:
    page = world.read(f"{world.thread_dir(world.a)}index.html")
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'.replace(
        "'", "&#39;") in page or f'content="{CSP}"' in page
    assert "<title>Gritting &lt;script&gt;alert(&#34;t&#34;)&lt;/script&gt; &amp; salt" in page
    assert "<script" not in page.replace('<script src="', "")  # no inline script at all
    assert '<a href="../../body/camden/"' in page and "Camden Borough Council" in page
    assert "the Freedom of Information Act 2000" in page and "awaiting a response" in page
    assert "How this date was worked out" in page and "Day 20:" in page
    # Outgoing letters carry the citizen's name, never her address; our address is labelled.
    assert "Request from Jane Citizen" in page and "Follow-up from Jane Citizen" in page
    assert f"[FOI #{world.a} email]" in page and "[requester email]" in page
    assert page.count("Could you also say how much salt") == 1   # followup_in is not shown
    # The signed answer: who, verified for which domain, its quote and signature folded.
    assert "Response from John Smith (Camden Borough Council)" in page
    assert "DKIM signature verified: sent through camden.gov.example" in page
    assert "No DKIM signature" in page        # the unsigned HTML answer
    assert re.search(r"The list of roads is attached\.\s*\n\s*Kind regards,</div>", page)
    assert '<details class="quoted"><summary>Show quoted text and signature</summary>' in page
    # The automatic reply is folded away whole.
    assert re.search(r'<details class="collapsed"><summary>\s*<h3[^>]*>Automatic reply', page)
    # The HTML-only answer: sanitised, and no remote image.
    assert "We used <b>4,000 tonnes</b>." in page
    for bad in ("onclick", "alert(2)", "tracker.example", "javascript:", 'style="'):
        assert bad not in page, bad
    # Attachments: published with type, size and a link; the archive withheld with a reason.
    m = re.search(r'<a href="(attachments/([0-9a-f]{32})\.csv)" download="[^"]+">([^<]+)</a> '
                  r'<span class="meta">\(text/csv[^,]*, (\d+) bytes\)</span>', page)
    assert m, page
    assert "[requester email]" in m.group(3)
    data = (world.out / world.thread_dir(world.a) / m.group(1)).read_text()
    assert "High St" in data and "[requester email]" in data
    assert re.search(r"bundle\.zip <span class=\"meta\">\(application/zip, 44 bytes\)</span>"
                     r" — withheld: a ZIP archive cannot be checked", page)
    # Absolute dates.
    assert re.search(r'<time datetime="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ">\w+day,? \d{1,2} \w+ '
                     r'\d{4}, \d\d:\d\d UTC</time>', page)


def test_placeholders(world: World) -> None:
    b = world.read(f"{world.thread_dir(world.b)}index.html")
    assert re.search(r"This message has been hidden by the site(&#39;|')s moderators.", b)
    assert "0777" not in b and "Any news" not in b
    c = world.read(f"{world.thread_dir(world.c)}index.html")
    assert "not to be archived" in c and "Secret numbers" not in c
    assert "Secret numbers" not in world.read("feed.atom")


def test_json_twin(world: World) -> None:
    d = json.loads(world.read(f"{world.thread_dir(world.a)}index.json"))
    assert d["id"] == world.a and d["title"] == 'Gritting <script>alert("t")</script> & salt'
    assert d["authority"] == {"slug": "camden", "name": "Camden Borough Council",
                              "url": f"https://{DOMAIN}/body/camden/"}
    assert d["state"] == "waiting_response" and d["status_words"] == "awaiting a response"
    assert d["requester"] == "Jane Citizen" and d["due"] and d["due_working"]
    kinds = [(m["kind"], m["direction"]) for m in d["messages"]]
    assert kinds == [("request", "out"), ("response", "in"), ("followup", "out"),
                     ("auto_reply", "in"), ("response", "in")]
    signed = d["messages"][1]
    assert signed["dkim"] == {"verified": True, "domain": "camden.gov.example"}
    [csv, zipped] = signed["attachments"]
    assert csv["url"].startswith(f"https://{DOMAIN}/{world.thread_dir(world.a)}attachments/")
    assert csv["content_type"].startswith("text/csv") and csv["size"] > 0
    assert zipped["withheld"].startswith("a ZIP archive") and "url" not in zipped
    assert d["messages"][4]["html"] and "<b>4,000 tonnes</b>" in d["messages"][4]["html"]
    hidden = json.loads(world.read(f"{world.thread_dir(world.b)}index.json"))["messages"][1]
    assert hidden["hidden"] is True and "text" not in hidden
    # The bulk download holds the same, one thread a line.
    [part] = json.loads(world.read("data/index.json"))["requests"]["parts"]
    assert part["url"] == f"https://{DOMAIN}/data/threads-0.jsonl.gz" and part["requests"] == 3
    lines = gzip.decompress((world.out / "data/threads-0.jsonl.gz").read_bytes()).splitlines()
    assert [json.loads(x)["id"] for x in lines] == sorted([world.a, world.b, world.c])
    assert json.loads(lines[0]) == d if world.a < world.b else True


def test_authority_page_and_record(world: World) -> None:
    page = world.read("body/camden/index.html")
    assert "foi@camden.gov.example" in page        # an authority's contact is public
    assert '<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img"' in page
    assert "<title id=\"record-title\">" in page
    assert ("Of 2 requests, 2 answered on time, 0 late, 0 very late, and 0 not answered yet."
            in page)
    assert "The median time to a first response was 0 days." in page
    d = json.loads(world.read("body/camden/index.json"))
    assert d["record"]["on_time"] == 2 and d["record"]["median_days_to_answer"] == 0
    assert {r["id"] for r in d["requests"]} == {world.a, world.c}
    home = world.read("body/home-office/index.html")
    assert "Of 1 request, 0 answered on time, 0 late, 0 very late, and 1 not answered yet." in home
    listing = world.read("body/index.html")
    assert "City of Edinburgh Council" in listing and "Home Office" in listing


def test_lists_index_and_feeds(world: World) -> None:
    waiting = world.read("list/waiting-response/index.html")
    assert "Visa processing times" in waiting and "Parking fines" in waiting
    assert "No requests here yet." in world.read("list/refused/index.html")
    index = world.read("index.html")
    assert "Recent activity" in index and "Gritting &lt;script&gt;" in index
    assert re.search(r"<strong>3</strong> requests", index)
    feed = world.read(f"{world.thread_dir(world.a)}feed.atom")
    assert feed.startswith("<?xml version='1.0' encoding='utf-8'?>\n<feed xmlns=\"http://www.w3.org/2005/Atom\">")
    assert "Gritting &lt;script&gt;alert(\"t\")&lt;/script&gt; &amp; salt" in feed
    assert feed.count("<entry>") == 5
    assert world.read("robots.txt").endswith(f"Sitemap: https://{DOMAIN}/sitemap.xml\n")


# -- incremental and full builds ------------------------------------------------------------------
def test_second_build_writes_nothing_and_dns_is_asked_once(fresh: World) -> None:
    asked: list[bytes] = []

    def dns(name: bytes) -> bytes | None:
        asked.append(name)
        return fresh.dns(name)

    first = fresh.build(dns_txt=dns)
    assert first.written > 30 and first.removed == 0 and len(asked) == 1
    again = fresh.build(dns_txt=dns)
    assert (again.written, again.removed, again.unchanged) == (0, 0, first.written)
    assert len(asked) == 1       # the DKIM result came from the cache
    assert json.loads((fresh.out / CACHE_DIR / "dkim.json").read_text())


def test_a_dns_failure_is_not_remembered(fresh: World) -> None:
    def broken(name: bytes) -> bytes | None:
        raise OSError("no route to the resolver")

    fresh.build(dns_txt=broken)
    a = fresh.thread_dir(fresh.a)
    assert "DKIM signature verified" not in fresh.read(f"{a}index.html")
    r = fresh.build()             # DNS is back: the answer is checked again, and now verifies
    assert f"{a}index.html" in r.written_paths
    assert "DKIM signature verified: sent through camden.gov.example" in fresh.read(f"{a}index.html")


def test_one_new_message_rewrites_only_the_pages_that_show_it(
        fresh: World, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh.build()
    req_b, _ = addresses_of(fresh.mf, fresh.b)
    ingest(fresh.mf, mail(f"Visa FOI <{HOME}>", req_b, "RE: Visa", "Six weeks on average."),
           req_b, HOME)
    made: list[int] = []
    real = build_mod.C.thread_view

    def counting(inp, **kw):  # type: ignore[no-untyped-def]
        made.append(inp.thread.id)
        return real(inp, **kw)

    monkeypatch.setattr(build_mod.C, "thread_view", counting)
    r = fresh.build()
    assert made == [fresh.b]     # the other threads' views came from the cache
    b = fresh.thread_dir(fresh.b)
    # (the sitemap's dates are days: it changes only when the day of last activity does)
    assert set(r.written_paths) - {"sitemap/site.xml", "sitemap/threads-0.xml"} == {
        f"{b}index.html", f"{b}index.json", f"{b}feed.atom",
        "body/home-office/index.html", "body/home-office/index.json",
        "body/home-office/feed.atom", "body/index.html",      # its record changed
        "index.html", "feed.atom", "data/threads-0.jsonl.gz"}
    assert r.removed == 0
    assert "Six weeks on average." in fresh.read(f"{b}index.html")


def test_files_no_longer_produced_are_removed(fresh: World) -> None:
    fresh.build()
    a = fresh.thread_dir(fresh.a)
    attachments = [p for p in all_files(fresh.out / a / "attachments")]
    assert len(attachments) == 1
    with fresh.mf.store.tx() as tx:   # a moderator hides the answers (one has the attachment)
        tx.c.execute(update(messages_table).where(
            messages_table.c.thread_id == fresh.a, messages_table.c.direction == "in")
            .values(hidden=True))
    r = fresh.build()
    assert r.removed_paths == [str(attachments[0].relative_to(fresh.out))]
    assert not (fresh.out / a / "attachments").exists()


def test_full_rebuild_is_built_aside_and_swapped_in(fresh: World) -> None:
    fresh.build()
    stray = fresh.out / "request" / "999-gone" / "index.html"   # not ours any more
    stray.parent.mkdir(parents=True)
    stray.write_text("old")
    inode = fresh.out.stat().st_ino
    before = {p.relative_to(fresh.out): p.read_bytes() for p in all_files(fresh.out)
              if CACHE_DIR not in str(p) and p != stray}
    r = fresh.build(full=True)
    assert r.written == len(before) and r.removed == 0 and r.unchanged == 0
    after = {p.relative_to(fresh.out): p.read_bytes() for p in all_files(fresh.out)
             if CACHE_DIR not in str(p)}
    assert after == before                   # same content, and the stray file is gone
    assert fresh.out.stat().st_ino != inode  # a new folder took the old one's place
    writer_mod.wait_for_removals()            # the old one is deleted in the background
    assert [p.name for p in fresh.out.parent.iterdir() if p.name.startswith(".out")] == [".out.lock"]
    assert fresh.build().written == 0        # the manifest came along with it


def test_a_failed_build_changes_nothing(fresh: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redaction switched off: the writer's last check refuses, and the site stays as it was."""
    fresh.build()
    db = sqlite3.connect(fresh.out / CACHE_DIR / "cache.sqlite")
    with db:
        db.execute("DELETE FROM threads")   # else the views of the last build serve
    db.close()
    before = {p: p.read_bytes() for p in all_files(fresh.out)}

    class NoRedaction(Redactor):
        def __init__(self, rules, *, thread_id, authority, private):  # type: ignore[no-untyped-def]
            super().__init__([], thread_id=thread_id, authority=authority, private=[])

    monkeypatch.setattr(build_mod, "Redactor", NoRedaction)
    with pytest.raises(LeakError, match=r"refusing to publish request/\d+-.*: it contains "
                                        r"\[requester email\]"):
        fresh.build()
    assert {p: p.read_bytes() for p in all_files(fresh.out)} == before
    with pytest.raises(LeakError):
        fresh.build(full=True)
    assert {p: p.read_bytes() for p in all_files(fresh.out)} == before
    assert not [p for p in fresh.out.parent.iterdir() if ".new-" in p.name]


def test_leak_guard_finds_any_value_in_any_form(tmp_path: Path) -> None:
    guard = LeakGuard([(JANE, "[requester email]"), ("abcdefghjkmn", "[token]"),
                       ("abcdefgh", "[other]"), ("x", "[too short to scan]")])
    assert guard.find(b"mail JANE.Citizen@Citizen.example now") == "[requester email]"
    assert guard.find(b"request-1-abcdefghjkmn@x") == "[token]"
    assert guard.find(b"abcdefgh!") == "[other]"
    assert guard.find(b"nothing here, x marks") is None
    with pytest.raises(LeakError):
        guard.check("a.html", b"jane.citizen&#64;citizen.example")
    w = Writer(tmp_path, guard)
    w.write("ok.html", "fine")
    with pytest.raises(ValueError, match="already written"):
        w.write("ok.html", "twice")
    for bad in ("../x", "/etc/x", ".mailflow-cache/x", "pagefind/x.js", "a/../b", "a/.hidden"):
        with pytest.raises(ValueError):
            w.write(bad, "x")
    w.commit()
    assert (tmp_path / "ok.html").read_text() == "fine"


def test_cli_build(fresh: World) -> None:
    cfg = fresh.mf.settings.path
    from click.testing import CliRunner

    from mailflow.cli import cli
    from mailflow.cli_archive import archive
    if "archive" not in cli.commands:
        cli.add_command(archive)
    r = CliRunner().invoke(cli, ["--config", str(cfg), "archive", "build", "--no-search",
                                 "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    default = cfg.parent / "var" / "archive"
    assert d["out"] == str(default.resolve()) and d["threads"] == 3 and d["written"] > 30
    assert (default / "index.html").exists()


@pytest.mark.skipif(not build_mod.pagefind_available(), reason="pagefind is not installed")
def test_search_index_is_built_and_only_when_pages_change(fresh: World) -> None:
    r = fresh.build(search=True)
    assert r.search == "indexed", r.warnings
    assert (fresh.out / "pagefind" / "pagefind-ui.js").exists()
    assert not (fresh.out / CACHE_DIR / "pagefind-new").exists()
    assert fresh.build(search=True).search == "unchanged"
    req_b, _ = addresses_of(fresh.mf, fresh.b)   # a page changes while search is off ...
    ingest(fresh.mf, mail(f"Visa FOI <{HOME}>", req_b, "RE: Visa", "Six weeks."), req_b, HOME)
    assert fresh.build(search=False).search == "not run"
    assert fresh.build(search=True).search == "indexed"   # ... so the next build re-indexes
    secrets = [s.lower().encode() for s in fresh.secrets]
    for p in all_files(fresh.out / "pagefind"):
        data = p.read_bytes()
        try:
            data = gzip.decompress(data)
        except OSError:
            pass
        assert not any(s in data.lower() for s in secrets), p
