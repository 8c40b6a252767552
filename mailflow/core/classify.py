"""Decide what an incoming message is before it is threaded: a person's reply, an automatic
answer, a delivery report, or mailflow's own mail coming back. Pure: no I/O, no clock.

Getting this wrong is costly both ways. An out-of-office filed as the authority's answer stops
a deadline clock on a non-answer; a real answer filed as automatic is never read. So the
rules lean on evidence that humans do not produce (DSN parts, RFC 3834 headers, MTA sender
names, formulaic subjects) and every decision names the evidence in `reason`.

Order matters: delivery reports come before auto-reply headers because Exim and Postfix mark
their bounces `Auto-Submitted: auto-replied`, and challenge-response systems (Boxbe) come
before delivery reports because they dress their challenge up as a DSN.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from mailflow.core.message import Classification, Kind, ParsedMessage

__all__ = ["classify"]

# ----------------------------------------------------------------------------- patterns

_LOCAL_PART = re.compile(r"([^\s<>@\"',;:]+)@", re.I)
# Local parts only ever used by mail systems (RFC 5321 §4.5.5, RFC 2142 and common MTAs).
_MTA_LOCALS = frozenset({"mailer-daemon", "mailer_daemon", "mailerdaemon", "mail-daemon",
                         "mail_daemon", "mail.delivery.system", "mdaemon", "mail-delivery",
                         "maildelivery"})
_POSTMASTER_LOCALS = frozenset({"postmaster", "post_master", "post-master", "poostmaster"})
# Display names only delivery software uses, and ones a person might also hide behind.
_MTA_NAMES = re.compile(r"\b(mail\s+deliver(y)?\s+(system|subsystem|service)|mailer[-_ ]?daemon)\b",
                        re.I)
_MTA_NAMES_WEAK = re.compile(
    r"\b(postmaster|internet\s+mail\s+delivery|ndr\s+administrator|mail\s+administrator|"
    r"smtp\s+mail\s+service|mail\s+service|mail\s+system|jetmail\s+system)\b", re.I)

_REPLY_PREFIX = re.compile(r"^\s*((re|fw|fwd|aw|wg|tr|sv|vs|antw|r|rif|odp|pd)\s*(\[\d+\])?\s*:\s*)+",
                           re.I)

_FORWARD_PREFIX = re.compile(r"^\s*(fw|fwd|wg|tr|doorst|rv|enc|i)\s*:", re.I)

# Subjects that only delivery systems write; matched at the start (after a "[tag]").
_BOUNCE_SUBJECT = re.compile(r"""^\s*(\[[^\]]{1,40}\]\s*)?(\*\*\s*)?(
      undeliver(able|ed)
    | undelivered\s+mail
    | (mail|message|e-?mail)\s+delivery\s+(failed|failure|problem|has\s+failed)
    | delivery\s+(failure|failed|problem|error)
    | delivery\s+status\s+notification(?!\s*\((success|relay|delivered)\))
    | delivery\s+notification:\s*delivery\s+has\s+failed
    | delivery\s+report\s*\((failure|delay)
    | delivery\s+status\s*$
    | delayed\s+mail
    | returned\s+mail
    | failure\s+(notice|delivery)
    | failed\s+(mail|delivery)
    | permanent\s+delivery\s+failure
    | non[-\s]?delivery(\s+(report|notification)|\s*:)
    | message\s+status\s*-\s*undeliverable
    | mail\s+system\s+error\s*-\s*returned\s+mail
    | (sorry,\s+)?your\s+message\s+could\s+not\s+be\s+delivered
    | (mail|message)\s+could\s+not\s+be\s+delivered
    | message\s+delivery\s+has\s+failed
    | warning:\s+(could\s+not\s+send\s+message|message\s+\S+\s+delayed)
    | there\s+was\s+an\s+error\s+sending\s+your\s+mail
    | e-?mail\s+bounce\s+notification
    | message\s+you\s+sent\s+blocked
    | unzustellbar | nicht\s+zustellbar | zustellung\s+fehlgeschlagen
    | non\s+remis | non\s+distribuable | [ée]chec\s+de\s+(la\s+)?remise
    | notification\s+d.[ée]tat\s+de\s+remise
    | no\s+se\s+puede\s+entregar | imposible\s+entregar | mensaje\s+no\s+entregado
    | n[ãa]o\s+(é\s+poss[íi]vel\s+entregar|entregue)
    | k[ée]zbes[íi]thetetlen | nem\s+k[ée]zbes[íi]thet
    | onbestelbaar | non\s+recapitabile | impossibile\s+recapitare
    | niedostarczon | nie\s+dostarczono
    | недоставленное\s+сообщение | не\s+доставлено | сообщение\s+не\s+доставлено
    | メールエラー | 配信できません | 配送エラー | 送信できませんでした
    | 邮件传输失败 | 退信 | 无法投递 | 未能送达
)""", re.I | re.X)
# Bounce wording that may follow other text in a subject; counts only with body evidence.
_BOUNCE_SUBJECT_ANYWHERE = re.compile(
    r"(delivery\s+status\s+notification\s*\((failure|delay)\)|mail\s+delivery\s+failed|"
    r"undelivered\s+mail\s+returned\s+to\s+sender|\(delivery\s+failure\)|non\s+remis)", re.I)

# Phrases from bounce bodies: supporting evidence only, never enough alone.
_BOUNCE_BODY = re.compile(r"""(
      could\s*n[o']t\s+be\s+delivered | was\s+not\s+delivered | has\s+not\s+been\s+delivered
    | not\s+yet\s+been\s+delivered | could\s+not\s+deliver | unable\s+to\s+deliver
    | delivery\s+(has\s+)?failed | delivery\s+to\s+the\s+following\s+recipient
    | undeliverable | undelivered | permanent\s+(fatal\s+)?error
    | user\s+unknown | unknown\s+user | no\s+such\s+(user|mailbox|recipient)
    | mailbox\s+(unavailable|not\s+found|full|is\s+full) | over\s+quota | quota\s+exceeded
    | does\s+not\s+exist | recipient\s+address\s+rejected | address(es)?\s+failed
    | returned\s+to\s+sender | mail\s+delivery\s+software | this\s+is\s+the\s+mail\s+system
    | qmail-send\s+program | sorry\s+to\s+have\s+to\s+inform\s+you | delivery\s+attempts?
    | not\s+listed\s+in | non-delivery | nameserver\s+error | host\s+unknown
    | remote\s+host\s+said | smtp\s+error | diagnostic-code | final-recipient
    | no\s+valid\s+recipients | invalid\s+(user|recipient|address)
    | not\s+a\s+member\s+of\s+this\s+(mailing\s+)?list
    | n'a\s+pas\s+pu\s+[eê]tre\s+d[ée]livr | konnte\s+nicht\s+zugestellt
    | не\s+доставлено | 送信できませんでした | 配信できません
)""", re.X)   # searched in lower-cased text (_LOWERED)

_DSN_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_SMTP_CODE = re.compile(r"(?m)(?:^|[\s:(\[])([45])\d\d(?=[\s-])")
_MAILBOX_FULL = re.compile(
    r"(mailbox\s+(is\s+)?full|over\s*quota|quota\s+exceeded|exceeded\s+(the\s+)?(storage|quota)|"
    r"insufficient\s+(system\s+)?storage|mailbox\s+size\s+limit|disk\s+quota|"
    r"mailbox\s+exceeds|exceeds\s+(the\s+)?allowed\s+size|"
    r"メールボックスが一杯|\b[45]\.2\.2\b)")   # _LOWERED
_DELAY = re.compile(
    r"(\bdelayed\b|will\s+(continue\s+to\s+)?(re)?try|still\s+(being\s+)?(re)?tr(y|ied|ying)|"
    r"not\s+yet\s+been\s+delivered|could\s+not\s+send\s+message\s+for\s+past|"
    r"this\s+is\s+a\s+warning|no\s+action\s+is\s+required|temporar(y|ily)\s+(failure|error|deferred)|"
    r"delivery\s+(is\s+)?delayed|\(delay\))")   # _LOWERED
_PERMANENT = re.compile(
    r"(permanent(ly)?\s+(fatal\s+)?(error|failure|failed)|this\s+is\s+a\s+permanent|"
    r"user\s+unknown|unknown\s+user|no\s+such\s+(user|mailbox|recipient)|does\s+not\s+exist|"
    r"recipient\s+address\s+rejected|address\s+rejected|unrouteable|not\s+listed\s+in|"
    r"host\s+unknown|invalid\s+(user|recipient|address)|unknown\s+recipient|"
    r"recipient\s+name\s+is\s+not\s+recognized|no\s+matches\s+to\s+nameserver|"
    r"account\s+(has\s+been\s+)?(disabled|deactivated|closed))")   # _LOWERED
# _LOWERED: these four are searched, without re.I, in text lower-cased once. Python's re
# tries a case-insensitive alternation at every position of up to 64 KB of bounce text:
# 2 to 6 times slower than the same alternation over lowered text (bench/README.md,
# seventh round). Their letters are all lower case (tests/test_classify.py).
_LOWERED = (_BOUNCE_BODY, _MAILBOX_FULL, _DELAY, _PERMANENT)

_OOF_SUBJECT = re.compile(r"""(
      out\s+of\s+(the\s+)?office | \bOOO\b | \bOOF\b | auto(matic|mated)?[-\s]?(reply|response|respons|answer)
    | autoreply | autorespon | \bis\s+out\s+of\s+the\s+office | away\s+from\s+(the\s+)?office
    | \bon\s+(annual\s+)?leave\b | \bon\s+vacation\b | \baway\s+until\b | vacation\s+(reply|message|notice)
    | thank\s+you\s+for\s+your\s+(e-?mail|message)\s*$ | AUTO:\s | acknowledg(e)?ment\s+of\s+receipt
    | absence\s+du\s+bureau | absent\s+du\s+bureau | r[ée]ponse\s+automatique | message\s+d.absence
    | abwesenheitsnotiz | abwesenheit | automatische\s+antwort | automatische\s+r[üu]ckmeldung
    | nicht\s+im\s+b[üu]ro | au[ßs]er\s+haus
    | respuesta\s+autom[áa]tica | fuera\s+de\s+la\s+oficina | ausente\s+de\s+la\s+oficina
    | automatikus\s+v[áa]lasz | h[áa]zon\s+k[íi]v[üu]l | irod[áa]n\s+k[íi]v[üu]l | t[áa]voll[ée]t
    | resposta\s+autom[áa]tica | ausente\s+do\s+escrit[óo]rio | fora\s+do\s+escrit[óo]rio
    | risposta\s+automatica | fuori\s+ufficio
    | automatisch\s+antwoord | afwezig
    | automatyczna\s+odpowied[źz] | poza\s+biurem
    | автоответ | автоматический\s+ответ
)""", re.I | re.X)
_OOF_ANYWHERE = re.compile(r"\bis\s+(currently\s+)?(out\s+of\s+(the\s+)?office|on\s+(annual\s+)?leave|"
                           r"away\s+from\s+(the\s+|his\s+|her\s+)?(office|desk))", re.I)
_PRECEDENCE_AUTO = frozenset({"bulk", "junk", "list", "auto_reply", "auto-reply"})
_AUTO_HEADERS = ("X-Autoreply", "X-Autorespond", "X-Autorespond-To", "X-Autoreply-From",
                 "X-Mail-Autoreply", "X-Autogenerated", "X-Auto-Reply", "X-AutoResponder")
_ADDRESS = re.compile(r"[^\s<>()\[\]\"',;:]+@[^\s<>()\[\]\"',;:]+\.[A-Za-z0-9-]+")


# ------------------------------------------------------------------------------ helpers

def _first_param(value: str, name: str) -> str | None:
    m = re.search(rf"(?:^|;)\s*{name}\s*=\s*\"?([^\";\s]+)", value, re.I)
    return m.group(1).lower() if m else None


def _dsn_blocks(msg: ParsedMessage) -> list[dict[str, str]]:
    """Per-recipient field blocks of every message/delivery-status part (RFC 3464)."""
    blocks: list[dict[str, str]] = []
    for att in msg.attachments:
        if att.content_type not in ("message/delivery-status", "message/global-delivery-status"):
            continue
        text = att.data[:256 * 1024].decode("utf-8", "replace").replace("\r\n", "\n")
        for chunk in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            last = None
            for line in chunk.split("\n"):
                if line[:1] in (" ", "\t") and last:
                    fields[last] += " " + line.strip()
                    continue
                if ":" in line:
                    k, v = line.split(":", 1)
                    last = k.strip().lower()
                    fields.setdefault(last, v.strip())
            if fields:
                blocks.append(fields)
    return blocks


def _recipient(value: str) -> str:
    value = value.split(";", 1)[-1].strip().strip("<>").strip()
    if value.startswith("@") and ":" in value:   # RFC 822 source route "@relay:user@host"
        value = value.rsplit(":", 1)[1]
    return value.lower()


def _failed_from_text(text: str) -> list[str]:
    """Recipients named in common non-DSN bounce layouts (qmail, Postfix, Exim)."""
    found = re.findall(r"(?m)^\s*<([^<>\s]+@[^<>\s]+)>\s*:", text)
    m = re.search(r"following\s+address(?:\(es\)|es)?\s+failed:?", text, re.I)
    if m:  # Exim lists them, indented, on the next lines
        for line in text[m.end():].split("\n")[:12]:
            found += _ADDRESS.findall(line)
    return found


def _permanence(text: str) -> bool | None:
    """True for 5.x.x / 5xx, False for 4.x.x / delays / full mailboxes (which clear up)."""
    text = text.lower()
    if _MAILBOX_FULL.search(text):
        return False
    statuses = {m.group(1) for m in _DSN_STATUS.finditer(text)}
    if "5" in statuses:
        return True
    if "4" in statuses or _DELAY.search(text):
        return False
    codes = {m.group(1) for m in _SMTP_CODE.finditer(text)}
    if "5" in codes or _PERMANENT.search(text):
        return True
    if "4" in codes:
        return False
    return None


def _said(pattern: re.Pattern[str], text: str) -> str | None:
    """What a _LOWERED pattern found in `text`, as the text says it."""
    low = text.lower()
    m = pattern.search(low)
    if m is None:
        return None
    # lower() keeps the length but for a few letters ("İ" becomes two): then the lowered words
    return text[m.start():m.end()] if len(low) == len(text) else m.group(0)


def _dedupe(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i for i in items if i))


def _from_text(msg: ParsedMessage) -> str:
    return " ".join(msg.header_all("From")) or msg.from_addr


def _local_parts(text: str) -> set[str]:
    return {m.lower() for m in _LOCAL_PART.findall(text)}


# -------------------------------------------------------------------------------- rules

def _oof_subject(subject: str) -> str | None:
    """The marker, if the subject is an automatic answer's. A reply's subject carries the
    request's own title after "Re:", and a request may well be about "automatic responses",
    so markers count only where responders put them: first, or bracketed at the end."""
    head = re.sub(r"^[\s\[(]+", "", subject)
    head = re.sub(r"^auto\s*:\s*", "AUTO: ", head, flags=re.I)
    m = _OOF_SUBJECT.match(head) or _OOF_ANYWHERE.search(subject)
    if m:
        return m.group(0).strip()
    m = re.search(r"[(\[]\s*([^()\[\]]{3,60})\s*[)\]]\s*$", subject)
    if m and _OOF_SUBJECT.match(m.group(1)):
        return m.group(1).strip()
    return None


def _loop(msg: ParsedMessage, our_domain: str, loop_header: str) -> Classification | None:
    domain = our_domain.lower().strip()
    for value in msg.header_all(loop_header):
        if domain and domain in value.lower():
            return Classification(Kind.LOOP, f"{loop_header}: {value.strip()[:80]}")
    if domain and msg.message_id and msg.message_id.lower().endswith(f"@{domain}>"):
        return Classification(Kind.LOOP, f"Message-ID {msg.message_id} was made by us")
    return None


def _challenge_response(msg: ParsedMessage) -> Classification | None:
    names = {k.lower() for k, _ in msg.headers}
    if "x-bluebottle-request" in names:
        return Classification(Kind.AUTO_REPLY, "challenge-response: X-Bluebottle-Request")
    if any(n.startswith("x-boxbe") for n in names) or msg.from_addr.endswith("@boxbe.com"):
        return Classification(Kind.AUTO_REPLY, "challenge-response: Boxbe")
    for block in _dsn_blocks(msg):
        if "boxbe" in block.get("diagnostic-code", "").lower():
            return Classification(Kind.AUTO_REPLY, "challenge-response: Boxbe notice in DSN")
    return None


def _bounce(msg: ParsedMessage, null_sender: bool, null_why: str) -> Classification | None:
    content_type = msg.header("Content-Type") or ""
    report_type = _first_param(content_type, "report-type")
    is_report = content_type.lower().lstrip().startswith("multipart/report")
    blocks = _dsn_blocks(msg)
    text = msg.text[:64 * 1024]

    # 1. RFC 3464 delivery status notification.
    if blocks or (is_report and report_type == "delivery-status"):
        recipients = [b for b in blocks if "final-recipient" in b or "original-recipient" in b]
        actions = {a.split()[0].lower() for b in recipients if (a := b.get("action", "").strip())}
        statuses = " ".join(b.get("status", "") for b in recipients)
        failed = _dedupe(_recipient(b.get("final-recipient") or b.get("original-recipient", ""))
                         for b in recipients
                         if b.get("action", "failed").lower().startswith(("failed", "delayed")))
        if actions and actions <= {"delivered", "relayed", "expanded"}:
            return Classification(Kind.AUTO_REPLY,
                                   f"delivery status notification: {', '.join(sorted(actions))}")
        # One recipient gone for good makes the report permanent, even if another's mailbox
        # is merely full.
        each = [False if b.get("action", "").lower().startswith("delayed")
                else _permanence(b.get("status", "") + " " + b.get("diagnostic-code", ""))
                for b in recipients]
        if True in each:
            permanent: bool | None = True
        elif False in each:
            permanent = False
        else:
            permanent = _permanence(text)
        why = "multipart/report; report-type=delivery-status" if is_report else \
              "message/delivery-status part"
        detail = f" (Action: {', '.join(sorted(actions))}; Status: {statuses.strip()})" \
            if actions or statuses.strip() else ""
        return Classification(Kind.BOUNCE, why + detail, permanent, failed)

    # 2. Headers that only MTAs add.
    x_failed = msg.header_all("X-Failed-Recipients")
    if x_failed:
        failed = _dedupe(a.lower() for v in x_failed for a in _ADDRESS.findall(v))
        return Classification(Kind.BOUNCE, f"X-Failed-Recipients: {', '.join(failed)[:120]}",
                              _permanence(msg.subject + "\n" + text), failed)
    if msg.header("X-MS-Exchange-Message-Is-Ndr") is not None:
        return Classification(Kind.BOUNCE, "X-MS-Exchange-Message-Is-Ndr header",
                              _permanence(text), _dedupe(_failed_from_text(text)))
    auto = (msg.header("Auto-Submitted") or "").lower()
    if "auto-generated" in auto and re.search(r"\((failure|warning|delay)", auto):
        # Sendmail's own labels: "(failure)" is a bounce, "(warning-timeout)" a delay.
        found = _permanence(text)
        permanent = (found if found is not None else True) if "failure" in auto else False
        return Classification(Kind.BOUNCE, f"Auto-Submitted: {auto}", permanent,
                              _dedupe(_failed_from_text(text)))

    # 3. Who sent it, what it is called, what it says.
    sender = _from_text(msg)
    locals_ = _local_parts(sender)
    subject = msg.subject
    fresh_subject = not _REPLY_PREFIX.match(subject)
    subject_hit = _BOUNCE_SUBJECT.match(subject) if fresh_subject else None
    mta_sender = bool(locals_ & _MTA_LOCALS) or bool(_MTA_NAMES.search(sender)) or \
        sender.strip().endswith("<>")
    postmaster = bool(locals_ & _POSTMASTER_LOCALS) or bool(_MTA_NAMES_WEAK.search(sender))
    # The body's wording only ever supports other evidence, and searching up to 64 KB of
    # text with this many alternatives is the dearest step of classifying (about 0.5 ms a
    # message): look only when a rule below could use what it finds.
    body_hit = (_said(_BOUNCE_BODY, text)
                if not subject_hit and not mta_sender and (
                    postmaster or null_sender
                    or (not _FORWARD_PREFIX.match(subject)
                        and _BOUNCE_SUBJECT_ANYWHERE.search(subject)))
                else None)

    def bounce(reason: str) -> Classification:
        return Classification(Kind.BOUNCE, reason, _permanence(subject + "\n" + text),
                              _dedupe(a.lower() for a in _failed_from_text(text)))

    if subject_hit:
        return bounce(f"bounce subject {subject_hit.group(0).strip()[:60]!r}")
    if mta_sender:
        return bounce(f"sent by a mail system: From {sender.strip()[:80]}")
    if postmaster and (body_hit or null_sender):
        return bounce(f"From {sender.strip()[:60]} and body says {body_hit!r}" if body_hit
                      else f"From {sender.strip()[:60]} with {null_why}")
    if null_sender and body_hit:
        return bounce(f"{null_why} and body says {body_hit!r}")
    if body_hit and not _FORWARD_PREFIX.match(subject) and _BOUNCE_SUBJECT_ANYWHERE.search(subject):
        return bounce(f"subject {subject[:60]!r} and body says {body_hit!r}")
    return None


def _auto_reply(msg: ParsedMessage, null_sender: bool, null_why: str) -> Classification | None:
    auto = msg.header("Auto-Submitted")
    if auto is not None:
        value = re.sub(r"\(.*?\)", "", auto).strip().lower()
        if value and value != "no":
            return Classification(Kind.AUTO_REPLY, f"Auto-Submitted: {auto.strip()[:60]}")
    for name in _AUTO_HEADERS:
        value = msg.header(name)
        if value is not None and value.strip().lower() not in ("no", "false", "0"):
            return Classification(Kind.AUTO_REPLY, f"{name}: {value.strip()[:60]}")
    message_class = msg.header("X-POST-MessageClass") or ""
    if "autoresponder" in message_class.lower():
        return Classification(Kind.AUTO_REPLY, f"X-POST-MessageClass: {message_class[:60]}")
    content_type = msg.header("Content-Type") or ""
    if _first_param(content_type, "report-type") in ("feedback-report", "disposition-notification"):
        return Classification(Kind.AUTO_REPLY,
                              f"multipart/report; report-type={_first_param(content_type, 'report-type')}")
    precedence = (msg.header("Precedence") or "").strip().lower()
    if precedence in _PRECEDENCE_AUTO:
        return Classification(Kind.AUTO_REPLY, f"Precedence: {precedence}")
    oof = _oof_subject(msg.subject)
    if oof:
        return Classification(Kind.AUTO_REPLY, f"out-of-office subject {oof!r}")
    # Outlook/Exchange put X-Auto-Response-Suppress on ordinary mail too: count it only when
    # something else says "generated", never alone.
    suppress = msg.header("X-Auto-Response-Suppress")
    if suppress is not None and (null_sender or msg.header("X-MS-Exchange-Inbox-Rules-Loop")):
        why = null_why if null_sender else "X-MS-Exchange-Inbox-Rules-Loop"
        return Classification(Kind.AUTO_REPLY, f"X-Auto-Response-Suppress: {suppress} with {why}")
    return None


_SCORE = re.compile(r"[-+]?\d+(?:[.,]\d+)?")


def _spam(msg: ParsedMessage, header: str | None, threshold: float | None) -> Classification | None:
    """An upstream filter's score (SpamAssassin's X-Spam-Score, rspamd's X-Spamd-Score...).

    Only a header the site configured is trusted: anyone can write any header, so the site's
    own MTA must be the one that sets (and strips incoming copies of) it.
    """
    if not header or threshold is None:
        return None
    for value in msg.header_all(header):
        m = _SCORE.search(value)
        if m is None:
            continue
        score = float(m.group(0).replace(",", "."))
        if score >= threshold:
            return Classification(Kind.SPAM, f"{header}: {score:g} (threshold {threshold:g})")
    return None


def classify(msg: ParsedMessage, envelope_sender: str | None, *, our_domain: str,
             loop_header: str = "X-Mailflow-Loop", spam_header: str | None = None,
             spam_threshold: float | None = None) -> Classification:
    """What this message is. `envelope_sender` is the SMTP MAIL FROM ("" for the null
    sender, None when unknown, e.g. a message read from a file or IMAP); when unknown, a
    `Return-Path: <>` header stands in for it."""
    loop = _loop(msg, our_domain, loop_header)
    if loop is not None:
        return loop
    spam = _spam(msg, spam_header, spam_threshold)
    if spam is not None:
        return spam

    if envelope_sender is not None:
        null_sender = envelope_sender.strip() in ("", "<>")
        null_why = "null envelope sender"
    else:
        return_path = msg.header("Return-Path")
        null_sender = return_path is not None and return_path.strip() in ("<>", "")
        null_why = "Return-Path: <>"

    for rule in (lambda: _challenge_response(msg),
                 lambda: _bounce(msg, null_sender, null_why),
                 lambda: _auto_reply(msg, null_sender, null_why)):
        found = rule()
        if found is not None:
            return found
    if null_sender:
        return Classification(Kind.BOUNCE, null_why, None)
    return Classification(Kind.REPLY, "no automatic markers")
