"""Adding and changing authorities, as application functions (the CLI calls these; a web page
or an email interface could too).

Authorities stay data in `rules/authorities.toml`, the file a site also edits by hand and may
keep in git. So mailflow edits it the way a careful person would:

- only the tables it changes are rewritten; the header comments, the other tables and the
  comments between them are kept as they were, so a diff shows just the change;
- the whole new text is checked with `parse_authorities` before it replaces the old file
  (temporary file, fsync, `os.replace`), so a bad edit never leaves a broken file behind;
- a lock on the rules folder keeps two admins from overwriting each other's change;
- every change is written to the audit log, in the same transaction as the file write.

The daemon reads `rules/` when it starts: it sees a change after `mailflow serve` restarts.
"""
from __future__ import annotations

import csv
import difflib
import fcntl
import io
import json
import os
import re
import stat
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from mailflow.core.addresses import AddressKind, is_our_domain, parse_ours, valid_slug
from mailflow.core.rules import Authority, parse_authorities
from mailflow.rulesdir import load_report_rules
from mailflow.errors import MailflowError, NotFound, RulesError
from mailflow.moderation import Outcome, default_actor
from mailflow.site import Site
from mailflow.store.repository import Thread

RESTART = "Restart `mailflow serve` for the daemon to see it (it reads rules/ when it starts)."
KEYS = ("slug", "name", "emails", "law", "url", "tags", "reports")   # the order tables are written in
CSV_COLUMNS = ("name", "slug", "emails", "law", "tags", "url")
_TABLE_RE = re.compile(r"(?m)^[ \t]*\[\[[ \t]*authority[ \t]*\]\]")


# -- the file as header + tables ---------------------------------------------------------------
@dataclass
class _Table:
    entry: dict[str, Any]     # the table's keys as written (no defaults filled in)
    text: str                 # its own lines, rewritten only when the entry changes
    tail: str = ""            # blank and comment lines after it, kept as they are
    new: bool = False


@dataclass
class _Doc:
    path: Path
    header: str
    tables: list[_Table]

    def find(self, slug: str) -> _Table | None:
        return next((t for t in self.tables if t.entry["slug"].lower() == slug), None)

    def text(self) -> str:
        out = self.header
        for t in self.tables:
            if t.new and out and not out.endswith("\n\n"):   # a blank line before it
                out += "\n" if out.endswith("\n") else "\n\n"
            out += t.text + t.tail
        return out


def _render(entry: dict[str, Any]) -> str:
    """One `[[authority]]` table. JSON strings are valid TOML basic strings."""
    def value(v: Any) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):   # `reports`: where each category's fault reports go
            return "{ " + ", ".join(f"{json.dumps(str(k))} = {value(x)}"
                                    for k, x in v.items()) + " }"
        return json.dumps(v, ensure_ascii=False)
    return "[[authority]]\n" + "".join(f"{k} = {value(entry[k])}\n" for k in KEYS if k in entry)


def _split(text: str, source: str) -> tuple[str, list[_Table]]:
    """Cut the file at each `[[authority]]` line; each piece must parse as exactly that table,
    or the file is laid out in a way mailflow cannot safely rewrite."""
    starts = [m.start() for m in _TABLE_RE.finditer(text)]
    header = text[:starts[0]] if starts else text
    tables = []
    for i, start in enumerate(starts):
        chunk = text[start:starts[i + 1] if i + 1 < len(starts) else len(text)]
        lines = chunk.splitlines(keepends=True)
        cut = len(lines)
        while cut > 1 and (not lines[cut - 1].strip() or lines[cut - 1].lstrip().startswith("#")):
            cut -= 1
        body, tail = "".join(lines[:cut]), "".join(lines[cut:])
        if not body.endswith("\n"):
            body += "\n"
        try:
            data = tomllib.loads(body)
            (entry,) = data["authority"]
            if set(data) != {"authority"} or not isinstance(entry.get("slug"), str):
                raise ValueError
        except (tomllib.TOMLDecodeError, KeyError, ValueError, TypeError):
            raise RulesError(f"{source}: authority table #{i + 1} is laid out in a way "
                             "mailflow cannot rewrite safely (it expects one table per "
                             "authority, as in the example file, and nothing else after "
                             "them); change it by hand") from None
        tables.append(_Table(entry, body, tail))
    return header, tables


def _unique(items: Any) -> list[str]:
    return list(dict.fromkeys(items))


