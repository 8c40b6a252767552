"""Coordinates read out of what citizens write: the usual forms are found, and dates, times,
phone numbers, versions and prices are not mistaken for places."""
from __future__ import annotations

import pytest

from mailflow.core.geo import Found, Point, distance_m, find_coordinates, map_link

BIG_BEN = (51.5007, -0.1246)


@pytest.mark.parametrize("text, lat, lon", [
    ("51.5014, -0.1419", 51.5014, -0.1419),
    ("51.5014 -0.1419", 51.5014, -0.1419),
    ("51.5014,-0.1419", 51.5014, -0.1419),
    ("51.5014; -0.1419", 51.5014, -0.1419),
    ("It's at (51.5014, -0.1419).", 51.5014, -0.1419),
    ("51.50142° -0.14189°", 51.50142, -0.14189),
    ("-33.8688, 151.2093", -33.8688, 151.2093),
    ("51.5014, −0.1419", 51.5014, -0.1419),            # a typographic minus
    ("51.5014, –0.1419", 51.5014, -0.1419),            # an en dash from a word processor
    ("51.5014°N 0.1419°W", 51.5014, -0.1419),
    ("51.5014° N, 0.1419° W", 51.5014, -0.1419),
    ("51.5014N 0.1419W", 51.5014, -0.1419),
    ("33.8688°S 151.2093°E", -33.8688, 151.2093),
    ("0.1419°W 51.5014°N", 51.5014, -0.1419),          # longitude first, but labelled
    ("N 51.5014 W 0.1419", 51.5014, -0.1419),
    ("N51.5014 E0.1419", 51.5014, 0.1419),
    ("S 33.8688, E 151.2093", -33.8688, 151.2093),
    ("lat: 51.5014 lon: -0.1419", 51.5014, -0.1419),
    ("Latitude 51.5014, Longitude -0.1419", 51.5014, -0.1419),
    ("latitude: 51.5014\nlongitude: -0.1419", 51.5014, -0.1419),
    ("Lon: -0.1419 Lat: 51.5014", 51.5014, -0.1419),
    ("lat=51.5014 lng=-0.1419", 51.5014, -0.1419),
    ("coordinates: 51.5, -0.14", 51.5, -0.14),           # few decimals, but said to be a place
    ("GPS 51.50, -0.14", 51.5, -0.14),
    ("51°30'05\"N 0°08'31\"W", 51 + 30 / 60 + 5 / 3600, -(8 / 60 + 31 / 3600)),
    ("51°30′05″N, 0°08′31″W", 51 + 30 / 60 + 5 / 3600, -(8 / 60 + 31 / 3600)),
    ("51º 30' 5.2\" N 0º 8' 31.4\" W", 51 + 30 / 60 + 5.2 / 3600, -(8 / 60 + 31.4 / 3600)),
    ("33°52'07.7\"S 151°12'33.5\"E", -(33 + 52 / 60 + 7.7 / 3600), 151 + 12 / 60 + 33.5 / 3600),
    ("N 51° 30.083' W 000° 08.517'", 51 + 30.083 / 60, -(8.517 / 60)),
    ("51° 30.083' N 0° 08.517' W", 51 + 30.083 / 60, -(8.517 / 60)),
    ("N 51° 30.083 W 000° 08.517", 51 + 30.083 / 60, -(8.517 / 60)),   # geocaching style
    ("geo:51.5,-0.14", 51.5, -0.14),
    ("geo:51.5014,-0.1419;u=10", 51.5014, -0.1419),
    ("geo:51.5014,-0.1419,35", 51.5014, -0.1419),
    ("geo:0,0?q=51.5014,-0.1419(Pothole)", 51.5014, -0.1419),
    ("https://www.openstreetmap.org/?mlat=51.5014&mlon=-0.1419#map=18/51.5014/-0.1419",
     51.5014, -0.1419),
    ("https://www.openstreetmap.org/#map=18/51.50140/-0.14190", 51.5014, -0.1419),
    ("https://osm.org/go/?mlat=51.5014&amp;mlon=-0.1419", 51.5014, -0.1419),
    ("https://www.google.com/maps/@51.5014,-0.1419,17z", 51.5014, -0.1419),
    ("https://www.google.co.uk/maps/place/Big+Ben/@51.5007,-0.1246,17z/data=!3m1",
     51.5007, -0.1246),
    ("https://www.google.com/maps?q=51.5014,-0.1419", 51.5014, -0.1419),
    ("https://maps.google.com/?q=51.5014%2C-0.1419", 51.5014, -0.1419),
    ("https://www.google.com/maps/search/?api=1&query=51.5014%2C-0.1419", 51.5014, -0.1419),
    ("https://www.google.com/maps/search/51.5014,+-0.1419", 51.5014, -0.1419),
    ("https://maps.apple.com/?ll=51.5014,-0.1419&q=Dropped%20Pin", 51.5014, -0.1419),
    ("https://maps.apple.com/?q=Pin&ll=51.5014,-0.1419&t=m", 51.5014, -0.1419),
    ("see <https://www.openstreetmap.org/?mlat=51.5014&mlon=-0.1419>.", 51.5014, -0.1419),
])
def test_written_forms_are_found(text: str, lat: float, lon: float) -> None:
    (found,) = find_coordinates(text)
    assert found.source == "text"
    assert found.point.lat == pytest.approx(lat, abs=1e-9)
    assert found.point.lon == pytest.approx(lon, abs=1e-9)
    assert found.text in " ".join(text.split()) or found.text.startswith(("http", "geo:"))


