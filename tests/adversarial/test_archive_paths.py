"""Attachment names from an attacker never become paths, and never become markup.

An authority's reply carries attachments named with the classic path-traversal and XSS corpus
(`../../x`, `/etc/passwd`, `C:\\x`, NUL bytes, RFC 2231-encoded dots, very long names, a
right-to-left override, `.htaccess`, `index.html`, script tags). The message goes through the
real pipeline and the real archive build; the whole file tree around the site is listed before
and after, and nothing may appear outside the site's `var/` (the store: database, spool and
outbox, where messages are kept by content hash and id, never by a sender's name) and the
archive folder. Inside the archive, attachment files sit at
`attachments/<content hash>.<ext>` and the pages show each name escaped.

Archive files are also durable: each is fsynced before its rename and each folder a rename
changed is fsynced after (Writer.commit).
"""
from __future__ import annotations

import base64
import os
import re
import secrets
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DOMAIN, JANE, Site, compose
from mailflow.archive import writer as writer_mod
from mailflow.archive.build import build
from mailflow.archive.writer import LeakGuard, Writer, safe_rel
from mailflow.mail.parse import parse
from mailflow.pipeline import Pipeline
from mailflow.site import Site as MfSite
from mailflow.spool import Envelope

CAMDEN = "foi@camden.gov.example"
TOKEN = secrets.token_hex(6)   # in every hostile name, so an escape is easy to find anywhere

# (how the parameter is written in the part header, a short label for failures)
HOSTILE_NAMES: list[tuple[bytes, str]] = [
    (f'filename="../../{TOKEN}-dotdot.txt"'.encode(), "dot-dot"),
    (f'filename="../../../../../../../../tmp/{TOKEN}-deep.txt"'.encode(), "deep dot-dot"),
    (f'filename="/tmp/{TOKEN}-absolute.txt"'.encode(), "absolute"),
    (f'filename="/etc/passwd"'.encode(), "etc-passwd"),
    (f'filename="C:\\\\Windows\\\\{TOKEN}-win.txt"'.encode(), "windows path"),
    (f'filename="..\\\\..\\\\{TOKEN}-backslash.txt"'.encode(), "backslash dot-dot"),
    (b'filename="nul\x00byte-' + TOKEN.encode() + b'.txt\x00.html"', "NUL bytes"),
    (f"filename*=utf-8''%2e%2e%2f%2e%2e%2f{TOKEN}-rfc2231.txt".encode(), "RFC 2231 dots"),
    (f"filename*0*=utf-8''%2e%2e%2f; filename*1=\"{TOKEN}-continued.txt\"".encode(),
     "RFC 2231 continuation"),
    (f"filename*=utf-8''{TOKEN}%00-nul.txt".encode(), "RFC 2231 NUL"),
    (f'filename="%2e%2e%2f{TOKEN}-percent.txt"'.encode(), "literal percent dots"),
    (f'filename="=?utf-8?q?=2E=2E=2F=2E=2E=2F{TOKEN}-ew.txt?="'.encode(), "encoded-word dots"),
    (f"filename*=utf-8''{quote(chr(0xFF0E) * 2 + chr(0xFF0F) + TOKEN + '-fullwidth.txt')}".encode(),
     "fullwidth dots"),
    (f"filename*=utf-8''..{quote(chr(0x2215))}{TOKEN}-divslash.txt".encode(), "division slash"),
    (f'filename="{"A" * 5000}-{TOKEN}.txt"'.encode(), "very long"),
    (f"filename*=utf-8''invoice-{TOKEN}{quote(chr(0x202E))}txt.exe".encode(), "RTL override"),
    (b'filename=".htaccess"', ".htaccess"),
    (b'filename="index.html"', "index.html"),
    (f'filename="<script>alert(\'{TOKEN}\')</script>.txt"'.encode(), "script tag"),
    (f'filename="\\"><img src=x onerror=alert(1)>{TOKEN}.txt"'.encode(), "attribute breakout"),
    (f'filename="javascript:alert(1)//{TOKEN}.txt"'.encode(), "javascript URL"),
    (f'filename="~/.ssh/{TOKEN}-authorized_keys"'.encode(), "home dir"),
    (b'filename=".."', "dot-dot only"),
    (b'filename="."', "dot only"),
    (f'filename="con.txt"'.encode(), "windows device"),
]
XSS = ["<script>alert(", "<img src=x", "onerror=alert", "javascript:alert"]


