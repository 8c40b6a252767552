"""Admin tools given a spool file: `mailflow explain` reads a .mail as the message it holds,
with the envelope it arrived with, exactly as it reads the raw message."""
from __future__ import annotations

import json

from conftest import DOMAIN, JANE, Site, compose

from mailflow.spool import Envelope, Spool


def test_explain_a_spool_file_as_its_message(site: Site) -> None:
    raw = compose(f"Jane <{JANE}>", f"camden@{DOMAIN}", "Gritting", "Which roads?")
    spool = Spool(site.dir / "var" / "spool-explain")
    id = spool.put(raw, Envelope(mail_from=JANE, rcpt_tos=[f"camden@{DOMAIN}"]))
    plain = site.dir / "plain.eml"
    plain.write_bytes(raw)
    r1 = site.run("explain", str(spool.root / "new" / f"{id}.mail"), "--json")
    r2 = site.run("explain", str(plain), "--rcpt", f"camden@{DOMAIN}", "--sender", JANE, "--json")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr.decode() + r2.stderr.decode()
    assert json.loads(r1.stdout) == json.loads(r2.stdout)
