"""The Jinja2 environment: a site's own templates folder first, the shipped templates after.

A deployment overrides any template by putting a file of the same name in `[site] templates`;
everything it does not override falls back to the shipped one. Undefined variables are errors,
so a typo in a template fails loudly in tests instead of sending a letter with a hole in it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined, select_autoescape

from mailflow.rulesdir import packaged_dir


def make_environment(override: Path | None = None) -> Environment:
    loaders = []
    if override is not None:
        loaders.append(FileSystemLoader(str(override)))
    loaders.append(FileSystemLoader(str(packaged_dir("templates"))))
    return Environment(loader=ChoiceLoader(loaders), undefined=StrictUndefined,
                       autoescape=select_autoescape(["html", "htm", "xml"]),
                       keep_trailing_newline=True)


def render(env: Environment, name: str, **context: Any) -> str:
    return env.get_template(name).render(**context)
