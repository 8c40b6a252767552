"""rules/: the shipped data loads, and a broken file is reported by name and entry."""
from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from mailflow.core.deadlines import due_date
from mailflow.core.rules import parse_authorities, parse_laws
from mailflow.errors import RulesError
from mailflow.rulesdir import load_rules

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_rules_load() -> None:
    rules = load_rules(ROOT / "rules", "uk-foia")
    assert {"uk-foia", "scotland-foisa", "us-foia", "eu-1049", "au-foi", "nz-oia", "hu-info",
            "ke-ati", "cl-transparencia", "ua-access"} <= set(rules.laws)
    assert all(a.contact for a in rules.authorities.values())


def test_broken_entries_are_named() -> None:
    laws = parse_laws((ROOT / "rules/laws.toml").read_text())
    with pytest.raises(RulesError, match=r"authority #1 \(camden\): unknown law 'xx-foi'"):
        parse_authorities('[[authority]]\nslug="camden"\nname="C"\nlaw="xx-foi"\n', laws, "uk-foia")
    with pytest.raises(RulesError, match="not an email address"):
        parse_authorities('[[authority]]\nslug="c"\nname="C"\nemails=["nope"]\n', laws, "uk-foia")
    with pytest.raises(RulesError, match="must not look like a request address"):
        parse_authorities('[[authority]]\nslug="request-1"\nname="C"\n', laws, "uk-foia")
    with pytest.raises(RulesError, match="unknown key"):
        parse_authorities('[[authority]]\nslug="c"\nname="C"\nemail=["a@b.c"]\n', laws, "uk-foia")
    with pytest.raises(RulesError, match="not valid TOML"):
        parse_laws("[[law]\n")


LAW = 'id = "x-foi"\nname = "the X Act"\ndays = 20\ncountry = "GB"\n'


@pytest.mark.parametrize("extra, message", [
    ('colour = "red"', r"unknown key\(s\) colour"),
    ('excluded_periods = [{ from = "12-32", to = "01-15", reason = "r" }]',
     r'excluded_periods #1: from must be a day of the year as "MM-DD", got \'12-32\''),
    ('excluded_periods = [{ from = "1-5", to = "01-15", reason = "r" }]', r'"MM-DD"'),
    ('excluded_periods = [{ from = "12-25", to = "01-15" }]', r"missing key 'reason'"),
    ('excluded_periods = [{ from = "12-25", to = "01-15", reason = "r", note = "n" }]',
     r"unknown key\(s\) note"),
    ('subdivisions = ["XYZ"]', r"subdivision 'XYZ' is not one of GB's"),
    ('day_one = "tomorrow"', r"day_one must be one of next_working_day, next_day, same_day"),
    ('shift_if_non_working = "sideways"', r"shift_if_non_working must be one of"),
    ('very_late_days = -5', r"very_late_days must be positive"),
    ('internal_review_days = 0', r"internal_review_days must be positive"),
    ('extensions = [{ id = "e", days = -1, description = "d" }]',
     r"extension 'e': days must be positive"),
    ('extensions = [{ id = "e", days = 5 }]', r"extensions #1: missing key 'description'"),
])
def test_broken_law_entries_name_the_file_and_the_law(extra: str, message: str) -> None:
    with pytest.raises(RulesError, match=r"^/site/rules/laws\.toml: law #1 \(x-foi\): .*" + message):
        parse_laws("[[law]]\n" + LAW + extra + "\n", "/site/rules/laws.toml")


def test_broken_law_days_and_country() -> None:
    with pytest.raises(RulesError, match=r"laws\.toml: law #2 \(y-foi\): days must be positive"):
        parse_laws(f'[[law]]\n{LAW}\n[[law]]\nid = "y-foi"\nname = "Y"\ndays = -3\ncountry = "GB"\n')
    with pytest.raises(RulesError, match=r"law #1 \(x-foi\): country 'XX' is not a country"):
        parse_laws("[[law]]\n" + LAW.replace('"GB"', '"XX"'))
    with pytest.raises(RulesError, match=r"law #1 \(x-foi\): days must be int"):
        parse_laws("[[law]]\n" + LAW.replace("days = 20", 'days = "20"'))


def test_a_short_law_entry_gets_the_defaults() -> None:
    law = parse_laws("[[law]]\n" + LAW)["x-foi"]
    assert (law.working_days, law.day_one, law.shift_if_non_working, law.very_late_days,
            law.extensions, law.excluded_periods, law.internal_review_days) == \
        (True, "next_working_day", "none", 20, (), (), None)
    cal = parse_laws("[[law]]\n" + LAW + "working_days = false\n")["x-foi"]
    assert cal.day_one == "next_day"


def test_uk_due_date_skips_weekends_and_bank_holidays() -> None:
    uk = parse_laws((ROOT / "rules/laws.toml").read_text())["uk-foia"]
    # Sent Thursday 17 December 2026: Christmas, Boxing Day (observed Mon 28th), New Year's
    # Day and Scotland's 2 January (observed Mon 4th: the Act counts a bank holiday "in any
    # part of the United Kingdom") are skipped along with weekends.
    assert due_date(date(2026, 12, 17), uk) == date(2027, 1, 20)
    # 20 working days after Monday 2 November 2026 would be Monday 30 November, but that is
    # St Andrew's Day, a bank holiday in Scotland.
    assert due_date(date(2026, 11, 2), uk) == date(2026, 12, 1)
