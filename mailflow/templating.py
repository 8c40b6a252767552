"""The Jinja2 environment: a site's own templates folder first, the shipped templates after.

A deployment overrides any template by putting a file of the same name in `[site] templates`;
everything it does not override falls back to the shipped one. Undefined variables are errors,
so a typo in a template fails loudly in tests instead of sending a letter with a hole in it.
"""
from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from typing import Any

from babel.dates import format_date
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined, select_autoescape

from mailflow.i18n import translations
from mailflow.rulesdir import packaged_dir


def make_environment(override: Path | None = None, language: str = "en") -> Environment:
    loaders = []
    if override is not None:
        loaders.append(FileSystemLoader(str(override)))
    loaders.append(FileSystemLoader(str(packaged_dir("templates"))))
    env = Environment(loader=ChoiceLoader(loaders), undefined=StrictUndefined,
                      autoescape=select_autoescape(["html", "htm", "xml"]),
                      keep_trailing_newline=True, extensions=["jinja2.ext.i18n"])
    env.install_gettext_translations(translations(language), newstyle=True)  # type: ignore[attr-defined]
    env.globals["long_date"] = lambda d: long_date(d, language)
    env.globals["language"] = language
    return env


def long_date(d: date | datetime, language: str = "en") -> str:
    """A date as people write it in letters, in the site's language ("1 April 2027")."""
    return format_date(d, format="long", locale=_LOCALES.get(language, language))


_LOCALES = {"en": "en_GB"}


def render(env: Environment, name: str, **context: Any) -> str:
    return env.get_template(name).render(**context)
