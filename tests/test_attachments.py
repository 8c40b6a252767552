"""Attachments: published only when nothing private can be in them, withheld with a reason else."""
from __future__ import annotations

import gzip
import io
import tarfile
import zipfile

import pytest
from PIL import ExifTags, Image, PngImagePlugin
from pypdf import PdfReader, PdfWriter

from mailflow.archive.attachments import (CANNOT_CHECK, PublicAttachment, Withheld,
                                          publish_attachment)
from mailflow.core.message import Attachment
from mailflow.core.redaction import RedactionRule, Redactor, private_values
from tests.test_redaction import DOMAIN, EMAIL, SECRETS, THREAD

NAME = "Jane Citizen"
PHONE = "07700 900123"
PRIVATE = SECRETS + [NAME, PHONE, "jane.citizen"]
CLEAN_TEXT = ["Dear requester,", "Please find below the information you asked for about",
              "the council's spending on road repairs in 2024."]


def _redactor() -> Redactor:
    rules = [RedactionRule("site", r"07700\s?900\s?123", True, "[phone removed]"),
             RedactionRule("thread:12", NAME, False, "[name removed]")]
    return Redactor(rules, thread_id=12, authority="camden", private=private_values(THREAD, DOMAIN))


def publish(name: str, ctype: str, data: bytes) -> PublicAttachment | Withheld:
    return publish_attachment(Attachment(name, ctype, data), _redactor())


def assert_nothing_private(result: PublicAttachment | Withheld) -> None:
    """Whatever the result, neither its name, its reason nor its content names a secret."""
    texts = [result.filename]
    if isinstance(result, Withheld):
        texts.append(result.reason)
    else:
        texts.append(result.data.decode("latin-1"))
    for text in texts:
        for secret in PRIVATE:
            assert secret.lower() not in text.lower(), (secret, text[:300])


# ------------------------------------------------------------------------------ test files

def make_pdf(lines: list[str], extra: tuple[str, ...] = ()) -> bytes:
    """A minimal valid one-page PDF showing `lines` in Helvetica (offsets computed); `extra`
    objects are stored too, referenced by nothing (as a bookmark or XMP packet would be to
    text extraction)."""
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    content = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({esc(x)}) '" for x in lines) + " ET"
    objects = ["<< /Type /Catalog /Pages 2 0 R >>",
               "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
               "/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
               f"<< /Length {len(content)} >>\nstream\n{content}\nendstream", *extra]
    out = b"%PDF-1.4\n"
    offsets = []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{obj}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += (f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n"
            "%%EOF\n").encode()
    return out


