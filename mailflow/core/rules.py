"""The site's data in `rules/`, read into typed values: authorities and the laws they fall under.

Parsing is pure (text in, values out) so a broken rules file is reported with the file name
and the entry before anything runs, and tests need no files. `mailflow.rulesdir` reads the
folder.
"""
from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from functools import cache
from typing import TYPE_CHECKING, Any

from mailflow.core.addresses import valid_slug
from mailflow.errors import RulesError

if TYPE_CHECKING:   # routing imports shapely: only the sites with fault reports load it
    from mailflow.core.routing import ReportRules

_EMAIL_RE = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+\.[^@\s<>\"]+$")


DAY_ONE_RULES = ("next_working_day", "next_day", "same_day")
SHIFT_RULES = ("next_working_day", "previous_working_day", "none")
_MONTH_DAY_RE = re.compile(r"^(\d\d)-(\d\d)$")


@dataclass(frozen=True)
class ExcludedPeriod:
    """Days of every year on which the clock does not run, e.g. New Zealand's 25 December to
    15 January. Inclusive at both ends; `start` after `end` means the period wraps the year end."""
    start: tuple[int, int]    # (month, day)
    end: tuple[int, int]
    reason: str               # shown to people, e.g. "25 December to 15 January (OIA s 2)"

    def contains(self, d: date) -> bool:
        md = (d.month, d.day)
        if self.start <= self.end:
            return self.start <= md <= self.end
        return md >= self.start or md <= self.end


@dataclass(frozen=True)
class Extension:
    """More time the law lets an authority claim, counted the law's way after the due date."""
    id: str                   # how a claimed extension is named: "public-interest"
    days: int                 # further days, counted like the law's own days
    description: str          # where it comes from and when it applies


@dataclass(frozen=True)
class Law:
    """A Freedom of Information law's clock, as data (see rules/laws.toml for every field).

    In laws.toml only id, name, days and country are required, so a short entry stays a valid
    law. Two defaults depend on other fields and are filled in at construction: `day_one` is
    the next working day for working-day laws and the next day for calendar-day laws, and
    `very_late_days` is as many again as `days`.
    """
    id: str
    name: str                 # as used in letters: "the Freedom of Information Act 2000"
    short_name: str           # "FOI"
    days: int                 # the time the authority has to answer
    working_days: bool        # counted in working days (else calendar days)
    country: str              # ISO 3166 code for the `holidays` package
    subdivisions: tuple[str, ...] = ()   # holidays of any of these count (the union)
    day_one: str = ""         # one of DAY_ONE_RULES; "" → the usual for the counting (above)
    shift_if_non_working: str = "none"   # one of SHIFT_RULES, for calendar-day deadlines
    excluded_periods: tuple[ExcludedPeriod, ...] = ()
    very_late_days: int = 0   # further days after `due` until "very late"; 0 → `days`
    extensions: tuple[Extension, ...] = ()
    internal_review_days: int | None = None   # None: the law has no internal review

    def __post_init__(self) -> None:
        # A frozen dataclass fills its derived defaults through object.__setattr__.
        if not self.day_one:
            object.__setattr__(self, "day_one",
                               "next_working_day" if self.working_days else "next_day")
        if not self.very_late_days:
            object.__setattr__(self, "very_late_days", self.days)
        if self.day_one not in DAY_ONE_RULES:
            raise ValueError(f"day_one must be one of {', '.join(DAY_ONE_RULES)}, "
                             f"got {self.day_one!r}")
        if self.shift_if_non_working not in SHIFT_RULES:
            raise ValueError(f"shift_if_non_working must be one of {', '.join(SHIFT_RULES)}, "
                             f"got {self.shift_if_non_working!r}")
        if self.days <= 0:
            raise ValueError(f"days must be positive, got {self.days}")
        if self.very_late_days < 0:
            raise ValueError(f"very_late_days must be positive, got {self.very_late_days}")
        if self.internal_review_days is not None and self.internal_review_days <= 0:
            raise ValueError("internal_review_days must be positive (leave it out where the "
                             f"law has no internal review), got {self.internal_review_days}")
        seen: set[str] = set()
        for ext in self.extensions:
            if ext.days <= 0:
                raise ValueError(f"extension {ext.id!r}: days must be positive, got {ext.days}")
            if ext.id in seen:
                raise ValueError(f"duplicate extension id {ext.id!r}")
            seen.add(ext.id)

    def extension(self, ext_id: str) -> Extension | None:
        """The extension the law calls `ext_id`, if it allows one by that name."""
        return next((e for e in self.extensions if e.id == ext_id), None)


