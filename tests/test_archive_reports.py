"""Fault reports in the public archive, built from reports made through the real pipeline.

One small world, made once per module by mail through `Pipeline.process` (the path `mailflow
ingest` takes) on a site made by `mailflow init`, whose shipped rules describe the fictional
two-tier Wessex: reports with a location in the text, in a photo's EXIF and from the gazetteer,
one answered by the authority, some fixed, and reports that must never be public (still asking
for details, outside every area, never confirmed, hidden by a moderator). The tests read what
the build wrote: pages, lists, feeds, maps (the pin is checked against the drawn outline with
the projection worked out again here), the authority's record, incremental rebuilds and the
leak guard.
"""
from __future__ import annotations

import gzip
import io
import json
import math
import re
import statistics
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from datetime import timedelta
from email.utils import formataddr
from pathlib import Path

import pytest
import shapely
from PIL import Image
from shapely.geometry import Polygon, shape

from conftest import DOMAIN, JANE, compose
from test_archive_build import all_files, ingest, mail, make_site
from mailflow.archive import maps
from mailflow.archive import reports as R
from mailflow.archive.build import BuildReport, build
from mailflow.archive.writer import LeakError
from mailflow.site import Site as MfSite

BOB = "bob.private@citizen.example"
CAROL = "carol.vague@citizen.example"
DORA = "dora.far@citizen.example"
EVE = "eve.unconfirmed@citizen.example"
HIGHWAYS = "highways@wessex.gov.example"
ATOM = "{http://www.w3.org/2005/Atom}"
ROOT = Path(__file__).resolve().parent.parent


def photo_with_gps(lat: float, lon: float) -> bytes:
    """A real JPEG carrying an EXIF GPS position, a camera make and an owner's name."""
    img = Image.new("RGB", (64, 48), (120, 110, 100))
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"                   # Make
    exif[0x013B] = "Jane Citizen Camera Owner"    # Artist

    def dms(v: float) -> tuple[float, float, float]:
        v = abs(v)
        d = int(v)
        m = int((v - d) * 60)
        return (float(d), float(m), round(((v - d) * 60 - m) * 60, 4))

    exif[0x8825] = {1: "N" if lat >= 0 else "S", 2: dms(lat),
                    3: "E" if lon >= 0 else "W", 4: dms(lon)}
    out = io.BytesIO()
    img.save(out, "JPEG", exif=exif.tobytes(), quality=90)
    return out.getvalue()


@dataclass
class World:
    mf: MfSite
    out: Path
    r1: int      # Jane: pothole, coordinates in the text, a photo, an answer; fixed after 10 days
    r2: int      # Bob: bins in Northdown, place from the gazetteer; open
    r3: int      # Jane: pothole in Port Sheldon (unitary); fixed after 4 days
    r4: int      # Jane: street light in Wessex, location from the photo's EXIF; fixed after 3 days
    r5: int      # Jane: pothole in Southdown (the county's); open; a moderator hid the letter
    unsent: dict[str, int]    # label -> thread id, for reports that must never be public
    secrets: list[str] = field(default_factory=list)

    def build(self, **kw: object) -> BuildReport:
        kw.setdefault("search", False)
        kw.setdefault("dns_txt", lambda name: None)
        return build(self.mf, self.out, **kw)  # type: ignore[arg-type]

    def read(self, rel: str) -> str:
        return (self.out / rel).read_text(encoding="utf-8")

    def sitemap(self) -> str:
        """The sitemap index and every part it lists, as one text."""
        index = self.read("sitemap.xml")
        parts = re.findall(r"<loc>https://[^/]+/(sitemap/[^<]+)</loc>", index)
        return index + "".join(self.read(p) for p in parts)


