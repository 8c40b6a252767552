"""Authorities through the real CLI: show, add, edit, import, problems; rules/authorities.toml
rewritten without losing its comments, never left broken, every change in the audit log."""
from __future__ import annotations

import json
import tomllib

from conftest import ROOT, Site
from test_matching_e2e import fixture
from test_roundtrip import ask

ROOT_RULES = ROOT / "rules"
HEADER = "# The public authorities citizens can write to."


def toml(site: Site) -> str:
    return (site.dir / "rules" / "authorities.toml").read_text()


def fails(site: Site, *args: str, says: str) -> None:
    """The command exits 1 with `says` in its error, and the rules file is untouched."""
    before = toml(site)
    r = site.run(*args)
    assert r.returncode == 1, r.stdout.decode()
    said = " ".join((r.stderr + r.stdout).decode().split())   # errors are wrapped at 80 columns
    assert says in said, said
    assert toml(site) == before


def test_add_then_show_list_and_audit(site: Site) -> None:
    r = site.run("--as", "alice", "authority", "add", "--slug", "Islington", "--name",
                 "Islington Council", "--email", "FOI@islington.gov.example", "--email",
                 "info@islington.gov.example", "--tag", "council", "--reason", "new borough")
    assert r.returncode == 0, r.stderr.decode()
    assert b"Restart `mailflow serve`" in r.stdout
    text = toml(site)
    shipped = (ROOT_RULES / "authorities.toml").read_text().count("\n[[authority]]")
    assert text.startswith(HEADER) and text.count("\n[[authority]]") == shipped + 1
    assert text.endswith('\n\n[[authority]]\nslug = "islington"\nname = "Islington Council"\n'
                         'emails = ["foi@islington.gov.example", "info@islington.gov.example"]\n'
                         'tags = ["council"]\n')
    assert tomllib.loads(text)["authority"][0]["slug"] == "camden"
    assert site.json("authority", "list")[-1] == {
        "slug": "islington", "name": "Islington Council",
        "emails": ["foi@islington.gov.example", "info@islington.gov.example"],
        "law": "uk-foia", "address": "islington@ask.example"}
    shown = site.json("authority", "show", "islington")
    assert shown["address_works"] and shown["threads"] == [] and shown["tags"] == ["council"]
    (entry,) = site.json("audit")
    assert (entry["actor"], entry["action"], entry["target"], entry["reason"]) == (
        "alice", "authority_add", "authority:islington", "new borough")
    assert entry["detail"]["after"]["emails"][0] == "foi@islington.gov.example"
    human = site.run("authority", "show", "islington")
    assert b"Islington Council" in human.stdout and b"no known problem" in human.stdout


def test_add_refuses_and_writes_nothing(site: Site) -> None:
    for args, says in [
        (("--slug", "camden", "--name", "C"), "authority 'camden' already exists"),
        (("--slug", "hackney", "--name", "H", "--email", "foi-at-hackney"),
         "'foi-at-hackney' is not an email address"),
        (("--slug", "hackney", "--name", "H", "--law", "mars-foia"),
         "unknown law 'mars-foia'; known: au-foi, cl-transparencia"),
        (("--slug", "bad_slug", "--name", "B"), "slug 'bad_slug' must be lower-case letters"),
        (("--slug", "postmaster", "--name", "P"), "postmaster@ask.example is mailflow's own role"),
        (("--slug", "hackney", "--name", "H", "--email", "x@ask.example"),
         "'x@ask.example' is at this site's own domain"),
        (("--slug", "hackney", "--name", " "), "no name"),
        (("--slug", "", "--name", "N"), "no slug"),
    ]:
        fails(site, "authority", "add", *args, says=says)
    assert site.json("audit") == []


def test_edit_changes_only_its_table_and_keeps_comments(site: Site) -> None:
    path = site.dir / "rules" / "authorities.toml"
    path.write_text(toml(site).replace('[[authority]]\nslug = "edinburgh"',
                                       '# Scotland from here on\n[[authority]]\nslug = "edinburgh"'))
    before = toml(site)
    r = site.run("--as", "bob", "authority", "edit", "camden", "--add-email",
                 "info@camden.gov.example", "--remove-email", "foi@camden.gov.example",
                 "--name", "London Borough of Camden", "--reason", "bounced")
    assert r.returncode == 0, r.stderr.decode()
    assert b"Restart `mailflow serve`" in r.stdout
    after = toml(site)
    assert after.replace('name = "London Borough of Camden"\nemails = ["info@camden.gov.example"]',
                         'name = "Camden Borough Council"\nemails = ["foi@camden.gov.example"]'
                         ) == before
    camden = site.json("authority", "show", "camden")
    assert camden["emails"] == ["info@camden.gov.example"] and camden["tags"] == ["council"]
    (entry,) = site.json("audit")
    assert entry["action"] == "authority_edit" and entry["actor"] == "bob"
    assert entry["detail"] == {
        "before": {"name": "Camden Borough Council", "emails": ["foi@camden.gov.example"]},
        "after": {"name": "London Borough of Camden", "emails": ["info@camden.gov.example"]}}
    assert site.run("authority", "edit", "camden", "--email", "a@camden.gov.example", "--email",
                    "b@camden.gov.example", "--tag", "").returncode == 0
    camden = site.json("authority", "show", "camden")
    assert camden["emails"] == ["a@camden.gov.example", "b@camden.gov.example"]
    assert camden["tags"] == [] and "tags" not in tomllib.loads(toml(site))["authority"][0]
    again = site.run("authority", "edit", "camden", "--add-email", "a@camden.gov.example")
    assert again.returncode == 0 and b"nothing changed" in again.stdout
    assert len(site.json("audit")) == 2


