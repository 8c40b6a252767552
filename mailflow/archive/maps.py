"""Maps as small inline SVGs drawn from the site's own boundary data: no tiles, no script.

A fault report's page shows where it is, and an area's list where its reports are, without a
tile server: a reader's browser asks no other host for anything (a map tile would tell a third
party which report they read), the page passes its Content Security Policy, and it prints. The
drawing is the boundary data in `rules/areas.geojson` — the report's area outlined, its
neighbours lightly — with a pin at the point and a scale bar.

The projection is equirectangular with longitude scaled by cos(latitude) at the middle of the
frame: over the few kilometres of a town the distortion is far below a pixel, and it keeps the
arithmetic simple enough to check in a test (a pin drawn inside its area's outline). Outlines
are clipped to the frame and simplified to half a pixel, so a county boundary with a hundred
thousand points costs the page a few kilobytes. Colours come from classes in style.css, with
presentation attributes as a fallback (the CSP forbids inline `style`, not attributes).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import shapely
from markupsafe import Markup, escape
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

SIZE = 560            # the longer side of a map, in SVG units (px at 100%)
MIN_SIDE = 220        # the shorter side is never less than this: the frame widens instead
MARGIN = 14
METRES_PER_DEGREE = 6371008.8 * math.pi / 180     # mean Earth radius
MAX_PINS = 2000       # an overview map shows at most this many (the newest); the list has all
_NICE = (1, 2, 5)
_FALLBACK = {"focus": ("#eef3fb", "#0b57d0"), "neighbour": ("none", "#9aa0a6")}
_PIN_FILL = {"here": "#b3261e", "open": "#b3261e", "fixed": "#2e7d32", "other": "#5f6368"}
# A map pin with its tip at (0, 0), PIN_HEIGHT units tall.
PIN_HEIGHT = 30
_PIN_PATH = "M0 0C-2-7-10-12-10-20a10 10 0 1 1 20 0c0 8-8 13-10 20z"


@dataclass(frozen=True)
class Outline:
    """One area's boundary: a shapely Polygon or MultiPolygon in (lon, lat)."""
    id: str
    name: str
    geometry: BaseGeometry


@dataclass(frozen=True)
class Pin:
    lat: float
    lon: float
    kind: str = "here"        # "here" (the report's own point), "open", "fixed", "other"
    label: str = ""           # the pin's <title>
    href: str | None = None   # a link from the pin (relative to the page)


def geometry_of(area: Any) -> BaseGeometry | None:
    """The shapely geometry of an `Area` (routing keeps it prepared: the original is
    `.context` on a PreparedGeometry, or the geometry itself with shapely 2's in-place
    preparation)."""
    g = getattr(area, "geometry", None)
    g = getattr(g, "context", g)
    return g if isinstance(g, (Polygon, MultiPolygon)) and not g.is_empty else None


@dataclass(frozen=True)
class Projection:
    """Degrees (lon, lat) to SVG units, north up, for one frame."""
    west: float
    north: float
    k: float           # cos(latitude of the frame's middle)
    scale: float       # SVG units per projected unit (a degree of latitude)
    width: int
    height: int

    @classmethod
    def fit(cls, bounds: tuple[float, float, float, float], top: int = MARGIN) -> "Projection":
        """The projection that shows `bounds` (west, south, east, north) whole, the longer
        side SIZE units long; a thin frame is widened about its middle to MIN_SIDE. `top`:
        the margin above, room for a pin standing on the northernmost point."""
        west, south, east, north = bounds
        k = math.cos(math.radians((south + north) / 2))
        dx, dy = max((east - west) * k, 1e-9), max(north - south, 1e-9)
        scale = (SIZE - 2 * MARGIN) / max(dx, dy)
        inner = MIN_SIDE - 2 * MARGIN
        if dx * scale < inner:
            extra = (inner / scale - dx) / k / 2
            west, east, dx = west - extra, east + extra, inner / scale
        if dy * scale < inner:
            extra = (inner / scale - dy) / 2
            south, north, dy = south - extra, north + extra, inner / scale
        return cls(west - MARGIN / scale / k, north + top / scale, k, scale,
                   round(dx * scale + 2 * MARGIN), round(dy * scale + MARGIN + top))

    def xy(self, lon: float, lat: float) -> tuple[float, float]:
        return (lon - self.west) * self.k * self.scale, (self.north - lat) * self.scale

    def project(self, geom: BaseGeometry) -> BaseGeometry:
        """A geometry in SVG units, clipped a little beyond the frame and simplified to half a
        unit (what a screen cannot show is not sent)."""
        coords = shapely.transform(geom, lambda a: (a - (self.west, self.north))
                                   * (self.k * self.scale, -self.scale))
        pad = 4 * MARGIN
        clipped = shapely.clip_by_rect(coords, -pad, -pad, self.width + pad, self.height + pad)
        return clipped.simplify(0.5, preserve_topology=True)

    @property
    def metres_per_unit(self) -> float:
        return METRES_PER_DEGREE / self.scale


