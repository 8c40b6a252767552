"""Dump everything `mailflow.mail.parse.parse` returns for every message of the corpora, so a
change to the parser can be diffed against the reading before it (issue #10: a faster parser
must read the corpus exactly as the old one did, or differ only where it is deliberately better).

`python -m bench.parse_dump OUT [DIR ...]`: one JSON line per file, sorted by path; the
default directories are tests/corpus, ../shared/corpus (when present) and tests/fixtures.
Attachments are dumped as name, type, size and sha256; text and HTML whole.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def files(dirs: list[Path]) -> list[Path]:
    out: list[Path] = []
    for d in dirs:
        if d.is_dir():
            out.extend(p for p in d.rglob("*") if p.is_file() and p.suffix not in (".md", ".py",
                                                                                  ".json", ".geojson"))
    return sorted(out)


def dump(raw: bytes) -> dict[str, Any]:
    from mailflow.mail.parse import ParseError, parse
    try:
        pm = parse(raw)
    except ParseError as exc:
        return {"error": str(exc)}
    d: dict[str, Any] = {}
    for name in pm.__dataclass_fields__:
        v = getattr(pm, name)
        if name == "attachments":
            v = [{"filename": a.filename, "content_type": a.content_type, "size": a.size,
                  "sha256": hashlib.sha256(a.data).hexdigest()} for a in v]
        elif name == "date":
            v = None if v is None else v.isoformat()
        d[name] = v
    return d


def main() -> None:
    out = Path(sys.argv[1])
    dirs = [Path(a) for a in sys.argv[2:]] or [ROOT / "tests" / "corpus",
                                               ROOT.parent / "shared" / "corpus",
                                               ROOT / "tests" / "fixtures"]
    with out.open("w") as f:
        for p in files(dirs):
            rel = str(p.relative_to(p.parents[len(p.relative_to(ROOT.parent).parts) - 2]))
            f.write(json.dumps({"file": rel, **dump(p.read_bytes())}, ensure_ascii=False,
                               sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