def test_edit_errors(site: Site) -> None:
    fails(site, "authority", "edit", "camdn", "--name", "X", says="did you mean camden?")
    fails(site, "authority", "edit", "camden", says="nothing to change")
    fails(site, "authority", "edit", "camden", "--law", "nope", says="unknown law 'nope'; known:")
    fails(site, "authority", "edit", "camden", "--add-email", "no", says="'no' is not an email")
    fails(site, "authority", "edit", "camden", "--remove-email", "x@y.example",
          says="x@y.example: not among camden's addresses (foi@camden.gov.example)")
    fails(site, "authority", "show", "edinburg", says="did you mean edinburgh?")
    assert site.json("audit") == []


CSV = """name,slug,emails,law,tags
Islington Council,islington,foi@islington.gov.example; info@islington.gov.example,,council;london
Camden (again),camden,foi@camden.gov.example,uk-foia,
Hackney Council,hackney,not-an-email,,
Glasgow City Council,glasgow,foi@glasgow.gov.example,mars-foia,
,nameless,a@b.example,,
Islington twice,islington,x@islington.gov.example,,
"Too, many",fields,a@b.example,,,extra
"""


def test_import_dry_run_refusals_and_partial(site: Site, tmp_path) -> None:  # type: ignore[no-untyped-def]
    csv = tmp_path / "councils.csv"
    csv.write_text(CSV)
    before = toml(site)
    dry = site.run("authority", "import", str(csv), "--dry-run")
    assert dry.returncode == 1 and toml(site) == before
    out = dry.stdout.decode()
    assert "row 2: would add islington (Islington Council)" in out
    assert "row 3: skipped camden: exists (use --update to change it)" in out
    for line in ("row 4: refused hackney: 'not-an-email' is not an email address",
                 "row 5: refused glasgow: unknown law 'mars-foia'; known: au-foi",
                 "row 6: refused nameless: no name",
                 "row 7: refused islington: slug 'islington' is also in row 2",
                 "row 8: refused: 6 fields, but the header has 5"):
        assert line in out, out
    assert "dry run: nothing written" in out
    report = json.loads(site.run("authority", "import", str(csv), "--json").stdout)
    assert [r["row"] for r in report["refused"]] == [4, 5, 6, 7, 8]
    assert not report["written"] and toml(site) == before
    assert site.json("audit") == []
    partial = site.run("--as", "carol", "authority", "import", str(csv), "--partial")
    assert partial.returncode == 1 and b"Restart `mailflow serve`" in partial.stdout
    added = site.json("authority", "show", "islington")
    assert added["emails"] == ["foi@islington.gov.example", "info@islington.gov.example"]
    assert added["tags"] == ["council", "london"] and added["law"] == "uk-foia"
    assert toml(site).startswith(before)          # appended; the rest kept as it was
    (entry,) = site.json("audit")
    assert (entry["actor"], entry["action"], entry["target"]) == (
        "carol", "authority_import", "authority:islington")
    assert entry["detail"]["row"] == 2 and entry["detail"]["change"] == "added"


def test_import_update_and_semicolon_csv(site: Site, tmp_path) -> None:  # type: ignore[no-untyped-def]
    csv = tmp_path / "update.csv"
    csv.write_bytes("\ufeffslug;name;emails;law\n"             # Excel's BOM and separator
                    "camden;Camden Council;foi@camden.gov.example info@camden.gov.example;\n"
                    "home-office;Home Office;foirequests@homeoffice.gov.example;uk-foia\n"
                    "edinburgh;City of Edinburgh Council;;\n".encode())
    slugs = ["camden", "home-office", "edinburgh"]
    skipped = site.json("authority", "import", str(csv))
    assert [r["slug"] for r in skipped["skipped"]] == slugs
    r = site.run("authority", "import", str(csv), "--update")
    assert r.returncode == 0, r.stderr.decode()
    assert "row 2: update camden: name: 'Camden Council'; emails: [" in r.stdout.decode()
    camden = site.json("authority", "show", "camden")
    assert camden["name"] == "Camden Council" and camden["tags"] == ["council"]
    assert camden["emails"] == ["foi@camden.gov.example", "info@camden.gov.example"]
    edinburgh = site.json("authority", "show", "edinburgh")     # blank cells change nothing
    assert edinburgh["law"] == "scotland-foisa" and edinburgh["emails"] == [
        "foi@edinburgh.gov.example"]
    (entry,) = site.json("audit")
    assert entry["detail"]["before"]["name"] == "Camden Borough Council"
    again = site.json("authority", "import", str(csv), "--update")
    assert [r["slug"] for r in again["unchanged"]] == slugs
    assert not again["written"]