@dataclass(frozen=True)
class Authority:
    slug: str
    name: str
    emails: tuple[str, ...]
    law: str
    url: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)
    # Where fault reports go, by category slug or "default" (authorities.toml `reports`).
    reports: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def contact(self) -> str | None:
        return self.emails[0] if self.emails else None

    def report_contact(self, category: str) -> str | None:
        """Where a fault report of `category` goes: the address for that category, else the
        authority's "default" report address, else its contact (None: it has no address)."""
        return self.reports.get(category) or self.reports.get("default") or self.contact


@dataclass(frozen=True)
class Rules:
    laws: dict[str, Law]
    authorities: dict[str, Authority]
    # None: the site takes no fault reports. A function: they are read on first use (what
    # `mailflow ingest` asks for: the areas' geometry needs shapely and numpy, a quarter of a
    # process's start-up, and most mail is not a report); `reports` then returns its value.
    report_rules: "ReportRules | Callable[[], ReportRules] | None" = field(
        default=None, compare=False)

    @property
    def reports(self) -> ReportRules | None:
        r = self.report_rules
        if callable(r):   # a ReportRules is a plain dataclass, never callable
            r = r()
            object.__setattr__(self, "report_rules", r)
        return r   # type: ignore[return-value]

    @property
    def takes_reports(self) -> bool:
        """Whether rules/ has fault-report categories (without reading the areas)."""
        return self.report_rules is not None

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


_LAW_KEYS = {"id", "name", "short_name", "days", "working_days", "country", "subdivisions",
             "day_one", "shift_if_non_working", "excluded_periods", "very_late_days",
             "extensions", "internal_review_days"}


@cache
def _supported_calendars() -> dict[str, frozenset[str]]:
    """Country code → its subdivision codes, as the installed `holidays` package knows them."""
    import holidays
    return {c: frozenset(subs) for c, subs in holidays.list_supported_countries().items()}


def _check_calendar(country: str, subdivisions: tuple[str, ...], where: str) -> None:
    """A misspelt country or region would silently drop holidays: refuse it at load time."""
    calendars = _supported_calendars()
    if country not in calendars:
        raise RulesError(f"{where}: country {country!r} is not a country the `holidays` "
                         "package knows (ISO 3166 alpha-2, e.g. GB, NZ)")
    for sub in subdivisions:
        if not isinstance(sub, str) or sub not in calendars[country]:
            known = ", ".join(sorted(calendars[country])) or "none"
            raise RulesError(f"{where}: subdivision {sub!r} is not one of {country}'s in the "
                             f"`holidays` package: {known}")


def _month_day(value: Any, key: str, where: str) -> tuple[int, int]:
    m = _MONTH_DAY_RE.match(value) if isinstance(value, str) else None
    if m:
        month, day = int(m.group(1)), int(m.group(2))
        try:
            date(2000, month, day)  # a leap year, so 02-29 is allowed
            return month, day
        except ValueError:
            pass
    raise RulesError(f'{where}: {key} must be a day of the year as "MM-DD", got {value!r}')


def _excluded_periods(e: dict[str, Any], where: str) -> tuple[ExcludedPeriod, ...]:
    out = []
    for j, p in enumerate(_get(e, "excluded_periods", list, where, []), 1):
        here = f"{where}: excluded_periods #{j}"
        if not isinstance(p, dict):
            raise RulesError(f"{here}: expected a table {{from, to, reason}}, got {p!r}")
        _unknown(p, {"from", "to", "reason"}, here)
        out.append(ExcludedPeriod(start=_month_day(_get(p, "from", str, here), "from", here),
                                  end=_month_day(_get(p, "to", str, here), "to", here),
                                  reason=_get(p, "reason", str, here)))
    return tuple(out)


