"""Which authority fixes this problem at this place: fault-report routing as data.

Who mends a pothole and who clears fly-tipping differs from town to town and, in two-tier
areas, from one problem to the next at the same spot (the county fixes roads, the district
collects bins). mailflow keeps that knowledge out of code, in three optional files in `rules/`:

- `categories.toml`: the kinds of problem, their keywords and the tier of authority that
  handles each;
- `areas.geojson`: each authority's boundary and the tiers it handles there;
- `gazetteer.csv`: places and postcodes a citizen may name instead of giving coordinates.

Routing is a real point-in-polygon test (shapely, with an STR-tree so hundreds of areas cost
nothing), and every decision carries its reasons, so an admin can see why a report went where
it did (`mailflow route`). Whatever cannot be decided safely — a point on two overlapping areas
of the same tier, two categories matching equally, far-apart positions in one message — is
returned undecided, for mailflow to ask the citizen or an admin rather than guess.

Pure: the parse_* functions take text (mailflow.rulesdir reads the files).
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import tomllib
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import shapely
from shapely.geometry import MultiPolygon, Point as ShapelyPoint, Polygon, shape
from shapely.validation import explain_validity, make_valid

from mailflow.core.geo import Found, Point, distance_m, find_coordinates
from mailflow.errors import RulesError

SAME_PLACE_M = 50.0   # positions this close together in one message are the same position
_SLUG_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_MAX_ID = 64          # the width of reports.category and reports.area in the database


# -- values ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Category:
    """A kind of problem citizens report, and the tier of authority that handles it."""
    slug: str                       # report+<slug>@domain
    name: str
    keywords: tuple[str, ...]       # whole words or phrases, any case, accents ignored
    tier: str                       # "county", "district"…: matched against Area.tiers
    description: str = ""


@dataclass(frozen=True)
class Area:
    """Where one authority handles some tiers of problem: a (Multi)Polygon in lon/lat.

    `geometry` is a valid shapely geometry, prepared for fast repeated tests; the archive can
    draw it (`geometry.exterior.coords` or `geometry.geoms`)."""
    id: str
    name: str
    authority: str                  # a slug in authorities.toml
    tiers: tuple[str, ...]
    geometry: Any = field(compare=False, repr=False)

    def describe(self) -> str:
        tiers = " and ".join(self.tiers) + (" tiers" if len(self.tiers) > 1 else " tier")
        return f"{self.name} (area {self.id}: authority {self.authority}, {tiers})"


@dataclass(frozen=True)
class Place:
    """A gazetteer entry: a place name or a postcode, and the position it stands for."""
    name: str
    point: Point
    kind: str                       # "place" | "postcode"


@dataclass(frozen=True)
class CategoryGuess:
    slug: str | None                # None: no category, or several equally likely
    candidates: tuple[str, ...]     # the slugs that matched best (one when decided)
    reason: str


@dataclass(frozen=True)
class LocationGuess:
    point: Point | None             # None: nothing found, or several far-apart positions
    source: str                     # "text" | "gazetteer" | "" (nothing found)
    text: str                       # what was read
    candidates: tuple[Found, ...]   # every position found
    reason: str


@dataclass(frozen=True)
class Route:
    """Where a report of `category` at a point goes, and why.

    - covered=False: no area contains the point (the site does not cover it);
    - authority=None, covered=True: areas contain it but none handles the category's tier,
      or (ambiguous=True) two areas of different authorities both do: a person decides.
    """
    authority: str | None
    area: Area | None
    category: str
    tier: str
    covered: bool
    reasons: tuple[str, ...]
    areas: tuple[Area, ...]         # every area containing the point, by id
    ambiguous: bool = False


class UnknownCategory(ValueError):
    """route() was given a slug that is not in categories.toml."""


# -- matching words ------------------------------------------------------------------------------
def normalise_words(text: str) -> str:
    """Lower case, accents removed, every run of non-letters a single space, padded with spaces:
    " hole in the road " — so a phrase matches as whole words by a substring test."""
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
    return " " + " ".join(re.findall(r"[^\W_]+", bare)) + " "


def _phrase_forms(keyword: str) -> tuple[str, ...]:
    """The keyword and its plural ("pothole" also matches "potholes", "street lights")."""
    k = normalise_words(keyword).strip()
    if not k:
        return ()
    return tuple(f" {f} " for f in dict.fromkeys((k, k + "s", k + "es")))


# -- the rules as one value ----------------------------------------------------------------------
@dataclass(frozen=True)
class ReportRules:
    """Everything fault reports need from rules/: categories, areas and the gazetteer."""
    categories: dict[str, Category]
    areas: tuple[Area, ...]
    gazetteer: tuple[Place, ...] = ()
    _tree: Any = field(init=False, repr=False, compare=False)
    _phrases: Any = field(init=False, repr=False, compare=False)
    _postcodes: Any = field(init=False, repr=False, compare=False)
    _places: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_tree", shapely.STRtree([a.geometry for a in self.areas]))
        # slug -> one tuple of forms per distinct keyword (the name and slug count as keywords)
        phrases = {c.slug: tuple({forms[0]: forms for k in (*c.keywords, c.name,
                                                           c.slug.replace("-", " "))
                                  if (forms := _phrase_forms(k))}.values())
                   for c in self.categories.values()}
        object.__setattr__(self, "_phrases", phrases)
        postcodes: dict[str, list[Place]] = {}
        places: list[tuple[str, Place]] = []
        for p in self.gazetteer:
            if p.kind == "postcode":
                postcodes.setdefault(_postcode_key(p.name), []).append(p)
            elif (n := normalise_words(p.name)).strip():
                places.append((n, p))
        object.__setattr__(self, "_postcodes", postcodes)
        object.__setattr__(self, "_places", places)

    def area(self, area_id: str) -> Area | None:
        return next((a for a in self.areas if a.id == area_id), None)

    def areas_at(self, point: Point) -> tuple[Area, ...]:
        """Every area whose boundary or inside holds the point, ordered by id."""
        pt = ShapelyPoint(point.lon, point.lat)
        hits = self._tree.query(pt, predicate="intersects")
        return tuple(sorted((self.areas[i] for i in hits), key=lambda a: a.id))

    def problems(self) -> list[str]:
        """Things that are not errors but will leave reports unrouted (for an admin to see)."""
        tiers = {t for a in self.areas for t in a.tiers}
        return [f"category {c.slug!r} is handled by the {c.tier!r} tier, which no area in "
                "areas.geojson has: its reports can never be routed"
                for c in self.categories.values() if c.tier not in tiers]

    # -- routing -----------------------------------------------------------------------------
    def route(self, point: Point, category: str) -> Route:
        """The authority that handles `category` at `point`, with a reason for each step.

        The area that handles the category's tier and contains the point wins. A point exactly
        on a shared boundary (inside neither area) goes to the area first by id, and the
        reasons say so. Two areas of different authorities whose insides both hold the point
        for the tier are a data problem: nobody is chosen (ambiguous=True)."""
        cat = self.categories.get(category)
        if cat is None:
            raise UnknownCategory(f"unknown category {category!r}; known: "
                                  f"{', '.join(sorted(self.categories)) or 'none'}")
        reasons = [f"{cat.name} ({cat.slug}) is handled by the {cat.tier} tier"]
        here = self.areas_at(point)
        if not here:
            reasons.append(f"no area contains {point}: the site does not cover it")
            return Route(None, None, cat.slug, cat.tier, False, tuple(reasons), ())
        reasons.append(f"{point} is in " + "; ".join(a.describe() for a in here))
        handling = [a for a in here if cat.tier in a.tiers]
        if not handling:
            reasons.append(f"none of them handles the {cat.tier} tier: nobody to send it to")
            return Route(None, None, cat.slug, cat.tier, True, tuple(reasons), here)
        pt = ShapelyPoint(point.lon, point.lat)
        inside = [a for a in handling if a.geometry.contains(pt)]
        if inside:
            chosen = inside
        elif len(handling) == 1:
            chosen = handling
            reasons.append(f"the point is on the edge of {handling[0].id}, which counts as "
                           "inside")
        else:
            chosen = handling
            reasons.append(f"the point is on the shared boundary of {_ids(handling)}; a "
                           f"point on a boundary goes to the area first by id, {handling[0].id}")
        authorities = sorted({a.authority for a in chosen})
        if inside and len(authorities) > 1:
            reasons.append(f"ambiguous: the areas {_ids(inside)} overlap here and all handle "
                           f"the {cat.tier} tier (authorities {', '.join(authorities)}); "
                           "a person must decide (fix areas.geojson)")
            return Route(None, None, cat.slug, cat.tier, True, tuple(reasons), here,
                         ambiguous=True)
        area = chosen[0]
        reasons.append(f"{area.name} ({area.id}) handles the {cat.tier} tier there: "
                       f"send it to {area.authority}")
        return Route(area.authority, area, cat.slug, cat.tier, True, tuple(reasons), here)

    # -- what the citizen meant ---------------------------------------------------------------
    def _match(self, text: str) -> dict[str, int]:
        """Category slug → how many different keywords the text holds for it.

        A match inside a longer match does not count ("road" inside "hole in the road", or
        "bin" inside "litter bin"), and the same words count once however many keywords they
        are ("bins" is both the keyword "bin" in the plural and the category's name)."""
        words = normalise_words(text)
        hits: list[tuple[int, int, str]] = []
        for slug, keywords in self._phrases.items():
            for forms in keywords:
                for form in forms:
                    start = words.find(form)
                    while start >= 0:
                        hits.append((start, start + len(form), slug))
                        start = words.find(form, start + 1)
        kept = {(slug, words[s:e].strip()) for s, e, slug in _outermost(hits)}
        scores: dict[str, int] = {}
        for slug, _ in kept:
            scores[slug] = scores.get(slug, 0) + 1
        return scores

    def detect_category(self, *, tag: str | None, subject: str, body: str) -> CategoryGuess:
        """The category from the address tag (report+pothole@), else the subject's keywords,
        else the body's. Two categories matching equally well is no answer: slug None, both in
        `candidates`, for mailflow to ask the citizen."""
        notes: list[str] = []
        if tag:
            t = tag.strip().lower()
            if t in self.categories:
                return CategoryGuess(t, (t,), f"the address names the category {t!r}")
            notes.append(f"the address names {t!r}, which is not a category")
            by_tag = self._best(self._match(t.replace("-", " ").replace("_", " ")))
            if len(by_tag) == 1:
                return CategoryGuess(by_tag[0], by_tag, "; ".join(
                    [*notes, f"but it is a keyword of {by_tag[0]!r}"]))
        tied: tuple[str, ...] = ()
        for where, text in (("subject", subject), ("body", body)):
            scores = self._match(text or "")
            if tied:   # the subject could not decide between these: let the body choose
                scores = {s: n for s, n in scores.items() if s in tied}
            best = self._best(scores)
            if len(best) == 1:
                words = "keywords" if scores[best[0]] > 1 else "a keyword"
                return CategoryGuess(best[0], best, "; ".join(
                    [*notes, f"the {where} has {words} of {best[0]!r}"]))
            if len(best) > 1 and not tied:
                tied = best
                notes.append(f"the {where} matches {', '.join(best)} equally")
        if tied:
            if len(notes) and "body" not in notes[-1]:
                notes.append("the body does not decide between them")
            return CategoryGuess(None, tied, "; ".join(notes) + ": ambiguous")
        notes.append("no category's keywords are in the subject or the body")
        return CategoryGuess(None, (), "; ".join(notes))

    @staticmethod
    def _best(scores: dict[str, int]) -> tuple[str, ...]:
        if not scores:
            return ()
        top = max(scores.values())
        return tuple(sorted(s for s, n in scores.items() if n == top))

    def locate(self, text: str) -> LocationGuess:
        """Where the text says the problem is: written coordinates or map links first, then a
        gazetteer postcode, then a gazetteer place. Several positions more than
        SAME_PLACE_M apart are ambiguous (point None, all of them in `candidates`)."""
        found = find_coordinates(text)
        if found:
            return _one(found, "coordinates")
        found = self._find_postcodes(text)
        if found:
            return _one(found, "postcode")
        found = self._find_places(text)
        if found:
            return _one(found, "place name")
        return LocationGuess(None, "", "", (), "no coordinates, map link, postcode or place "
                             "name in the message")

    def _find_postcodes(self, text: str) -> list[Found]:
        if not self._postcodes:
            return []
        tokens = re.findall(r"[A-Z0-9]+", text.upper())
        out: list[Found] = []
        i = 0
        while i < len(tokens):   # "SO23 8UJ" is two tokens; a full postcode beats its half
            pair = tokens[i] + tokens[i + 1] if i + 1 < len(tokens) else ""
            if pair and pair in self._postcodes:
                out += [Found(p.point, "gazetteer", p.name) for p in self._postcodes[pair]]
                i += 2
                continue
            out += [Found(p.point, "gazetteer", p.name) for p in self._postcodes.get(tokens[i], [])]
            i += 1
        return _distinct(out)

    def _find_places(self, text: str) -> list[Found]:
        words = normalise_words(text)
        spans: list[tuple[int, int, Place]] = []
        for name, place in self._places:
            start = words.find(name)
            while start >= 0:
                spans.append((start, start + len(name), place))
                start = words.find(name, start + 1)
        # "Upper Ashcombe" is not also "Ashcombe": a match inside a longer one is dropped
        return _distinct([Found(p.point, "gazetteer", p.name) for _, _, p in _outermost(spans)])


def _ids(areas: Collection[Area]) -> str:
    return ", ".join(a.id for a in areas)


def _postcode_key(name: str) -> str:
    return re.sub(r"\s+", "", name).upper()


def _distinct(found: list[Found]) -> list[Found]:
    return list(dict.fromkeys(found))


def _outermost(spans: list[tuple[int, int, Any]]) -> list[tuple[int, int, Any]]:
    """The spans not inside a longer one, in order (identical spans are all kept). One sort and
    one pass, so a hostile text full of keywords costs no more than its length."""
    out = []
    ordered = sorted(spans, key=lambda x: (x[0], -x[1]))
    end_before = -1          # the furthest end of the spans that start earlier
    i = 0
    while i < len(ordered):
        start = ordered[i][0]
        group_end = ordered[i][1]                     # the longest span starting here
        j = i
        while j < len(ordered) and ordered[j][0] == start:
            s, e, _ = ordered[j]
            if end_before < e and group_end == e:
                out.append(ordered[j])
            j += 1
        end_before = max(end_before, group_end)
        i = j
    return out


def _one(found: list[Found], what: str) -> LocationGuess:
    first = found[0]
    if all(distance_m(first.point, f.point) <= SAME_PLACE_M for f in found[1:]):
        extra = f" (and {len(found) - 1} more within {SAME_PLACE_M:g} m)" if len(found) > 1 else ""
        return LocationGuess(first.point, first.source, first.text, tuple(found),
                             f"{what} {first.text!r}: {first.point}{extra}")
    return LocationGuess(None, first.source, "", tuple(found),
                         f"ambiguous: {len(found)} different {what}s, more than "
                         f"{SAME_PLACE_M:g} m apart: " + "; ".join(f.text for f in found))


# -- parsing the files ---------------------------------------------------------------------------
_CATEGORY_KEYS = {"slug", "name", "keywords", "tier", "description"}


def parse_categories(text: str, source: str = "categories.toml") -> dict[str, Category]:
    """Every [[category]] in the text. A wrong entry is a RulesError naming file and entry."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RulesError(f"{source}: not valid TOML: {e}") from None
    extra = set(data) - {"category"}
    if extra:
        raise RulesError(f"{source}: unknown table(s) {', '.join(sorted(extra))}; "
                         "expected [[category]] tables")
    entries = data.get("category", [])
    if not isinstance(entries, list):
        raise RulesError(f"{source}: expected [[category]] tables")
    out: dict[str, Category] = {}
    for i, e in enumerate(entries, 1):
        where = f"{source}: category #{i}" + (
            f" ({e['slug']})" if isinstance(e.get("slug"), str) else "")
        unknown = set(e) - _CATEGORY_KEYS
        if unknown:
            raise RulesError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(_CATEGORY_KEYS))}")
        slug = _str(e, "slug", where)
        if not _SLUG_RE.match(slug) or len(slug) > _MAX_ID:
            raise RulesError(f"{where}: slug {slug!r} must be lower-case letters, digits and "
                             f"single hyphens (at most {_MAX_ID}): it is used in "
                             "report+<slug>@ addresses")
        if slug in out:
            raise RulesError(f"{where}: duplicate slug {slug!r}")
        tier = _str(e, "tier", where)
        if not _SLUG_RE.match(tier):
            raise RulesError(f"{where}: tier {tier!r} must be lower-case letters, digits and "
                             "hyphens, as in areas.geojson (e.g. \"county\")")
        keywords = e.get("keywords", [])
        if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
            raise RulesError(f"{where}: keywords must be a list of strings")
        for k in keywords:
            if not normalise_words(k).strip():
                raise RulesError(f"{where}: keyword {k!r} has no letters or digits to match")
        description = e.get("description", "")
        if not isinstance(description, str):
            raise RulesError(f"{where}: description must be a string")
        out[slug] = Category(slug=slug, name=_str(e, "name", where),
                             keywords=tuple(k.strip() for k in keywords), tier=tier,
                             description=description.strip())
    return out


def _str(e: dict[str, Any], key: str, where: str) -> str:
    if key not in e:
        raise RulesError(f"{where}: missing key {key!r}")
    v = e[key]
    if not isinstance(v, str) or not v.strip():
        raise RulesError(f"{where}: {key} must be a non-empty string, got {v!r}")
    return v.strip()


def _polygonal(geom: Any) -> Any:
    """Only the polygons of a geometry (make_valid may add lines where rings touched)."""
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    parts = [g for g in getattr(geom, "geoms", ()) if isinstance(g, (Polygon, MultiPolygon))]
    polys = [p for g in parts for p in (g.geoms if isinstance(g, MultiPolygon) else [g])]
    return MultiPolygon(polys) if polys else Polygon()


def parse_areas(text: str, source: str = "areas.geojson",
                authorities: Collection[str] = ()) -> tuple[Area, ...]:
    """The Features of a GeoJSON FeatureCollection as areas, checked: Polygon or MultiPolygon
    in lon/lat, unique ids, a known authority, at least one tier. A self-intersecting polygon
    is repaired (shapely's make_valid) rather than refused; one that leaves nothing is an
    error."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RulesError(f"{source}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("type") != "FeatureCollection":
        raise RulesError(f"{source}: expected a GeoJSON FeatureCollection")
    features = data.get("features")
    if not isinstance(features, list):
        raise RulesError(f"{source}: a FeatureCollection needs a \"features\" list")
    out: list[Area] = []
    seen: set[str] = set()
    for i, f in enumerate(features, 1):
        where = f"{source}: feature #{i}"
        if not isinstance(f, dict) or f.get("type") != "Feature":
            raise RulesError(f"{where}: expected a GeoJSON Feature")
        props = f.get("properties")
        if not isinstance(props, dict):
            raise RulesError(f"{where}: needs properties {{id, name, authority, tiers}}")
        area_id = props.get("id", f.get("id"))
        if isinstance(area_id, str):
            where += f" ({area_id})"
        if not isinstance(area_id, str) or not _SLUG_RE.match(area_id) or len(area_id) > _MAX_ID:
            raise RulesError(f"{where}: properties.id must be lower-case letters, digits and "
                             f"hyphens (at most {_MAX_ID}), got {area_id!r}")
        if area_id in seen:
            raise RulesError(f"{where}: duplicate id {area_id!r}")
        seen.add(area_id)
        name = props.get("name")
        if not isinstance(name, str) or not name.strip():
            raise RulesError(f"{where}: properties.name must be a non-empty string")
        authority = props.get("authority")
        if not isinstance(authority, str) or authority not in authorities:
            raise RulesError(f"{where}: authority {authority!r} is not a slug in "
                             f"authorities.toml; known: {', '.join(sorted(authorities)) or 'none'}"
                             " (a site that takes no fault reports can remove categories.toml)")
        tiers = props.get("tiers")
        if (not isinstance(tiers, list) or not tiers
                or not all(isinstance(t, str) and _SLUG_RE.match(t) for t in tiers)):
            raise RulesError(f"{where}: properties.tiers must be a non-empty list of tiers "
                             f"such as [\"county\", \"district\"], got {tiers!r}")
        out.append(Area(id=area_id, name=name.strip(), authority=authority,
                        tiers=tuple(dict.fromkeys(tiers)), geometry=_geometry(f, where)))
    return tuple(out)


def _geometry(feature: dict[str, Any], where: str) -> Any:
    g = feature.get("geometry")
    if not isinstance(g, dict) or g.get("type") not in ("Polygon", "MultiPolygon"):
        kind = g.get("type") if isinstance(g, dict) else g
        raise RulesError(f"{where}: geometry must be a Polygon or MultiPolygon, got {kind!r}")
    try:
        geom = shape(g)
    except Exception as e:   # shapely raises several kinds for malformed coordinates
        raise RulesError(f"{where}: geometry is not a valid {g['type']}: {e}") from None
    if geom.is_empty:
        raise RulesError(f"{where}: geometry is empty")
    minx, miny, maxx, maxy = geom.bounds
    if not all(math.isfinite(v) for v in geom.bounds) or minx < -180 or maxx > 180 \
            or miny < -90 or maxy > 90:
        raise RulesError(f"{where}: coordinates must be [longitude, latitude] within "
                         f"±180 and ±90, got bounds {geom.bounds}")
    if not geom.is_valid:
        problem = explain_validity(geom)
        geom = _polygonal(make_valid(geom))
        if geom.is_empty or geom.area == 0:
            raise RulesError(f"{where}: geometry is not a valid polygon ({problem}) and "
                             "cannot be repaired")
    shapely.prepare(geom)
    return geom


_GAZETTEER_HEADER = ["name", "lat", "lon", "kind"]


def parse_gazetteer(text: str, source: str = "gazetteer.csv") -> tuple[Place, ...]:
    """Rows `name,lat,lon,kind` (kind: place | postcode) after that header line."""
    rows = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    try:
        header = next(rows, None)
        if header is None or [h.strip().lower() for h in header] != _GAZETTEER_HEADER:
            raise RulesError(f"{source}: the first line must be the header "
                             f"{','.join(_GAZETTEER_HEADER)}, got {','.join(header or [])!r}")
        out: list[Place] = []
        for row in rows:
            line = rows.line_num
            if not row or all(not c.strip() for c in row):
                continue
            where = f"{source}: line {line}"
            if len(row) != 4:
                raise RulesError(f"{where}: expected 4 columns (name,lat,lon,kind), "
                                 f"got {len(row)}")
            name, lat, lon, kind = (c.strip() for c in row)
            if not name:
                raise RulesError(f"{where}: the name is empty")
            where += f" ({name})"
            kind = kind.lower()
            if kind not in ("place", "postcode"):
                raise RulesError(f"{where}: kind must be place or postcode, got {kind!r}")
            try:
                point = Point(float(lat), float(lon))
            except ValueError as e:
                raise RulesError(f"{where}: lat,lon must be decimal degrees ({e})") from None
            out.append(Place(name=name, point=point, kind=kind))
    except csv.Error as e:
        raise RulesError(f"{source}: line {rows.line_num}: not valid CSV: {e}") from None
    return tuple(out)
