"""Fault-report routing over a small two-tier fixture map (tests/fixtures/geo/): point in
polygon, boundaries, holes, overlaps; category detection; locating a report; and rules files
that are wrong are reported by file and entry."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailflow.core.geo import Point
from mailflow.core.routing import (ReportRules, UnknownCategory, normalise_words, parse_areas,
                                   parse_categories, parse_gazetteer)
from mailflow.core.rules import check_report_contacts, parse_authorities, parse_laws
from mailflow.errors import RulesError
from mailflow.rulesdir import load_report_rules, load_rules

ROOT = Path(__file__).resolve().parent.parent
GEO = ROOT / "tests" / "fixtures" / "geo"
AUTHORITIES = {"shire", "westdale", "eastdale", "city", "isles"}


@pytest.fixture(scope="module")
def rules() -> ReportRules:
    return ReportRules(
        categories=parse_categories((GEO / "categories.toml").read_text()),
        areas=parse_areas((GEO / "areas.geojson").read_text(), "areas.geojson", AUTHORITIES),
        gazetteer=parse_gazetteer((GEO / "gazetteer.csv").read_text()))


# -- routing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("lat, lon, category, authority, area", [
    (50.5, 10.5, "pothole", "shire", "shire"),        # two tiers: the county fixes roads…
    (50.5, 10.5, "bins", "westdale", "westdale"),     # …and the district collects bins
    (50.5, 11.5, "street-light", "shire", "shire"),
    (50.5, 11.5, "fly-tipping", "eastdale", "eastdale"),
    (50.2, 12.2, "pothole", "city", "city"),          # a unitary authority does both
    (50.2, 12.2, "bins", "city", "city"),
    (50.2, 14.2, "bins", "isles", "isles"),           # either part of a MultiPolygon
    (50.2, 15.2, "pothole", "isles", "isles"),
])
def test_point_in_polygon(rules: ReportRules, lat: float, lon: float, category: str,
                          authority: str, area: str) -> None:
    r = rules.route(Point(lat, lon), category)
    assert (r.authority, r.area.id if r.area else None, r.covered) == (authority, area, True)
    assert r.category == category and r.tier == rules.categories[category].tier
    assert not r.ambiguous
    assert any(authority in reason for reason in r.reasons)


def test_every_area_at_the_point_is_listed(rules: ReportRules) -> None:
    r = rules.route(Point(50.5, 10.5), "bins")
    assert [a.id for a in r.areas] == ["shire", "westdale"]
    assert r.reasons[0] == "Bins (bins) is handled by the district tier"
    assert "Westdale (area westdale: authority westdale, district tier)" in r.reasons[1]


@pytest.mark.parametrize("lat, lon", [
    (49.9, 10.5),     # south of everything
    (50.5, 14.7),     # between the two isles
    (50.5, 12.5),     # in the hole of the city's polygon
])
def test_not_covered(rules: ReportRules, lat: float, lon: float) -> None:
    r = rules.route(Point(lat, lon), "pothole")
    assert (r.authority, r.area, r.covered, r.areas) == (None, None, False, ())
    assert "the site does not cover it" in r.reasons[-1]


def test_a_shared_boundary_gives_one_answer_and_says_why(rules: ReportRules) -> None:
    # lon 11 is the line between Westdale and Eastdale: the district goes to the first by id
    for _ in range(3):
        r = rules.route(Point(50.5, 11.0), "bins")
        assert r.authority == "eastdale" and r.area and r.area.id == "eastdale"
    assert "shared boundary of eastdale, westdale" in r.reasons[-2]
    assert "first by id, eastdale" in r.reasons[-2]
    # the county is the same on both sides: inside it, not on its edge
    assert rules.route(Point(50.5, 11.0), "pothole").authority == "shire"
    # lon 12: the county's edge and the city's edge
    r = rules.route(Point(50.5, 12.0), "pothole")
    assert r.authority == "city" and "shared boundary of city, shire" in r.reasons[-2]
    # the outer edge of the map counts as inside
    r = rules.route(Point(50.0, 10.5), "bins")
    assert r.authority == "westdale" and "on the edge of westdale" in r.reasons[-2]


def test_no_area_here_handles_the_tier() -> None:
    areas = parse_areas(json.dumps(_collection(("shire", "shire", ["county"], SQUARE))),
                        "areas.geojson", AUTHORITIES)
    rules = ReportRules(parse_categories((GEO / "categories.toml").read_text()), areas)
    r = rules.route(Point(50.5, 10.5), "bins")
    assert (r.authority, r.covered, [a.id for a in r.areas]) == (None, True, ["shire"])
    assert "none of them handles the district tier" in r.reasons[-1]
    assert rules.problems() == [
        "category 'fly-tipping' is handled by the 'district' tier, which no area in "
        "areas.geojson has: its reports can never be routed",
        "category 'bins' is handled by the 'district' tier, which no area in areas.geojson "
        "has: its reports can never be routed"]


def test_overlapping_areas_of_one_tier_are_left_to_a_person() -> None:
    other = [[[10.5, 50], [11.5, 50], [11.5, 51], [10.5, 51], [10.5, 50]]]
    areas = parse_areas(json.dumps(_collection(("shire", "shire", ["county"], SQUARE),
                                               ("westdale", "westdale", ["county"], other))),
                        "areas.geojson", AUTHORITIES)
    rules = ReportRules(parse_categories((GEO / "categories.toml").read_text()), areas)
    r = rules.route(Point(50.5, 10.7), "pothole")
    assert (r.authority, r.area, r.covered, r.ambiguous) == (None, None, True, True)
    assert r.reasons[-1].startswith("ambiguous: the areas shire, westdale overlap here")
    # outside the overlap each one is its own
    assert rules.route(Point(50.5, 10.2), "pothole").authority == "shire"
    assert rules.route(Point(50.5, 11.3), "pothole").authority == "westdale"


def test_overlapping_areas_of_one_authority_are_not_ambiguous() -> None:
    other = [[[10.5, 50], [11.5, 50], [11.5, 51], [10.5, 51], [10.5, 50]]]
    areas = parse_areas(json.dumps(_collection(("a", "shire", ["county"], SQUARE),
                                               ("b", "shire", ["county"], other))),
                        "areas.geojson", AUTHORITIES)
    rules = ReportRules(parse_categories((GEO / "categories.toml").read_text()), areas)
    r = rules.route(Point(50.5, 10.7), "pothole")
    assert (r.authority, r.area.id if r.area else None, r.ambiguous) == ("shire", "a", False)


def test_an_unknown_category_is_an_error(rules: ReportRules) -> None:
    with pytest.raises(UnknownCategory, match="unknown category 'potholes'; known: bins, "):
        rules.route(Point(50.5, 10.5), "potholes")


def test_routing_among_many_areas() -> None:
    # 400 districts in a 20 × 20 grid and one county over them all
    features = [("county", "shire", ["county"],
                 [[[0, 40], [20, 40], [20, 60], [0, 60], [0, 40]]])]
    for i in range(20):
        for j in range(20):
            x, y = i, 40 + j
            features.append((f"d-{i}-{j}", "westdale" if (i + j) % 2 else "eastdale",
                             ["district"],
                             [[[x, y], [x + 1, y], [x + 1, y + 1], [x, y + 1], [x, y]]]))
    areas = parse_areas(json.dumps(_collection(*features)), "areas.geojson", AUTHORITIES)
    rules = ReportRules(parse_categories((GEO / "categories.toml").read_text()), areas)
    for i in range(20):
        for j in range(20):
            r = rules.route(Point(40 + j + 0.5, i + 0.5), "bins")
            assert r.area and r.area.id == f"d-{i}-{j}"
            assert [a.id for a in r.areas] == ["county", f"d-{i}-{j}"]


# -- what the citizen meant --------------------------------------------------------------------
@pytest.mark.parametrize("tag, subject, body, slug, says", [
    ("pothole", "Big problem", "", "pothole", "the address names the category 'pothole'"),
    ("Street-Light", "", "", "street-light", "the address names"),
    ("lamp-post", "", "", "street-light", "'lamp-post', which is not a category; but it is a "
                                          "keyword of 'street-light'"),
    ("potholez", "Dumped rubbish", "", "fly-tipping", "'potholez', which is not a category; "
                                                      "the subject has a keyword"),
    (None, "Huge POTHOLES on Mill Lane", "the lamp post", "pothole", "the subject has a keyword"),
    (None, "Please help", "There is a hole in the road by the school", "pothole",
     "the body has a keyword of 'pothole'"),
    (None, "Problem", "Street light out; also the street lights on Elm Road and a lamp post",
     "street-light", "the body has keywords of 'street-light'"),
    (None, "Fly tipping", "", "fly-tipping", "subject"),        # hyphen or space alike
    (None, "fly‑tipping again", "", "fly-tipping", "subject"),  # a non-breaking hyphen
    (None, "Missed collection and dumped rubbish", "dumped rubbish by the bins, fly-tipping",
     "fly-tipping", "the subject matches bins, fly-tipping equally; the body has keywords"),
])
def test_detect_category(rules: ReportRules, tag: str | None, subject: str, body: str,
                         slug: str, says: str) -> None:
    guess = rules.detect_category(tag=tag, subject=subject, body=body)
    assert guess.slug == slug and guess.candidates == (slug,)
    assert says in guess.reason, guess.reason


def test_detect_category_undecided(rules: ReportRules) -> None:
    guess = rules.detect_category(tag=None, subject="Pothole next to a bin", body="")
    assert (guess.slug, guess.candidates) == (None, ("bins", "pothole"))
    assert guess.reason == ("the subject matches bins, pothole equally; the body does not "
                            "decide between them: ambiguous")
    guess = rules.detect_category(tag=None, subject="Problem", body="a street light and a bin")
    assert (guess.slug, guess.candidates) == (None, ("bins", "street-light"))
    guess = rules.detect_category(tag="nothing", subject="Hello", body="Something is broken.")
    assert (guess.slug, guess.candidates) == (None, ())
    assert "not a category" in guess.reason and "no category's keywords" in guess.reason


def test_keywords_are_whole_words(rules: ReportRules) -> None:
    # "bin" is not in "cabinet", "binoculars" or "robin"
    for text in ("the cabinet is broken", "I lost my binoculars", "robin redbreast"):
        assert rules.detect_category(tag=None, subject=text, body="").slug is None, text
    assert normalise_words("Ça déborde — Crème BRÛLÉE!") == " ca deborde creme brulee "


def test_accents_are_ignored() -> None:
    cats = parse_categories('[[category]]\nslug = "nids"\nname = "Nid-de-poule"\n'
                            'keywords = ["nid-de-poule", "chaussée abîmée"]\ntier = "county"\n')
    rules = ReportRules(cats, ())
    assert rules.detect_category(tag=None, subject="Chaussee abimee rue Haute", body="").slug == "nids"
    assert rules.detect_category(tag=None, subject="NID DE POULE !", body="").slug == "nids"
    assert rules.detect_category(tag=None, subject="Une poule", body="").slug is None


@pytest.mark.parametrize("text, lat, lon, source", [
    ("It is at 50.5123, 10.5123 by the gate", 50.5123, 10.5123, "text"),
    ("https://www.openstreetmap.org/?mlat=50.5&mlon=11.5", 50.5, 11.5, "text"),
    ("Outside number 4, WD1 2AB", 50.51, 10.51, "gazetteer"),
    ("postcode wd12ab", 50.51, 10.51, "gazetteer"),
    ("in ED9 9ZZ near Westford", 50.52, 11.52, "gazetteer"),     # a postcode beats a place
    ("just ED9 somewhere", 50.6, 11.6, "gazetteer"),            # an outward code on its own
    ("the road into Westford", 50.5, 10.5, "gazetteer"),
    ("the road into WESTFORD.", 50.5, 10.5, "gazetteer"),
    ("up in Upper Westford", 50.7, 10.3, "gazetteer"),          # not also "Westford"
    ("Saint Etienne la Ville, rue Haute", 50.2, 12.2, "gazetteer"),
    ("51.5014, -0.1419 — i.e. 51.50141, -0.14191", 51.5014, -0.1419, "text"),   # 1.4 m apart
])
def test_locate(rules: ReportRules, text: str, lat: float, lon: float, source: str) -> None:
    guess = rules.locate(text)
    assert guess.point == Point(lat, lon), guess.reason
    assert guess.source == source and guess.candidates


def test_locate_undecided(rules: ReportRules) -> None:
    guess = rules.locate("between 50.5123, 10.5123 and 50.6123, 10.6123")
    assert guess.point is None and len(guess.candidates) == 2
    assert guess.reason.startswith("ambiguous: 2 different coordinates")
    guess = rules.locate("from Westford to Eastbury")
    assert guess.point is None and [c.text for c in guess.candidates] == ["Westford", "Eastbury"]
    guess = rules.locate("the corner of Mill Lane; Westfordshire; Eastburyton")
    assert (guess.point, guess.source, guess.candidates) == (None, "", ())
    assert guess.reason == "no coordinates, map link, postcode or place name in the message"


# -- the files ---------------------------------------------------------------------------------
SQUARE = [[[10, 50], [11, 50], [11, 51], [10, 51], [10, 50]]]


def _collection(*features: tuple) -> dict:   # type: ignore[type-arg]
    return {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"id": i, "name": i.title(), "authority": a, "tiers": t},
         "geometry": {"type": "MultiPolygon" if isinstance(c[0][0][0], list) else "Polygon",
                      "coordinates": c}}
        for i, a, t, c in features]}


def test_the_fixture_and_the_shipped_rules_load() -> None:
    laws = parse_laws((ROOT / "rules" / "laws.toml").read_text())
    authorities = parse_authorities((GEO / "authorities.toml").read_text(), laws, "uk-foia")
    rules = load_report_rules(GEO, authorities)
    assert rules and [a.id for a in rules.areas] == ["shire", "westdale", "eastdale", "city", "isles"]
    assert authorities["shire"].report_contact("street-light") == "lights@shire.example"
    assert authorities["shire"].report_contact("pothole") == "roads@shire.example"
    assert authorities["westdale"].report_contact("bins") == "foi@westdale.example"
    assert authorities["isles"].report_contact("bins") is None
    shipped = load_rules(ROOT / "rules", "uk-foia")
    assert shipped.reports and shipped.reports.problems() == []
    assert set(shipped.reports.categories) == {"pothole", "street-light", "fly-tipping", "bins",
                                               "graffiti"}
    # every gazetteer entry of the example lies in one of its areas
    for place in shipped.reports.gazetteer:
        assert shipped.reports.areas_at(place.point), place


def test_a_site_without_categories_has_no_fault_reports(tmp_path: Path) -> None:
    (tmp_path / "areas.geojson").write_text("not even JSON")     # not read without categories
    assert load_report_rules(tmp_path, {}) is None
    (tmp_path / "categories.toml").write_text((GEO / "categories.toml").read_text())
    (tmp_path / "areas.geojson").unlink()
    with pytest.raises(RulesError, match=r"areas\.geojson: missing"):
        load_report_rules(tmp_path, {})


def _areas_error(doc: object) -> str:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(RulesError) as e:
        parse_areas(text, "/site/rules/areas.geojson", AUTHORITIES)
    assert str(e.value).startswith("/site/rules/areas.geojson: ")
    return str(e.value)


def test_broken_geojson_is_named() -> None:
    assert "not valid JSON" in _areas_error('{"type": "FeatureCollection", ')
    assert "expected a GeoJSON FeatureCollection" in _areas_error({"type": "Feature"})
    assert "needs a \"features\" list" in _areas_error({"type": "FeatureCollection"})
    good = _collection(("shire", "shire", ["county"], SQUARE))
    f = good["features"][0]

    def broken(**changes: object) -> dict:   # type: ignore[type-arg]
        props = {**f["properties"], **{k: v for k, v in changes.items() if k != "geometry"}}
        return {"type": "FeatureCollection", "features": [
            {**f, "properties": props, "geometry": changes.get("geometry", f["geometry"])}]}

    assert "feature #1 (shire): authority 'nowhere' is not a slug in authorities.toml; " \
           "known: city, eastdale, isles, shire, westdale" in _areas_error(broken(authority="nowhere"))
    assert "feature #1: properties.id must be" in _areas_error(broken(id=None))
    assert "feature #1 (Shire): properties.id must be" in _areas_error(broken(id="Shire"))
    assert "properties.tiers must be a non-empty list" in _areas_error(broken(tiers=[]))
    assert "properties.tiers must be a non-empty list" in _areas_error(broken(tiers="county"))
    assert "properties.name must be" in _areas_error(broken(name=""))
    assert "geometry must be a Polygon or MultiPolygon, got 'Point'" in _areas_error(
        broken(geometry={"type": "Point", "coordinates": [10, 50]}))
    assert "geometry must be a Polygon or MultiPolygon, got None" in _areas_error(
        broken(geometry=None))
    assert "geometry is not a valid Polygon" in _areas_error(
        broken(geometry={"type": "Polygon", "coordinates": [[[10, 50], [11]]]}))
    assert "geometry is not a valid Polygon" in _areas_error(
        broken(geometry={"type": "Polygon", "coordinates": "nope"}))
    assert "geometry is empty" in _areas_error(
        broken(geometry={"type": "Polygon", "coordinates": []}))
    assert "coordinates must be [longitude, latitude]" in _areas_error(
        broken(geometry={"type": "Polygon", "coordinates": [[[10, 95], [11, 95], [11, 96],
                                                             [10, 95]]]}))
    assert "cannot be repaired" in _areas_error(           # a ring with no area
        broken(geometry={"type": "Polygon", "coordinates": [[[10, 50], [11, 50], [12, 50],
                                                             [10, 50]]]}))
    two = {"type": "FeatureCollection", "features": [f, f]}
    assert "feature #2 (shire): duplicate id 'shire'" in _areas_error(two)


def test_a_self_intersecting_polygon_is_repaired() -> None:
    bowtie = [[[10, 50], [11, 51], [11, 50], [10, 51], [10, 50]]]
    (area,) = parse_areas(json.dumps(_collection(("shire", "shire", ["county"], bowtie))),
                          "areas.geojson", AUTHORITIES)
    assert area.geometry.is_valid and area.geometry.area == pytest.approx(0.5)
    rules = ReportRules(parse_categories((GEO / "categories.toml").read_text()), (area,))
    assert rules.route(Point(50.5, 10.1), "pothole").authority == "shire"    # the left lobe
    assert rules.route(Point(50.1, 10.5), "pothole").covered is False       # between lobes


@pytest.mark.parametrize("text, message", [
    ("[[category]\n", "not valid TOML"),
    ('[[categories]]\nslug = "x"\n', r"unknown table\(s\) categories"),
    ('[[category]]\nslug = "pothole"\nname = "P"\n', r"category #1 \(pothole\): missing key 'tier'"),
    ('[[category]]\nslug = "Pot Hole"\nname = "P"\ntier = "county"\n',
     r"slug 'Pot Hole' must be lower-case letters"),
    ('[[category]]\nslug = "report"\nname = "P"\ntier = "County"\n', r"tier 'County' must be"),
    ('[[category]]\nslug = "p"\nname = "P"\ntier = "county"\nkeywords = "pothole"\n',
     "keywords must be a list of strings"),
    ('[[category]]\nslug = "p"\nname = "P"\ntier = "county"\nkeywords = ["--"]\n',
     "keyword '--' has no letters or digits"),
    ('[[category]]\nslug = "p"\nname = "P"\ntier = "county"\ncolour = "red"\n',
     r"unknown key\(s\) colour"),
    ('[[category]]\nslug = "p"\nname = ""\ntier = "county"\n', "name must be a non-empty string"),
    ('[[category]]\nslug = "p"\nname = "P"\ntier = "county"\n'
     '[[category]]\nslug = "p"\nname = "Q"\ntier = "county"\n',
     r"category #2 \(p\): duplicate slug 'p'"),
])
def test_broken_categories_are_named(text: str, message: str) -> None:
    with pytest.raises(RulesError, match=r"^/site/rules/categories\.toml: .*" + message):
        parse_categories(text, "/site/rules/categories.toml")


@pytest.mark.parametrize("text, message", [
    ("", "the first line must be the header name,lat,lon,kind"),
    ("name,latitude,longitude,kind\n", "the first line must be the header"),
    ("name,lat,lon,kind\nWestford,50.5,10.5\n", r"line 2: expected 4 columns"),
    ("name,lat,lon,kind\n\nWestford,50.5,ten,place\n", r"line 3 \(Westford\): lat,lon must be"),
    ("name,lat,lon,kind\nWestford,95,10,place\n", r"line 2 \(Westford\): lat,lon must be.*lat must"),
    ("name,lat,lon,kind\nWestford,50.5,10.5,town\n", "kind must be place or postcode, got 'town'"),
    ("name,lat,lon,kind\n,50.5,10.5,place\n", "line 2: the name is empty"),
    ('name,lat,lon,kind\n"Westford,50.5,10.5,place\n', "not valid CSV|expected 4 columns"),
])
def test_broken_gazetteer_is_named(text: str, message: str) -> None:
    with pytest.raises(RulesError, match=r"^/site/rules/gazetteer\.csv: .*(" + message + ")"):
        parse_gazetteer(text, "/site/rules/gazetteer.csv")


def test_gazetteer_reads_excel_csv() -> None:
    (place,) = parse_gazetteer("\ufeffName,Lat,Lon,Kind\r\n  Westford , 50.5 , 10.5 , Place \r\n")
    assert (place.name, place.point, place.kind) == ("Westford", Point(50.5, 10.5), "place")


def test_report_contacts_in_authorities() -> None:
    laws = parse_laws((ROOT / "rules" / "laws.toml").read_text())

    def parse(extra: str) -> dict:   # type: ignore[type-arg]
        return parse_authorities(f'[[authority]]\nslug = "shire"\nname = "S"\n'
                                 f'emails = ["foi@shire.example"]\n{extra}\n', laws, "uk-foia",
                                 "/site/rules/authorities.toml")

    a = parse('reports = { default = "Roads@Shire.example", Pothole = "holes@shire.example" }')
    assert a["shire"].reports == {"default": "roads@shire.example",
                                  "pothole": "holes@shire.example"}
    assert hash(a["shire"])   # still usable in sets
    with pytest.raises(RulesError, match=r"authority #1 \(shire\): reports.pothole must be an "
                                         "email address, got 'roads'"):
        parse('reports = { pothole = "roads" }')
    with pytest.raises(RulesError, match="reports must be dict"):
        parse('reports = "roads@shire.example"')
    with pytest.raises(RulesError, match=r"^/site/rules/authorities\.toml: authority shire: "
                                         r"reports\.potholes: 'potholes' is not a category"):
        check_report_contacts(parse('reports = { potholes = "r@shire.example" }'),
                              {"pothole": None}, "/site/rules/authorities.toml")


def test_report_is_not_an_authority_slug() -> None:
    laws = parse_laws((ROOT / "rules" / "laws.toml").read_text())
    with pytest.raises(RulesError, match=r"authority #1 \(Report\): slug 'report' is taken"):
        parse_authorities('[[authority]]\nslug = "Report"\nname = "R"\n', laws, "uk-foia")


def test_hostile_text_costs_no_more_than_its_length(rules: ReportRules) -> None:
    """Thousands of keyword and place matches are sorted once, not compared pairwise."""
    text = "bin hole in the road Westford Upper Westford WD1 2AB " * 5_000
    assert rules.detect_category(tag=None, subject=text, body="").slug is None
    guess = rules.locate(text)
    assert guess.point == Point(50.51, 10.51)     # the postcode
    assert rules.locate(text.replace("WD1 2AB ", "")).point is None     # two places
