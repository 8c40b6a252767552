"""`mailflow report correct`: an admin puts right a report's category or place, as a
FixMyStreet admin edits a report, and it goes where it now belongs — on from where it was stuck,
quietly re-routed while it waits for the citizen, or sent on to another council when it was
already open. Real mail through `mailflow ingest`, on SQLite and PostgreSQL."""
from __future__ import annotations

import re

from conftest import JANE, Site, addresses
from test_reports_flow import (ASHCOMBE, LONDON, PORT_SHELDON, PORT_SHELDON_ROADS, WESSEX_LIGHTS,
                               WESSEX_ROADS,
                               _overlap_at_ashcombe, confirm_and_send, flat, new_mail, one,
                               reply, report, sent_report, thread_of)

NORTHDOWN = "streetscene@northdown.gov.example"


def _events(site: Site, tid: int, kind: str) -> list[dict]:  # type: ignore[type-arg]
    return [e for e in site.json("thread", "show", str(tid))["events"] if e["kind"] == kind]


def test_an_open_report_in_the_wrong_category_is_sent_on_to_the_right_council(site: Site) -> None:
    lat, lon = ASHCOMBE
    first, _ = sent_report(site, "Pothole by the green", f"At {lat}, {lon}, a deep hole.",
                           WESSEX_ROADS)
    tid = thread_of(first)
    r = site.run("--as", "alice", "report", "correct", str(tid), "--category", "fly-tipping",
                 "--reason", "the photo shows dumped rubbish")
    assert r.returncode == 0, r.stderr.decode()
    assert f"report {tid}: sent on to northdown (was wessex)" in r.stdout.decode()
    again, _ = one(new_mail(site), NORTHDOWN)
    assert thread_of(again) == tid
    assert addresses(again, "From") == addresses(first, "From")   # the same report address
    assert "Fly-tipping" in flat(again) and "a deep hole" in flat(again)
    t = site.json("thread", "show", str(tid))
    assert (t["state"], t["authority"]) == ("open", "northdown")
    (fix,) = _events(site, tid, "report_corrected")
    assert fix["actor"] == "admin:alice"
    assert fix["detail"]["from"] == {"category": "pothole"}
    assert fix["detail"]["to"] == {"category": "fly-tipping"}
    assert fix["detail"]["reason"] == "the photo shows dumped rubbish"
    (entry,) = [a for a in site.json("audit") if a["action"] == "report_correct"]
    assert entry["actor"] == "alice" and entry["detail"]["from"]["authority"] == "wessex"

    # Northdown answers at the report address: it is the report's authority now.
    from test_reports_flow import ingest, mail
    ingest(site, mail(f"Northdown <{NORTHDOWN}>", addresses(again, "From")[0],
                      "Re: " + str(again["Subject"]), "We will clear it on Monday."),
           addresses(again, "From")[0], NORTHDOWN)
    fwd, _ = one(new_mail(site), JANE)
    assert "We will clear it on Monday." in flat(fwd)


def test_a_category_the_same_council_handles_elsewhere_goes_to_that_address(site: Site) -> None:
    """Wessex takes both potholes and street lights, at two addresses: a pothole report that
    is really about a street light goes to the street-lighting team."""
    lat, lon = ASHCOMBE
    first, _ = sent_report(site, "Pothole", f"At {lat}, {lon}.", WESSEX_ROADS)
    tid = thread_of(first)
    r = site.run("report", "correct", str(tid), "--category", "street-light")
    assert r.returncode == 0, r.stderr.decode()
    said = " ".join(r.stdout.decode().split())   # the console wraps at its width
    assert f"sent on to {WESSEX_LIGHTS} (was {WESSEX_ROADS})" in said
    again, _ = one(new_mail(site), WESSEX_LIGHTS)
    assert thread_of(again) == tid and "Street light" in flat(again)
    assert site.json("thread", "show", str(tid))["authority"] == "wessex"


def test_a_correction_that_keeps_the_council_sends_nothing(site: Site) -> None:
    lat, lon = ASHCOMBE
    first, _ = sent_report(site, "Pothole", f"At {lat}, {lon}.", WESSEX_ROADS)
    tid = thread_of(first)
    r = site.run("report", "correct", str(tid), "--lat", str(lat + 0.001), "--lon", str(lon))
    assert r.returncode == 0, r.stderr.decode()
    assert "still for wessex" in r.stdout.decode()
    assert new_mail(site) == {}
    rows = site.json("route", "--lat", str(lat + 0.001), "--lon", str(lon), "--category",
                     "pothole")
    assert rows["authority"] == "wessex"
    r = site.run("report", "correct", str(tid), "--lat", str(lat + 0.001), "--lon", str(lon))
    assert r.returncode == 1 and "nothing to change" in r.stderr.decode()


