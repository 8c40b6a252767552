"""When an authority's answer is due, and why: the law's clock as a pure calculation.

Everything here is a function of its arguments (a Law from rules/laws.toml and dates): no
clock, no I/O, so the same dates come out in the CLI, on the thread page, in the citizen's
emails and in tests. A result keeps its working — every day that did not count and why — so
anyone can check a due date by hand (Alaveteli's users asked for exactly that).

Vocabulary, as the laws use it:
  - a *working day* is not a weekend day, not a public holiday of the law's country (or of any
    of its listed subdivisions: the union) and not in one of the law's excluded periods;
  - a *counted day* is a day the law's clock runs: a working day for working-day laws, and any
    day outside the excluded periods for calendar-day laws;
  - *day one* is the first counted day (the law's `day_one` rule says whether the day of sending
    can be it, and whether it must be a working day);
  - a calendar-day deadline that falls on a non-working day *moves* (`shift_if_non_working`).

The holiday calendars come from the `holidays` package, read once per country, subdivisions
and year: the reminder sweep asks about thousands of threads.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import cached_property, lru_cache
from types import MappingProxyType
from typing import Any

import holidays as holidays_lib

from mailflow.core.rules import Law

ONE_DAY = timedelta(days=1)
# A law under which no day counts for this long is misconfigured (say, an excluded period
# covering the whole year); better a clear error than an endless loop.
_MAX_GAP_DAYS = 2 * 366
# Fixed English names: strftime("%A") follows the process locale, and the working must not.
_DAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August",
                "September", "October", "November", "December")


@dataclass(frozen=True)
class Skipped:
    """A day that did not count (or that a deadline moved off), and why, for people to read."""
    date: date
    reason: str   # "Saturday", "Christmas Day (holiday in GB-ENG, GB-NIR, ...)", "day of sending"


@dataclass(frozen=True)
class Deadline:
    """The dates a request's clock gives, with the working that leads to them.

    `due` is the last day an answer is on time; `very_late` is, the same way, the last day
    before the request counts as very late (`law.very_late_days` further days after `due`).
    """
    law: str
    sent: date
    day_one: date
    due: date
    very_late: date
    skipped: tuple[Skipped, ...]     # every day from `sent` to `very_late` that did not count
    working_days: bool
    days: int                        # the law's days, without any extension
    extra_days: int = 0              # an extension claimed, counted the law's way
    moved: tuple[Skipped, ...] = ()  # days the due or very-late date of a calendar-day law
                                     # moved off: counted days, so not in `skipped`
    # The law itself, to write the working when it is asked for (not part of the value).
    law_def: Law | None = field(default=None, compare=False, repr=False)

    @cached_property
    def working_lines(self) -> tuple[str, ...]:
        """The calculation, written on first use (the sweep never needs it)."""
        if self.law_def is None:
            return ()
        lines: list[str] = []
        _count(self.law_def, self.sent, self.extra_days, lines)
        return tuple(lines)

    def working(self) -> list[str]:
        """The calculation, one line a day, e.g. "Day 1: Friday 18 December 2026"."""
        return list(self.working_lines)


# -- the calendar ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Year:
    holidays: Mapping[date, str]        # date → "Name (holiday in GB-SCT)", "; " between several
    weekend: frozenset[int]             # weekday numbers, Monday = 0
    weekend_workdays: frozenset[date]   # weekend days declared working days (swapped days off)
    counted: dict[tuple[date, bool, tuple[Any, ...]], tuple[bool, str | None]] = field(
        default_factory=dict, compare=False, repr=False)
    """`is_counted`'s answers for days of this year, by the law's counting and excluded
    periods: a clock walks the same days for every request sent around the same date (the
    reminder sweep works out a thousand deadlines when it checks every running clock)."""


@lru_cache(maxsize=None)
def _language(country: str) -> str | None:
    """English holiday names where the package has them, since the working is written in English."""
    probe = holidays_lib.country_holidays(country)
    lang = probe.default_language
    if lang is None or lang.startswith("en") or "en_US" not in probe.supported_languages:
        return lang
    return "en_US"


@lru_cache(maxsize=4096)
def _year(country: str, subdivisions: tuple[str, ...], year: int) -> _Year:
    """One year of the law's holiday calendar: the union over its subdivisions, each holiday
    named with the subdivision(s) it belongs to. The neighbouring years are read too, so a
    holiday observed across the year end (1 January on a Saturday, observed on 31 December in
    the US) is found whichever year populates it."""
    names: dict[date, dict[str, list[str]]] = {}
    weekend: set[int] = set()
    workdays: set[date] | None = None
    for sub in subdivisions or (None,):
        cal = holidays_lib.country_holidays(country, subdiv=sub, years=range(year - 1, year + 2),
                                            language=_language(country))
        label = f"{country}-{sub}" if sub else country
        weekend |= set(cal.weekend)
        # A swapped Saturday is a working day only if it is one everywhere the law looks.
        here = {d for d in cal.weekend_workdays if d.year == year}
        workdays = here if workdays is None else workdays & here
        for d in sorted(cal):
            if d.year == year:
                for name in cal.get_list(d):
                    names.setdefault(d, {}).setdefault(name, []).append(label)
    reasons = {d: "; ".join(f"{name} (holiday in {', '.join(labels)})"
                            for name, labels in by_name.items())
               for d, by_name in sorted(names.items())}
    return _Year(MappingProxyType(reasons), frozenset(weekend), frozenset(workdays or ()))


def holiday_names(law: Law, years: range) -> dict[date, str]:
    """The law's public holidays in `years`, each named with where it is a holiday."""
    out: dict[date, str] = {}
    for year in years:
        out.update(_year(law.country, law.subdivisions, year).holidays)
    return out


