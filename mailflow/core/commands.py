"""One-line commands a citizen can send to her thread address. Pure.

A reply whose own text (above any quoted message or signature) is exactly one command is a
command; anything else is a follow-up to the authority. Being strict matters: a citizen who
writes "Refused. I want to appeal because..." means a letter, not a state change.
"""
from __future__ import annotations

import re

# command word(s) -> the thread state or action it stands for
COMMANDS = {
    "successful": "successful",
    "partially successful": "partially_successful",
    "partly successful": "partially_successful",
    "refused": "rejected",
    "rejected": "rejected",
    "not held": "not_held",
    "withdraw": "withdraw",
    "withdrawn": "withdraw",
    "internal review": "internal_review",
    "clarification": "clarification",
    "extension": "extension",
    "waiting": "waiting_response",
    "still waiting": "waiting_response",
    "waiting response": "waiting_response",
}
def N_(message: str) -> str:
    """Marks a string for translation; it is translated where it is shown."""
    return message


STATE_WORDS = {
    "open": N_("open"),
    "fixed": N_("fixed"),
    "waiting_response": N_("awaiting a response"),
    "waiting_clarification": N_("waiting for you to clarify"),
    "internal_review": N_("under internal review"),
    "successful": N_("successful"),
    "partially_successful": N_("partially successful"),
    "rejected": N_("refused"),
    "not_held": N_("information not held"),
    "user_withdrawn": N_("withdrawn"),
}
_QUOTE_START = re.compile(
    r"^(>|on .{0,200}wrote:?$|-----\s*original message|from:\s|sent from my|-- ?$|_{5,}|le .{0,200}a écrit)",
    re.I)


def own_text(text: str) -> list[str]:
    """The lines the citizen wrote herself: up to the first quote, header block or signature."""
    lines = []
    for line in text.splitlines():
        if _QUOTE_START.match(line.strip()):
            break
        if line.strip():
            lines.append(line.strip())
    return lines


def parse_command(text: str) -> str | None:
    """The command, or None. Only "internal review" may be followed by the citizen's reasons."""
    lines = own_text(text)
    if not lines:
        return None
    word = re.sub(r"\s+", " ", re.sub(r"[\s.!:]+$", "", lines[0]).lower())
    command = COMMANDS.get(word)
    if len(lines) > 1 and command != "internal_review":
        return None
    return command


# A fault report's answers to "has it been fixed?" (and its own withdraw), in the languages
# the site ships. Apostrophes are straightened and a leading "yes"/"no"/"sí" is dropped first,
# so "Yes, it's fixed!" and "No - still broken." are read too.
REPORT_COMMANDS = {
    "fixed": "fixed",
    "it's fixed": "fixed",
    "it is fixed": "fixed",
    "it's been fixed": "fixed",
    "has been fixed": "fixed",
    "it has been fixed": "fixed",
    "repaired": "fixed",
    "it's been repaired": "fixed",
    "it has been repaired": "fixed",
    "arreglado": "fixed",
    "está arreglado": "fixed",
    "ya está arreglado": "fixed",
    "ha sido arreglado": "fixed",
    "reparado": "fixed",
    "not fixed": "not_fixed",
    "it's not fixed": "not_fixed",
    "it is not fixed": "not_fixed",
    "it isn't fixed": "not_fixed",
    "not yet fixed": "not_fixed",
    "not fixed yet": "not_fixed",
    "still broken": "not_fixed",
    "it's still broken": "not_fixed",
    "it is still broken": "not_fixed",
    "still not fixed": "not_fixed",
    "no arreglado": "not_fixed",
    "no está arreglado": "not_fixed",
    "sin arreglar": "not_fixed",
    "sigue sin arreglar": "not_fixed",
    "sigue roto": "not_fixed",
    "withdraw": "withdraw",
    "withdrawn": "withdraw",
    "retirar": "withdraw",
}
_YES_NO = re.compile(r"^(yes|yep|no|nope|sí|si)\b[\s,.;:!-]*", re.I)


def parse_report_command(text: str) -> str | None:
    """"fixed", "not_fixed", "withdraw" or None, from a citizen's reply about a fault report.

    As strict as `parse_command`: the citizen's own text must be that one line, else it is a
    message for the authority ("Not fixed. The hole is bigger now and..." is a letter).
    """
    lines = own_text(text)
    if len(lines) != 1:
        return None
    line = lines[0].lower().replace("\u2019", "'").replace("\u2018", "'")
    line = re.sub(r"[\s.!:,;]+$", "", line).strip()
    line = re.sub(r"\s+", " ", line)
    command = REPORT_COMMANDS.get(line)
    m = _YES_NO.match(line)
    if command is None and m:
        # "yes, fixed" and "no, still broken" agree with themselves; "no, fixed" does not.
        rest = REPORT_COMMANDS.get(line[m.end():].strip())
        said_no = m.group(1) in ("no", "nope")
        if rest in ("fixed", "not_fixed") and (rest == "not_fixed") == said_no:
            command = rest
    return command