@pytest.mark.parametrize("text", [
    "",
    "The pothole on the High Street is getting worse.",
    "12.03.2024",                              # dates
    "on 12.03.2024 at 14.30",
    "2024-03-12 14:30:00",
    "from 10.30 to 12.45",                     # times
    "call 0161 496 0000",                      # phone numbers
    "+44 20 7946 0958",
    "tel. 020.7946.0958",
    "version 3.11.2 and 2.7.18",               # versions
    "Python 3.11 2.7",
    "v1.2345 2.3456",
    "192.168.1.1 10.0.0.1",                    # IP addresses
    "price £12.50, £13.99",                    # prices
    "12.50, 13.99",
    "€51.501, 0.141",
    "it costs 1,234.567",
    "score 51.5014%, 0.1419",
    "12, 14",                                  # integers
    "12 14",
    "51, -1",
    "95.1234, 10.1234",                        # out of range
    "45.1234, 190.1234",
    "91°00'00\"N 0°08'31\"W",
    "12°61'N 0°08'W",                          # 61 minutes
    "0.000, 0.000",                            # a device without a fix
    "1.5 N 2.5 N",                             # two latitudes
    "Flat 5, 12 High St",
    "ab51.5014 -0.1419",                       # glued to a word
    "51.5014 -0.1419.3",
    "1:50.000 -1.000",
    "see https://example.com/v1.2345/2.3456",  # a link that is not a map link
    "https://maps.app.goo.gl/abc123",          # a short link cannot be read offline
    "https://www.google.com/maps/place/Big+Ben",
    "lat: 95 lon: 0",
    "mlat=51.5&mlon=-0.14",                    # not in a link
])
def test_other_numbers_are_not_coordinates(text: str) -> None:
    assert find_coordinates(text) == []


def test_several_positions_in_order_and_repeats_once() -> None:
    text = ("First 51.5014, -0.1419 then https://www.openstreetmap.org/?mlat=50.9&mlon=-1.3 "
            "and again 51.5014, -0.1419 and N 51.0 W 1.2")
    found = find_coordinates(text)
    assert [(f.point.lat, f.point.lon) for f in found] == [
        (51.5014, -0.1419), (50.9, -1.3), (51.0, -1.2)]
    assert found[1].text == "https://www.openstreetmap.org/?mlat=50.9&mlon=-1.3"


def test_a_links_numbers_are_not_read_twice() -> None:
    found = find_coordinates("https://www.openstreetmap.org/#map=18/51.50140/-0.14190 51.5014 -0.1419")
    assert len(found) == 1


def test_point_is_validated() -> None:
    assert Point(90, -180) == Point(90.0, -180.0)
    for lat, lon in ((91, 0), (0, 181), (float("nan"), 0), (0, float("inf")), (True, 0)):
        with pytest.raises(ValueError):
            Point(lat, lon)  # type: ignore[arg-type]
    assert str(Point(51.5, -0.14)) == "51.5, -0.14"


def test_distance() -> None:
    assert distance_m(Point(*BIG_BEN), Point(*BIG_BEN)) == 0
    # one degree of latitude is about 111.2 km; a hundred metres is a hundred metres
    assert distance_m(Point(50, 0), Point(51, 0)) == pytest.approx(111_195, rel=1e-3)
    assert distance_m(Point(51.5, -0.14), Point(51.5009, -0.14)) == pytest.approx(100, rel=1e-2)
    assert distance_m(Point(0, 179.9999), Point(0, -179.9999)) == pytest.approx(22.2, rel=1e-2)


def test_map_link() -> None:
    template = "https://www.openstreetmap.org/?mlat={lat}&mlon={lon}#map=18/{lat}/{lon}"
    assert map_link(Point(51.5014, -0.1419), template) == (
        "https://www.openstreetmap.org/?mlat=51.5014&mlon=-0.1419#map=18/51.5014/-0.1419")
    assert map_link(Point(51.123456789, 0), "geo:{lat},{lon}") == "geo:51.123457,0"
    assert map_link(Point(1, 2), "{x} {lat}") == "{x} 1"


def test_found_is_a_value() -> None:
    assert find_coordinates("51.5014, -0.1419") == [
        Found(Point(51.5014, -0.1419), "text", "51.5014, -0.1419")]


@pytest.mark.parametrize("text", [
    "1.234" + " " * 50_000 + "x",
    "N 51.5" + " " * 50_000 + "x",
    "lat: 51.5" + " " * 50_000 + "x",
    "51°30" + " " * 50_000 + "x",
    "1." + "1" * 50_000,
    "1.234 " * 10_000,
    "51°30'05\" " * 5_000,
    "https://www.openstreetmap.org/" + "a" * 50_000,
])
def test_hostile_text_is_read_in_one_pass(text: str) -> None:
    """Every repeat in the expressions is bounded: a long run of spaces or digits costs no more
    than its length (unbounded, the first of these took minutes)."""
    assert len(find_coordinates(text)) <= 1