def holiday_dates(law: Law, years: range) -> set[date]:
    """The union of the holidays of every subdivision the law names (or the whole country)."""
    return set(holiday_names(law, years))


def calendar_fingerprint(laws: Iterable[Law], years: Iterable[int]) -> str:
    """Which calendar these laws count with in these years: a digest of the laws themselves,
    the `holidays` package's version and every holiday, weekend and swapped working day of
    each law's calendar in each year. Two equal fingerprints give the same due dates for
    clocks within those years; a new package, an edited laws.toml or another year do not."""
    h = hashlib.sha256(f"holidays {holidays_lib.__version__}\n".encode())
    ys = sorted(set(years))
    for law in sorted(laws, key=lambda law: law.id):
        h.update(f"{law!r}\n".encode())
        for y in ys:
            cal = _year(law.country, law.subdivisions, y)
            h.update(repr((y, sorted(cal.holidays.items()), sorted(cal.weekend),
                           sorted(cal.weekend_workdays))).encode())
    return h.hexdigest()


def _excluded(law: Law, d: date) -> list[str]:
    return [f"excluded period: {p.reason}" for p in law.excluded_periods if p.contains(d)]


def _non_working(law: Law, d: date) -> list[str]:
    """Why `d` is not a working day for the law (nothing: it is one)."""
    year = _year(law.country, law.subdivisions, d.year)
    reasons = []
    if d.weekday() in year.weekend and d not in year.weekend_workdays:
        reasons.append(_DAY_NAMES[d.weekday()])
    if d in year.holidays:
        reasons.append(year.holidays[d])
    return reasons + _excluded(law, d)


def is_working_day(law: Law, d: date) -> tuple[bool, str | None]:
    """(whether `d` is a working day for the law, why not). Every reason that applies is given,
    e.g. "Saturday; Boxing Day (holiday in NZ); excluded period: ..."."""
    reasons = _non_working(law, d)
    return not reasons, "; ".join(reasons) or None


