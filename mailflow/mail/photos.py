"""Photos attached to fault reports: where they were taken, and copies safe to pass on.

A phone photo of a pothole usually knows where it was taken (EXIF GPS tags), which spares the
citizen typing coordinates: `gps_from_image` reads that position. The same photo also carries
what the citizen never meant to publish or send: the exact time, the phone's make, model and
serial number, its owner's name, editing software, sometimes a thumbnail of the uncropped
original. `strip_metadata` makes the copy that goes to the authority and the archive: only the
pixels, re-encoded, turned the way the camera meant (EXIF orientation applied before the tag is
dropped). The position itself travels separately, as coordinates in the report.

Photos come from strangers, so both functions treat the bytes as hostile: a file claiming
gigapixels is refused before it is decoded (decompression bombs), and garbage or truncated
data never raises out of `gps_from_image`. `strip_metadata` raises ValueError for an image it
cannot clean (undecodable, too large, or a kind it does not re-encode), so the caller withholds
the file: passing it on unchanged would pass its metadata on too.
"""
from __future__ import annotations

import io
import math
from typing import Any

from PIL import Image, ImageOps

from mailflow.core.geo import Point

GPS_IFD = 0x8825
MAX_PIXELS = 64_000_000          # about 8000 × 8000: more than any phone's normal photo mode
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON, _GPS_STATUS = 1, 2, 3, 4, 9

# What strip_metadata re-encodes, by the format Pillow reads from the bytes themselves.
_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WEBP"}
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


def _ref(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip("\x00 \t").upper()[:1] if value is not None else ""


def _number(value: Any) -> float:
    """A rational as Pillow gives it: IFDRational, a (numerator, denominator) pair or a number."""
    if isinstance(value, tuple) and len(value) == 2:
        num, den = value
        return float(num) / float(den)
    return float(value)


def _dms(value: Any) -> float | None:
    """Degrees from EXIF's (degrees, minutes, seconds); None for anything impossible."""
    if not isinstance(value, (tuple, list)) or not 1 <= len(value) <= 3:
        return None
    try:
        parts = [_number(v) for v in value]
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    if not all(math.isfinite(p) and p >= 0 for p in parts):
        return None
    if any(p >= 60 for p in parts[1:2]) or any(p > 60 for p in parts[2:]):
        return None
    return sum(p / 60 ** i for i, p in enumerate(parts))


def gps_from_image(data: bytes) -> Point | None:
    """Where the photo was taken, from its EXIF GPS tags (JPEG, PNG, WebP…), or None.

    Needs the latitude and longitude with their N/S and E/W references; a fix the device
    marked void (GPSStatus "V") or the 0,0 of a device without a fix counts as none. Never
    raises, whatever the bytes."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS * 4:
                return None
            gps = im.getexif().get_ifd(GPS_IFD)
            if not gps or _ref(gps.get(_GPS_STATUS)) == "V":
                return None
            lat_ref, lon_ref = _ref(gps.get(_GPS_LAT_REF)), _ref(gps.get(_GPS_LON_REF))
            lat, lon = _dms(gps.get(_GPS_LAT)), _dms(gps.get(_GPS_LON))
    except Exception:   # hostile bytes: Pillow raises many kinds; a bomb warning counts too
        return None
    if lat is None or lon is None or lat_ref not in ("N", "S") or lon_ref not in ("E", "W"):
        return None
    lat, lon = (-lat if lat_ref == "S" else lat), (-lon if lon_ref == "W" else lon)
    if abs(lat) > 90 or abs(lon) > 180 or (lat == 0 and lon == 0):
        return None
    return Point(lat, lon)


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def strip_metadata(data: bytes, content_type: str) -> bytes:
    """A copy of a JPEG, PNG or WebP photo with nothing but its pixels (and colour profile).

    EXIF (GPS, camera, serial numbers, times, thumbnails), XMP, IPTC, comments and PNG text
    are dropped; the EXIF orientation is applied first, so the copy looks the same. The copy is
    in the format the bytes really are, whatever `content_type` says. An animated image keeps
    its first frame.

    Data that is not an image (neither its content type nor its first bytes say so) is
    returned unchanged. An image that cannot be cleaned raises ValueError: the caller must
    withhold it, since the original would carry its metadata along."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if not ctype.startswith("image/") and not _looks_like_image(data):
        return data
    try:
        im = Image.open(io.BytesIO(data))
    except Exception as e:
        raise ValueError(f"cannot read the image ({ctype or 'no type'}): {e}") from None
    with im:
        fmt = _FORMATS.get(im.format or "")
        if fmt is None:
            raise ValueError(f"{im.format or ctype} images are not cleaned of metadata "
                             "(JPEG, PNG and WebP are)")
        if im.width * im.height > MAX_PIXELS:
            raise ValueError(f"the image is too large to clean ({im.width}×{im.height} "
                             f"pixels; at most {MAX_PIXELS:,})")
        try:
            im.load()
            try:
                upright = ImageOps.exif_transpose(im)
            except Exception:   # a garbled orientation tag: keep the pixels as they are
                upright = im.copy()
            icc = im.info.get("icc_profile")
            transparency = im.info.get("transparency")
            upright.info = {}           # the JPEG and PNG writers fall back on .info
            out = io.BytesIO()
            options: dict[str, Any] = {}
            if icc:
                options["icc_profile"] = icc
            if fmt == "JPEG":
                if upright.mode not in ("RGB", "L", "CMYK"):
                    upright = upright.convert("RGB")
                options.update(quality=90, optimize=True)
            elif fmt == "PNG":
                if transparency is not None and upright.mode in ("P", "L", "RGB"):
                    options["transparency"] = transparency
                options["optimize"] = True
            else:
                options.update(quality=90)
            upright.save(out, format=fmt, **options)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"cannot decode the image: {e}") from None
    return out.getvalue()