def rewrite_pdf(data: bytes, *, metadata: dict[str, str] | None = None,
                password: str | None = None) -> bytes:
    """The PDF with compressed content streams (the text is no longer in the raw bytes)."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    for page in writer.pages:
        page.compress_content_streams()
    if metadata:
        writer.add_metadata(metadata)
    if password is not None:
        writer.encrypt(password, "owner", algorithm="AES-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def image_bytes(fmt: str, *, size: tuple[int, int] = (40, 20), gps: bool = False,
                orientation: int | None = None, **save: object) -> bytes:
    img = Image.new("RGB", size, "steelblue")
    exif = img.getexif()
    if gps:
        exif[ExifTags.Base.Make] = "PhoneMaker"
        gps_ifd = exif.get_ifd(ExifTags.IFD.GPSInfo)
        gps_ifd[ExifTags.GPS.GPSLatitudeRef] = "N"
        gps_ifd[ExifTags.GPS.GPSLatitude] = (51.0, 30.0, 26.0)
        gps_ifd[ExifTags.GPS.GPSLongitudeRef] = "W"
        gps_ifd[ExifTags.GPS.GPSLongitude] = (0.0, 7.0, 39.0)
    if orientation:
        exif[ExifTags.Base.Orientation] = orientation
    out = io.BytesIO()
    if gps or orientation:
        save["exif"] = exif
    img.save(out, fmt, **save)
    return out.getvalue()


def office_zip(parts: dict[str, str | bytes], *, ooxml: bool = True) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        if ooxml:
            zf.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        else:
            zf.writestr("mimetype", "application/vnd.oasis.opendocument.text")
        for name, content in parts.items():
            zf.writestr(name, content)
    return out.getvalue()


def docx(body: str, *, creator: str = "FOI Team", link: str = "https://gov.example") -> bytes:
    return office_zip({
        "word/document.xml": f'<w:document><w:body><w:p>{body}</w:p></w:body></w:document>',
        "docProps/core.xml": f"<cp:coreProperties><dc:creator>{creator}</dc:creator>"
                             "</cp:coreProperties>",
        "word/_rels/document.xml.rels": f'<Relationships><Relationship Target="{link}" '
                                        'TargetMode="External"/></Relationships>'})


def run(text: str) -> str:
    return f"<w:r><w:t>{text}</w:t></w:r>"


# ------------------------------------------------------------------------------------- text

def test_text_is_redacted_and_published() -> None:
    body = f"From {EMAIL.upper()}, call {PHONE}. Reply to request-12-abcdefghjkmn@ask.example"
    result = publish(f"notes for {NAME}.txt", "text/plain; charset=utf-8", body.encode())
    assert isinstance(result, PublicAttachment)
    assert result.filename == "notes for [name removed].txt"
    assert result.content_type == "text/plain; charset=utf-8"
    assert result.data.decode() == ("From [requester email], call [phone removed]. "
                                    "Reply to [FOI #12 email]")
    assert result.size == len(result.data)


def test_csv_keeps_its_type_and_legacy_encodings_are_read() -> None:
    result = publish("spend.csv", "text/csv", f"name,cost\n{NAME},£12\n".encode("cp1252"))
    assert isinstance(result, PublicAttachment)
    assert result.content_type == "text/csv; charset=utf-8"
    assert result.data.decode() == "name,cost\n[name removed],£12\n"


def test_html_is_sanitised_redacted_and_locked_down() -> None:
    html = (f'<html><head><style>p{{background:url(http://t.example/x)}}</style></head><body>'
            f'<p onclick="steal()">Dear {NAME}, <a href="mailto:{EMAIL}">reply</a></p>'
            f'<img src="http://tracker.example/p.gif"><script>alert(1)</script></body></html>')
    result = publish("letter", "text/html", html.encode())
    assert isinstance(result, PublicAttachment)
    assert result.filename == "letter.html" and result.content_type == "text/html; charset=utf-8"
    page = result.data.decode()
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    for bad in ("<script", "onclick", "<img", "url(", "tracker.example"):
        assert bad not in page
    assert "Dear [name removed]" in page
    assert_nothing_private(result)


@pytest.mark.parametrize("name, ctype, published", [
    ("evil.svg", "text/plain", "evil.svg.txt"),
    ("page.xml", "text/xml", "page.xml.txt"),
    ("run.js", "text/javascript", "run.js.txt"),
    ("readme", "text/plain", "readme.txt"),
    ("data.json", "application/json", "data.json"),
    ("notes.txt", "application/octet-stream", "notes.txt"),
    ("spend.csv", "application/vnd.ms-excel", "spend.csv"),
])
def test_published_text_always_has_a_harmless_extension(name: str, ctype: str, published: str) -> None:
    # A static web server picks the Content-Type from the extension, not from us.
    result = publish(name, ctype, b"<svg onload=alert(1)>")
    assert isinstance(result, PublicAttachment) and result.filename == published


def test_binary_declared_as_text_is_withheld() -> None:
    result = publish("x.txt", "text/plain", b"MZ\x90\x00\x03\x00\x00\x00")
    assert isinstance(result, Withheld) and CANNOT_CHECK in result.reason


# -------------------------------------------------------------------------------------- PDF

def test_a_clean_pdf_is_published_unchanged() -> None:
    data = rewrite_pdf(make_pdf(CLEAN_TEXT))
    result = publish("response.pdf", "application/pdf", data)
    assert result == PublicAttachment("response.pdf", "application/pdf", data, len(data))


def test_a_pdf_sent_as_octet_stream_is_still_a_pdf() -> None:
    result = publish("response", "application/octet-stream", make_pdf(CLEAN_TEXT))
    assert isinstance(result, PublicAttachment)
    assert result.filename == "response.pdf" and result.content_type == "application/pdf"


@pytest.mark.parametrize("line, label", [
    (f"Request from {EMAIL}", "[requester email]"),
    (f"Request from {EMAIL.upper()}", "[requester email]"),
    (f"Name: {NAME}", "[name removed]"),
    (f"Tel {PHONE}", "[phone removed]"),
    ("Reply to reply-12-pqrstvwxyz01@ask.example", "[FOI #12 email]"),
    ("Reference abcdefghjkmn", "[token]"),
])
def test_a_pdf_naming_anything_private_is_withheld(line: str, label: str) -> None:
    for data in (make_pdf(CLEAN_TEXT + [line]), rewrite_pdf(make_pdf(CLEAN_TEXT + [line]))):
        result = publish("response.pdf", "application/pdf", data)
        assert isinstance(result, Withheld)
        assert label in result.reason and "cannot be redacted safely" in result.reason
        assert_nothing_private(result)


def test_an_address_broken_across_lines_of_a_pdf_is_still_found() -> None:
    data = rewrite_pdf(make_pdf(CLEAN_TEXT + ["Email: jane.citizen@", "citizen.example"]))
    assert isinstance(publish("r.pdf", "application/pdf", data), Withheld)


def test_private_pdf_metadata_withholds_it() -> None:
    data = rewrite_pdf(make_pdf(CLEAN_TEXT), metadata={"/Author": NAME, "/Title": "FOI"})
    result = publish("r.pdf", "application/pdf", data)
    assert isinstance(result, Withheld) and "[name removed]" in result.reason


@pytest.mark.parametrize("extra", [
    f"<< /Title (Request from {NAME}) >>",
    "<< /Type /Metadata /Subtype /XML /Length 90 >>\nstream\n<x:xmpmeta><dc:creator>"
    f"{EMAIL}</dc:creator></x:xmpmeta>\nendstream",
])
def test_strings_that_text_extraction_misses_are_checked_too(extra: str) -> None:
    result = publish("r.pdf", "application/pdf", make_pdf(CLEAN_TEXT, (extra,)))
    assert isinstance(result, Withheld) and "cannot be redacted safely" in result.reason


def test_a_broad_rule_does_not_match_the_pdf_syntax_itself() -> None:
    # xref offsets, object numbers and lengths are digits too; only strings and text count.
    digits = Redactor([RedactionRule("site", r"\d{6,}", True, "[number]")], thread_id=12,
                      authority=None, private=[])
    data = rewrite_pdf(make_pdf(CLEAN_TEXT))
    assert isinstance(publish_attachment(Attachment("r.pdf", "application/pdf", data), digits),
                      PublicAttachment)
    office = office_zip({"word/document.xml": '<w:p w:rsidR="00123456" w:rsidP="0099AABB">'
                         + run("Roads") + "</w:p>"})
    assert isinstance(publish_attachment(Attachment("a.docx", "", office), digits),
                      PublicAttachment)


def test_an_encrypted_pdf_is_withheld() -> None:
    for password in ("", "secret"):
        result = publish("r.pdf", "application/pdf", rewrite_pdf(make_pdf(CLEAN_TEXT),
                                                                 password=password))
        assert result == Withheld("r.pdf", f"encrypted PDF: {CANNOT_CHECK}")


def test_an_image_only_pdf_is_withheld() -> None:
    out = io.BytesIO()
    Image.new("RGB", (200, 300), "white").save(out, "PDF")
    result = publish("scan.pdf", "application/pdf", out.getvalue())
    assert isinstance(result, Withheld) and "(a scan?)" in result.reason
    assert CANNOT_CHECK in result.reason


def test_a_pdf_without_any_text_is_withheld() -> None:
    result = publish("blank.pdf", "application/pdf", make_pdf([]))
    assert isinstance(result, Withheld) and "no extractable text" in result.reason


@pytest.mark.parametrize("data", [b"%PDF-1.4\ngarbage", make_pdf(CLEAN_TEXT)[:200], b"not a pdf"])
def test_a_broken_pdf_is_withheld(data: bytes) -> None:
    result = publish("r.pdf", "application/pdf", data)
    assert isinstance(result, Withheld) and CANNOT_CHECK in result.reason


# ----------------------------------------------------------------------------------- images

def test_gps_exif_is_removed_from_a_jpeg() -> None:
    data = image_bytes("JPEG", gps=True, comment=b"taken at 12 Home Street")
    with Image.open(io.BytesIO(data)) as before:
        assert before.getexif().get_ifd(ExifTags.IFD.GPSInfo)   # the test file really has GPS
    result = publish("photo.jpg", "image/jpeg", data)
    assert isinstance(result, PublicAttachment) and result.content_type == "image/jpeg"
    assert b"Exif" not in result.data and b"PhoneMaker" not in result.data
    assert b"Home Street" not in result.data
    with Image.open(io.BytesIO(result.data)) as after:
        assert not after.getexif() and not after.getexif().get_ifd(ExifTags.IFD.GPSInfo)
        assert after.size == (40, 20) and after.format == "JPEG"


def test_the_exif_orientation_is_applied_before_it_is_dropped() -> None:
    result = publish("photo.jpg", "image/jpeg", image_bytes("JPEG", orientation=6, gps=True))
    assert isinstance(result, PublicAttachment) and b"Exif" not in result.data
    with Image.open(io.BytesIO(result.data)) as after:
        assert after.size == (20, 40)


def test_png_text_chunks_and_exif_are_removed() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", NAME)
    info.add_itxt("Comment", EMAIL)
    data = image_bytes("PNG", gps=True, pnginfo=info)
    result = publish("screen.png", "image/png", data)
    assert isinstance(result, PublicAttachment) and result.content_type == "image/png"
    assert_nothing_private(result)
    with Image.open(io.BytesIO(result.data)) as after:
        assert not after.getexif() and set(after.info) <= {"dpi", "gamma", "srgb"}


def test_webp_and_animated_gif_are_cleaned() -> None:
    webp = publish("a.webp", "image/webp", image_bytes("WEBP", gps=True))
    assert isinstance(webp, PublicAttachment) and b"EXIF" not in webp.data
    frames = [Image.new("RGB", (10, 10), colour) for colour in ("red", "green", "blue")]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0,
                   comment=EMAIL.encode())
    gif = publish("a.gif", "image/gif", out.getvalue())
    assert isinstance(gif, PublicAttachment)
    assert_nothing_private(gif)
    with Image.open(io.BytesIO(out.getvalue())) as before:
        assert before.n_frames == 3 and before.info["comment"] == EMAIL.encode()
    with Image.open(io.BytesIO(gif.data)) as after:
        assert after.n_frames == 3 and "comment" not in after.info


def test_an_image_gets_the_extension_of_what_it_is() -> None:
    result = publish("photo.html", "text/html", image_bytes("PNG"))
    assert isinstance(result, PublicAttachment)
    assert result.filename == "photo.html.png" and result.content_type == "image/png"


@pytest.mark.parametrize("name, ctype, data", [
    ("x.png", "image/png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),
    ("x.jpg", "image/jpeg", b"\xff\xd8\xff\xe0 truncated"),
    ("x.png", "image/png", b"this is not a picture"),
    ("x.svg", "image/svg+xml", b'<svg onload="alert(1)"/>'),
    ("x.tif", "image/tiff", b"II*\x00\x08\x00\x00\x00"),
])
def test_images_that_cannot_be_cleaned_are_withheld(name: str, ctype: str, data: bytes) -> None:
    result = publish(name, ctype, data)
    assert isinstance(result, Withheld) and CANNOT_CHECK in result.reason


# ------------------------------------------------------------------------ office documents

def test_a_clean_office_document_is_published_unchanged() -> None:
    data = docx(run("Spending on roads: ") + run("£1.2m"))
    result = publish("answer.docx", "application/octet-stream", data)
    assert result == PublicAttachment(
        "answer.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        data, len(data))


@pytest.mark.parametrize("data, label", [
    (docx(run("Dear ") + run("jane.citizen") + run("@citizen.") + run("example")), "[requester email]"),
    (docx(run("Dear Jane ") + run("Citizen")), "[name removed]"),
    (docx(run("x"), creator=NAME), "[name removed]"),
    (docx(f'<w:ins w:author="{NAME}">' + run("x") + "</w:ins>"), "[name removed]"),
    (docx(run("x"), link=f"mailto:{EMAIL}"), "[requester email]"),
    (docx(run("x"), link="mailto:jane.citizen&#64;citizen.example"), "[requester email]"),
    (office_zip({"content.xml": f"<office:text>{PHONE}</office:text>"}, ooxml=False), "[phone removed]"),
])
def test_an_office_document_naming_anything_private_is_withheld(data: bytes, label: str) -> None:
    result = publish("answer.docx", "application/vnd.openxmlformats-officedocument."
                     "wordprocessingml.document", data)
    assert isinstance(result, Withheld) and label in result.reason
    assert_nothing_private(result)


def test_an_odt_is_checked_like_a_docx() -> None:
    data = office_zip({"content.xml": "<office:text>Roads</office:text>", "meta.xml": "<m/>"},
                      ooxml=False)
    result = publish("answer.odt", "application/vnd.oasis.opendocument.text", data)
    assert isinstance(result, PublicAttachment)
    assert result.content_type == "application/vnd.oasis.opendocument.text"


def test_zip_bombs_are_refused() -> None:
    bomb = office_zip({"word/document.xml": "<w:t>" + "0" * 20_000_000 + "</w:t>"})
    result = publish("bomb.docx", "application/octet-stream", bomb)
    assert isinstance(result, Withheld) and "too large" in result.reason
    big = io.BytesIO()
    with zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("[Content_Types].xml", "<Types/>")
        zf.writestr("word/document.xml", b"<w:t>" + b"x" * (51 * 1024 * 1024) + b"</w:t>")
    result = publish("big.docx", "application/octet-stream", big.getvalue())
    assert isinstance(result, Withheld) and "too large" in result.reason


def test_embedded_objects_and_macros_are_withheld() -> None:
    for part in ("word/embeddings/oleObject1.bin", "word/vbaProject.bin"):
        data = office_zip({"word/document.xml": "<w:t>x</w:t>", part: b"\xd0\xcf\x11\xe0"})
        result = publish("a.docx", "application/octet-stream", data)
        assert isinstance(result, Withheld) and "embedded files or macros" in result.reason


def _plain_zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("notes.txt", EMAIL)
    return out.getvalue()


def test_a_zip_that_is_not_an_office_document_is_withheld() -> None:
    result = publish("a.docx", "application/octet-stream", _plain_zip())
    assert isinstance(result, Withheld) and "not a valid DOCX document" in result.reason


# ---------------------------------------------------------------- what can never be checked

def _tar() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        info = tarfile.TarInfo("notes.txt")
        info.size = len(EMAIL)
        tf.addfile(info, io.BytesIO(EMAIL.encode()))
    return out.getvalue()


@pytest.mark.parametrize("name, ctype, data", [
    ("files.zip", "application/zip", _plain_zip()),
    ("files.zip", "application/octet-stream", _plain_zip()),
    ("files.tar", "application/x-tar", _tar()),
    ("files.tar", "application/octet-stream", _tar()),
    ("notes.txt.gz", "application/gzip", gzip.compress(EMAIL.encode(), mtime=0)),
    ("notes.7z", "application/x-7z-compressed", b"7z\xbc\xaf\x27\x1c\x00\x04"),
    ("notes.rar", "application/vnd.rar", b"Rar!\x1a\x07\x01\x00"),
    ("fwd.eml", "message/rfc822", f"From: {EMAIL}\r\n\r\nhello".encode()),
    ("winmail.dat", "application/ms-tnef", b"\x78\x9f\x3e\x22\x00"),
    ("winmail.dat", "application/octet-stream", b"\x78\x9f\x3e\x22\x00"),
    ("msg.asc", "application/pgp-encrypted", b"-----BEGIN PGP MESSAGE-----"),
    ("smime.p7m", "application/pkcs7-mime", b"\x30\x82\x01"),
    ("old.doc", "application/msword", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 20),
    ("prog.exe", "application/octet-stream", b"MZ\x90\x00"),
    ("data.bin", "", b"\x00\x01\x02"),
])
def test_what_cannot_be_read_through_is_withheld(name: str, ctype: str, data: bytes) -> None:
    result = publish(name, ctype, data)
    assert isinstance(result, Withheld) and result.reason.endswith(CANNOT_CHECK)


# ------------------------------------------------------------------------------- leak test

def test_leak_nothing_private_survives_anywhere() -> None:
    """Every secret of the thread, seeded everywhere mail carries it, never comes out."""
    seeds = [EMAIL, EMAIL.upper(), "=?utf-8?q?JANE.CITIZEN=40CITIZEN.EXAMPLE?=",
             "mailto:jane.citizen%40citizen.example", "jane.citizen&#64;citizen.example",
             NAME, NAME.upper(), PHONE, "07700900123",
             "request-12-abcdefghjkmn@ask.example", "REPLY-12-PQRSTVWXYZ01@ASK.EXAMPLE",
             "confirm-2345678abcde@ask.example", "abcdefghjkmn", "pqrstvwxyz01", "2345678abcde"]
    blob = "\n".join(f"seed {i}: {s}." for i, s in enumerate(seeds))
    redactor = _redactor()

    text = redactor.text(blob)
    names = [redactor.filename(f"{s}.pdf") for s in seeds]
    html = redact_html_via_attachment(blob)
    results = [publish(f"{s}.txt", "text/plain", blob.encode()) for s in seeds]
    results.append(publish(f"{NAME}.pdf", "application/pdf", make_pdf(blob.splitlines())))
    results.append(publish(f"{EMAIL}.pdf", "application/pdf", rewrite_pdf(make_pdf(blob.splitlines()))))
    results.append(publish("a.docx", "application/octet-stream", docx(run(blob))))
    results.append(publish(f"{PHONE}.jpg", "image/jpeg", image_bytes("JPEG", comment=blob.encode())))

    for out in [text, html, *names]:
        for secret in PRIVATE:
            assert secret.lower() not in out.lower(), (secret, out)
    for result in results:
        assert_nothing_private(result)
    assert [type(r).__name__ for r in results[-4:]] == ["Withheld", "Withheld", "Withheld",
                                                        "PublicAttachment"]


def redact_html_via_attachment(blob: str) -> str:
    html = "".join(f"<p><a href='mailto:{line}'>{line}</a></p>" for line in blob.splitlines())
    result = publish("body.html", "text/html", html.encode())
    assert isinstance(result, PublicAttachment)
    return result.data.decode()
