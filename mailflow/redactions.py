"""Adding a redaction rule: preview what it would change across the archive, then save it.

Rules stay data in `rules/redactions.toml` (the file admins may also edit by hand). A new rule
is checked by the same parser that loads the file, the whole file is re-validated before it is
replaced (atomically), and the preview runs the rule over the public text of every thread in
its scope, so an admin sees what a regular expression really catches before anything changes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailflow.core.redaction import RedactionRule, Redactor, load_redactions
from mailflow.errors import MailflowError
from mailflow.site import Site

HEADER = """# Redaction rules: text the public archive must never show.
# One [[redaction]] table per rule; see the comments of the shipped file for every key.
"""


@dataclass
class Preview:
    rule: RedactionRule
    threads: int                               # threads where it changes something
    changes: int                               # how many matches in all
    examples: list[dict[str, Any]]             # {thread_id, message_id, found, replacement}


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)   # a JSON string is a valid TOML basic string


def rule_toml(scope: str, pattern: str, regex: bool, replacement: str, note: str) -> str:
    key = "regex" if regex else "text"
    lines = ["[[redaction]]", f"scope = {_toml_string(scope)}", f"{key} = {_toml_string(pattern)}",
             f"replacement = {_toml_string(replacement)}"]
    if note:
        lines.append(f"note = {_toml_string(note)}")
    return "\n".join(lines) + "\n"


def make_rule(scope: str, pattern: str, regex: bool, replacement: str, note: str = "") -> RedactionRule:
    """The rule as the file would load it (the same checks: scope, regex, empty matches)."""
    [rule] = load_redactions(rule_toml(scope, pattern, regex, replacement, note), "the new rule")
    return rule


def preview(site: Site, rule: RedactionRule, limit: int = 10) -> Preview:
    result = Preview(rule, 0, 0, [])
    with site.store.read() as tx:
        for thread in tx.threads():
            if thread.sent_at is None:
                continue
            r = Redactor([rule], thread_id=thread.id, authority=thread.authority, private=[])
            touched = False
            for m in tx.messages(thread.id):
                for found, replacement in r.changes(m.subject) + r.changes(m.text):
                    touched = True
                    result.changes += 1
                    if len(result.examples) < limit:
                        result.examples.append({"thread_id": thread.id, "message_id": m.id,
                                                "found": found, "replacement": replacement})
            result.threads += touched
    return result


def save(site: Site, scope: str, pattern: str, regex: bool, replacement: str, note: str,
         actor: str) -> Path:
    path = site.settings.site.rules / "redactions.toml"
    old = path.read_text(encoding="utf-8") if path.exists() else HEADER
    new = old.rstrip("\n") + "\n\n" + rule_toml(scope, pattern, regex, replacement, note)
    load_redactions(new, str(path))   # the whole file must still load
    tmp = path.with_suffix(".toml.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    thread_id = int(scope.split(":", 1)[1]) if scope.startswith("thread:") else None
    with site.store.tx() as tx:
        tx.audit(actor, "redact_add", thread_id=thread_id, target=f"redaction:{scope}",
                 reason=note or None,
                 detail={"scope": scope, "regex" if regex else "text": pattern,
                         "replacement": replacement})
    return path


__all__ = ["Preview", "make_rule", "preview", "save", "MailflowError"]