def report(mf: MfSite, citizen: str, name: str, subject: str, body: str, *,
           to: str = f"report@{DOMAIN}", photos: list[bytes] = (), confirm: bool = True) -> int:
    frm = formataddr((name, citizen))
    raw = (mail(frm, to, subject, body, attachments=[(f"photo{i}.jpg", "image/jpeg", p)
                                                       for i, p in enumerate(photos, 1)])
           if photos else compose(frm, to, subject, body))
    ingest(mf, raw, to, citizen)
    with mf.store.read() as tx:
        t = tx.threads()[-1]
    assert t.kind == "report" and t.citizen_email == citizen, t
    if confirm and t.state == "awaiting_confirmation":
        addr = f"confirm-{t.confirm_token}@{DOMAIN}"
        ingest(mf, compose(frm, addr, "Re", "Yes"), addr, citizen)
    return t.id


def tokens(mf: MfSite, tid: int) -> tuple[str, str]:
    with mf.store.read() as tx:
        t = tx.thread(tid)
    assert t is not None
    return (f"report-{tid}-{t.request_token}@{DOMAIN}", f"reply-{tid}-{t.reply_token}@{DOMAIN}")


def say(mf: MfSite, citizen: str, tid: int, text: str) -> None:
    _, reply = tokens(mf, tid)
    ingest(mf, compose(f"Citizen <{citizen}>", reply, "Re", text), reply, citizen)


def backdate(mf: MfSite, tid: int, sent_days_ago: int, fixed_after: int | None) -> None:
    """Sending and fixing as if they happened days apart (the pipeline stamps both 'now')."""
    with mf.store.tx() as tx:
        t = tx.thread(tid)
        assert t is not None and t.sent_at is not None
        sent = t.sent_at - timedelta(days=sent_days_ago)
        tx.update_thread(tid, sent_at=sent)
        if fixed_after is not None:
            tx.update_report(tid, fixed_at=sent + timedelta(days=fixed_after, hours=2))


def make_world(folder: Path) -> World:
    mf = make_site(folder / "site")
    assert mf.rules.reports is not None, "the shipped rules take fault reports"
    r1 = report(mf, JANE, "Jane Citizen", "Deep pothole outside the bakery",
                "There is a deep pothole at 51.1652, -1.4497 outside the bakery.\n"
                f"Write to me at {JANE} if you need more.\n", photos=[photo_with_gps(51.1652, -1.4497)])
    req1, _ = tokens(mf, r1)
    ingest(mf, mail(f"Wessex Highways <{HIGHWAYS}>", req1, "RE: pothole",
                    "Thank you, Jane Citizen. A crew will fill it this week.\n"),
           req1, HIGHWAYS)
    say(mf, JANE, r1, "fixed")
    r2 = report(mf, BOB, "Bob Private", "Bins not collected in Kingsbury St Mary",
                "The bin collection was missed again on Church Lane, Kingsbury St Mary.")
    r3 = report(mf, JANE, "Jane Citizen", "Pothole by the quay",
                "A pothole at 50.9300, -1.3000 near the quay.")
    say(mf, JANE, r3, "fixed")
    r4 = report(mf, JANE, "Jane Citizen", "Street light out",
                "The street light by my house is not working (see photo).",
                photos=[photo_with_gps(51.1510, -1.1532)])
    say(mf, JANE, r4, "fixed")
    r5 = report(mf, JANE, "Jane Citizen", "Pothole near Wickham Cross",
                "Pothole at 51.0493, -1.4018, on the bend.")
    backdate(mf, r1, 20, 10)
    backdate(mf, r3, 15, 4)
    backdate(mf, r4, 12, 3)
    backdate(mf, r2, 5, None)
    unsent = {
        "details": report(mf, CAROL, "Carol Vague", "Something broken somewhere",
                          "It is broken, please fix it."),
        "not_covered": report(mf, DORA, "Dora Far", "Pothole far away",
                              "Pothole at 53.4808, -2.2426 in Manchester."),
        "unconfirmed": report(mf, EVE, "Eve Unconfirmed", "Graffiti never confirmed",
                              "Graffiti at 51.1652, -1.4497 on the wall.", confirm=False),
        "hidden": report(mf, JANE, "Jane Citizen", "Pothole hidden by a moderator",
                         "Pothole at 51.1804, -1.3021."),
    }
    with mf.store.tx() as tx:
        tx.update_thread(unsent["hidden"], hidden=True)
        [letter] = [m for m in tx.messages(r5) if m.direction == "out" and m.kind == "request"]
        tx.set_message_hidden(letter.id, True)
    with mf.store.read() as tx:
        states = {k: tx.thread(v).state for k, v in unsent.items()}  # type: ignore[union-attr]
        for tid in (r1, r2, r3, r4, r5):
            t = tx.thread(tid)
            assert t is not None and t.sent_at is not None, t
    assert states["details"] == "awaiting_details", states
    assert states["not_covered"] == "not_covered", states
    assert states["unconfirmed"] == "awaiting_confirmation", states
    secrets = [JANE, BOB, CAROL, DORA, EVE, mf.settings.site.secret]
    with mf.store.read() as tx:
        for t in tx.threads():
            secrets += [t.request_token, t.reply_token] + ([t.confirm_token] if t.confirm_token else [])
    return World(mf, folder / "out", r1, r2, r3, r4, r5, unsent, secrets)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    w = make_world(tmp_path_factory.mktemp("reports"))
    w.report = w.build()  # type: ignore[attr-defined]
    yield w
    w.mf.close()