def hostile_reply(to: str) -> bytes:
    """An authority's reply with one small text attachment per hostile name."""
    parts = [b"From: FOI Officer <" + CAMDEN.encode() + b">\r\nTo: " + to.encode()
             + b"\r\nSubject: RE: Gritting\r\nMessage-ID: <hostile-names@camden.gov.example>\r\n"
             b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n"
             b"--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe files are attached.\r\n"]
    for n, (param, _) in enumerate(HOSTILE_NAMES):
        body = f"attachment {n}: harmless text {TOKEN}\n".encode()
        ctype = b"text/html" if b"index.html" in param else b"text/plain"
        if ctype == b"text/html":
            body = b"<p>hi</p><script>alert(1)</script><img src=x onerror=alert(2)>"
        parts.append(b"--XX\r\nContent-Type: " + ctype + b"; charset=utf-8\r\n"
                     b"Content-Disposition: attachment; " + param + b"\r\n"
                     b"Content-Transfer-Encoding: base64\r\n\r\n"
                     + base64.encodebytes(body).replace(b"\n", b"\r\n"))
    parts.append(b"--XX--\r\n")
    return b"".join(parts)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            p = Path(dirpath) / name
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def test_parsed_names_are_labels_not_paths() -> None:
    m = parse(hostile_reply(f"request-1-x@{DOMAIN}"))
    names = [a.filename for a in m.attachments]
    assert len(names) == len(HOSTILE_NAMES)
    for name, (_, label) in zip(names, HOSTILE_NAMES):
        assert "/" not in name and "\\" not in name, label
        assert "\x00" not in name and "\u202e" not in name, label
        assert not name.startswith("."), label
        assert len(name) <= 255, label


def test_hostile_attachment_names_write_nothing_outside_the_store_and_archive(
        site: Site, tmp_path: Path) -> None:
    mf = MfSite.open(site.config)
    pipe = Pipeline(mf)
    # a request, confirmed and sent
    pipe.process(compose(f"Jane Citizen <{JANE}>", f"camden@{DOMAIN}", "Gritting", "Roads?"),
                 Envelope(mail_from=JANE, rcpt_tos=[f"camden@{DOMAIN}"], via="test"))
    with mf.store.read() as tx:
        t = tx.threads()[-1]
    confirm = f"confirm-{t.confirm_token}@{DOMAIN}"
    pipe.process(compose(f"Jane Citizen <{JANE}>", confirm, "Re", "Yes"),
                 Envelope(mail_from=JANE, rcpt_tos=[confirm], via="test"))
    request_addr = f"request-{t.id}-{t.request_token}@{DOMAIN}"

    root = tmp_path                  # the site, its var/ and the archive all live in here
    out = site.dir / "var" / "archive"
    before = snapshot(root)
    before_parent = set(os.listdir(root.parent))
    before_tmp = set(os.listdir("/tmp"))

    result = pipe.process(hostile_reply(request_addr),
                          Envelope(mail_from=CAMDEN, rcpt_tos=[request_addr], via="test"))
    assert any(o.outcome.startswith("stored") or o.thread_id == t.id for o in result.outcomes), \
        result.outcomes
    build(mf, out, search=False)
    mf.close()

    after = snapshot(root)
    allowed = (str((site.dir / "var").relative_to(root)) + os.sep,)
    changed = [p for p, v in after.items() if before.get(p) != v]
    outside = [p for p in changed if not (p + os.sep).startswith(allowed)]
    # the config and rules are read, not written; the build lock sits beside the archive
    assert outside == [], outside
    assert set(os.listdir(root.parent)) == before_parent
    assert not [n for n in set(os.listdir("/tmp")) - before_tmp if TOKEN in n]
    # where the corpus aims: no file named with our token outside the test's own folder
    for target in (Path("/tmp"), Path("/etc"), Path.home(), site.dir.parent.parent):
        assert not [n for n in os.listdir(target) if TOKEN in n], target

    # inside the archive: attachments only at attachments/<content hash>.<ext>
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
             and ".mailflow-cache" not in p.parts]
    attachments = [f for f in files if "/attachments/" in f or f.startswith("attachments/")]
    assert attachments, files
    for f in attachments:
        name = f.rsplit("/attachments/", 1)[-1] if "/attachments/" in f else f[len("attachments/"):]
        assert re.fullmatch(r"[0-9a-f]{32}(\.[a-z0-9]{1,8})?", name), f
        safe_rel(f)
    for f in files:
        assert not any(part.startswith(".") for part in Path(f).parts), f
        assert TOKEN not in f or "/attachments/" in f or f.startswith("attachments/"), f
    assert not any(Path(f).name in (".htaccess", "index.html") and "attachments" in f
                   for f in files)

    # the pages show every name escaped: no markup from a name, anywhere
    pages = [out / f for f in files if f.endswith(".html") and "attachments" not in f]
    thread_pages = [p for p in pages if TOKEN in p.read_text(encoding="utf-8")]
    assert thread_pages, "the thread page should list the attachments"
    for p in pages:
        html = p.read_text(encoding="utf-8")
        for needle in XSS:
            assert needle not in html, (p, needle)
    # the published index.html attachment is sanitised HTML under a strict CSP
    published = [out / f for f in attachments if f.endswith(".html")]
    for p in published:
        body = p.read_text(encoding="utf-8")
        assert "default-src 'none'" in body and "<script" not in body and "onerror" not in body


