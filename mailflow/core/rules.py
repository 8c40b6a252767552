"""The site's data in `rules/`, read into typed values: authorities and the laws they fall under.

Parsing is pure (text in, values out) so a broken rules file is reported with the file name
and the entry before anything runs, and tests need no files. `mailflow.rulesdir` reads the
folder.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from mailflow.core.addresses import valid_slug
from mailflow.errors import RulesError

_EMAIL_RE = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+\.[^@\s<>\"]+$")


@dataclass(frozen=True)
class Law:
    id: str
    name: str                 # as used in letters: "the Freedom of Information Act 2000"
    short_name: str           # "FOI"
    days: int                 # the time the authority has to answer
    working_days: bool        # counted in working days (else calendar days)
    country: str              # ISO 3166 code for the `holidays` package
    subdivisions: tuple[str, ...] = ()   # holidays of any of these count (the union)


@dataclass(frozen=True)
class Authority:
    slug: str
    name: str
    emails: tuple[str, ...]
    law: str
    url: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def contact(self) -> str | None:
        return self.emails[0] if self.emails else None


@dataclass(frozen=True)
class Rules:
    laws: dict[str, Law]
    authorities: dict[str, Authority]

    @property
    def slugs(self) -> frozenset[str]:
        return frozenset(self.authorities)

    def law_for(self, authority: Authority) -> Law:
        return self.laws[authority.law]


def _toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RulesError(f"{source}: not valid TOML: {e}") from None


def _get(entry: dict[str, Any], key: str, typ: type, where: str, default: Any = ...) -> Any:
    if key not in entry:
        if default is ...:
            raise RulesError(f"{where}: missing key {key!r}")
        return default
    value = entry[key]
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        raise RulesError(f"{where}: {key} must be {typ.__name__}, got {value!r}")
    return value


def _unknown(entry: dict[str, Any], known: set[str], where: str) -> None:
    extra = set(entry) - known
    if extra:
        raise RulesError(f"{where}: unknown key(s) {', '.join(sorted(extra))}; "
                         f"known: {', '.join(sorted(known))}")


def parse_laws(text: str, source: str = "laws.toml") -> dict[str, Law]:
    data = _toml(text, source)
    entries = data.get("law", [])
    if not isinstance(entries, list):
        raise RulesError(f"{source}: expected [[law]] tables")
    laws: dict[str, Law] = {}
    known = {"id", "name", "short_name", "days", "working_days", "country", "subdivisions"}
    for i, e in enumerate(entries, 1):
        where = f"{source}: law #{i}" + (f" ({e.get('id')})" if isinstance(e.get("id"), str) else "")
        _unknown(e, known, where)
        law = Law(id=_get(e, "id", str, where), name=_get(e, "name", str, where),
                  short_name=_get(e, "short_name", str, where, "FOI"),
                  days=_get(e, "days", int, where),
                  working_days=_get(e, "working_days", bool, where, True),
                  country=_get(e, "country", str, where),
                  subdivisions=tuple(_get(e, "subdivisions", list, where, [])))
        if law.days <= 0:
            raise RulesError(f"{where}: days must be positive")
        if law.id in laws:
            raise RulesError(f"{where}: duplicate law id {law.id!r}")
        laws[law.id] = law
    return laws


def parse_authorities(text: str, laws: dict[str, Law], default_law: str,
                      source: str = "authorities.toml") -> dict[str, Authority]:
    data = _toml(text, source)
    entries = data.get("authority", [])
    if not isinstance(entries, list):
        raise RulesError(f"{source}: expected [[authority]] tables")
    out: dict[str, Authority] = {}
    known = {"slug", "name", "emails", "law", "url", "tags"}
    for i, e in enumerate(entries, 1):
        where = f"{source}: authority #{i}" + (
            f" ({e.get('slug')})" if isinstance(e.get("slug"), str) else "")
        _unknown(e, known, where)
        slug = _get(e, "slug", str, where).lower()
        if not valid_slug(slug):
            raise RulesError(f"{where}: slug {slug!r} must be lower-case letters, digits and "
                             "hyphens, and must not look like a request address")
        emails = tuple(a.strip().lower() for a in _get(e, "emails", list, where, []))
        for a in emails:
            if not _EMAIL_RE.match(a):
                raise RulesError(f"{where}: {a!r} is not an email address")
        law = _get(e, "law", str, where, default_law)
        if law not in laws:
            raise RulesError(f"{where}: unknown law {law!r}; known: {', '.join(sorted(laws))}")
        if slug in out:
            raise RulesError(f"{where}: duplicate slug {slug!r}")
        out[slug] = Authority(slug=slug, name=_get(e, "name", str, where), emails=emails,
                              law=law, url=_get(e, "url", str, where, ""),
                              tags=tuple(_get(e, "tags", list, where, [])))
    return out