@pytest.fixture()
def fresh(tmp_path: Path) -> World:
    w = make_world(tmp_path)
    yield w
    w.mf.close()


# -- helpers to read a map --------------------------------------------------------------------------
def svg_of(html: str, cls: str = "map", having: str = "") -> ET.Element:
    found = [m.group(0) for m in re.finditer(
        r'<svg xmlns="http://www.w3.org/2000/svg" class="' + cls + r'".*?</svg>', html, re.S)
        if having in m.group(0)]
    assert len(found) == 1, f"{len(found)} <svg class={cls}> with {having!r}"
    return ET.fromstring(found[0])


SVG = "{http://www.w3.org/2000/svg}"


def rings(d: str) -> list[list[tuple[float, float]]]:
    out = []
    for part in re.findall(r"M([^MZ]+)Z", d):
        nums = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", part)]
        out.append(list(zip(nums[0::2], nums[1::2])))
    return out


def outline(svg: ET.Element, area: str) -> Polygon:
    [p] = [p for p in svg.iter(f"{SVG}path") if p.get("data-area") == area]
    shells = rings(p.get("d", ""))
    return Polygon(shells[0], shells[1:])


def pin_xy(svg: ET.Element) -> tuple[float, float]:
    [g] = [g for g in svg.iter(f"{SVG}g") if "pin" in (g.get("class") or "").split()]
    x, y = re.match(r"translate\((\S+) (\S+)\)", g.get("transform", "")).groups()  # type: ignore[union-attr]
    return float(x), float(y)


def area_geometry(area: str) -> Polygon:
    data = json.loads((ROOT / "rules" / "areas.geojson").read_text())
    [f] = [f for f in data["features"] if f["properties"]["id"] == area]
    return shape(f["geometry"])


# -- the tests --------------------------------------------------------------------------------------
def test_layout_and_only_sent_reports_are_public(world: World) -> None:
    files = {str(p.relative_to(world.out)) for p in all_files(world.out)}
    for tid in (world.r1, world.r2, world.r3, world.r4, world.r5):
        for name in ("index.html", "index.json", "feed.atom"):
            assert f"report/{tid}/{name}" in files
    for path in ("report/index.html", "report/feed.atom", "area/wessex/index.html",
                 "area/wessex/feed.atom", "area/northdown/index.html", "area/port-sheldon/feed.atom",
                 "category/pothole/index.html", "category/bins/feed.atom", "data/reports.jsonl.gz"):
        assert path in files, path
    for label, tid in world.unsent.items():
        assert not any(f.startswith(f"report/{tid}/") for f in files), label
    everything = "\n".join(p.read_text(errors="replace") for p in all_files(world.out)
                           if p.suffix in (".html", ".json", ".atom", ".xml"))
    everything += gzip.decompress((world.out / "data/reports.jsonl.gz").read_bytes()).decode()
    for title in ("Something broken somewhere", "Pothole far away", "Graffiti never confirmed",
                  "Pothole hidden by a moderator"):
        assert title not in everything, title
    assert world.report.reports == 5  # type: ignore[attr-defined]


