"""Reading the site's `rules/` folder from disk (the parsing itself is pure, in core.rules and
core.routing), so every file is checked, and reported by name, before anything runs.

Fault reports are on when `rules/categories.toml` exists: then `areas.geojson` must be there
too and `gazetteer.csv` may be. Without categories.toml the other two are not read."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mailflow.core.redaction import RedactionRule, load_redactions
from mailflow.core.rules import (Authority, Rules, check_report_contacts, parse_authorities,
                                 parse_laws)
from mailflow.errors import RulesError

if TYPE_CHECKING:
    from mailflow.core.routing import ReportRules


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RulesError(f"{path}: missing (every site needs it in its rules folder)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RulesError(f"{path}: cannot read: {e}") from None


def load_rules(folder: Path, default_law: str, *, lazy_reports: bool = False) -> Rules:
    """`lazy_reports`: read the fault-report files on first use rather than now (a one-message
    process that may never need them); a broken one is then reported when a report comes."""
    laws = parse_laws(_read(folder / "laws.toml"), str(folder / "laws.toml"))
    if default_law not in laws:
        raise RulesError(f"[site] default_law {default_law!r} is not a law in "
                         f"{folder / 'laws.toml'}; known: {', '.join(sorted(laws))}")
    authorities = parse_authorities(_read(folder / "authorities.toml"), laws, default_law,
                                    str(folder / "authorities.toml"))
    if lazy_reports and (folder / "categories.toml").exists():
        return Rules(laws=laws, authorities=authorities,
                     report_rules=lambda: load_report_rules(folder, authorities))
    return Rules(laws=laws, authorities=authorities,
                 report_rules=load_report_rules(folder, authorities))


def _optional(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise RulesError(f"{path}: cannot read: {e}") from None


def load_report_rules(folder: Path, authorities: dict[str, Authority]) -> ReportRules | None:
    """categories.toml, areas.geojson and gazetteer.csv as a ReportRules, or None when the site
    has no categories.toml (it takes no fault reports)."""
    categories_text = _optional(folder / "categories.toml")
    if categories_text is None:
        return None
    from mailflow.core.routing import ReportRules, parse_areas, parse_categories, parse_gazetteer
    categories = parse_categories(categories_text, str(folder / "categories.toml"))
    areas_path = folder / "areas.geojson"
    areas_text = _optional(areas_path)
    if areas_text is None:
        raise RulesError(f"{areas_path}: missing: fault reports (categories.toml) need the "
                         "authorities' areas to route them")
    areas = parse_areas(areas_text, str(areas_path), authorities)
    gazetteer_text = _optional(folder / "gazetteer.csv")
    gazetteer = (parse_gazetteer(gazetteer_text, str(folder / "gazetteer.csv"))
                 if gazetteer_text is not None else ())
    check_report_contacts(authorities, categories, str(folder / "authorities.toml"))
    return ReportRules(categories=categories, areas=areas, gazetteer=gazetteer)


def load_redactions_file(folder: Path) -> list[RedactionRule]:
    """rules/redactions.toml, or no rules when the site has none (it is optional)."""
    path = folder / "redactions.toml"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise RulesError(f"{path}: cannot read: {e}") from None
    return load_redactions(text, str(path))


def packaged_dir(name: str) -> Path:
    """The shipped `templates/` or `rules/`: the repository's in a checkout, else the wheel's."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / name, here / "_data" / name):
        if candidate.is_dir():
            return candidate
    raise RulesError(f"the packaged {name}/ folder is missing from this installation")