def is_counted(law: Law, d: date) -> tuple[bool, str | None]:
    """(whether `d` counts as a day once the law's clock runs, why not). Working-day laws count
    working days; calendar-day laws count every day outside their excluded periods."""
    memo = _year(law.country, law.subdivisions, d.year).counted
    key = (d, law.working_days, law.excluded_periods)
    hit = memo.get(key)
    if hit is None:
        hit = memo[key] = _is_counted(law, d)
    return hit


def _is_counted(law: Law, d: date) -> tuple[bool, str | None]:
    if law.working_days:
        return is_working_day(law, d)
    reasons = _excluded(law, d)
    return not reasons, "; ".join(reasons) or None


def count_days(law: Law, start: date, end: date) -> int:
    """How many days in (start, end] count for the law; 0 when end is not after start."""
    n, d = 0, start
    while d < end:
        d += ONE_DAY
        n += is_counted(law, d)[0]
    return n


def _walk(law: Law, after: date) -> Iterator[tuple[date, bool, str | None]]:
    """Every day after `after`: (day, counted, why not)."""
    d, gap = after, 0
    while True:
        d += ONE_DAY
        counted, why = is_counted(law, d)
        gap = 0 if counted else gap + 1
        if gap > _MAX_GAP_DAYS:
            raise ValueError(f"law {law.id}: no day counts for {_MAX_GAP_DAYS} days after "
                             f"{after.isoformat()}; check its excluded periods")
        yield d, counted, why


def _move(law: Law, nominal: date, floor: date) -> tuple[date, list[Skipped]]:
    """Where a deadline that lands on `nominal` really falls, and the days it moved off.

    Only calendar-day laws move (a working-day count always ends on a working day). Moving
    back never goes before `floor`; if it would, the deadline moves forward instead.
    """
    if law.working_days or law.shift_if_non_working == "none":
        return nominal, []
    if law.shift_if_non_working == "previous_working_day":
        d, moved = nominal, []
        while not is_working_day(law, d)[0] and d > floor:
            moved.append(Skipped(d, is_working_day(law, d)[1] or ""))
            d -= ONE_DAY
        if is_working_day(law, d)[0]:
            return d, moved
    d, moved = nominal, []
    for _ in range(_MAX_GAP_DAYS):
        working, why = is_working_day(law, d)
        if working:
            return d, moved
        moved.append(Skipped(d, why or ""))
        d += ONE_DAY
    raise ValueError(f"law {law.id}: no working day for {_MAX_GAP_DAYS} days after "
                     f"{nominal.isoformat()}")


def add_days(law: Law, start: date, n: int) -> tuple[date, tuple[Skipped, ...]]:
    """The day `n` counted days after `start`, the law's way, and the days not counted on the
    way. Used for extensions, the internal-review clock and "every N working days" follow-ups.

    Counting starts the day after `start` (the law's day-one rule is about receiving a request
    and is applied by `deadline`). A calendar-day law moves the result off a non-working day
    as it says; the days moved off were counted, so they are not in the tuple.
    """
    if n < 0:
        raise ValueError(f"cannot count {n} days")
    end, skipped = start, []
    walk = _walk(law, start)
    counted = 0
    while counted < n:
        d, ok, why = next(walk)
        if ok:
            counted, end = counted + 1, d
        else:
            skipped.append(Skipped(d, why or ""))
    if n:
        end, _ = _move(law, end, floor=start + ONE_DAY)
    return end, tuple(skipped)


# -- the deadline -------------------------------------------------------------------------------
def long_date(d: date) -> str:
    """A date for people, e.g. "Thursday 17 December 2026", whatever the process locale."""
    return f"{_DAY_NAMES[d.weekday()]} {d.day} {_MONTH_NAMES[d.month - 1]} {d.year}"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def deadline(law: Law, sent: date, *, extra_days: int = 0) -> Deadline:
    """The due and very-late dates for a request sent (received) on `sent`, with the working.

    `extra_days` is an extension the authority claimed, counted the law's way: the law's
    period becomes `law.days + extra_days` from the same start, then moves as the law says.

    The working lines are written only when asked for (`Deadline.working()`): the reminder
    sweep and the pipeline need the dates, and only `mailflow deadline` and the archive's
    thread page show the lines.
    """
    if extra_days < 0:
        raise ValueError(f"extra_days must not be negative, got {extra_days}")
    day_one, due, very_late, skipped, moved = _count(law, sent, extra_days, None)
    return Deadline(law=law.id, sent=sent, day_one=day_one, due=due, very_late=very_late,
                    skipped=tuple(Skipped(d, r) for d, r in sorted(skipped.items())),
                    working_days=law.working_days, days=law.days, extra_days=extra_days,
                    moved=moved, law_def=law)