def _extensions(e: dict[str, Any], where: str) -> tuple[Extension, ...]:
    out = []
    for j, x in enumerate(_get(e, "extensions", list, where, []), 1):
        here = f"{where}: extensions #{j}"
        if not isinstance(x, dict):
            raise RulesError(f"{here}: expected a table {{id, days, description}}, got {x!r}")
        _unknown(x, {"id", "days", "description"}, here)
        out.append(Extension(id=_get(x, "id", str, here), days=_get(x, "days", int, here),
                             description=_get(x, "description", str, here)))
    return tuple(out)


def parse_laws(text: str, source: str = "laws.toml") -> dict[str, Law]:
    """Every [[law]] in the text. A wrong entry is a RulesError naming the file and the law."""
    data = _toml(text, source)
    entries = data.get("law", [])
    if not isinstance(entries, list):
        raise RulesError(f"{source}: expected [[law]] tables")
    laws: dict[str, Law] = {}
    for i, e in enumerate(entries, 1):
        where = f"{source}: law #{i}" + (f" ({e.get('id')})" if isinstance(e.get("id"), str) else "")
        _unknown(e, _LAW_KEYS, where)
        country = _get(e, "country", str, where)
        subdivisions = tuple(_get(e, "subdivisions", list, where, []))
        _check_calendar(country, subdivisions, where)
        try:
            law = Law(id=_get(e, "id", str, where), name=_get(e, "name", str, where),
                      short_name=_get(e, "short_name", str, where, "FOI"),
                      days=_get(e, "days", int, where),
                      working_days=_get(e, "working_days", bool, where, True),
                      country=country, subdivisions=subdivisions,
                      day_one=_get(e, "day_one", str, where, ""),
                      shift_if_non_working=_get(e, "shift_if_non_working", str, where, "none"),
                      excluded_periods=_excluded_periods(e, where),
                      very_late_days=_get(e, "very_late_days", int, where, 0),
                      extensions=_extensions(e, where),
                      internal_review_days=_get(e, "internal_review_days", int,
                                                                where, None))
        except ValueError as err:
            raise RulesError(f"{where}: {err}") from None
        if "very_late_days" in e and law.very_late_days <= 0:
            raise RulesError(f"{where}: very_late_days must be positive")
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
    known = {"slug", "name", "emails", "law", "url", "tags", "reports"}
    for i, e in enumerate(entries, 1):
        where = f"{source}: authority #{i}" + (
            f" ({e.get('slug')})" if isinstance(e.get("slug"), str) else "")
        _unknown(e, known, where)
        slug = _get(e, "slug", str, where).lower()
        if slug == "report":
            raise RulesError(f"{where}: slug 'report' is taken: citizens write to report@ "
                             "and report+<category>@ to report a problem in the street")
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
                              tags=tuple(_get(e, "tags", list, where, [])),
                              reports=_report_contacts(e, where))
    return out


def _report_contacts(e: dict[str, Any], where: str) -> dict[str, str]:
    """`reports = { default = "...", pothole = "roads@..." }`: category slug → address."""
    table = _get(e, "reports", dict, where, {})
    out: dict[str, str] = {}
    for key, addr in table.items():
        if not isinstance(addr, str) or not _EMAIL_RE.match(addr.strip()):
            raise RulesError(f"{where}: reports.{key} must be an email address, got {addr!r}")
        out[key.lower()] = addr.strip().lower()
    return out


def check_report_contacts(authorities: dict[str, Authority], categories: Any,
                          source: str = "authorities.toml") -> None:
    """Every key of an authority's `reports` table is "default" or a category slug: a typo
    would otherwise silently send that category's reports to the fallback address."""
    for a in authorities.values():
        for key in a.reports:
            if key != "default" and key not in categories:
                raise RulesError(
                    f"{source}: authority {a.slug}: reports.{key}: {key!r} is not a category "
                    f"in categories.toml; known: default, {', '.join(sorted(categories))}")