def test_nothing_private_anywhere(world: World) -> None:
    for p in all_files(world.out):
        data = p.read_bytes()
        if p.suffix == ".gz":
            data = gzip.decompress(data)
        low = data.lower()
        for s in world.secrets:
            assert s.lower().encode() not in low, (p, s)
    # The photo was published re-encoded: no EXIF, so neither the position nor the owner.
    [jpg] = [p for p in all_files(world.out) if p.suffix == ".jpg" and f"report/{world.r1}/" in str(p)]
    with Image.open(jpg) as im:
        assert not im.getexif() and "exif" not in im.info
    assert b"Camera Owner" not in jpg.read_bytes() and b"PhoneMaker" not in jpg.read_bytes()


def test_report_page(world: World) -> None:
    html = world.read(f"report/{world.r1}/index.html")
    assert "<h1>Deep pothole outside the bakery</h1>" in html
    assert 'href="../../category/pothole/"' in html and ">Pothole</a>" in html
    assert 'class="state state-fixed"' in html and "fixed on" in html
    assert "10 days after it was reported" in html
    assert 'href="../../body/wessex/"' in html and "Wessex County Council" in html
    assert 'href="../../area/wessex/"' in html
    assert "Reported by</dt><dd>Jane Citizen" in html
    assert "51.16520, -1.44970" in html and "from coordinates in the report" in html
    # The description, with her address redacted; the letter as sent; the authority's answer.
    assert "There is a deep pothole at 51.1652, -1.4497 outside the bakery." in html
    assert "[requester email]" in html
    assert "Report from Jane Citizen" in html and "A crew will fill it this week." in html
    assert 'id="fixed"' in html
    # What happened to it, as FixMyStreet's updates say it.
    assert re.findall(r'<li class="history-([a-z_]+)">', html) == ["sent", "fixed"]
    assert "Sent to Wessex County Council" in html and "by the reporter" in html
    # The photo, inline, from the archive's own files.
    [src] = re.findall(r'<ul class="photos">\s*<li><a href="[^"]+"><img src="([^"]+)"', html)
    assert src.startswith("attachments/") and src.endswith(".jpg")
    assert (world.out / f"report/{world.r1}" / src).is_file()
    # Nothing that runs or loads from elsewhere: no script, no external src, no style attribute.
    main = html.split('<main id="main">')[1]
    assert "<script" not in html and " style=" not in main
    assert not re.findall(r'\ssrc="(?:https?:)?//', html)
    assert "data-pagefind-body" in html and 'data-pagefind-filter="category"' in html


def test_report_page_without_photos_and_one_open(world: World) -> None:
    html = world.read(f"report/{world.r2}/index.html")
    assert 'class="state state-open"' in html and 'id="fixed"' not in html
    assert '<ul class="photos">' not in html
    assert "from a place name or postcode in the report" in html
    assert "(“Kingsbury St Mary”, from a place name" in html
    html = world.read(f"report/{world.r4}/index.html")
    assert "from the location recorded in a photo" in html and "51.15100, -1.15320" in html
    assert '<ul class="photos">' in html and 'href="../../area/wessex/"' in html


def test_a_hidden_letter_hides_the_description(world: World) -> None:
    html = world.read(f"report/{world.r5}/index.html")
    assert "<h1>Pothole near Wickham Cross</h1>" in html
    assert html.count("This message has been hidden by the site's moderators.") == 2
    assert not any("on the bend" in p.read_text(errors="replace") for p in all_files(world.out)
                   if p.suffix in (".html", ".json", ".atom"))
    assert json.loads(world.read(f"report/{world.r5}/index.json"))["description"] == ""