def _count(law: Law, sent: date, extra_days: int, lines: list[str] | None,
           ) -> tuple[date, date, date, dict[date, str], tuple[Skipped, ...]]:
    """(day one, due, very late, the days not counted and why, the days moved off), and the
    working, one line a day, appended to `lines` unless it is None."""
    total = law.days + extra_days
    unit = "working day" if law.working_days else "day"
    skipped: dict[date, str] = {}

    def skip(d: date, why: str | None) -> None:
        skipped.setdefault(d, why or "")
        if lines is not None:
            lines.append(f"  not counted: {long_date(d)} — {why}")

    # Day one.
    if law.day_one == "same_day":
        if lines is not None:
            lines.append(f"Sent {long_date(sent)}; the day of sending counts")
        candidate = sent
    else:
        why = _non_working(law, sent)
        skipped[sent] = "day of sending" + (f" ({'; '.join(why)})" if why else "")
        if lines is not None:
            lines.append(f"Sent {long_date(sent)}; the day of sending does not count")
        candidate = sent + ONE_DAY
    for _ in range(_MAX_GAP_DAYS):
        ok, why = is_counted(law, candidate)
        if ok and law.day_one == "next_working_day":
            ok, why = is_working_day(law, candidate)
        if ok:
            break
        skip(candidate, why)
        candidate += ONE_DAY
    else:
        raise ValueError(f"law {law.id}: no day one within {_MAX_GAP_DAYS} days of {sent}")
    day_one = candidate

    # Count to the due date.
    if lines is not None:
        lines.append(f"Day 1: {long_date(day_one)}")
    nominal, n = day_one, 1
    walk = _walk(law, day_one)
    while n < total:
        d, ok, why = next(walk)
        if ok:
            n, nominal = n + 1, d
            if lines is not None:
                lines.append(f"Day {n}: {long_date(d)}"
                             + (" (extension)" if n > law.days else ""))
        else:
            skip(d, why)
    due, moved = _move(law, nominal, floor=day_one)
    if lines is not None:
        for m in moved:
            lines.append(f"  {long_date(m.date)} is not a working day — {m.reason}: "
                         "the deadline moves")
        how = f"the {_ordinal(total)} {unit}"
        if extra_days:
            how += f", with {extra_days} {unit}s of extension"
        if due != nominal:
            how += f"; moved from {long_date(nominal)}"
        lines.append(f"Due: {long_date(due)} ({how})")

    # Count on to "very late".
    nominal_late, n = due, 0
    walk = _walk(law, due)
    while n < law.very_late_days:
        d, ok, why = next(walk)
        if ok:
            n, nominal_late = n + 1, d
            if lines is not None:
                lines.append(f"Late day {n}: {long_date(d)}")
        else:
            skip(d, why)
    very_late, moved_late = _move(law, nominal_late, floor=due + ONE_DAY)
    if lines is not None:
        for m in moved_late:
            lines.append(f"  {long_date(m.date)} is not a working day — {m.reason}: "
                         "the date moves")
        lines.append(f"Very late after: {long_date(very_late)} "
                     f"({law.very_late_days} {unit}s after the due date)")
    return day_one, due, very_late, skipped, tuple(moved + moved_late)


def due_date(sent: date, law: Law) -> date:
    """The due date alone (what the pipeline stores when a request goes out)."""
    return deadline(law, sent).due
