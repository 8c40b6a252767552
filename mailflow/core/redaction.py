"""What must never reach the public archive, and the label shown in its place. Pure: no I/O.

Two sources of things to hide:

- `rules/redactions.toml`, written by the site's admins: a phone number, a name, an account
  number, each scoped to the whole site, one authority or one thread (`load_redactions`);
- the secrets every thread has whether or not anyone writes them down: the citizen's address,
  the thread's tokens and our addresses built from them (`private_values`).

`Redactor` applies both in ONE pass over the original text: every rule finds its matches,
overlapping matches are merged and each merged stretch is replaced once. So a label such as
"[requester email]" is never matched again by another rule, and when two secrets overlap
(an address and its local part, a name and a street) no part of either survives.

Literal values are matched case-insensitively and tolerate the ways mail re-encodes them:
any run of white space (or `&nbsp;`) for a space, `%40`, `=40`, `&#64;`, ` at `, `[at]` for
`@`, `&amp;` for `&`. Zero-width characters that people and mail clients put inside addresses
to break auto-linking are removed before matching. Regular expressions from the rules file are
used as written (add `(?i)` to ignore case).
"""
from __future__ import annotations

import functools
import html as htmllib
import re
import string
import tomllib
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mailflow.core.addresses import AddressKind, confirm_address, thread_address, valid_slug
from mailflow.errors import RulesError

REQUESTER_EMAIL = "[requester email]"
TOKEN_LABEL = "[token]"
DEFAULT_REPLACEMENT = "[redacted]"

# Characters that render as nothing; removed from text before matching (see module doc).
_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u180e\u200b\u2060\ufeff"))

# How mail, HTML and people write the pieces of a literal value.
_AT = (r"(?:@|%40|=40|&#0*64;|&#x0*40;|&commat;"
       r"|\s*[\[(]\s*at\s*[\])]\s*|\s+at\s+)")
_SPACE = r"(?:\s|&nbsp;|&#0*160;|&#x0*a0;)+"
_PIECES = {"@": _AT, "&": r"(?:&|&amp;|&#0*38;)", '"': r"(?:\"|&quot;|&#0*34;)",
           "'": r"(?:'|&#0*39;|&#x0*27;|&apos;)"}

# Samples on which a rule's regex must never match nothing (it would "match" everywhere).
_EMPTY_PROBES = ("", "a", " ", "0", string.printable, "é ü ß Ж 中 \u00a0")
_SCOPE_RE = re.compile(r"^(site|authority:(?P<slug>.+)|thread:(?P<id>[0-9]{1,12}))$")


@dataclass(frozen=True)
class RedactionRule:
    """One entry of rules/redactions.toml."""
    scope: str            # "site" | "authority:<slug>" | "thread:<id>"
    pattern: str          # the literal text, or the regular expression
    regex: bool
    replacement: str      # what readers see instead, e.g. "[name removed]"
    note: str = ""        # why the rule exists, for the admins; never published


class PrivatePattern(str):
    """A private value given as a regular expression rather than literal text.

    It is a `str` so a list from `private_values` stays a list of (str, str) pairs; the
    Redactor compiles it case-insensitively, and its label may use `\\g<name>` groups.
    `literal`, when set, is a literal value the pattern can only match where that value
    matches (the pattern holds `_literal_source(literal)`, or for a value without spaces, `@`,
    `&` or quotes, `re.escape(literal)`, with conditions around it), which lets the Redactor
    skip texts that cannot contain it.
    """

    literal: str | None = None


class ThreadSecrets(Protocol):
    """What `private_values` reads from a thread (store.repository.Thread has it)."""
    id: int
    citizen_email: str
    request_token: str
    reply_token: str
    confirm_token: str | None


# ------------------------------------------------------------------------------ the rules file

_KEYS = {"scope", "text", "regex", "replacement", "note"}


def _where(source: str, i: int, e: dict[str, Any]) -> str:
    # Named by its note, never by its text: the text is the secret.
    note = e.get("note")
    return f"{source}: redaction #{i}" + (f" ({note})" if isinstance(note, str) and note else "")


