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
    assert {"uk-foia", "scotland-foisa", "us-foia", "eu-1049", "au-foi", "nz-oia"} <= set(rules.laws)
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


def test_uk_due_date_skips_weekends_and_bank_holidays() -> None:
    uk = parse_laws((ROOT / "rules/laws.toml").read_text())["uk-foia"]
    # Sent Thursday 17 December 2026: Christmas, Boxing Day (observed Mon 28th), New Year's
    # Day and Scotland's 2 January (observed Mon 4th: the Act counts a bank holiday "in any
    # part of the United Kingdom") are skipped along with weekends.
    assert due_date(date(2026, 12, 17), uk) == date(2027, 1, 20)
    # 20 working days after Monday 2 November 2026 would be Monday 30 November, but that is
    # St Andrew's Day, a bank holiday in Scotland.
    assert due_date(date(2026, 11, 2), uk) == date(2026, 12, 1)
