"""Photos: the GPS position from real JPEGs (and PNG, WebP) made here with Pillow, in every
hemisphere; copies stripped of GPS, camera and other metadata; hostile bytes never crash."""
from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from mailflow.core.geo import Point
from mailflow.mail.photos import MAX_PIXELS, gps_from_image, strip_metadata

MAKE, MODEL, SOFTWARE, DATETIME, ORIENTATION = 0x010F, 0x0110, 0x0131, 0x0132, 0x0112
EXIF_IFD, BODY_SERIAL, ARTIST = 0x8769, 0xA431, 0x013B


def dms(value: float) -> tuple[IFDRational, IFDRational, IFDRational]:
    """Degrees as EXIF writes them: whole degrees, whole minutes, seconds to 1/100."""
    d = int(value)
    m = int((value - d) * 60)
    s = round(((value - d) * 60 - m) * 60 * 100)
    return IFDRational(d, 1), IFDRational(m, 1), IFDRational(s, 100)


def photo(lat: float | None = 51.5014, lon: float | None = -0.1419, fmt: str = "JPEG", *,
          lat_ref: str | None = None, lon_ref: str | None = None, size: tuple[int, int] = (64, 32),
          orientation: int | None = None, gps: dict | None = None,   # type: ignore[type-arg]
          mode: str = "RGB") -> bytes:
    """A photo as a phone writes it: camera tags, a serial number, a time and GPS."""
    im = Image.new(mode, size, "red" if mode != "L" else 128)
    im.paste("blue" if mode != "L" else 0, (0, 0, size[0] // 2, size[1]))   # left half blue
    exif = Image.Exif()
    exif[MAKE], exif[MODEL], exif[SOFTWARE] = "PhoneCo", "Phone 15 Pro", "Camera 17.1"
    exif[DATETIME], exif[ARTIST] = "2026:03:01 08:15:00", "Jane Citizen"
    exif.get_ifd(EXIF_IFD)[BODY_SERIAL] = "SN-0042-SECRET"
    if orientation:
        exif[ORIENTATION] = orientation
    ifd = exif.get_ifd(0x8825)
    if lat is not None and lon is not None:
        ifd[1] = lat_ref if lat_ref is not None else ("N" if lat >= 0 else "S")
        ifd[2] = dms(abs(lat))
        ifd[3] = lon_ref if lon_ref is not None else ("E" if lon >= 0 else "W")
        ifd[4] = dms(abs(lon))
        ifd[7] = (IFDRational(8), IFDRational(15), IFDRational(0))     # GPS time
    ifd.update(gps or {})
    out = io.BytesIO()
    extra = {"comment": b"Jane's phone"} if fmt == "JPEG" else {}
    im.save(out, fmt, exif=exif, **extra)
    return out.getvalue()


@pytest.mark.parametrize("lat, lon", [
    (51.5014, -0.1419),       # N, W
    (-33.8688, 151.2093),     # S, E
    (-22.9519, -43.2105),     # S, W
    (64.1466, 21.9426),       # N, E
])
def test_gps_in_every_hemisphere(lat: float, lon: float) -> None:
    p = gps_from_image(photo(lat, lon))
    assert p is not None
    assert p.lat == pytest.approx(lat, abs=1e-5) and p.lon == pytest.approx(lon, abs=1e-5)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_gps_from_png_and_webp(fmt: str) -> None:
    p = gps_from_image(photo(50.9, -1.3, fmt))
    assert p and p.lat == pytest.approx(50.9, abs=1e-5) and p.lon == pytest.approx(-1.3, abs=1e-5)


def test_rationals_in_every_shape_pillow_gives() -> None:
    from mailflow.mail.photos import _dms, _ref
    assert _dms(((33, 1), (52, 1), (768, 100))) == pytest.approx(33.8688, abs=1e-4)
    assert _dms((33.0, 52.0, 7.68)) == pytest.approx(33.8688, abs=1e-4)
    assert _dms((IFDRational(33), IFDRational(52), IFDRational(768, 100))) == pytest.approx(
        33.8688, abs=1e-4)
    for garbage in ("51.5", None, (), (1, 2, 3, 4), ((1, 0), 0, 0), (-1, 0, 0), (1, "x", 0),
                    (float("nan"), 0, 0), (51, 60, 0)):
        assert _dms(garbage) is None, garbage
    assert [_ref(v) for v in ("N", b"S\x00", "w ", None, 7)] == ["N", "S", "W", "", "7"]


def test_decimal_degrees_in_the_degrees_field() -> None:
    # decimal degrees in the degrees field, minutes and seconds zero (some apps do this)
    raw = photo(None, None, gps={1: "N", 2: (IFDRational(515014, 10000), IFDRational(0), IFDRational(0)),
                                 3: "W", 4: (IFDRational(1419, 10000), IFDRational(0), IFDRational(0))})
    assert gps_from_image(raw) == Point(51.5014, -0.1419)


@pytest.mark.parametrize("gps", [
    {},                                                        # no GPS at all
    {1: "N", 2: dms(51.5)},                                    # no longitude
    {1: "N", 2: dms(51.5), 4: dms(0.14)},                      # no longitude reference
    {1: "X", 2: dms(51.5), 3: "W", 4: dms(0.14)},              # a garbage reference
    {1: "E", 2: dms(51.5), 3: "N", 4: dms(0.14)},              # references swapped
    {1: "N", 2: dms(95.0), 3: "W", 4: dms(0.14)},              # out of range
    {1: "N", 2: (IFDRational(51), IFDRational(75), IFDRational(0)), 3: "W", 4: dms(0.14)},
    {1: "N", 2: (IFDRational(51, 0), IFDRational(0), IFDRational(0)), 3: "W", 4: dms(0.14)},
    {1: "N", 2: dms(51.5), 3: "W", 4: dms(0.14), 9: "V"},      # the fix is void
    {1: "N", 2: dms(0), 3: "E", 4: dms(0)},                    # 0,0: no fix
])
def test_missing_or_garbage_gps_is_none(gps: dict) -> None:   # type: ignore[type-arg]
    assert gps_from_image(photo(None, None, gps=gps)) is None


def test_a_photo_without_exif() -> None:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "JPEG")
    assert gps_from_image(out.getvalue()) is None


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size (a decompression bomb's first bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + b"\x00\x00\x00\x00IEND\xaeB`\x82")


HOSTILE = [b"", b"garbage", b"\xff\xd8\xff" + b"\x00" * 100, b"GIF89a" + b"\xff" * 50,
           _png_claiming(100_000, 100_000), _png_claiming(20_000, 20_000)]


@pytest.mark.parametrize("data", HOSTILE + [photo()[:300], photo()[:2000]])
def test_hostile_bytes_never_raise(data: bytes) -> None:
    assert gps_from_image(data) is None or isinstance(gps_from_image(data), Point)


def test_gps_survives_random_corruption() -> None:
    import random
    good = photo()
    rng = random.Random(8)
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        result = gps_from_image(bytes(data))
        assert result is None or isinstance(result, Point)


# -- strip_metadata ------------------------------------------------------------------------------
SECRETS = (b"PhoneCo", b"Phone 15 Pro", b"SN-0042-SECRET", b"Jane", b"2026:03:01", b"Camera 17.1")


@pytest.mark.parametrize("fmt, ctype", [("JPEG", "image/jpeg"), ("PNG", "image/png"),
                                        ("WEBP", "image/webp"),
                                        ("JPEG", "application/octet-stream"),  # sniffed
                                        ("PNG", "image/jpeg")])                # mislabelled
def test_strip_removes_gps_and_camera_tags(fmt: str, ctype: str) -> None:
    original = photo(fmt=fmt)
    assert gps_from_image(original) is not None
    assert any(s in original for s in SECRETS)
    clean = strip_metadata(original, ctype)
    assert gps_from_image(clean) is None
    for secret in SECRETS:
        assert secret not in clean, secret
    with Image.open(io.BytesIO(clean)) as im:
        assert im.format == fmt and im.size == (64, 32)
        assert dict(im.getexif()) == {}
        assert not {"exif", "xmp", "comment", "XML:com.adobe.xmp"} & set(im.info)
        px = im.convert("RGB")
        left, right = px.getpixel((5, 16)), px.getpixel((60, 16))
        assert left[2] > 200 > left[0] and right[0] > 200 > right[2]   # still blue | red


def test_strip_removes_xmp_and_png_text() -> None:
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("Author", "Jane Citizen")
    info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta>GPSLatitude 51,30.08N</x:xmpmeta>")
    out = io.BytesIO()
    Image.new("RGB", (16, 16), "green").save(out, "PNG", pnginfo=info)
    clean = strip_metadata(out.getvalue(), "image/png")
    assert b"Jane" not in clean and b"xmpmeta" not in clean
    out = io.BytesIO()
    Image.new("RGB", (16, 16), "green").save(out, "JPEG", xmp=b"<x:xmpmeta>Jane</x:xmpmeta>")
    assert b"xmpmeta" in out.getvalue()
    assert b"xmpmeta" not in strip_metadata(out.getvalue(), "image/jpeg")


@pytest.mark.parametrize("orientation, size, blue_at", [
    (1, (64, 32), (5, 16)),       # as stored: blue on the left
    (3, (64, 32), (60, 16)),      # turned 180°: blue on the right
    (6, (32, 64), (16, 5)),       # turned 90° clockwise: blue at the top
    (8, (32, 64), (16, 60)),      # turned 90° anticlockwise: blue at the bottom
])
def test_strip_applies_the_orientation_first(orientation: int, size: tuple[int, int],
                                             blue_at: tuple[int, int]) -> None:
    clean = strip_metadata(photo(orientation=orientation), "image/jpeg")
    with Image.open(io.BytesIO(clean)) as im:
        assert im.size == size and 0x0112 not in im.getexif()
        r, g, b = im.convert("RGB").getpixel(blue_at)
        assert b > 200 > r


def test_strip_keeps_greyscale_and_transparency() -> None:
    clean = strip_metadata(photo(mode="L"), "image/jpeg")
    with Image.open(io.BytesIO(clean)) as im:
        assert im.mode == "L"
    out = io.BytesIO()
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    exif = Image.Exif()
    exif[MAKE] = "PhoneCo"
    rgba.save(out, "PNG", exif=exif)
    clean = strip_metadata(out.getvalue(), "image/png")
    with Image.open(io.BytesIO(clean)) as im:
        assert im.mode == "RGBA" and im.getpixel((1, 1))[3] == 0
    assert b"PhoneCo" not in clean


def test_not_an_image_is_returned_unchanged() -> None:
    for data, ctype in ((b"%PDF-1.7 ...", "application/pdf"), (b"hello", "text/plain"),
                        (b"PK\x03\x04", "application/zip")):
        assert strip_metadata(data, ctype) is data


@pytest.mark.parametrize("data, ctype, says", [
    (b"not an image at all", "image/jpeg", "cannot read the image (image/jpeg)"),
    (photo()[:600], "image/jpeg", "cannot"),                          # truncated
    (_png_claiming(100_000, 100_000), "image/png", "cannot read the image"),
    (_png_claiming(9_000, 8_000), "image/png", f"at most {MAX_PIXELS:,}"),
    (b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "image/gif", "cannot"),
])
def test_an_image_that_cannot_be_cleaned_is_an_error(data: bytes, ctype: str, says: str) -> None:
    with pytest.raises(ValueError) as e:
        strip_metadata(data, ctype)
    assert says in str(e.value), str(e.value)


def test_other_image_kinds_are_refused_not_passed_on() -> None:
    for fmt, ctype in (("GIF", "image/gif"), ("TIFF", "image/tiff"), ("BMP", "image/bmp")):
        out = io.BytesIO()
        Image.new("RGB", (8, 8)).save(out, fmt)
        with pytest.raises(ValueError, match="are not cleaned of metadata"):
            strip_metadata(out.getvalue(), ctype)