def _addresses(items: Any) -> list[str]:
    return _unique(a.strip().lower() for a in items if a.strip())


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` applied to a table: an empty url, law or tag list removes the key (the law
    then falls back to [site] default_law); `emails` always stays, `[]` meaning no address."""
    out = dict(base)
    for k, v in changes.items():
        if v in ("", []) and k != "emails":
            out.pop(k, None)
        else:
            out[k] = v
    out.setdefault("emails", [])
    return {k: out[k] for k in KEYS if k in out}


def _diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    keys = [k for k in KEYS if old.get(k) != new.get(k)]
    return {"before": {k: old.get(k) for k in keys}, "after": {k: new.get(k) for k in keys}}


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the rules folder (not the file: os.replace swaps the file)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)   # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- CSV -----------------------------------------------------------------------------------------
def _csv_rows(data: bytes, source: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(row number as a spreadsheet shows it, cells by column) for each non-empty row.
    The separator is whichever of `,` `;` tab the header uses most (spreadsheets differ)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MailflowError(f"{source}: not UTF-8 ({e}); save it as 'CSV UTF-8'") from None
    first = text.split("\n", 1)[0]
    delimiter = max((",", ";", "\t"), key=first.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [h.strip().lower() for h in next(reader, [])]
    unknown = [h for h in header if h not in CSV_COLUMNS]
    missing = [h for h in ("slug", "name") if h not in header]
    if unknown or missing or len(set(header)) != len(header):
        raise MailflowError(
            f"{source}: the first row must name the columns; got {', '.join(header) or 'nothing'}"
            f" (columns: {', '.join(CSV_COLUMNS)}; slug and name are required, each once)")
    for n, cells in enumerate(reader, 2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield n, {"": f"{len(cells)} fields, but the header has {len(header)}"}
        else:
            yield n, dict(zip(header, cells))


def _row_changes(cells: dict[str, str]) -> dict[str, Any]:
    """A CSV row as changes to a table: emails split on `;`, commas or spaces; tags on `;`."""
    out: dict[str, Any] = {"slug": cells["slug"].strip().lower(), "name": cells["name"].strip()}
    if "emails" in cells:
        out["emails"] = _addresses(re.split(r"[;,\s]+", cells["emails"]))
    if "tags" in cells:
        out["tags"] = _unique(t.strip() for t in cells["tags"].split(";") if t.strip())
    for k in ("law", "url"):
        if k in cells:
            out[k] = cells[k].strip()
    return out


@dataclass
class ImportReport:
    added: list[dict[str, Any]] = field(default_factory=list)
    updated: list[dict[str, Any]] = field(default_factory=list)
    unchanged: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)   # exist; no --update
    refused: list[dict[str, Any]] = field(default_factory=list)   # {row, slug, reason}
    written: bool = False
    dry_run: bool = False

    def json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- the application functions -------------------------------------------------------------------
class Authorities:
    def __init__(self, site: Site, actor: str | None = None):
        self.site = site
        self.actor = actor or default_actor()

    @property
    def path(self) -> Path:
        return (self.site.settings.site.rules / "authorities.toml").resolve()

    def _parse(self, text: str) -> dict[str, Authority]:
        return parse_authorities(text, self.site.rules.laws, self.site.settings.site.default_law,
                                 str(self.path))

    def _not_found(self, slug: str, known: list[str]) -> NotFound:
        near = difflib.get_close_matches(slug, known, n=3, cutoff=0.5)
        return NotFound(f"no authority {slug!r}; " + (
            f"did you mean {', '.join(near)}?" if near else
            f"known: {', '.join(sorted(known)[:12]) or 'none'}"))

    def _check(self, entry: dict[str, Any]) -> None:
        """Refuse a table that would not load, or whose address could never reach it. The
        reason is the one `parse_authorities` gives, without its file-and-entry prefix."""
        slug, domain = entry.get("slug", ""), self.site.domain
        if not slug:
            raise MailflowError("no slug")
        if not str(entry.get("name", "")).strip():
            raise MailflowError("no name")
        ours = parse_ours(f"{slug}@{domain}", domain, {slug}) if valid_slug(slug) else None
        if ours is not None and ours.kind is not AddressKind.AUTHORITY:
            raise MailflowError(f"slug {slug!r}: {slug}@{domain} is mailflow's own "
                                f"{ours.kind.value} address")
        for a in entry.get("emails", []):
            if is_our_domain(a, domain):
                raise MailflowError(f"{a!r} is at this site's own domain")
        source = "entry"
        try:
            parse_authorities(_render(entry), self.site.rules.laws,
                              self.site.settings.site.default_law, source)
        except RulesError as e:
            raise MailflowError(str(e).removeprefix(f"{source}: authority #1 ({slug}): ")) from None

    @contextmanager
    def _editing(self) -> Iterator[_Doc]:
        """The file as it is now, under the lock, for one read-change-write."""
        path = self.path
        with _locked(path.parent):
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise RulesError(f"{path}: cannot read: {e}") from None
            parsed = self._parse(text)   # fix a broken file by hand first
            header, tables = _split(text, str(path))
            if [t.entry["slug"].lower() for t in tables] != list(parsed):
                raise RulesError(f"{path}: the authorities are not written one table per "
                                 "authority, as in the example file, so mailflow cannot "
                                 "rewrite it safely; change it by hand")
            yield _Doc(path, header, tables)

    def _commit(self, doc: _Doc, audits: list[tuple[str, str, dict[str, Any]]],
                reason: str | None) -> None:
        text = doc.text()
        authorities = self._parse(text)   # before anything is replaced
        with self.site.store.tx() as tx:
            for action, slug, detail in audits:
                tx.audit(self.actor, action, target=f"authority:{slug}", reason=reason,
                         detail=detail)
            _atomic_write(doc.path, text)    # a failed write rolls the audit entries back
        # The fault-report rules are read again (when next used) against the new authorities,
        # which their areas and contacts name: not dropped, as this once did.
        rules = self.site.rules
        self.site.rules = replace(rules, authorities=authorities, report_rules=(
            (lambda: load_report_rules(self.site.settings.site.rules, authorities))
            if rules.takes_reports else None))

    # -- changes ---------------------------------------------------------------------------------
    def add(self, changes: dict[str, Any], *, reason: str | None = None) -> Outcome:
        """A new authority, e.g. {"slug", "name", "emails", "law"?, "url"?, "tags"?}."""
        changes = {**changes, "slug": str(changes.get("slug", "")).strip().lower()}
        if "emails" in changes:
            changes["emails"] = _addresses(changes["emails"])
        entry = _merged({}, changes)
        with self._editing() as doc:
            old = doc.find(changes["slug"]) if changes["slug"] else None
            if old is not None:
                raise MailflowError(f"authority {entry['slug']!r} already exists "
                                    f"({old.entry.get('name')}); change it with "
                                    f"`mailflow authority edit {entry['slug']}`")
            self._check(entry)
            doc.tables.append(_Table(entry, _render(entry), new=True))
            self._commit(doc, [("authority_add", entry["slug"], {"after": entry})], reason)
        return Outcome(f"added {entry['slug']} ({entry['name']}) to {doc.path}\n{RESTART}", [])

    def edit(self, slug: str, changes: dict[str, Any], *, add_emails: tuple[str, ...] = (),
             remove_emails: tuple[str, ...] = (), reason: str | None = None) -> Outcome:
        """Change an authority's keys; `changes` replaces whole values (the email list too),
        then `add_emails` and `remove_emails` adjust the list."""
        slug = slug.strip().lower()
        with self._editing() as doc:
            table = doc.find(slug)
            if table is None:
                raise self._not_found(slug, [t.entry["slug"] for t in doc.tables])
            if "emails" in changes:
                changes = {**changes, "emails": _addresses(changes["emails"])}
            entry = _merged(table.entry, changes)
            remove = _addresses(remove_emails)
            emails = [a for a in entry["emails"] if a not in remove]
            gone = [a for a in remove if a not in entry["emails"]]
            if gone:
                raise MailflowError(f"{', '.join(gone)}: not among {slug}'s addresses "
                                    f"({', '.join(entry['emails']) or 'none'})")
            entry["emails"] = _unique([*emails, *_addresses(add_emails)])
            if entry == _merged(table.entry, {}):
                return Outcome(f"{slug}: nothing changed", [])
            self._check(entry)
            diff = _diff(table.entry, entry)
            table.entry, table.text = entry, _render(entry)
            self._commit(doc, [("authority_edit", slug, diff)], reason)
        said = "; ".join(f"{k} {json.dumps(v, ensure_ascii=False)}"
                         for k, v in diff["after"].items())
        return Outcome(f"{slug}: {said}\n{RESTART}", [])

    def import_csv(self, data: bytes, source: str, *, update: bool = False,
                   dry_run: bool = False, partial: bool = False,
                   reason: str | None = None) -> ImportReport:
        """Add (and with `update`, change) authorities from a CSV file. A row that cannot be
        taken is reported with its number and why; then nothing is written, unless `partial`
        asks to write the good rows anyway. `dry_run` reports and writes nothing.

        In an update a blank cell leaves that value as it is: a spreadsheet with an empty law
        column must not quietly move an authority to the default law."""
        report = ImportReport(dry_run=dry_run)
        audits: list[tuple[str, str, dict[str, Any]]] = []
        with self._editing() as doc:
            rows: dict[str, int] = {}
            for n, cells in _csv_rows(data, source):
                if "" in cells:
                    report.refused.append({"row": n, "slug": None, "reason": cells[""]})
                    continue
                changes = _row_changes(cells)
                slug = changes["slug"]
                table = doc.find(slug) if slug else None
                try:
                    if slug and slug in rows:
                        raise MailflowError(f"slug {slug!r} is also in row {rows[slug]}")
                    rows[slug] = n
                    if table is not None and not update:
                        report.skipped.append({"row": n, "slug": slug,
                                               "reason": "exists (use --update to change it)"})
                        continue
                    if table is not None:   # a blank cell leaves that value as it is
                        changes = {k: v for k, v in changes.items() if v not in ("", [])}
                    entry = _merged(table.entry if table else {}, changes)
                    self._check(entry)
                except MailflowError as e:
                    report.refused.append({"row": n, "slug": slug or None, "reason": str(e)})
                    continue
                if table is None:
                    doc.tables.append(_Table(entry, _render(entry), new=True))
                    report.added.append({"row": n, "slug": slug, "name": entry["name"]})
                    audits.append(("authority_import", slug,
                                   {"file": source, "row": n, "change": "added", "after": entry}))
                elif entry == _merged(table.entry, {}):
                    report.unchanged.append({"row": n, "slug": slug})
                else:
                    diff = _diff(table.entry, entry)
                    table.entry, table.text = entry, _render(entry)
                    report.updated.append({"row": n, "slug": slug, **diff})
                    audits.append(("authority_import", slug,
                                   {"file": source, "row": n, "change": "updated", **diff}))
            if audits and not dry_run and (partial or not report.refused):
                self._commit(doc, audits, reason)
                report.written = True
        return report

    # -- reading ---------------------------------------------------------------------------------
    def _emails_changed(self, tx: Any) -> dict[str, datetime]:
        """When each authority's addresses were last changed through mailflow."""
        out: dict[str, datetime] = {}
        for e in tx.audit_entries():
            target = e["target"] or ""
            if target.startswith("authority:") and "emails" in ((e["detail"] or {}).get("after")
                                                                 or {}):
                out[target.removeprefix("authority:")] = e["at"]
        return out

    @staticmethod
    def _problem(a: Authority, threads: list[Thread],
                 changed: datetime | None) -> tuple[str, int | None] | None:
        """Why the authority's address does not work, or None. Only the latest request
        counts, and not if the addresses were changed after it went out: once an admin fixed
        the address, or a later request got through, the old failure is history."""
        if not a.emails:
            return "no email address", None
        sent = [t for t in threads if t.sent_at is not None]
        if not sent:
            return None
        last = max(sent, key=lambda t: (t.sent_at, t.id))
        if last.delivery_status != "failed" or (changed and last.sent_at and changed > last.sent_at):
            return None
        return (f"the request of thread {last.id} could not be delivered: "
                f"{last.delivery_detail or 'no detail'}", last.id)

    def _json(self, a: Authority) -> dict[str, Any]:
        return {"slug": a.slug, "name": a.name, "emails": list(a.emails), "law": a.law,
                "url": a.url, "tags": list(a.tags), "address": f"{a.slug}@{self.site.domain}"}

    def show(self, slug: str) -> dict[str, Any]:
        """One authority, its threads, and whether its address works."""
        authorities = self.site.rules.authorities
        a = authorities.get(slug.strip().lower())
        if a is None:
            raise self._not_found(slug, list(authorities))
        with self.site.store.read() as tx:
            threads = tx.threads(authority=a.slug)
            problem = self._problem(a, threads, self._emails_changed(tx).get(a.slug))
        return {**self._json(a), "law_name": self.site.rules.laws[a.law].name,
                "address_works": problem is None, "problem": problem and problem[0],
                "threads": [{"id": t.id, "title": t.title, "state": t.state,
                             "delivery_status": t.delivery_status} for t in threads]}

    def problems(self) -> list[dict[str, Any]]:
        """Authorities with no working address: none given, or the latest request failed."""
        out = []
        with self.site.store.read() as tx:
            changed = self._emails_changed(tx)
            for a in self.site.rules.authorities.values():
                problem = self._problem(a, tx.threads(authority=a.slug), changed.get(a.slug))
                if problem:
                    out.append({"slug": a.slug, "name": a.name, "emails": list(a.emails),
                                "problem": problem[0], "thread_id": problem[1]})
        return out
