"""Reading the site's `rules/` folder from disk (the parsing itself is pure, in core.rules)."""
from __future__ import annotations

from pathlib import Path

from mailflow.core.redaction import RedactionRule, load_redactions
from mailflow.core.rules import Rules, parse_authorities, parse_laws
from mailflow.errors import RulesError


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RulesError(f"{path}: missing (every site needs it in its rules folder)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RulesError(f"{path}: cannot read: {e}") from None


def load_rules(folder: Path, default_law: str) -> Rules:
    laws = parse_laws(_read(folder / "laws.toml"), str(folder / "laws.toml"))
    if default_law not in laws:
        raise RulesError(f"[site] default_law {default_law!r} is not a law in "
                         f"{folder / 'laws.toml'}; known: {', '.join(sorted(laws))}")
    authorities = parse_authorities(_read(folder / "authorities.toml"), laws, default_law,
                                    str(folder / "authorities.toml"))
    return Rules(laws=laws, authorities=authorities)


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