def test_map_pin_is_where_the_report_is(world: World) -> None:
    html = world.read(f"report/{world.r1}/index.html")
    svg = svg_of(html)
    assert svg.get("role") == "img" and svg.find(f"{SVG}title").text == "Where the problem is"  # type: ignore[union-attr]
    drawn = outline(svg, "wessex")
    px, py = pin_xy(svg)
    assert drawn.contains(shapely.Point(px, py))
    # The neighbouring areas are drawn too, lightly; the pin is in the district it lies in.
    classes = {p.get("data-area"): p.get("class") for p in svg.iter(f"{SVG}path") if p.get("data-area")}
    assert classes["wessex"] == "area area-focus"
    assert classes["northdown"] == classes["southdown"] == "area area-neighbour"
    assert outline(svg, "northdown").contains(shapely.Point(px, py))
    assert not outline(svg, "southdown").contains(shapely.Point(px, py))
    # The projection, worked out again: equirectangular, longitude scaled by cos(latitude).
    west, south, east, north = area_geometry("wessex").bounds
    dx0, dy0, dx1, dy1 = drawn.bounds
    sx, sy = (dx1 - dx0) / (east - west), (dy1 - dy0) / (north - south)
    k = math.cos(math.radians((south + north) / 2))
    assert sx / sy == pytest.approx(k, rel=0.01)
    assert px == pytest.approx(dx0 + (-1.4497 - west) * sx, abs=1.0)
    assert py == pytest.approx(dy0 + (north - 51.1652) * sy, abs=1.0)
    # A scale bar whose length is the distance it claims.
    [scale] = [g for g in svg.iter(f"{SVG}g") if g.get("class") == "scale"]
    metres = float(scale.get("data-metres", "").split()[0]) * (1000 if "km" in scale.get("data-metres", "") else 1)
    metres_per_unit = 6371008.8 * math.pi / 180 / sy
    assert float(scale.get("data-length", 0)) * metres_per_unit == pytest.approx(metres, rel=0.01)
    # Self-contained: nothing in it points anywhere but this site.
    text = ET.tostring(svg, encoding="unicode")
    assert "http" not in text.replace("http://www.w3.org/2000/svg", "")


def test_overview_maps_show_open_and_fixed(world: World) -> None:
    html = world.read("area/wessex/index.html")
    assert "<h1>Reports in Wessex</h1>" in html
    svg = svg_of(html)
    pins = [c for c in svg.iter(f"{SVG}circle")]
    kinds = sorted(c.get("class", "").split()[-1] for c in pins)
    # Wessex holds r1 (fixed), r2 (open, Northdown), r4 (fixed), r5 (open): not Port Sheldon's.
    assert kinds == ["pin-fixed", "pin-fixed", "pin-open", "pin-open"]
    links = [a.get("href") for a in svg.iter(f"{SVG}a")]
    assert f"../../report/{world.r1}/" in links and f"../../report/{world.r3}/" not in links
    drawn = outline(svg, "wessex")
    for c in pins:
        assert drawn.contains(shapely.Point(float(c.get("cx", 0)), float(c.get("cy", 0))))
    assert "Pothole by the quay" not in html
    html = world.read("area/port-sheldon/index.html")
    assert "Pothole by the quay" in html and "Deep pothole" not in html
    html = world.read("report/index.html")
    pins = list(svg_of(html).iter(f"{SVG}circle"))
    assert len(pins) == 5
    for slug in ("wessex", "northdown", "southdown", "port-sheldon"):
        assert f'href="../area/{slug}/"' in html
    html = world.read("category/pothole/index.html")
    assert "Deep pothole" in html and "Bins not collected" not in html
    assert len(list(svg_of(html).iter(f"{SVG}circle"))) == 3