def test_safe_rel_refuses_what_no_archive_path_may_contain() -> None:
    for bad in ["../x", "/etc/passwd", "a/../../x", "a\\..\\x", "a/\x00b", "a/.htaccess",
                ".mailflow-cache/x", "C:/x", "a/b:c", "a/" + "x" * 300, "a/\nb", ""]:
        with pytest.raises(ValueError):
            safe_rel(bad)
    assert safe_rel("request/1-x/attachments/2/3-file.txt") == "request/1-x/attachments/2/3-file.txt"


@settings(max_examples=2000, deadline=None)
@given(rel=st.one_of(
    st.text(alphabet="aZ0_-./", max_size=12),
    st.lists(st.sampled_from(["pagefind", ".mailflow-cache", "request", "..", ".", "", "a.b",
                              ".x", "-", "_", "x" * 255, "x" * 256, "é", "a:b"]),
             max_size=4).map("/".join)))
def test_safe_rel_fast_path_answers_as_the_full_check(rel: str) -> None:
    """`safe_rel` accepts plain ASCII paths without pathlib: exactly as `_safe_rel` would."""
    try:
        expected: str | None = writer_mod._safe_rel(rel)
    except ValueError:
        expected = None
    try:
        got: str | None = safe_rel(rel)
    except ValueError:
        got = None
    assert got == expected


def test_archive_files_are_fsynced_before_rename_and_their_folders_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(writer_mod.os, "fsync", spy)
    root = tmp_path / "out"
    w = Writer(root, LeakGuard([]))
    w.write("a/b/page.html", "<p>hello</p>")
    w.write("top.json", "{}")
    staged = [str(tmp) for tmp, _ in w._staged]
    w.commit()
    assert set(staged) <= set(synced)                  # each file before its rename
    for folder in (root / "a" / "b", root / "a", root):  # each folder a rename changed
        assert str(folder) in synced, folder
    manifest = root / writer_mod.CACHE_DIR / writer_mod.MANIFEST
    assert str(manifest.with_name(manifest.name + ".tmp")) in synced or str(manifest) in synced
    # a file's fsync comes before the fsync of the folder it was renamed into
    assert synced.index(staged[0]) < synced.index(str(root / "a" / "b"))
    # and a removal is made durable too
    synced.clear()
    w2 = Writer(root, LeakGuard([]))
    w2.write("top.json", "{}")
    w2.commit()
    assert not (root / "a").exists() and str(root) in synced
