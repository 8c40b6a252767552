"""When an authority's answer is due: a working-day count with public holidays. Pure.

Kept deliberately simple for now (the full law engine with its working shown is a later
piece): day one is the first working day after the request was sent, as under the UK FOIA,
and the holidays are those of the law's country and any of its listed subdivisions.
"""
from __future__ import annotations

from datetime import date, timedelta

import holidays as holidays_lib

from mailflow.core.rules import Law


def holiday_dates(law: Law, years: range) -> set[date]:
    """The union of the holidays of every subdivision the law names (or the whole country)."""
    found: set[date] = set()
    subdivs: tuple[str | None, ...] = law.subdivisions or (None,)
    for sub in subdivs:
        found |= set(holidays_lib.country_holidays(law.country, subdiv=sub, years=years))
    return found


def due_date(sent: date, law: Law) -> date:
    if not law.working_days:
        return sent + timedelta(days=law.days)
    off = holiday_dates(law, range(sent.year, sent.year + 2 + law.days // 200))
    day, counted = sent, 0
    while counted < law.days:
        day += timedelta(days=1)
        if day.weekday() < 5 and day not in off:
            counted += 1
    return day