def test_feeds(world: World) -> None:
    def entries(rel: str) -> list[tuple[str, str]]:
        root = ET.fromstring((world.out / rel).read_bytes())
        return [(e.find(f"{ATOM}title").text or "", e.find(f"{ATOM}id").text or "")  # type: ignore[union-attr]
                for e in root.iter(f"{ATOM}entry")]

    area = entries("area/wessex/feed.atom")
    titles = [t for t, _ in area]
    assert "Report: Deep pothole outside the bakery" in titles
    assert "Response: Deep pothole outside the bakery" in titles
    assert "Fixed: Deep pothole outside the bakery" in titles
    assert not any("quay" in t for t in titles)
    assert all(i.startswith(f"https://{DOMAIN}/report/") for _, i in area)
    everything = entries("report/feed.atom")
    assert any("quay" in t for t, _ in everything)
    assert entries("category/bins/feed.atom") == [
        ("Report: Bins not collected in Kingsbury St Mary",
         f"https://{DOMAIN}/report/{world.r2}#m{next(i for t, i in everything if 'Bins' in t).split('#m')[1]}")]
    assert not any(w in (world.out / "report/feed.atom").read_text() for w in ("Far away", "moderator"))


def test_authority_record(world: World) -> None:
    html = world.read("body/wessex/index.html")
    # r1 (10 days), r4 (3 days) fixed, r5 open: median 6.5 days.
    assert "Of 3 reports, 2 fixed and 1 still open." in html
    assert "The median time to fix was 6.5 days." in html
    svg = svg_of(html, "chart", having="report-record-title")
    bars = {g.get("class"): g for g in svg.iter(f"{SVG}g")}
    assert set(bars) == {"bar bar-fixed", "bar bar-open"}
    assert [t.text for t in bars["bar bar-fixed"].iter(f"{SVG}text")][-1] == "2"
    data = json.loads(world.read("body/wessex/index.json"))
    assert data["report_record"]["median_days_to_fix"] == 6.5
    assert data["report_record"] == {**data["report_record"], "received": 3, "fixed": 2, "open": 1}
    assert {r["id"] for r in data["reports"]} == {world.r1, world.r4, world.r5}
    html = world.read("body/northdown/index.html")
    assert "Of 1 report, 0 fixed and 1 still open." in html and "median time to fix" not in html
    # An authority with no reports shows no report record at all.
    html = world.read("body/camden/index.html")
    assert "Its record with fault reports" not in html
    assert json.loads(world.read("body/camden/index.json")).get("reports") is None


def test_history_from_events() -> None:
    from datetime import datetime, timezone

    def at(h: int) -> datetime:
        return datetime(2026, 3, 1, h, tzinfo=timezone.utc)
    events = [
        {"at": at(1), "actor": "citizen", "kind": "report", "detail": {}},
        {"at": at(2), "actor": "admin:al", "kind": "report_corrected",   # before sending: private
         "detail": {"from": {"category": None}, "to": {"category": "pothole"}}},
        {"at": at(3), "actor": "mailflow", "kind": "report_sent", "detail": {"authority": "wessex"}},
        {"at": at(4), "actor": "admin:al", "kind": "report_corrected",
         "detail": {"from": {"lat": 1.0, "lon": 2.0}, "to": {"lat": 1.1, "lon": 2.1}, "reason": "x"}},
        {"at": at(5), "actor": "admin:al", "kind": "state", "detail": {"to": "open"}},   # no change
        {"at": at(6), "actor": "admin:al", "kind": "state", "detail": {"to": "fixed"}},
        {"at": at(7), "actor": "citizen", "kind": "state", "detail": {"command": "withdraw"}},
        {"at": at(8), "actor": "mailflow", "kind": "clock", "detail": {}},
    ]
    h = R.history(events, lambda s: s.upper(), lambda s: s.title())
    assert [(e.what, e.by, e.at.hour) for e in h] == [
        ("sent", "", 3), ("moved", "site", 4), ("fixed", "site", 6), ("withdrawn", "reporter", 7)]
    assert h[0].words == "Sent to WESSEX" and h[2].words == "Marked as fixed by the site's moderators"
    assert R.history(events[:2], str, str) == ()   # never sent: no history


