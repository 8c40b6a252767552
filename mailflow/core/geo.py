"""Where a fault is: coordinates read out of what a citizen wrote, distances and map links.

A fault report is only useful at the right place, and a wrong place is worse than none: the
report would go to the wrong council, or to nobody. So `find_coordinates` reads the forms people
(and their phones and map sites) really write — decimal degrees signed or with N/S/E/W,
degrees-minutes(-seconds), `geo:` URIs and links from OpenStreetMap, Google Maps and Apple
Maps — and prefers missing a form to reading a date, a time, a phone number, a version number
or a price as a place. When nothing is found mailflow asks the citizen, which costs one email;
a false position costs a misrouted report.

Pure: text in, values out (no I/O).
"""
from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

EARTH_RADIUS_M = 6_371_008.8   # the mean radius (IUGG), what haversine distances are quoted in


@dataclass(frozen=True)
class Point:
    """A position in WGS 84 decimal degrees (what GPS, GeoJSON and map sites use)."""
    lat: float
    lon: float

    def __post_init__(self) -> None:
        for name, value, limit in (("lat", self.lat, 90.0), ("lon", self.lon, 180.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or abs(value) > limit:
                raise ValueError(f"{name} must be between -{limit:g} and {limit:g}, got {value!r}")
            object.__setattr__(self, name, float(value))

    def __str__(self) -> str:
        return f"{_fmt(self.lat)}, {_fmt(self.lon)}"


@dataclass(frozen=True)
class Found:
    """A position and where it came from, kept so a person can check what mailflow read."""
    point: Point
    source: str   # "text" | "exif" | "gazetteer" | "reply"
    text: str     # what was read, e.g. "51.5014, -0.1419" or the map link


def distance_m(a: Point, b: Point) -> float:
    """Great-circle distance in metres (haversine; within 0.5 % of the ellipsoid's)."""
    phi1, phi2 = math.radians(a.lat), math.radians(b.lat)
    dphi, dlam = phi2 - phi1, math.radians(b.lon - a.lon)
    h = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlam / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def _fmt(x: float) -> str:
    """Six decimals (about 10 cm) without trailing zeros: 51.5, -0.1419."""
    s = f"{x:.6f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def map_link(p: Point, template: str) -> str:
    """`template` with {lat} and {lon} filled in (other braces are left alone)."""
    return template.replace("{lat}", _fmt(p.lat)).replace("{lon}", _fmt(p.lon))


# -- reading coordinates ------------------------------------------------------------------------
# A number must not be glued to other digits, dots, letters or signs: that is what keeps dates
# (12.03.2024), versions (3.11.2), IP addresses and words with digits out.
_NB = r"(?<![\w.,+\-−–/:$£€¥])"      # not preceded by
_NA = r"(?![\w.]*\d|[\w%$£€¥])"      # not followed by more digits, a letter or a unit sign
# Every repeat is bounded, so no text, however hostile, makes these expressions backtrack for
# long: a run of spaces (at most 8 here), of decimals (at most 20).
_S = r"\s{0,8}"
_S1 = r"\s{1,8}"
_DEC = r"\d{1,20}"
_SIGN = r"[+\-−–]"
_DEG = r"(?:°|º|˚|\bdeg\b\.?)"
_MIN = r"(?:'|′|’|‘)"
_SEC = r"(?:\"|″|”|“|''|′′|’’)"

# Signed decimal degrees: "51.5014, -0.1419", "51.5014 -0.1419", "(51.5014°, -0.1419°)".
_DECIMAL_PAIR = re.compile(
    _NB + rf"(?P<lat>{_SIGN}?\d{{1,2}}\.(?P<latd>{_DEC}))\s?°?"
    rf"(?:{_S}[,;]{_S}|{_S1})"
    rf"(?P<lon>{_SIGN}?\d{{1,3}}\.(?P<lond>{_DEC}))\s?°?" + _NA)

# Labelled: "lat: 51.5014 lon: -0.1419", "Latitude 51.5 / Longitude -0.14", either order.
_NUM = rf"{_SIGN}?\d{{1,3}}(?:\.{_DEC})?"
_LAT_LABEL = r"\b(?:lat|latitude|breite)\b\.?"
_LON_LABEL = r"\b(?:lon|lng|long|longitude|länge)\b\.?"
_LABEL_SEP = rf"{_S}(?:[:=]{_S}|\s)"
_BETWEEN = rf"{_S}°?{_S}[,;/|&]?{_S}(?:and{_S1})?"
_LABELLED = re.compile(
    rf"(?:{_LAT_LABEL}{_LABEL_SEP}(?P<lat>{_NUM}){_BETWEEN}{_LON_LABEL}{_LABEL_SEP}"
    rf"(?P<lon>{_NUM}){_S}°?"
    rf"|{_LON_LABEL}{_LABEL_SEP}(?P<lon2>{_NUM}){_BETWEEN}{_LAT_LABEL}{_LABEL_SEP}"
    rf"(?P<lat2>{_NUM}){_S}°?)" + _NA, re.IGNORECASE)

# One coordinate with a hemisphere letter before or after it: decimal degrees (a decimal point
# is required), or degrees with a degree sign and minutes (and seconds).
_ANGLE = (rf"(?:\d{{1,3}}{_S}{_DEG}{_S}\d{{1,2}}(?:\.{_DEC})?{_S}{_MIN}?"
          rf"(?:{_S}\d{{1,2}}(?:\.{_DEC})?{_S}{_SEC}?)?"   # D° M' S" or D° M.mmm'
          rf"|\d{{1,3}}\.{_DEC}{_S}{_DEG}?)")               # D.ddd°
_HEMI = r"[NSEW]"


def _component(n: int) -> str:
    return (rf"(?:(?P<pre{n}>(?<![A-Za-z]){_HEMI}){_S}(?P<a{n}>{_ANGLE})(?![\d.])"
            rf"|(?<![\w.])(?P<b{n}>{_ANGLE}){_S}(?P<post{n}>{_HEMI})(?![A-Za-z]))")


_HEMISPHERE_PAIR = re.compile(_component(1) + rf"{_S}[,;/]?{_S}" + _component(2))
_ANGLE_PARTS = re.compile(r"\d+(?:\.\d+)?")
_URL = re.compile(r"(?:\bhttps?://|\bgeo:)[^\s<>\"'()\[\]]+", re.IGNORECASE)


def _angle(text: str) -> float | None:
    """Degrees from "51.5014", "51°30'05\"" or "51° 30.083'"; None for impossible minutes or
    seconds (a clock time such as 12°61' is not an angle)."""
    parts = [float(p) for p in _ANGLE_PARTS.findall(text)]
    if not parts or len(parts) > 3:
        return None
    if any(not 0 <= p < 60 for p in parts[1:]):
        return None
    if len(parts) > 1 and not parts[0].is_integer():
        return None   # 51.5°30' is not a way anyone writes an angle
    if len(parts) == 3 and not parts[1].is_integer():
        return None
    return parts[0] + sum(p / 60 ** i for i, p in enumerate(parts[1:], 1))


def _point(lat: float, lon: float) -> Point | None:
    if not (math.isfinite(lat) and math.isfinite(lon)) or abs(lat) > 90 or abs(lon) > 180:
        return None
    if lat == 0 and lon == 0:
        return None   # "Null Island": a device that had no fix, not a place in the sea
    return Point(lat, lon)


def _float(s: str) -> float:
    return float(s.replace("−", "-").replace("–", "-"))


_CONTEXT = re.compile(r"\b(?:lat|latitude|lat/lon|lat/long|coordinates?|co-ordinates?|coords|gps|"
                      r"location|position|geo|located at)\b", re.IGNORECASE)


def _decimal_pair(m: re.Match[str], text: str) -> Point | None:
    # Two decimals or fewer on both sides is how prices and times are written (12.50, 14.30);
    # a written position has at least three on one side, and a decimal point on both, unless
    # the words just before it say it is a position ("coordinates: 51.5, -0.14").
    if max(len(m["latd"]), len(m["lond"])) < 3 and not _CONTEXT.search(
            text[max(0, m.start() - 40):m.start()]):
        return None
    return _point(_float(m["lat"]), _float(m["lon"]))


def _labelled(m: re.Match[str], text: str) -> Point | None:
    lat, lon = (m["lat"], m["lon"]) if m["lat"] is not None else (m["lat2"], m["lon2"])
    return _point(_float(lat), _float(lon))


def _hemisphere_pair(m: re.Match[str], text: str) -> Point | None:
    values: dict[str, float] = {}
    for n in (1, 2):
        hemi = (m[f"pre{n}"] or m[f"post{n}"]).upper()
        angle = _angle(m[f"a{n}"] or m[f"b{n}"])
        if angle is None:
            return None
        axis = "lat" if hemi in "NS" else "lon"
        if axis in values:
            return None          # "N 51.5 S 0.1": two latitudes
        values[axis] = -angle if hemi in "SW" else angle
    return _point(values["lat"], values["lon"])


_PAIR_IN_VALUE = re.compile(rf"^\s*(?P<lat>{_SIGN}?\d{{1,2}}(?:\.\d+)?)\s*,\s*"
                            rf"(?P<lon>{_SIGN}?\d{{1,3}}(?:\.\d+)?)(?:,[\d.]*z?)?\s*$")
_GOOGLE_AT = re.compile(rf"/@(?P<lat>{_SIGN}?\d{{1,2}}\.\d+),(?P<lon>{_SIGN}?\d{{1,3}}\.\d+)")
_OSM_HASH = re.compile(rf"map=\d{{1,2}}(?:\.\d+)?/(?P<lat>{_SIGN}?\d{{1,2}}\.\d+)/"
                       rf"(?P<lon>{_SIGN}?\d{{1,3}}\.\d+)")
_GEO_URI = re.compile(rf"^geo:(?P<lat>{_SIGN}?\d{{1,2}}(?:\.\d+)?),"
                      rf"(?P<lon>{_SIGN}?\d{{1,3}}(?:\.\d+)?)(?:,[\d.\-]+)?(?:[;?].*)?$",
                      re.IGNORECASE)
# Query keys that carry "lat,lon" on the map sites (Google: q, query, ll, center, destination,
# daddr; Apple: ll, q, sll, coordinate) and separate lat/lon keys (OpenStreetMap's mlat/mlon).
_PAIR_KEYS = ("ll", "q", "query", "center", "destination", "daddr", "sll", "coordinate")
_LAT_KEYS = ("mlat", "lat", "latitude")
_LON_KEYS = ("mlon", "lon", "lng", "longitude")


def _pair_value(value: str) -> Point | None:
    m = _PAIR_IN_VALUE.match(value)
    return _point(_float(m["lat"]), _float(m["lon"])) if m else None


def _url(url: str) -> Point | None:
    """The position a map link or geo: URI points at, or None (any other link)."""
    url = url.rstrip(".,;:!?").replace("&amp;", "&")
    if url[:4].lower() == "geo:":
        # geo:lat,lon[,alt][;u=..], or Android's geo:0,0?q=lat,lon(label) for a marker
        q = dict(parse_qsl(url.partition("?")[2]))
        if "q" in q and (p := _pair_value(q["q"].partition("(")[0])):
            return p
        m = _GEO_URI.match(unquote(url))
        return _point(_float(m["lat"]), _float(m["lon"])) if m else None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    query = dict((k.lower(), v) for k, v in parse_qsl(parts.query))
    fragment = unquote(parts.fragment)
    is_osm = host == "osm.org" or host.endswith((".osm.org", "openstreetmap.org"))
    is_google = re.search(r"(^|\.)google\.[a-z.]+$", host) is not None and (
        parts.path.startswith("/maps") or host.startswith("maps."))
    is_apple = host in ("maps.apple.com", "maps.apple")
    # A marker (OpenStreetMap mlat/mlon, a search for coordinates) beats the view's centre.
    lat = next((query[k] for k in _LAT_KEYS if k in query), None)
    lon = next((query[k] for k in _LON_KEYS if k in query), None)
    if lat is not None and lon is not None:
        try:
            p = _point(_float(lat), _float(lon))
        except ValueError:
            p = None
        if p:
            return p
    if is_google or is_apple:
        for key in _PAIR_KEYS:
            if key in query and (p := _pair_value(query[key])):
                return p
    if is_google:
        path = unquote(parts.path)
        if m := _GOOGLE_AT.search(path):
            return _point(_float(m["lat"]), _float(m["lon"]))
        for segment in path.replace("+", " ").split("/"):   # /maps/search/51.50,+-0.14
            if p := _pair_value(segment):
                return p
    if is_osm and (m := _OSM_HASH.search(fragment)):
        return _point(_float(m["lat"]), _float(m["lon"]))
    return None


def find_coordinates(text: str) -> list[Found]:
    """Every distinct position written in `text`, in order of appearance (source "text").

    Links are read whole (a link that is not a map link yields nothing, and its digits are not
    read as coordinates); the same position written twice is returned once."""
    spans: list[tuple[int, int, Point | None, str]] = []
    for m in _URL.finditer(text):
        spans.append((m.start(), m.end(), _url(m.group()), m.group().rstrip(".,;:!?")))
    taken = sorted((s, e) for s, e, _, _ in spans)   # never overlapping, so sorted by both

    def free(s: int, e: int) -> bool:
        i = bisect.bisect_left(taken, (e, -1))       # the spans that start before e…
        return i == 0 or taken[i - 1][1] <= s        # …must all end by s

    for regex, read in ((_LABELLED, _labelled), (_HEMISPHERE_PAIR, _hemisphere_pair),
                        (_DECIMAL_PAIR, _decimal_pair)):
        for m in regex.finditer(text):
            s, e = m.span()
            if not free(s, e):
                continue
            try:
                p = read(m, text)
            except ValueError:
                p = None
            if p is not None:
                spans.append((s, e, p, " ".join(m.group().split())))
                bisect.insort(taken, (s, e))
    out: list[Found] = []
    seen: set[tuple[float, float]] = set()
    for _, _, p, said in sorted(spans, key=lambda x: x[0]):
        if p is None:
            continue
        key = (round(p.lat, 7), round(p.lon, 7))
        if key not in seen:
            seen.add(key)
            out.append(Found(point=p, source="text", text=said))
    return out
