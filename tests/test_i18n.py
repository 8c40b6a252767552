"""A deployment can run the whole site in another language: letters, notices and pages."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from babel.messages.pofile import read_po

from conftest import DOMAIN, JANE, Site, addresses, compose

ROOT = Path(__file__).resolve().parent.parent
LOCALE = ROOT / "mailflow" / "locale"


def test_the_spanish_catalogue_is_complete_and_current(tmp_path: Path) -> None:
    """Every string in the templates and code is in the catalogue template, and translated."""
    fresh = tmp_path / "fresh.pot"
    subprocess.run([sys.executable, "-m", "babel.messages.frontend", "extract", "-F",
                    str(ROOT / "babel.cfg"), "-k", "_", "-k", "N_", "--no-location",
                    "--sort-output", "-o", str(fresh), str(ROOT)], check=True,
                   capture_output=True, cwd=ROOT)
    ids = {m.id if isinstance(m.id, str) else m.id[0] for m in read_po(fresh.open("rb")) if m.id}
    es = {(m.id if isinstance(m.id, str) else m.id[0]): m.string
          for m in read_po((LOCALE / "es/LC_MESSAGES/mailflow.po").open("rb"), locale="es")
          if m.id}
    missing = sorted(i for i in ids if not es.get(i) or es[i] in ("", ("", "")))
    assert missing == [], f"untranslated (run `make messages`): {missing}"


def test_a_spanish_site_writes_its_letters_in_spanish(site: Site) -> None:
    site.set("site", "language", '"es"')
    assert site.ingest(compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Baches", "¿Cuánto?"),
                       [f"camden@{DOMAIN}"]) == 0
    (_, conf, _), = site.new_mail()
    text = conf.get_body(("plain",)).get_content()
    assert str(conf["Subject"]) == "Confirme su solicitud: Baches"
    assert "Estimado/a Jane" in text and "Please confirm" not in text
    confirm = addresses(conf, "Reply-To")[0]
    assert site.ingest(compose(f"Jane <{JANE}>", confirm, "Re", "Sí"), [confirm]) == 0
    (_, req, _), = site.new_mail()
    assert str(req["Subject"]).startswith("Solicitud de acceso a la información - Baches [FOI #")
    body = " ".join(req.get_body(("plain",)).get_content().split())
    assert "Atentamente," in body and "de " in body   # a Spanish long date


def test_an_unknown_language_is_a_clear_error(site: Site) -> None:
    site.set("site", "language", '"xx"')
    r = site.run("authority", "list")
    assert r.returncode == 1 and b"language" in r.stderr and b"es" in r.stderr