def test_report_record_median_days() -> None:
    def view(state: str, sent_day: int, fixed_day: int | None) -> R.ReportView:
        from datetime import datetime, timezone
        base = datetime(2027, 3, 1, 9, tzinfo=timezone.utc)
        return R.ReportView(
            id=sent_day, title="t", category="pothole", category_name="Pothole", state=state,
            authority="a", authority_name="A", area="x", area_name="X", lat=None, lon=None,
            location_source="", location_text="", reporter="", sent_at=base + timedelta(sent_day),
            fixed_at=base + timedelta(fixed_day, hours=2) if fixed_day is not None else None,
            description="", description_note=None, photos=(), messages=())

    views = [view("fixed", 0, 1), view("fixed", 2, 10), view("fixed", 3, 30),
             view("open", 4, None), view("user_withdrawn", 5, None),
             view("open", 6, 9)]   # reopened: its old fixed_at does not count
    rec = R.report_record(views)
    assert (rec.received, rec.fixed, rec.open, rec.other) == (6, 3, 2, 1)
    assert rec.median_days == statistics.median([1, 8, 27]) == 8


def test_json_twin(world: World) -> None:
    d = json.loads(world.read(f"report/{world.r1}/index.json"))
    assert d["url"] == f"https://{DOMAIN}/report/{world.r1}/"
    assert d["category"]["slug"] == "pothole" and d["area"]["id"] == "wessex"
    assert d["location"] == {"lat": 51.1652, "lon": -1.4497, "source": "text",
                             "text": "51.1652, -1.4497"}
    assert d["state"] == "fixed" and d["days_to_fix"] == 10
    assert d["photos"] and d["photos"][0].startswith(f"https://{DOMAIN}/report/{world.r1}/attachments/")
    assert [m["kind"] for m in d["messages"]] == ["report", "response"]
    lines = gzip.decompress((world.out / "data/reports.jsonl.gz").read_bytes()).decode().splitlines()
    assert [json.loads(x)["id"] for x in lines] == sorted([world.r1, world.r2, world.r3, world.r4, world.r5])


def test_index_nav_sitemap(world: World) -> None:
    index = world.read("index.html")
    assert 'href="./report/"' in index and "Fault reports" in index
    page = world.read("body/index.html")
    assert 'href="../report/"' in page
    sitemap = world.sitemap()
    for path in (f"report/{world.r1}/", "report/", "area/wessex/", "category/pothole/"):
        assert f"<loc>https://{DOMAIN}/{path}</loc>" in sitemap, path
    for tid in world.unsent.values():
        assert f"/report/{tid}/" not in sitemap


def test_a_site_without_reports_has_no_report_pages(tmp_path: Path) -> None:
    mf = make_site(tmp_path / "site")
    (mf.settings.site.rules / "categories.toml").unlink()
    mf.close()
    mf = MfSite.open(tmp_path / "site" / "config.toml")
    assert mf.rules.reports is None
    build(mf, tmp_path / "out", search=False)
    files = {str(p.relative_to(tmp_path / "out")) for p in all_files(tmp_path / "out")}
    assert not any(f.startswith(("report/", "area/", "category/")) for f in files)
    assert "Fault reports" not in (tmp_path / "out/index.html").read_text()
    mf.close()


def test_a_fix_rebuilds_the_report_and_its_lists_only(fresh: World) -> None:
    fresh.build()
    again = fresh.build()
    assert again.written == 0, again.written_paths
    say(fresh.mf, BOB, fresh.r2, "fixed")
    after = fresh.build()
    written = set(after.written_paths)
    for path in (f"report/{fresh.r2}/index.html", f"report/{fresh.r2}/index.json",
                 f"report/{fresh.r2}/feed.atom", "report/index.html", "report/feed.atom",
                 "area/northdown/index.html", "area/northdown/feed.atom", "area/wessex/index.html",
                 "category/bins/index.html", "body/northdown/index.html", "data/reports.jsonl.gz"):
        assert path in written, path
    for path in (f"report/{fresh.r1}/index.html", f"report/{fresh.r5}/index.html",
                 "area/port-sheldon/index.html", "category/pothole/index.html",
                 "body/port-sheldon/index.html"):
        assert path not in written, path
    assert 'class="state state-fixed"' in fresh.read(f"report/{fresh.r2}/index.html")
    # fixed_at alone (an admin's correction) is enough to rebuild the page.
    with fresh.mf.store.tx() as tx:
        rep = tx.report(fresh.r1)
        assert rep is not None and rep.fixed_at is not None
        tx.update_report(fresh.r1, fixed_at=rep.fixed_at + timedelta(days=2))
    written = set(fresh.build().written_paths)
    assert f"report/{fresh.r1}/index.html" in written and "body/wessex/index.html" in written
    assert "12 days after it was reported" in fresh.read(f"report/{fresh.r1}/index.html")
    assert "The median time to fix was 7.5 days." in fresh.read("body/wessex/index.html")


