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