def _num(v: float) -> str:
    s = f"{v:.1f}"
    return s[:-2] if s.endswith(".0") else s


def path_data(geom: BaseGeometry) -> str:
    """SVG path data for a (projected) polygon or multipolygon, every ring closed; holes
    are cut out by the path's even-odd fill rule."""
    parts = []
    polygons = getattr(geom, "geoms", [geom])
    for poly in polygons:
        if not isinstance(poly, Polygon) or poly.is_empty:
            continue
        for ring in (poly.exterior, *poly.interiors):
            pts = list(ring.coords)[:-1]
            if len(pts) < 3:
                continue
            head, rest = pts[0], pts[1:]
            parts.append(f"M{_num(head[0])} {_num(head[1])}L"
                         + " ".join(f"{_num(x)} {_num(y)}" for x, y in rest) + "Z")
    return "".join(parts)


def scale_bar(proj: Projection) -> tuple[float, str]:
    """(length in SVG units, label) of a round distance about a quarter of the map's width."""
    target = proj.width / 4 * proj.metres_per_unit
    exp = math.floor(math.log10(target))
    metres = max(n * 10 ** exp for n in _NICE if n * 10 ** exp <= target)
    label = f"{metres / 1000:g} km" if metres >= 1000 else f"{metres:g} m"
    return metres / proj.metres_per_unit, label


def _bounds(outlines: Iterable[Outline], pins: Iterable[Pin]) -> tuple[float, float, float, float]:
    boxes = [o.geometry.bounds for o in outlines]
    boxes += [(p.lon, p.lat, p.lon, p.lat) for p in pins]
    if not boxes:
        return (-0.01, -0.01, 0.01, 0.01)
    west, south = min(b[0] for b in boxes), min(b[1] for b in boxes)
    east, north = max(b[2] for b in boxes), max(b[3] for b in boxes)
    if east - west < 0.002 and north - south < 0.002:    # a point alone: a few hundred metres
        west, east, south, north = west - 0.004, east + 0.004, south - 0.003, north + 0.003
    return west, south, east, north


def _outline(o: Outline, proj: Projection, role: str, label: bool) -> str:
    d = path_data(proj.project(o.geometry))
    if not d:
        return ""
    fill, stroke = _FALLBACK[role]
    out = (f'<path class="area area-{role}" data-area="{escape(o.id)}" d="{d}" '
           f'fill="{fill}" stroke="{stroke}" fill-rule="evenodd"><title>{escape(o.name)}</title>'
           "</path>")
    if label:
        p = o.geometry.representative_point()
        x, y = proj.xy(p.x, p.y)
        if 0 <= x <= proj.width and 0 <= y <= proj.height:
            out += (f'<text class="area-label" x="{_num(x)}" y="{_num(y)}" '
                    f'text-anchor="middle">{escape(o.name)}</text>')
    return out


