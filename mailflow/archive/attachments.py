"""Deciding what of an attachment may be published, and publishing it without private data.

An attachment is published only when we can see everything in it: text is redacted like a
message body; an image is re-encoded from its pixels so EXIF (GPS position, camera serial,
author) and every other metadata block is gone; a PDF or office document is published unchanged
only when its whole text, metadata included, names nothing private — we cannot redact inside
those files safely, so a match withholds the file. Anything we cannot read through (an archive,
an encrypted or scanned PDF, a forwarded message, an unknown binary) is withheld with the
reason, for an admin to look at, never published silently.

The type is decided by the file's own bytes first (a PDF sent as application/octet-stream is
still a PDF; a "text/plain" that starts with %PDF is not text), then the declared type, then the
extension. The published name always ends in an extension a web server maps to a harmless type,
because a static host picks Content-Type from the extension: "x.svg" sent as text/plain must
not become image/svg+xml on our origin.
"""
from __future__ import annotations

import collections
import hashlib
import io
import re
import warnings
import zipfile
from dataclasses import dataclass
from html import unescape
from typing import Any

from PIL import Image, ImageOps, ImageSequence
from pypdf import PdfReader

from mailflow.core.message import Attachment
from mailflow.core.redaction import Redactor
from mailflow.mail.sanitise import redact_html

CANNOT_CHECK = "cannot be checked for private information"
PDF_MAX_PAGES = 2000
PAGE_MIN_TEXT = 40          # non-space characters below which a page with images is "a scan"
ZIP_MAX_TOTAL = 50 * 1024 * 1024
ZIP_MAX_RATIO = 100
ZIP_MAX_MEMBERS = 10_000
IMAGE_MAX_FRAMES = 500


@dataclass(frozen=True)
class PublicAttachment:
    filename: str
    content_type: str
    data: bytes
    size: int


@dataclass(frozen=True)
class Withheld:
    filename: str
    reason: str           # for the admin queue and the public placeholder: never a secret


# ------------------------------------------------------------------------------ what it is

_OFFICE = {
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ".odt": "application/vnd.oasis.opendocument.text",
    ".ods": "application/vnd.oasis.opendocument.spreadsheet",
    ".odp": "application/vnd.oasis.opendocument.presentation",
}
_OFFICE_BY_TYPE = {v: k for k, v in _OFFICE.items()}
_IMAGES = {"JPEG": ("image/jpeg", (".jpg", ".jpeg"), ".jpg"),
           "PNG": ("image/png", (".png",), ".png"),
           "GIF": ("image/gif", (".gif",), ".gif"),
           "WEBP": ("image/webp", (".webp",), ".webp")}
_TEXT_EXTS = {".txt", ".text", ".log", ".md", ".csv", ".tsv", ".json", ".ics", ".vcf", ".htm",
              ".html", ".xml"}
# Extensions a static server maps to a type a browser shows inline without running anything.
_SAFE_PLAIN_EXTS = (".txt", ".text", ".log", ".md", ".json", ".ics", ".vcf", ".tsv")
_TEXTUAL_TYPES = {"application/json", "application/xml", "application/csv"}