def _str(e: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    if key not in e:
        if default is None:
            raise RulesError(f"{where}: missing key {key!r}")
        return default
    if not isinstance(e[key], str):
        raise RulesError(f"{where}: {key} must be a string, got {e[key]!r}")
    return e[key]


def _scope(raw: str, where: str) -> str:
    m = _SCOPE_RE.match(raw.strip())
    if m is None:
        raise RulesError(f'{where}: scope must be "site", "authority:<slug>" or "thread:<id>", '
                         f"got {raw!r}")
    if m.group("slug") is not None:
        slug = m.group("slug").strip().lower()
        if not valid_slug(slug):
            raise RulesError(f"{where}: scope {raw!r}: {slug!r} is not an authority slug")
        return f"authority:{slug}"
    if m.group("id") is not None:
        if int(m.group("id")) < 1:
            raise RulesError(f"{where}: scope {raw!r}: a thread id is a positive number")
        return f"thread:{int(m.group('id'))}"
    return "site"


def _check_regex(pattern: str, where: str) -> None:
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise RulesError(f"{where}: regex does not compile: {e}") from None
    for probe in _EMPTY_PROBES:
        if any(m.end() == m.start() for m in compiled.finditer(probe)):
            raise RulesError(f"{where}: regex matches the empty string, so it would match "
                             "everywhere; make it require at least one character")


def load_redactions(text: str, source: str) -> list[RedactionRule]:
    """Every [[redaction]] in the text. A wrong entry is a RulesError naming file and entry."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RulesError(f"{source}: not valid TOML: {e}") from None
    extra = set(data) - {"redaction"}
    if extra:
        raise RulesError(f"{source}: unknown key(s) {', '.join(sorted(extra))}; "
                         "expected only [[redaction]] tables")
    entries = data.get("redaction", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise RulesError(f"{source}: expected [[redaction]] tables")
    rules: list[RedactionRule] = []
    for i, e in enumerate(entries, 1):
        where = _where(source, i, e)
        unknown = set(e) - _KEYS
        if unknown:
            raise RulesError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(_KEYS))}")
        if ("text" in e) == ("regex" in e):
            raise RulesError(f"{where}: give exactly one of `text` (literal) or `regex`")
        is_regex = "regex" in e
        pattern = _str(e, "regex" if is_regex else "text", where)
        if not pattern.strip():
            raise RulesError(f"{where}: {'regex' if is_regex else 'text'} must not be empty")
        if is_regex:
            _check_regex(pattern, where)
        rules.append(RedactionRule(scope=_scope(_str(e, "scope", where, "site"), where),
                                   pattern=pattern, regex=is_regex,
                                   replacement=_str(e, "replacement", where, DEFAULT_REPLACEMENT),
                                   note=_str(e, "note", where, "")))
    return rules


# ---------------------------------------------------------------------------- thread secrets

def _generic_thread_pattern(domain: str) -> PrivatePattern:
    """Any thread-shaped address at our domain, retyped or not (see addresses.find_...)."""
    return _at_domain(
        r"(?:foi[-_.]?)?(?:requests?|reqeust|reqest|req|replies|reply|reports?)[-_.+]{0,4}"
        r"(?P<id>[0-9]{1,12})[-_.+]{0,4}[0-9a-z]{4,40}(?:\+[^\s@<>\"']{0,64})?"
        + _AT + re.escape(domain) + r"(?![a-z0-9-])", domain)


def _generic_confirm_pattern(domain: str) -> PrivatePattern:
    return _at_domain(r"confirm[-_.+]{0,4}[0-9a-z]{4,40}(?:\+[^\s@<>\"']{0,64})?"
                      + _AT + re.escape(domain) + r"(?![a-z0-9-])", domain)


def _at_domain(source: str, domain: str) -> PrivatePattern:
    """A pattern that ends in our domain as written: every match holds the domain, so a text
    without it is not searched (most texts; a PDF's are long)."""
    p = PrivatePattern(source)
    if domain.strip() and not re.search(r"\s|[@&\"']", domain):
        p.literal = domain
    return p


def private_values(thread: ThreadSecrets, domain: str) -> list[tuple[str, str]]:
    """Every secret of a thread -> the public label shown instead.

    The citizen's address; its local part alone when it has 4 characters or more, as a whole
    word (so a local part "info" hides "info" but not "information"); each of our addresses of
    the thread, whole and as a local part (so it is hidden at any domain); each bare token; and
    two `PrivatePattern`s that hide ANY thread- or confirm-shaped address at our domain, so
    another thread's address quoted in this one is hidden too.
    """
    out: list[tuple[str, str]] = []
    email = (thread.citizen_email or "").strip()
    if email:
        out.append((email, REQUESTER_EMAIL))
        local = email.rpartition("@")[0]
        if len(local) >= 4:
            word = PrivatePattern(r"(?<![^\W_])" + _literal_source(local) + r"(?![^\W_])")
            word.literal = local
            out.append((word, REQUESTER_EMAIL))
    ours = f"[FOI #{thread.id} email]"
    addresses = [thread_address(kind, thread.id, token, domain)
                 for kind, token in ((AddressKind.REQUEST, thread.request_token),
                                     (AddressKind.REPLY, thread.reply_token)) if token]
    if getattr(thread, "kind", "foi") == "report" and thread.request_token:
        # A fault report's authority side is report-<id>-<token>@ (the same secret).
        addresses.append(f"report-{thread.id}-{thread.request_token}@{domain}")
    if thread.confirm_token:
        addresses.append(confirm_address(thread.confirm_token, domain))
    for addr in addresses:
        out += [(addr, ours), (addr.rpartition("@")[0], ours)]
    for token in (thread.request_token, thread.reply_token, thread.confirm_token):
        if token:
            out.append((token, TOKEN_LABEL))
    out.append((_generic_thread_pattern(domain), r"[FOI #\g<id> email]"))
    out.append((_generic_confirm_pattern(domain), "[FOI email]"))
    return out


# ---------------------------------------------------------------------------------- matching

def _literal_source(value: str) -> str:
    """A literal value as a regex tolerant of re-encoding (see the module doc)."""
    value = unicodedata.normalize("NFC", value.translate(_INVISIBLE)).strip()
    out: list[str] = []
    for piece in re.split(r"(\s+)", value):
        if not piece:
            continue
        if piece.isspace():
            out.append(_SPACE)
            continue
        # re.escape works a character at a time, so a run without @ & " ' is escaped whole.
        for part in _PIECE_CHARS.split(piece):
            if part:
                out.append(_PIECES.get(part) or re.escape(part))
    return "".join(out)


_PIECE_CHARS = re.compile("([" + re.escape("".join(_PIECES)) + "])")


@functools.lru_cache(maxsize=4096)
def _compile(source: str, flags: int) -> re.Pattern[str]:
    """Compiled once per process: the site's rules and the patterns every thread shares (any
    thread-shaped address) are the same for every thread of a build, and for the next build.
    (The `re` module's own cache holds 512 patterns and is flushed through by thousands of
    threads' values.)"""
    return re.compile(source, flags)


def _pieces(literal: str) -> tuple[str, ...] | None:
    """Lower-cased runs of a literal value that `_literal_source(literal)` matches only as
    written (case aside): every match of the value, read through `_lowered`, contains each
    of them. None when the value is not ASCII (re.IGNORECASE matches some letters to others
    beyond lower-casing), so no shortcut is taken for it."""
    value = unicodedata.normalize("NFC", literal.translate(_INVISIBLE)).strip()
    if not value.isascii():
        return None
    runs = re.split(r"\s+|[@&\"']", value.lower())
    return tuple(r for r in runs if r)


@dataclass(frozen=True)
class _Matcher:
    source: str
    flags: int
    label: str
    expand: bool          # label is a template using the match's groups
    # Runs every match contains (see _pieces): a text without one of them is not searched,
    # and the value's pattern need not even be compiled. None: always search.
    pieces: tuple[str, ...] | None = None

    @property
    def pattern(self) -> re.Pattern[str]:
        return _compile(self.source, self.flags)



# The only characters outside ASCII that re.IGNORECASE matches to ASCII ones (ſ to s, the
# Kelvin sign to k, dotted and dotless I to i: tests/test_redaction_shortcut.py checks every
# code point), as the ASCII letter they match.
_RE_I_FOLDS = str.maketrans({"ſ": "s", "K": "k", "İ": "i", "ı": "i"})


def _lowered(s: str) -> str:
    """`s` lower-cased, with the letters re.IGNORECASE takes for ASCII ones made ASCII: every
    stretch of `s` that a literal value's pattern matches reads as that value's runs here
    (`_pieces`), so a text without one of them cannot hold the value, ASCII or not. (The
    lower-casing of other letters can only add matches of a run, never remove one.)"""
    return s.lower() if s.isascii() else s.translate(_RE_I_FOLDS).lower()


def _in_scope(scope: str, thread_id: int | None, authority: str | None) -> bool:
    kind, _, arg = scope.partition(":")
    if kind == "site":
        return True
    if kind == "authority":
        return authority is not None and arg.strip().lower() == authority.lower()
    if kind == "thread":
        return thread_id is not None and arg.strip().isdigit() and int(arg) == thread_id
    return False


class Redactor:
    """Applies the rules in scope and a thread's private values to any text (see module doc)."""

    def __init__(self, rules: list[RedactionRule], *, thread_id: int | None,
                 authority: str | None, private: list[tuple[str, str]]) -> None:
        literal: list[_Matcher] = []
        patterns: list[_Matcher] = []
        # Patterns are compiled on first use and cached per process (`_compile`); a literal
        # value is not searched for in a text that lacks one of its runs (`_pieces`), which
        # is most texts: a build redacts thousands of threads, each with its own values.
        for value, label in private:
            if isinstance(value, PrivatePattern):
                literal_of = value.literal
                patterns.append(_Matcher(str(value), re.I, label, True,
                                         _pieces(literal_of) if literal_of else None))
            elif value and value.strip():
                literal.append(_Matcher(_literal_source(value), re.I, label, False,
                                        _pieces(value)))
        # Longest value first: on the same span the longer, more specific label wins.
        literal.sort(key=lambda m: -len(m.source))
        ruled = [_Matcher(r.pattern, 0, r.replacement, False) if r.regex
                 else _Matcher(_literal_source(r.pattern), re.I, r.replacement, False,
                               _pieces(r.pattern))
                 for r in rules if _in_scope(r.scope, thread_id, authority)
                 and (r.regex or r.pattern.strip())]
        self._matchers = literal + patterns + ruled

    def _spans(self, s: str) -> list[tuple[int, int, str]]:
        """Merged (start, end, replacement) stretches of `s` to replace, in order."""
        found: list[tuple[int, int, int, str]] = []
        lowered = _lowered(s)
        for priority, m in enumerate(self._matchers):
            pieces = m.pieces    # a text without one of them cannot hold a match
            if pieces is not None and not all(p in lowered for p in pieces):
                continue
            for hit in m.pattern.finditer(s):
                if hit.end() > hit.start():
                    label = hit.expand(m.label) if m.expand else m.label
                    found.append((hit.start(), -hit.end(), priority, label))
        found.sort()
        merged: list[tuple[int, int, list[str]]] = []
        for start, neg_end, _, label in found:
            end = -neg_end
            if merged and start < merged[-1][1]:
                if end > merged[-1][1]:
                    labels = merged[-1][2]
                    if labels[-1] != label:
                        labels.append(label)
                    merged[-1] = (merged[-1][0], end, labels)
            else:
                merged.append((start, end, [label]))
        return [(a, b, "".join(labels)) for a, b, labels in merged]

    @staticmethod
    def _prepare(s: str) -> str:
        return unicodedata.normalize("NFC", s.translate(_INVISIBLE))

    def _apply(self, s: str, render: Callable[[str], str]) -> str:
        s = self._prepare(s)
        out: list[str] = []
        pos = 0
        for start, end, label in self._spans(s):
            out += [s[pos:start], render(label)]
            pos = end
        out.append(s[pos:])
        return "".join(out)

    def text(self, s: str) -> str:
        """`s` with everything private replaced by its label."""
        return self._apply(s, str)

    def html(self, s: str) -> str:
        """Like `text`, for serialised HTML: each label is inserted escaped, so a replacement
        never becomes markup. (Sanitise before and after: see mail.sanitise.redact_html.)"""
        return self._apply(s, htmllib.escape)

    def filename(self, s: str) -> str:
        """A file name redacted like text, then made safe to write and to serve."""
        return safe_filename(self.text(s))

    def changes(self, s: str) -> list[tuple[str, str]]:
        """(matched text, replacement) for each change `text` would make: an admin's preview."""
        s = self._prepare(s)
        return [(s[a:b], label) for a, b, label in self._spans(s)]


# ---------------------------------------------------------------------------------- file names

_NAME_UNSAFE = re.compile(r"[^\w .()\[\]+,~-]")
_WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.I)
_NAME_MAX = 120


def safe_filename(name: str) -> str:
    """A file name with no path, control or direction-changing characters, no leading dot,
    no shell or URL metacharacters, at most 120 characters (the extension kept)."""
    name = unicodedata.normalize("NFC", name)
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    name = _NAME_UNSAFE.sub("_", name)
    name = re.sub(r"\s+", " ", name).strip(" ._")
    if not name:
        return "attachment"
    if _WINDOWS_RESERVED.match(name):
        name = "_" + name
    if len(name) > _NAME_MAX:
        stem, dot, ext = name.rpartition(".")
        if dot and 0 < len(ext) <= 10:
            name = stem[:_NAME_MAX - len(ext) - 1].rstrip(" .") + "." + ext
        else:
            name = name[:_NAME_MAX].rstrip(" .")
    return name