def _pin(p: Pin, proj: Projection, big: bool) -> str:
    x, y = proj.xy(p.lon, p.lat)
    title = f"<title>{escape(p.label)}</title>" if p.label else ""
    fill = _PIN_FILL.get(p.kind, _PIN_FILL["other"])
    if big:
        mark = (f'<g class="pin pin-{escape(p.kind)}" transform="translate({_num(x)} {_num(y)})" '
                f'data-lat="{p.lat:.6f}" data-lon="{p.lon:.6f}">{title}'
                f'<path d="{_PIN_PATH}" fill="{fill}" stroke="#fff" stroke-width="1.5"/>'
                '<circle cx="0" cy="-20" r="4" fill="#fff"/></g>')
    else:
        mark = (f'<circle class="pin pin-{escape(p.kind)}" cx="{_num(x)}" cy="{_num(y)}" r="5" '
                f'fill="{fill}" stroke="#fff" stroke-width="1.5">{title}</circle>')
    if p.href:
        # Not focusable: the same links are in the list beside the map, where a keyboard
        # or a screen reader finds them (the map itself is one image to them).
        return f'<a href="{escape(p.href)}" tabindex="-1">{mark}</a>'
    return mark


def draw(*, focus: Sequence[Outline], others: Sequence[Outline] = (), pins: Sequence[Pin] = (),
         title: str, desc: str, map_id: str, labels: bool = False, big_pins: bool = True,
         layers: dict[Any, tuple[Projection, str]] | None = None) -> Markup:
    """A map framed on `focus` and `pins` (the outlines drawn strongly), with `others` drawn
    lightly (lines only) and `pins` on top.

    `title` and `desc` are the accessible name and description (translated by the caller,
    which also states the same facts in words beside the map). `layers`: a cache of outlines
    already projected for a frame, shared between the maps of one build."""
    pins = list(pins)
    bounds = _bounds(focus, pins)
    key = (tuple(o.id for o in focus), tuple(o.id for o in others), bounds, labels, big_pins)
    if layers is not None and key in layers:
        proj, drawn = layers[key]
    else:
        proj = Projection.fit(bounds, top=PIN_HEIGHT + 4 if big_pins else MARGIN)
        # The neighbours over the focus: its fill would hide a district boundary inside it.
        drawn = "".join([_outline(o, proj, "focus", labels) for o in focus]
                        + [_outline(o, proj, "neighbour", labels) for o in others])
        if layers is not None:
            layers[key] = (proj, drawn)
    # The first MAX_PINS (callers give the newest first); open ones drawn last, on top.
    shown_pins = sorted(pins[:MAX_PINS], key=lambda p: p.kind in ("open", "here"))
    length, words = scale_bar(proj)
    h = proj.height
    cid = escape(map_id)
    body = [f'<rect class="map-sea" x="0" y="0" width="{proj.width}" height="{h}" fill="#fafafa"/>']
    body.append(drawn)
    body += [_pin(p, proj, big_pins) for p in shown_pins]
    bx, by = 10, h - 12
    body.append(
        f'<g class="scale" data-metres="{words}" data-length="{_num(length)}">'
        f'<rect x="{bx - 4}" y="{by - 16}" width="{_num(length + 8 + 6 * len(words))}" '
        f'height="22" fill="#fff" opacity="0.85"/>'
        f'<path d="M{bx} {by - 5}V{by}H{_num(bx + length)}V{by - 5}" fill="none" '
        f'stroke="#1b1b1b" stroke-width="1.5"/>'
        f'<text x="{_num(bx + length + 4)}" y="{by}" class="scale-label">{words}</text></g>')
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" class="map" id="{cid}" role="img" '
        f'viewBox="0 0 {proj.width} {h}" width="{proj.width}" height="{h}" '
        f'aria-labelledby="{cid}-title {cid}-desc">'
        f'<title id="{cid}-title">{escape(title)}</title>'
        f'<desc id="{cid}-desc">{escape(desc)}</desc>'
        + "".join(body) + "</svg>")