def test_a_report_waiting_for_its_place_goes_on_when_an_admin_gives_it(site: Site) -> None:
    report(site, "Pothole", "There is a pothole by the old mill.")
    ask, _ = one(new_mail(site), JANE)
    (t,) = site.json("thread", "list")
    assert t["state"] == "awaiting_details"
    lat, lon = PORT_SHELDON
    r = site.run("report", "correct", str(t["id"]), "--lat", str(lat), "--lon", str(lon))
    assert r.returncode == 0, r.stderr.decode()
    assert "awaiting_confirmation" in r.stdout.decode()
    sent, _ = confirm_and_send(site, JANE, PORT_SHELDON_ROADS)
    assert thread_of(sent) == t["id"]
    assert site.json("thread", "show", str(t["id"]))["authority"] == "port-sheldon"


def test_a_report_no_council_could_take_is_routed_by_its_corrected_place(site: Site) -> None:
    _overlap_at_ashcombe(site)
    report(site, "Graffiti on the bus shelter", f"At {ASHCOMBE[0]}, {ASHCOMBE[1]}.")
    (item,) = site.json("queue", "list")
    lat, lon = PORT_SHELDON
    r = site.run("report", "correct", str(item["thread_id"]), "--lat", str(lat), "--lon",
                 str(lon), "--reason", "the shelter is in Port Sheldon")
    assert r.returncode == 0, r.stderr.decode()
    assert site.json("queue", "list") == []
    conf, _ = one(new_mail(site), JANE)
    assert "Port Sheldon" in flat(conf)


def test_a_correction_that_cannot_be_carried_out_changes_nothing(site: Site) -> None:
    lat, lon = ASHCOMBE
    first, _ = sent_report(site, "Pothole", f"At {lat}, {lon}.", WESSEX_ROADS)
    tid = thread_of(first)
    before = site.json("thread", "show", str(tid))

    def fails(*args: str) -> str:
        r = site.run("report", "correct", str(tid), *args)
        assert r.returncode != 0, r.stdout.decode()
        return " ".join(r.stderr.decode().split())

    assert "unknown category 'moon-dust'" in fails("--category", "moon-dust")
    assert "outside every area" in fails("--lat", str(LONDON[0]), "--lon", str(LONDON[1]))
    assert "both --lat and --lon" in fails("--lat", "51.0")
    assert "nothing to correct" in fails()
    assert "not a place on Earth" in fails("--lat", "91", "--lon", "0")
    r = site.run("thread", "state", str(tid), "fixed")
    assert r.returncode == 0, r.stderr.decode()
    assert "reopen it first" in fails("--category", "fly-tipping")
    after = site.json("thread", "show", str(tid))
    assert after["authority"] == before["authority"] == "wessex"
    assert _events(site, tid, "report_corrected") == []
    assert new_mail(site) == {}
    req = site.run("report", "correct", "999", "--category", "pothole")
    assert req.returncode == 1 and "999" in req.stderr.decode()


def test_the_public_page_tells_what_happened_to_the_report(site: Site) -> None:
    """FixMyStreet's "updates": sent to one council, its category corrected and sent on to
    another, fixed and reopened by the reporter — in order, on the page and in its JSON twin,
    without the moderator's reason, the first place or any address."""
    import json
    from test_reports_flow import ingest, mail, reply_address
    lat, lon = ASHCOMBE
    first, _ = sent_report(site, "Pothole by the green", f"At {lat}, {lon}, a deep hole.",
                           WESSEX_ROADS)
    tid = thread_of(first)
    assert site.run("--as", "alice", "report", "correct", str(tid), "--category", "fly-tipping",
                    "--reason", "the photo shows Mrs Smith's rubbish").returncode == 0
    new_mail(site)
    back = reply_address(site, tid)
    for said in ("fixed", "fixed", "not fixed"):   # a second "fixed" is not news
        ingest(site, mail(f"Jane <{JANE}>", back, "Re", said), back, JANE)
    r = site.run("archive", "build")
    assert r.returncode == 0, r.stderr.decode()
    out = site.dir / "var" / "archive"
    html = (out / f"report/{tid}/index.html").read_text()
    items = [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", li)).strip()
             for li in re.findall(r'<li class="history-[a-z_]+">(.*?)</li>', html, re.S)]
    assert [i.split(" · ")[0] for i in items] == [
        "Sent to Wessex County Council",
        "Category changed from Pothole to Fly-tipping by the site's moderators",
        "Sent on to Northdown District Council",
        "Marked as fixed by the reporter",
        "Reopened: not fixed by the reporter"], items
    assert "Mrs Smith" not in html and "rubbish</" not in html
    d = json.loads((out / f"report/{tid}/index.json").read_text())
    assert [(h["what"], h["by"]) for h in d["history"]] == [
        ("sent", None), ("category", "site"), ("sent_on", None), ("fixed", "reporter"),
        ("reopened", "reporter")]
    assert d["history"][2]["name"] == "Northdown District Council"
    assert "Mrs Smith" not in json.dumps(d)
