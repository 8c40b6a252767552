"""`mailflow route` and `mailflow category list` through the real CLI, on a site made by
`mailflow init` (which ships the example two-tier Wessex) and on the fixture map."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import DOMAIN, MAILFLOW, Site

GEO = Path(__file__).resolve().parent / "fixtures" / "geo"
ASHCOMBE = ("51.1652", "-1.4497")      # in Northdown, a district of Wessex County
PORT_SHELDON = ("50.9412", "-1.2987")  # a unitary city
LONDON = ("51.5014", "-0.1419")        # outside every area


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """One site for the tests that only read its rules (`mailflow init` takes seconds)."""
    d = tmp_path_factory.mktemp("shipped") / "site"
    r = subprocess.run([*MAILFLOW, "init", str(d), "--domain", DOMAIN], capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    return Site(d)


def said(r: subprocess.CompletedProcess[bytes]) -> str:
    """The error without the line breaks rich puts in at 80 columns (even inside a path)."""
    return "".join((r.stderr + r.stdout).decode().split())


def route(site: Site, lat: str, lon: str, category: str, *extra: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    r = site.run("route", "--lat", lat, "--lon", lon, "--category", category, "--json", *extra)
    assert r.returncode in (0, 1), r.stderr.decode()
    return r.returncode, json.loads(r.stdout)


@pytest.mark.parametrize("where, category, authority, name, contact, area", [
    (ASHCOMBE, "pothole", "wessex", "Wessex County Council", "highways@wessex.gov.example",
     "wessex"),
    (ASHCOMBE, "street-light", "wessex", "Wessex County Council",
     "streetlighting@wessex.gov.example", "wessex"),
    (ASHCOMBE, "bins", "northdown", "Northdown District Council",
     "streetscene@northdown.gov.example", "northdown"),
    (("51.0493", "-1.4018"), "graffiti", "southdown", "Southdown District Council",
     "graffiti@southdown.gov.example", "southdown"),
    (PORT_SHELDON, "pothole", "port-sheldon", "Port Sheldon City Council",
     "highways@portsheldon.gov.example", "port-sheldon"),
    (PORT_SHELDON, "fly-tipping", "port-sheldon", "Port Sheldon City Council",
     "fixmystreet@portsheldon.gov.example", "port-sheldon"),
])
def test_route_the_shipped_example(shipped: Site, where: tuple[str, str], category: str,
                                   authority: str, name: str, contact: str, area: str) -> None:
    code, data = route(shipped, *where, category)
    assert code == 0
    assert (data["authority"], data["authority_name"], data["contact"], data["area"],
            data["category"], data["covered"]) == (authority, name, contact, area, category, True)
    assert data["reasons"] and data["reasons"][-1].endswith(f"send it to {authority}")


def test_route_json_lists_every_area_and_the_tier(shipped: Site) -> None:
    _, data = route(shipped, *ASHCOMBE, "bins")
    assert data["tier"] == "district" and data["point"] == {"lat": 51.1652, "lon": -1.4497}
    assert data["areas"] == [
        {"id": "northdown", "name": "Northdown", "authority": "northdown", "tiers": ["district"]},
        {"id": "wessex", "name": "Wessex", "authority": "wessex", "tiers": ["county"]}]


def test_route_outside_every_area_exits_1(shipped: Site) -> None:
    code, data = route(shipped, *LONDON, "pothole")
    assert code == 1
    assert (data["authority"], data["covered"], data["area"], data["areas"]) == (
        None, False, None, [])
    assert "the site does not cover it" in data["reasons"][-1]
    human = shipped.run("route", "--lat", LONDON[0], "--lon", LONDON[1], "--category", "pothole")
    assert human.returncode == 1 and b"not covered" in human.stdout


def test_route_human_output_gives_the_reasons(shipped: Site) -> None:
    r = shipped.run("route", "--lat", ASHCOMBE[0], "--lon", ASHCOMBE[1], "--category", "pothole")
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    assert "wessex (Wessex County Council): send to highways@wessex.gov.example" in out
    assert "Pothole (pothole) is handled by the county tier" in out
    assert "Wessex (wessex) handles the county tier there" in out


@pytest.mark.parametrize("args, says", [
    (("--lat", "51.1", "--lon", "-1.4", "--category", "potholes"),
     "unknown category 'potholes'; known: bins, fly-tipping, graffiti, pothole, street-light"),
    (("--lat", "95", "--lon", "-1.4", "--category", "pothole"), "lat must be between -90 and 90"),
    (("--lat", "nan", "--lon", "-1.4", "--category", "pothole"), "lat must be between"),
    (("--lat", "north", "--lon", "-1.4", "--category", "pothole"), "'north' is not a valid float"),
    (("--lon", "-1.4", "--category", "pothole"), "Missing option '--lat'"),
])
def test_route_usage_errors_exit_2(shipped: Site, args: tuple[str, ...], says: str) -> None:
    r = shipped.run("route", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "".join(says.split()) in said(r), r.stderr.decode()


def test_category_list(shipped: Site) -> None:
    cats = shipped.json("category", "list")
    assert [c["slug"] for c in cats] == ["pothole", "street-light", "fly-tipping", "bins",
                                         "graffiti"]
    pothole = cats[0]
    assert pothole["name"] == "Pothole" and "hole in the road" in pothole["keywords"]
    assert pothole["tier"] == "county" and pothole["description"]
    assert pothole["address"] == "report+pothole@ask.example"
    human = shipped.run("category", "list")
    assert human.returncode == 0 and b"street-light" in human.stdout


def test_a_site_without_fault_reports(site: Site) -> None:
    (site.dir / "rules" / "categories.toml").unlink()
    assert site.json("category", "list") == []
    human = site.run("category", "list")
    assert human.returncode == 0 and b"no fault-report rules" in human.stdout
    r = site.run("route", "--lat", ASHCOMBE[0], "--lon", ASHCOMBE[1], "--category", "pothole")
    assert r.returncode == 2
    assert "thissitehasnofault-reportrules" in said(r)
    assert site.json("authority", "list")     # the rest of the site works as before


def test_broken_rules_files_are_named(site: Site) -> None:
    rules = site.dir / "rules"
    good = (rules / "areas.geojson").read_text()
    (rules / "areas.geojson").write_text(good.replace('"authority": "northdown"',
                                                      '"authority": "northdowns"'))
    r = site.run("category", "list")
    assert r.returncode == 1 and "".join(
        f"{rules / 'areas.geojson'}: feature #2 (northdown): authority 'northdowns' is not a "
        "slug in authorities.toml".split()) in said(r), said(r)
    (rules / "areas.geojson").write_text(good)
    (rules / "gazetteer.csv").write_text("name,lat,lon\nAshcombe,51.1,-1.4\n")
    r = site.run("route", "--lat", "51.1", "--lon", "-1.4", "--category", "pothole")
    assert r.returncode == 1 and f"{rules / 'gazetteer.csv'}:thefirstlinemustbe" in said(r)
    (rules / "gazetteer.csv").unlink()                          # optional
    assert site.json("category", "list")
    text = (rules / "authorities.toml").read_text()
    (rules / "authorities.toml").write_text(text.replace("graffiti = ", "grafitti = "))
    r = site.run("category", "list")
    assert r.returncode == 1 and "authoritysouthdown:reports.grafitti:'grafitti'isnota" \
        "category" in said(r), said(r)


def test_the_fixture_map_through_the_cli(site: Site) -> None:
    rules = site.dir / "rules"
    for name in ("areas.geojson", "categories.toml", "gazetteer.csv", "authorities.toml"):
        shutil.copy(GEO / name, rules / name)
    code, data = route(site, "50.5", "11.0", "bins")        # on the Westdale/Eastdale line
    assert code == 0 and data["authority"] == "eastdale"
    assert data["contact"] == "streets@eastdale.example"
    assert any("shared boundary of eastdale, westdale" in r for r in data["reasons"])
    code, data = route(site, "50.5", "12.5", "bins")        # the hole in the city
    assert code == 1 and data["covered"] is False
    code, data = route(site, "50.2", "14.2", "pothole")     # an authority with no address
    assert code == 0 and data["authority"] == "isles" and data["contact"] is None
