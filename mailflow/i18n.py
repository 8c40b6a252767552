"""Translations: the site's language for its letters, notices and pages (gettext, via Babel).

Catalogues live as `.po` files in `mailflow/locale/<lang>/LC_MESSAGES/mailflow.po` and are
compiled in memory when loaded, so no binary `.mo` file is kept in the repository. English is
the source language: with no catalogue, text is shown as written in the templates.
`make messages` re-extracts the catalogue template (`mailflow.pot`) from the templates and code.
"""
from __future__ import annotations

import gettext
from functools import lru_cache
from io import BytesIO
from pathlib import Path

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import Translations

from mailflow.errors import ConfigError

LOCALE_DIR = Path(__file__).resolve().parent / "locale"
DOMAIN = "mailflow"


def available() -> list[str]:
    return ["en", *sorted(p.parent.parent.name for p in LOCALE_DIR.glob(f"*/LC_MESSAGES/{DOMAIN}.po"))]


@lru_cache(maxsize=None)
def translations(language: str) -> gettext.NullTranslations:
    if language == "en":
        return gettext.NullTranslations()
    po = LOCALE_DIR / language / "LC_MESSAGES" / f"{DOMAIN}.po"
    if not po.exists():
        raise ConfigError(f"[site] language: no translation for {language!r}; "
                          f"available: {', '.join(available())}")
    with po.open("rb") as f:
        catalog = read_po(f, locale=language, domain=DOMAIN)
    buf = BytesIO()
    write_mo(buf, catalog)
    buf.seek(0)
    return Translations(buf, domain=DOMAIN)