def test_import_bad_header_or_encoding(site: Site, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.csv"
    bad.write_text("name,slug,email\nX,x,x@x.example\n")
    fails(site, "authority", "import", str(bad),
          says="got name, slug, email (columns: name, slug, emails, law, tags, url")
    bad.write_bytes(b"name,slug\nM\xfcnchen,muenchen\n")
    fails(site, "authority", "import", str(bad), says="not UTF-8")


def test_problems_no_address_and_bounced_request(site: Site) -> None:
    assert site.json("authority", "problems") == []
    assert site.run("authority", "add", "--slug", "quiet", "--name", "Quiet Council").returncode == 0
    t = ask(site)                                                 # to camden
    assert site.ingest(fixture("utf-7-conversion.eml"), [t["address"]], sender="") == 0
    problems = {p["slug"]: p for p in site.json("authority", "problems")}
    assert problems["quiet"]["problem"] == "no email address"
    assert problems["camden"]["thread_id"] == t["id"]
    assert problems["camden"]["problem"].startswith(
        f"the request of thread {t['id']} could not be delivered: ")
    camden = site.json("authority", "show", "camden")
    assert not camden["address_works"] and camden["problem"] == problems["camden"]["problem"]
    assert camden["threads"] == [{"id": t["id"], "title": "Road maintenance budget 2025",
                                  "state": "waiting_response", "delivery_status": "failed"}]
    human = site.run("authority", "problems")
    assert b"no email address" in human.stdout and b"camden" in human.stdout
    # Fixing the address takes camden off the list; the failure stays on the thread.
    assert site.run("authority", "edit", "camden", "--email",
                    "information@camden.gov.example").returncode == 0
    assert [p["slug"] for p in site.json("authority", "problems")] == ["quiet"]


def test_every_command_has_an_example(site: Site) -> None:
    for command in ("show", "add", "edit", "import", "problems"):
        r = site.run("authority", command, "--help")
        assert r.returncode == 0 and b"Example: mailflow authority " + command.encode() in r.stdout


def test_a_file_it_cannot_rewrite_safely_is_left_alone(site: Site) -> None:
    """Inline tables load, but mailflow cannot edit them table by table: it says so."""
    path = site.dir / "rules" / "authorities.toml"
    (site.dir / "rules" / "categories.toml").unlink()   # no fault reports: no areas to route
    path.write_text('authority = [{slug = "camden", name = "Camden", emails = []}]\n')
    fails(site, "authority", "add", "--slug", "x", "--name", "X",
          says="are not written one table per authority")


def test_the_application_functions_directly(site: Site) -> None:
    """What a web page would call: the site in memory sees the change at once."""
    from mailflow.authorities import Authorities
    from mailflow.site import Site as MailflowSite
    s = MailflowSite.open(site.config)
    try:
        app = Authorities(s, "web")
        app.add({"slug": "lambeth", "name": "Lambeth", "emails": ["foi@lambeth.gov.example"]})
        assert s.rules.authorities["lambeth"].law == "uk-foia"
        assert app.show("lambeth")["address_works"]
        report = app.import_csv(b"slug,name\nlambeth,Lambeth Council\n", "x.csv", update=True,
                                dry_run=True)
        assert report.updated and not report.written
        assert s.rules.authorities["lambeth"].name == "Lambeth"
    finally:
        s.close()


def test_edit_keeps_the_fault_report_contacts(site: Site) -> None:
    """Editing an authority rewrites its table: where its fault reports go must survive."""
    r = site.run("authority", "edit", "wessex", "--name", "Wessex County Council (Highways)")
    assert r.returncode == 0, r.stderr.decode()
    entry = [a for a in tomllib.loads((site.dir / "rules" / "authorities.toml").read_text())
             ["authority"] if a["slug"] == "wessex"][0]
    shipped = [a for a in tomllib.loads((ROOT_RULES / "authorities.toml").read_text())
               ["authority"] if a["slug"] == "wessex"][0]
    assert entry["name"] == "Wessex County Council (Highways)"
    assert entry["reports"] == shipped["reports"] and entry["reports"]
