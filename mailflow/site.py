"""Everything one site needs, built from its config: settings, rules, store, spool, signer.

Both the daemon and every CLI command start here, so they always agree on where things live.
Building it validates the config and the rules before anything touches mail.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from jinja2 import Environment

from mailflow import config as config_mod
from mailflow.core.addresses import AddressKind, report_address, thread_address
from mailflow.core.door import DoorDecision, check_recipient
from mailflow.config import Settings
from mailflow.core.rules import Rules
from mailflow.outbound.signing import Signer, load_key
from mailflow.outbound.transports import Transport, make_transport
from mailflow.rulesdir import load_rules
from mailflow.spool import Spool
from mailflow.store.repository import Store
from mailflow.i18n import translations
from mailflow.templating import make_environment


@dataclass
class Site:
    settings: Settings
    rules: Rules

    @classmethod
    def open(cls, config_path: Path | str, *, lazy_reports: bool = False) -> "Site":
        """`lazy_reports`: the fault-report rules are read when first needed (`ingest`)."""
        settings = config_mod.load(config_path)
        return cls(settings=settings,
                   rules=load_rules(settings.site.rules, settings.site.default_law,
                                    lazy_reports=lazy_reports))

    @property
    def domain(self) -> str:
        return self.settings.site.domain

    @cached_property
    def store(self) -> Store:
        return Store(self.settings.database.url).migrate()

    @cached_property
    def spool(self) -> Spool:
        return Spool(self.settings.spool.dir)

    @cached_property
    def signer(self) -> Signer:
        d = self.settings.dkim
        return Signer(load_key(d.key_file), d.selector, d.domain)

    @cached_property
    def templates(self) -> Environment:
        return make_environment(self.settings.site.templates, self.settings.site.language)

    def foi_subject(self, thread: Any) -> str:
        """The contract's subject, `Freedom of Information request - <title> [FOI #<id>]`,
        in the site's language (the tag stays as it is: matching relies on it)."""
        return self._("Freedom of Information request - {title}", title=thread.title) \
            + f" [FOI #{thread.id}]"

    def report_subject(self, thread: Any) -> str:
        """A fault report's subject, `Problem report - <title> [Report #<id>]`, built like the
        FOI one so a council's mail system threads the replies the same way."""
        return self._("Problem report - {title}", title=thread.title) + f" [Report #{thread.id}]"

    def thread_subject(self, thread: Any) -> str:
        """The subject mail to the authority carries: the report's or the FOI request's."""
        return self.report_subject(thread) if thread.kind == "report" else self.foi_subject(thread)

    def request_address(self, thread: Any) -> str:
        """Where the authority writes: the thread's authority-side secret address
        (`report-<id>-<token>@` for a fault report, `request-…` for an FOI request)."""
        if thread.kind == "report":
            return report_address(thread.id, thread.request_token, self.domain)
        return thread_address(AddressKind.REQUEST, thread.id, thread.request_token, self.domain)

    def reply_address(self, thread: Any) -> str:
        """Where the citizen writes: a different secret, so nobody else can write as her."""
        return thread_address(AddressKind.REPLY, thread.id, thread.reply_token, self.domain)

    @property
    def takes_reports(self) -> bool:
        """Whether the site has fault-report categories (rules/categories.toml), so report@ is open."""
        return self.rules.takes_reports

    def check_recipient(self, rcpt: str) -> DoorDecision:
        """The door's decision for one recipient, with everything the site knows."""
        return check_recipient(rcpt, domain=self.domain, slugs=self.rules.slugs,
                               site_url=self.settings.site.url, reports=self.takes_reports)

    def _(self, message: str, **values: object) -> str:
        """Translate a string of code (a subject line) into the site's language."""
        text = translations(self.settings.site.language).gettext(message)
        return text.format(**values) if values else text

    @cached_property
    def transport(self) -> Transport:
        return make_transport(self.settings.outbound, self.settings.smtp.hostname)

    def close(self) -> None:
        if "store" in self.__dict__:
            self.store.close()