_ARCHIVE_MAGIC = ((b"\x1f\x8b", "a gzip archive"), (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
                  (b"Rar!\x1a\x07", "a RAR archive"), (b"BZh", "a bzip2 archive"),
                  (b"\xfd7zXZ\x00", "an xz archive"),
                  (b"\x78\x9f\x3e\x22", "a TNEF file (winmail.dat)"),
                  (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old-style Office file (.doc/.xls/.msg)"),
                  (b"-----BEGIN PGP", "an encrypted or signed file"))
_DECLARED_BLOCKED = (("message/", "a forwarded message"), ("application/ms-tnef", "a TNEF file"),
                     ("application/vnd.ms-tnef", "a TNEF file"),
                     ("application/pgp", "an encrypted or signed file"),
                     ("application/pkcs7", "an encrypted or signed file"),
                     ("application/x-pkcs7", "an encrypted or signed file"),
                     ("application/zip", "a ZIP archive"),
                     ("application/x-", "an archive or program"),
                     ("image/svg", "an SVG image (it can carry script)"))


def _ext(name: str) -> str:
    stem, dot, ext = name.rpartition(".")
    return "." + ext.lower() if dot and stem and ext else ""


def _with_ext(name: str, allowed: tuple[str, ...], default: str) -> str:
    return name if _ext(name) in allowed else name + default


def _image_format(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


# ------------------------------------------------------------------------------------ text

def _decode(data: bytes) -> str | None:
    """The text of a text attachment, or None when it is really binary."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            return None
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


_HTML_HEAD = ('<!doctype html>\n<meta charset="utf-8">\n<meta http-equiv="Content-Security-Policy" '
              "content=\"default-src 'none'\">\n")


def _publish_text(att: Attachment, name: str, ctype: str, redactor: Redactor
                  ) -> PublicAttachment | Withheld:
    text = _decode(att.data)
    if text is None:
        return Withheld(name, f"binary data declared as text: {CANNOT_CHECK}")
    ext = _ext(name)
    if ctype == "text/html" or ext in (".htm", ".html"):
        body = (_HTML_HEAD + redact_html(text, redactor)).encode("utf-8")
        return _public(_with_ext(name, (".html", ".htm"), ".html"), "text/html; charset=utf-8",
                       body)
    data = redactor.text(text).encode("utf-8")
    if ctype in ("text/csv", "application/csv") or ext == ".csv":
        return _public(_with_ext(name, (".csv",), ".csv"), "text/csv; charset=utf-8", data)
    return _public(_with_ext(name, _SAFE_PLAIN_EXTS, ".txt"), "text/plain; charset=utf-8", data)


def _public(name: str, ctype: str, data: bytes) -> PublicAttachment:
    return PublicAttachment(filename=name, content_type=ctype, data=data, size=len(data))


def _found(redactor: Redactor, texts: list[str]) -> list[str]:
    """The labels of whatever private matches in any of the texts, also with white space
    removed (text pulled out of a PDF or XML often breaks a line inside an address)."""
    labels: list[str] = []
    for t in texts:
        for variant in (t, re.sub(r"\s+", "", t)):
            for _, label in redactor.changes(variant):
                if label not in labels:
                    labels.append(label)
    return labels


def _private_reason(kind: str, labels: list[str]) -> str:
    return (f"{kind} contains private information ({', '.join(labels[:5])}) and cannot be "
            "redacted safely")


# ------------------------------------------------------------------------------------- PDF

def _has_images(resources: Any, depth: int = 0) -> bool:
    """Whether a page (or a form inside it, recursively) draws an image."""
    try:
        xobjects = resources.get_object().get("/XObject") if resources is not None else None
        if xobjects is None:
            return False
        for ref in xobjects.get_object().values():
            obj = ref.get_object()
            if obj.get("/Subtype") == "/Image":
                return True
            if obj.get("/Subtype") == "/Form" and depth < 4 and _has_images(obj.get("/Resources"),
                                                                            depth + 1):
                return True
        return False
    except Exception:
        return True          # unreadable resources: assume the worst


def _pdf_texts(reader: PdfReader) -> tuple[list[str], str | None]:
    """Every text in the PDF we can find, or a reason it cannot be checked."""
    texts: list[str] = []
    total = 0
    for number, page in enumerate(reader.pages, 1):
        text = page.extract_text() or ""
        visible = len(re.sub(r"\s+", "", text))
        total += visible
        if visible < PAGE_MIN_TEXT and _has_images(page.get("/Resources")):
            return texts, f"page {number} of the PDF is an image without text (a scan?)"
        texts.append(text)
        annots = page.get("/Annots")
        for annot in annots.get_object() if annots is not None else []:
            a = annot.get_object()
            texts += [str(a.get(k, "")) for k in ("/Contents", "/T", "/RC")]
            action = a.get("/A")
            if action is not None:
                texts.append(str(action.get_object().get("/URI", "")))
    if total == 0:
        return texts, "the PDF has no extractable text (a scan?)"
    metadata = reader.metadata or {}
    texts += [str(metadata[k]) for k in metadata]
    for field in (reader.get_fields() or {}).values():
        texts.append(str(field.get("/V", "")))
    return texts, None


_PDF_STRING = re.compile(rb"\((?:[^()\\]|\\.){1,4000}\)", re.S)
_XMP = re.compile(rb"<x:xmpmeta.{0,200000}?</x:xmpmeta>", re.S)


def _raw_pdf_strings(data: bytes) -> list[str]:
    """Strings in the file that text extraction does not reach: XMP metadata, bookmarks and
    other uncompressed string objects. Only strings, not the whole file, so a rule's regex
    cannot match the numbers of the PDF syntax itself."""
    out = [m.decode("utf-8", "replace") for m in _XMP.findall(data)]
    for m in _PDF_STRING.findall(data):
        body = m[1:-1]
        out.append(body[2:].decode("utf-16-be", "replace") if body.startswith(b"\xfe\xff")
                   else body.decode("latin-1"))
    return out


# What a PDF holds is a function of its bytes alone: the same file attached again (forwarded,
# quoted, sent to several requests) is read once per process. Only the redaction check, which
# depends on the thread, runs for each.
_PDF_MEMO: collections.OrderedDict[bytes, tuple[str | None, list[str]]] = collections.OrderedDict()
_PDF_MEMO_SIZE = 64
_PDF_MEMO_MAX_TEXT = 1 << 20


def _pdf_read(data: bytes) -> tuple[str | None, list[str]]:
    """(why the PDF cannot be checked, or None; every text in it)."""
    key = hashlib.sha256(data).digest()
    hit = _PDF_MEMO.get(key)
    if hit is not None:
        _PDF_MEMO.move_to_end(key)
        return hit
    texts: list[str] = []
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            problem: str | None = f"encrypted PDF: {CANNOT_CHECK}"
        elif len(reader.pages) > PDF_MAX_PAGES:
            problem = f"PDF of more than {PDF_MAX_PAGES} pages: {CANNOT_CHECK}"
        elif reader.attachments:
            problem = f"PDF with files embedded in it: {CANNOT_CHECK}"
        else:
            texts, problem = _pdf_texts(reader)
            if problem:
                problem = f"{problem}: {CANNOT_CHECK}"
    except Exception as e:   # any failure on hostile input means: not checked
        problem = f"PDF could not be read ({type(e).__name__}): {CANNOT_CHECK}"
    result = (problem, [] if problem else [*texts, "\n".join(_raw_pdf_strings(data))])
    if sum(len(t) for t in result[1]) <= _PDF_MEMO_MAX_TEXT:
        _PDF_MEMO[key] = result
        while len(_PDF_MEMO) > _PDF_MEMO_SIZE:
            _PDF_MEMO.popitem(last=False)
    return result


def _publish_pdf(att: Attachment, name: str, redactor: Redactor) -> PublicAttachment | Withheld:
    name = _with_ext(name, (".pdf",), ".pdf")
    problem, texts = _pdf_read(att.data)
    if problem:
        return Withheld(name, problem)
    labels = _found(redactor, texts)
    if labels:
        return Withheld(name, _private_reason("PDF", labels))
    return _public(name, "application/pdf", att.data)


# ----------------------------------------------------------------------------------- images

_KEEP_FRAME_INFO = ("duration", "transparency", "disposal")
_ORIENTATION = 0x0112


def _reencode(img: Image.Image, fmt: str) -> bytes:
    """The pixels alone, in the same format: no EXIF, XMP, comments, text chunks."""
    icc = img.info.get("icc_profile")
    out = io.BytesIO()
    options: dict[str, object] = {"icc_profile": icc} if icc else {}
    frames = getattr(img, "n_frames", 1)
    if frames > 1 and fmt in ("GIF", "WEBP"):
        if frames > IMAGE_MAX_FRAMES:
            raise ValueError("too many frames")
        clean = []
        for frame in ImageSequence.Iterator(img):
            copy = frame.copy()
            copy.info = {k: frame.info[k] for k in _KEEP_FRAME_INFO if k in frame.info}
            clean.append(copy)
        durations = [f.info.get("duration", 100) for f in clean]
        clean[0].save(out, fmt, save_all=True, append_images=clean[1:], duration=durations,
                      loop=img.info.get("loop", 0), **options)
        return out.getvalue()
    rotated = img.getexif().get(_ORIENTATION, 1) not in (0, 1)
    if fmt == "JPEG" and not rotated:
        # Same quantisation and subsampling as the original: no visible loss.
        img.info = {}
        img.save(out, "JPEG", quality="keep", subsampling="keep", **options)
        return out.getvalue()
    # The EXIF orientation goes with the EXIF, so turn the pixels the way it said.
    frame = ImageOps.exif_transpose(img) if rotated else img
    transparency = frame.info.get("transparency")
    clean_frame = frame.copy()
    clean_frame.info = {}
    if transparency is not None and fmt in ("PNG", "GIF"):
        options["transparency"] = transparency
    if fmt == "JPEG":
        options["quality"] = 90
    elif fmt == "WEBP":
        options["quality"] = 90
    clean_frame.save(out, fmt, **options)
    return out.getvalue()


def _metadata_left(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as check:
        return bool(check.getexif()) or any(
            k.lower() in ("exif", "xmp", "comment", "xml:com.adobe.xmp") or k[:1].isupper()
            for k in check.info)


def _publish_image(att: Attachment, name: str, fmt: str) -> PublicAttachment | Withheld:
    ctype, exts, default = _IMAGES[fmt]
    name = _with_ext(name, exts, default)
    try:
        with warnings.catch_warnings():
            # A decompression bomb is refused, not just warned about.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(att.data)) as img:
                if img.format != fmt:
                    return Withheld(name, f"not a valid image: {CANNOT_CHECK}")
                img.load()
                data = _reencode(img, fmt)
            if _metadata_left(data):
                return Withheld(name, "image metadata could not be removed")
    except Exception as e:   # hostile or broken input: never publish what we could not clean
        return Withheld(name, f"image could not be read ({type(e).__name__}): {CANNOT_CHECK}")
    return _public(name, ctype, data)


# ----------------------------------------------------------------------- office documents

_XML_ATTR = re.compile(r"""=\s*(?:"([^"]*)"|'([^']*)')""")
_ID_LIKE = re.compile(r"^[0-9A-Fa-f{}\-.\s]*$")


def _xml_texts(xml: str) -> list[str]:
    """The text of an XML part with the tags removed (so a word Word split into several runs
    is whole again), and its attribute values (link targets, authors of comments and tracked
    changes) except ids and numbers, which a rule's regex could mistake for a phone number."""
    values = [a or b for a, b in _XML_ATTR.findall(xml)]
    return [unescape(re.sub(r"<[^>]*>", "", xml)),
            "\n".join(unescape(v) for v in values if v and not _ID_LIKE.match(v))]


def _publish_office(att: Attachment, name: str, ext: str, redactor: Redactor
                    ) -> PublicAttachment | Withheld:
    name = _with_ext(name, (ext,), ext)
    what = f"{ext[1:].upper()} document"
    try:
        with zipfile.ZipFile(io.BytesIO(att.data)) as zf:
            infos = zf.infolist()
            if len(infos) > ZIP_MAX_MEMBERS:
                return Withheld(name, f"{what} with too many parts: {CANNOT_CHECK}")
            total = sum(i.file_size for i in infos)
            packed = sum(i.compress_size for i in infos) or 1
            if total > ZIP_MAX_TOTAL or total / packed > ZIP_MAX_RATIO:
                return Withheld(name, f"{what} that unpacks too large (a zip bomb?): "
                                      f"{CANNOT_CHECK}")
            names = {i.filename for i in infos}
            if "[Content_Types].xml" not in names and "mimetype" not in names:
                return Withheld(name, f"not a valid {what}: {CANNOT_CHECK}")
            if any(i.flag_bits & 0x1 for i in infos):
                return Withheld(name, f"encrypted {what}: {CANNOT_CHECK}")
            if any(re.search(r"(^|/)embeddings/|\.bin$|\.ole$", i.filename, re.I) for i in infos):
                return Withheld(name, f"{what} with embedded files or macros: {CANNOT_CHECK}")
            texts: list[str] = []
            budget = ZIP_MAX_TOTAL
            for info in infos:
                if not re.search(r"\.(xml|rels|vml)$", info.filename, re.I):
                    continue
                with zf.open(info) as part:
                    raw = part.read(budget + 1)   # declared sizes can lie: cap what we inflate
                budget -= len(raw)
                if budget < 0:
                    return Withheld(name, f"{what} that unpacks too large: {CANNOT_CHECK}")
                texts += _xml_texts(raw.decode("utf-8", errors="replace"))
    except Exception as e:   # a broken or hostile zip
        return Withheld(name, f"{what} could not be read ({type(e).__name__}): {CANNOT_CHECK}")
    labels = _found(redactor, texts)
    if labels:
        return Withheld(name, _private_reason(what, labels))
    return _public(name, _OFFICE[ext], att.data)


# -------------------------------------------------------------------------------- the entry

def publish_attachment(att: Attachment, redactor: Redactor) -> PublicAttachment | Withheld:
    """What the archive may publish of one attachment: a redacted copy, or why it is withheld."""
    name = redactor.filename(att.filename or "attachment")
    ctype = att.content_type.split(";", 1)[0].strip().lower()
    ext = _ext(name)
    data = att.data
    fmt = _image_format(data)
    if fmt is not None:
        return _publish_image(att, name, fmt)
    if b"%PDF-" in data[:1024]:
        return _publish_pdf(att, name, redactor)
    if data.startswith(b"PK\x03\x04"):
        office = ext if ext in _OFFICE else _OFFICE_BY_TYPE.get(ctype)
        if office:
            return _publish_office(att, name, office, redactor)
        return Withheld(name, f"a ZIP archive {CANNOT_CHECK}")
    if len(data) > 262 and data[257:262] == b"ustar":
        return Withheld(name, f"a tar archive {CANNOT_CHECK}")
    for magic, what in _ARCHIVE_MAGIC:
        if data.startswith(magic):
            return Withheld(name, f"{what} {CANNOT_CHECK}")
    for prefix, what in _DECLARED_BLOCKED:
        if ctype.startswith(prefix):
            return Withheld(name, f"{what} {CANNOT_CHECK}")
    if ctype == "application/pdf" or ext == ".pdf":
        return Withheld(name, f"not a valid PDF: {CANNOT_CHECK}")
    if ctype.startswith("image/"):
        return Withheld(name, f"an image in a format we do not publish ({_shown(ctype, redactor)}) "
                              f"{CANNOT_CHECK}")
    # By extension too: CSV often comes as application/vnd.ms-excel, text as octet-stream.
    # (Binary data under a text name is caught by _decode.)
    if ctype.startswith("text/") or ctype in _TEXTUAL_TYPES or ext in _TEXT_EXTS:
        return _publish_text(att, name, ctype, redactor)
    return Withheld(name, f"a file of unknown type ({_shown(ctype, redactor)}) {CANNOT_CHECK}")


def _shown(ctype: str, redactor: Redactor) -> str:
    """A declared type fit for a reason (which may be shown publicly): the sender wrote it."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]{0,60}/[a-z0-9][a-z0-9.+-]{0,60}", ctype):
        return "none" if not ctype else "unrecognised"
    return redactor.text(ctype)