def test_the_leak_guard_covers_report_pages(fresh: World, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh.build()
    before = {p: p.read_bytes() for p in all_files(fresh.out)}
    real = R.report_view

    def careless(*args, **kw):  # type: ignore[no-untyped-def]
        view, files = real(*args, **kw)
        return replace(view, location_text=f"ask {JANE}"), files

    monkeypatch.setattr(R, "report_view", careless)
    with fresh.mf.store.tx() as tx:   # the cached views must be made again
        tx.update_report(fresh.r1, location_text="near the bakery")
    with pytest.raises(LeakError, match="report/"):
        fresh.build()
    assert {p: p.read_bytes() for p in all_files(fresh.out)} == before


def test_maps_unit() -> None:
    """The drawing on its own: a thin area is widened, holes are cut out, the scale is round."""
    ring = [(-1.0, 51.0), (-0.9, 51.0), (-0.9, 51.3), (-1.0, 51.3), (-1.0, 51.0)]
    hole = [(-0.97, 51.1), (-0.93, 51.1), (-0.93, 51.2), (-0.97, 51.2), (-0.97, 51.1)]
    o = maps.Outline("thin", "Thin <b>", Polygon(ring, [hole]))
    svg = ET.fromstring(str(maps.draw(focus=[o], pins=[maps.Pin(51.05, -0.95, label="x<y")],
                                      title="T", desc="D", map_id="m")))
    assert int(svg.get("width", 0)) >= maps.MIN_SIDE
    assert maps.SIZE <= int(svg.get("height", 0)) <= maps.SIZE + maps.PIN_HEIGHT
    drawn = outline(svg, "thin")
    assert len(drawn.interiors) == 1
    assert drawn.contains(shapely.Point(*pin_xy(svg)))
    assert not drawn.contains(shapely.Point(drawn.interiors[0].centroid.coords[0]))
    [title] = [p.find(f"{SVG}title") for p in svg.iter(f"{SVG}path") if p.get("data-area")]
    assert title is not None and title.text == "Thin <b>"
    # A pin on the northernmost point still shows whole.
    north = ET.fromstring(str(maps.draw(focus=[o], pins=[maps.Pin(51.3, -1.0)], title="T",
                                        desc="D", map_id="n")))
    assert pin_xy(north)[1] >= maps.PIN_HEIGHT
    length, words = maps.scale_bar(maps.Projection.fit(o.geometry.bounds))
    assert re.fullmatch(r"(1|2|5)(0*) (m|km)", words) or re.fullmatch(r"(1|2|5)(\.\d+)? km", words)
    big = Polygon([(x / 1000 - 1, 51 + math.sin(x / 50) / 10) for x in range(2000)]
                  + [(1, 50), (-1, 50)])
    small = maps.draw(focus=[maps.Outline("big", "Big", big)], title="T", desc="D", map_id="b")
    assert len(small) < 20_000    # simplified to what a screen can show


def test_a_spanish_site_shows_its_reports_in_spanish(fresh: World) -> None:
    config = fresh.mf.settings.path
    fresh.mf.close()
    config.write_text(config.read_text().replace('language = "en"', 'language = "es"'))
    fresh.mf = MfSite.open(config)
    fresh.build()
    html = fresh.read(f"report/{fresh.r1}/index.html")
    assert "Avisos de incidencias" in html and "Dónde está el problema" in html
    assert "10 días después del aviso" in html
    assert "La mediana del tiempo hasta el arreglo fue de 6.5 días" in fresh.read("body/wessex/index.html")
