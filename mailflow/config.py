"""The site's settings: defaults in one place, every key validated when the file is loaded.

A wrong key or value is a `ConfigError` that names the file, the key and what was expected,
so an admin never meets a KeyError at 3 a.m. Relative paths are relative to the folder that
holds the config file, so a site folder can be moved as a whole. Secrets can come from the
environment (`secret_env`, `password_env`) so they need not sit in the file.
"""
from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mailflow.core.reminders import ReminderPolicy
from mailflow.errors import ConfigError

DEFAULT_CONFIG = "config.toml"


@dataclass(frozen=True)
class SiteSettings:
    domain: str
    name: str
    url: str
    secret: str
    rules: Path
    templates: Path | None
    default_law: str
    language: str = "en"


@dataclass(frozen=True)
class DatabaseSettings:
    url: str


@dataclass(frozen=True)
class SpoolSettings:
    dir: Path
    keep_done_days: int
    max_attempts: int
    processor_niceness: int = 10     # the daemon's processing child: nice(2) increment


@dataclass(frozen=True)
class SmtpSettings:
    listen_host: str
    listen_port: int
    hostname: str
    max_message_size: int
    max_recipients: int
    lmtp: bool
    idle_timeout: float = 300.0           # seconds a client may stay silent (then 421)
    max_connections: int = 1000           # open connections in all (421 over it)
    max_connections_per_ip: int = 50      # from one client address; 0: no cap
    tls_cert: Path | None = None          # STARTTLS is offered when both are set
    tls_key: Path | None = None


@dataclass(frozen=True)
class SmarthostSettings:
    host: str
    port: int
    tls: str  # "starttls" | "implicit" | "none"
    user: str | None
    password: str | None
    timeout: float


@dataclass(frozen=True)
class OutboundSettings:
    transport: str  # "maildir" | "smtp"
    maildir: Path
    bounce_address: str
    retry_schedule: tuple[int, ...]
    smtp: SmarthostSettings


@dataclass(frozen=True)
class DkimSettings:
    selector: str
    domain: str
    key_file: Path


@dataclass(frozen=True)
class ArchiveSettings:
    dir: Path
    base_url: str
    debounce_seconds: int
    workers: int = 0          # processes making views in a full build; 0: min(2, CPU count)


@dataclass(frozen=True)
class ModerationSettings:
    new_requests: str = "publish"         # publish | premoderate
    authority_replies: str = "publish"    # publish | hold
    first_time_citizens: str = "publish"  # publish | hold


@dataclass(frozen=True)
class ReportSettings:
    """[reports]: fault reports (the categories and areas themselves are data in rules/)."""
    duplicate_distance_m: float = 100.0   # open reports of a category this close are pointed out
    questionnaire_after_days: int = 28    # "has it been fixed?" this long after sending
    questionnaire_repeat_days: int = 28   # and again this often while it is open
    map_link: str = "https://www.openstreetmap.org/?mlat={lat}&mlon={lon}#map=18/{lat}/{lon}"


@dataclass(frozen=True)
class ClassifySettings:
    spam_header: str | None
    spam_threshold: float
    # Who sent it: DKIM, SPF and DMARC for every incoming message (mailflow/mail/authenticate.py).
    authenticate: bool = True
    dns_timeout: float = 5.0              # seconds per DNS question (four times that per message)
    # The DNS resolvers to ask ("address" or "address:port", "[v6]:port"); empty: the
    # system's (/etc/resolv.conf). A caching resolver on the same machine is what keeps the
    # pipeline limited by its CPU and disk rather than by round trips (docs/operations.md).
    nameservers: tuple[tuple[str, int], ...] = ()
    hold_unverified: str = "failed"       # failed | unverified | never (core.authentication)
    # The site's own mail servers: a connection from one of them is not the client; the client
    # is read from the Received headers they wrote. Loopback: a Postfix or Exim in front.
    trusted_relays: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # ingest and IMAP: read the client address from the topmost Received header (written by
    # the site's own MTA or mailbox); off, SPF is "none" for mail taken in that way.
    spf_from_received: bool = False
    # RFC 3834: at most one automatic answer per this many days to an address that never
    # confirmed a request (0: no limit). Off by default: with it, a new citizen who writes
    # to three authorities in a week gets one confirmation and two queue items.
    automatic_answer_days: int = 0


@dataclass(frozen=True)
class ReminderSettings:
    sweep_seconds: int
    default: "ReminderPolicy"
    per_law: dict[str, "ReminderPolicy"]

    def policy(self, law: str) -> "ReminderPolicy":
        return self.per_law.get(law, self.default)


@dataclass(frozen=True)
class Settings:
    path: Path
    site: SiteSettings
    database: DatabaseSettings
    spool: SpoolSettings
    smtp: SmtpSettings
    outbound: OutboundSettings
    dkim: DkimSettings
    classify: ClassifySettings = ClassifySettings(None, 5.0)
    archive: ArchiveSettings | None = None
    moderation: ModerationSettings = ModerationSettings()
    reports: ReportSettings = ReportSettings()
    reminders: ReminderSettings = field(default_factory=lambda: ReminderSettings(
        300, ReminderPolicy(), {}))
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def base(self) -> Path:
        return self.path.parent

    @property
    def var(self) -> Path:
        return self.base / "var"


# The schema: table -> key -> (type, default). A default of REQUIRED must be given.
REQUIRED = object()
_SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], Any]]] = {
    "site": {
        "domain": (str, REQUIRED),
        "name": (str, "mailflow"),
        "url": (str, ""),
        "secret": (str, ""),
        "secret_env": (str, ""),
        "rules": (str, "rules"),
        "templates": (str, ""),
        "default_law": (str, "uk-foia"),
        "language": (str, "en"),
    },
    "database": {"url": (str, "sqlite:///var/mailflow.db")},
    "spool": {
        "dir": (str, "var/spool"),
        "keep_done_days": (int, 7),
        "max_attempts": (int, 5),
        "processor_niceness": (int, 10),
    },
    "smtp": {
        "listen": (str, "127.0.0.1:2525"),
        "hostname": (str, ""),
        "max_message_size": (int, 26_214_400),
        "max_recipients": (int, 100),
        "lmtp": (bool, False),
        "idle_timeout": ((int, float), 300),
        "max_connections": (int, 1000),
        "max_connections_per_ip": (int, 50),
        "tls_cert": (str, ""),
        "tls_key": (str, ""),
    },
    "outbound": {
        "transport": (str, "maildir"),
        "maildir": (str, "var/outbox"),
        "bounce_address": (str, ""),
        "retry_schedule": (list, [300, 900, 1800, 3600, 7200, 14400]),
    },
    "outbound.smtp": {
        "host": (str, "localhost"),
        "port": (int, 587),
        "tls": (str, "starttls"),
        "user": (str, ""),
        "password": (str, ""),
        "password_env": (str, ""),
        "timeout": ((int, float), 30),
    },
    "archive": {
        "dir": (str, "var/archive"),
        "base_url": (str, ""),
        "debounce_seconds": (int, 20),
        "workers": (int, 0),
    },
    "moderation": {
        "new_requests": (str, "publish"),
        "authority_replies": (str, "publish"),
        "first_time_citizens": (str, "publish"),
    },
    "classify": {
        "spam_header": (str, ""),
        "spam_threshold": ((int, float), 5.0),
        "authenticate": (bool, True),
        "dns_timeout": ((int, float), 5.0),
        "nameservers": (list, []),
        "hold_unverified": (str, "failed"),
        "trusted_relays": (list, ["127.0.0.0/8", "::1/128"]),
        "spf_from_received": (bool, False),
        "automatic_answer_days": (int, 0),
    },
    "reminders": {
        "sweep_seconds": (int, 300),
        "timezone": (str, "UTC"),
        "hour": (int, 9),
        "citizen_due": (bool, True),
        "citizen_late": (bool, True),
        "authority_followup": (bool, True),
        "followup_every": (int, 10),
        "followup_max": (int, 2),
        "very_late": (bool, True),
        "describe_after_days": (int, 7),
    },
    "reports": {
        "duplicate_distance_m": ((int, float), 100),
        "questionnaire_after_days": (int, 28),
        "questionnaire_repeat_days": (int, 28),
        "map_link": (str, ReportSettings.map_link),
    },
    "dkim": {
        "selector": (str, "mailflow"),
        "domain": (str, ""),
        "key_file": (str, "var/dkim/mailflow.pem"),
    },
}
# Tables that later features read; accepted here so a site can be configured ahead of them.
_OPEN_TABLES = {"imap", "scheduler", "log"}


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """--config wins, then MAILFLOW_CONFIG, then ./config.toml."""
    return Path(explicit or os.environ.get("MAILFLOW_CONFIG") or DEFAULT_CONFIG)


def load(path: str | os.PathLike[str]) -> Settings:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (make one with `mailflow init DIR`)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_dict(data, path.resolve())


def _where(path: Path, table: str, key: str | None = None) -> str:
    return f"{path}: [{table}]" + (f" {key}" if key else "")


def _niceness(path: Path, n: int) -> int:
    if not 0 <= n <= 19:
        raise ConfigError(f"{_where(path, 'spool', 'processor_niceness')}: must be from 0 (the "
                          f"daemon's own priority) to 19 (the lowest), got {n}")
    return n


def _archive_workers(path: Path, n: int) -> int:
    if n < 0:
        raise ConfigError(f"{_where(path, 'archive', 'workers')}: must be 0 (automatic) or "
                          f"more, got {n}")
    return n


def _check_table(path: Path, table: str, given: Any) -> dict[str, Any]:
    schema = _SCHEMA[table]
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ConfigError(f"{_where(path, table)}: expected a table, got {type(given).__name__}")
    out: dict[str, Any] = {}
    nested = {t.split(".", 1)[1] for t in _SCHEMA if t.startswith(table + ".")}
    for key, value in given.items():
        if key in nested:
            continue
        if key not in schema:
            hint = difflib.get_close_matches(key, schema, n=1)
            also = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"{_where(path, table, key)}: unknown key{also}; known keys: {', '.join(schema)}")
        typ, _ = schema[key]
        if typ is int and isinstance(value, bool) or not isinstance(value, typ):
            want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise ConfigError(
                f"{_where(path, table, key)}: expected {want}, got {type(value).__name__} {value!r}")
        out[key] = value
    for key, (_, default) in schema.items():
        if key not in out:
            if default is REQUIRED:
                raise ConfigError(f"{_where(path, table, key)}: missing, and it has no default")
            out[key] = default
    return out


def _secret(path: Path, table: str, data: dict[str, Any], key: str) -> str:
    env = data.get(f"{key}_env") or ""
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(
                f"{_where(path, table, key + '_env')}: environment variable {env} is not set")
        return value
    return data.get(key) or ""


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _hostport(path: Path, table: str, key: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{_where(path, table, key)}: expected \"host:port\", got {value!r}")
    return host.strip("[]"), int(port)


def _choice(path: Path, table: str, key: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(
            f"{_where(path, table, key)}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _policy(path: Path, table: str, values: dict[str, Any]) -> ReminderPolicy:
    try:
        ZoneInfo(values["timezone"])
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{_where(path, table, 'timezone')}: expected a time zone such as "
                          f"\"Europe/London\", got {values['timezone']!r}") from None
    if not 0 <= values["hour"] <= 23:
        raise ConfigError(f"{_where(path, table, 'hour')}: expected 0 to 23")
    for key in ("followup_every", "describe_after_days"):
        if values[key] < 1:
            raise ConfigError(f"{_where(path, table, key)}: expected at least 1")
    return ReminderPolicy(**{k: v for k, v in values.items() if k != "sweep_seconds"})


def _reminders(path: Path, given: Any) -> ReminderSettings:
    """[reminders] for the site, and [reminders.law.<id>] tables that override it per law."""
    given = dict(given or {})
    per_law_raw = given.pop("law", {}) or {}
    base = _check_table(path, "reminders", given)
    if base["sweep_seconds"] < 1:
        raise ConfigError(f"{_where(path, 'reminders', 'sweep_seconds')}: expected at least 1")
    default = _policy(path, "reminders", base)
    per_law = {}
    for law, overrides in per_law_raw.items():
        table = f"reminders.law.{law}"
        if not isinstance(overrides, dict):
            raise ConfigError(f"{_where(path, table)}: expected a table")
        if "sweep_seconds" in overrides:
            raise ConfigError(f"{_where(path, table, 'sweep_seconds')}: set it in [reminders]")
        merged = _check_table(path, "reminders", {**given, **overrides})
        per_law[law] = _policy(path, table, merged)
    return ReminderSettings(base["sweep_seconds"], default, per_law)


def _reports(path: Path, given: Any) -> ReportSettings:
    values = _check_table(path, "reports", given)
    if values["duplicate_distance_m"] < 0:
        raise ConfigError(f"{_where(path, 'reports', 'duplicate_distance_m')}: expected a distance "
                          f"in metres (0 or more), got {values['duplicate_distance_m']!r}")
    for key in ("questionnaire_after_days", "questionnaire_repeat_days"):
        if values[key] < 1:
            raise ConfigError(f"{_where(path, 'reports', key)}: expected at least 1 day, "
                              f"got {values[key]!r}")
    link = values["map_link"]
    if "{lat}" not in link or "{lon}" not in link:
        raise ConfigError(f"{_where(path, 'reports', 'map_link')}: expected a URL with {{lat}} "
                          f"and {{lon}} in it, got {link!r}")
    if not link.startswith(("https://", "http://")):
        raise ConfigError(f"{_where(path, 'reports', 'map_link')}: expected an http(s) URL, "
                          f"got {link!r}")
    return ReportSettings(duplicate_distance_m=float(values["duplicate_distance_m"]),
                          questionnaire_after_days=values["questionnaire_after_days"],
                          questionnaire_repeat_days=values["questionnaire_repeat_days"],
                          map_link=link)


def _nameserver(path: Path, given: Any) -> tuple[str, int]:
    """"192.0.2.53", "192.0.2.53:5353", "2001:db8::53" or "[2001:db8::53]:5353" → (address,
    port). Addresses only: a resolver named by a host name would need DNS to be found."""
    import ipaddress
    where = _where(path, "classify", "nameservers")
    if not isinstance(given, str):
        raise ConfigError(f"{where}: expected IP addresses as strings such as \"127.0.0.1\" or "
                          f"\"127.0.0.1:5353\", got {given!r}")
    text, port = given.strip(), "53"
    if text.startswith("["):
        text, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            text = ""
        port = rest[1:] or port
    elif text.count(":") == 1:
        text, _, port = text.partition(":")
    try:
        address = str(ipaddress.ip_address(text))
        number = int(port)
    except ValueError:
        raise ConfigError(f"{where}: expected an IP address, optionally with a port "
                          f"(\"127.0.0.1:5353\", \"[::1]:5353\"), got {given!r}") from None
    if not 0 < number < 65536:
        raise ConfigError(f"{where}: port {number} of {given!r} is not between 1 and 65535")
    return address, number


def _classify(path: Path, values: dict[str, Any]) -> ClassifySettings:
    import ipaddress
    if values["dns_timeout"] <= 0:
        raise ConfigError(f"{_where(path, 'classify', 'dns_timeout')}: expected a positive "
                          f"number of seconds, got {values['dns_timeout']!r}")
    nameservers = tuple(_nameserver(path, n) for n in values["nameservers"])
    relays = values["trusted_relays"]
    for r in relays:
        try:
            ipaddress.ip_network(r, strict=False)
        except (TypeError, ValueError):
            raise ConfigError(f"{_where(path, 'classify', 'trusted_relays')}: expected IP "
                              f"addresses or networks such as \"10.0.0.0/8\", got {r!r}") from None
    return ClassifySettings(
        spam_header=values["spam_header"] or None,
        spam_threshold=float(values["spam_threshold"]),
        authenticate=values["authenticate"], dns_timeout=float(values["dns_timeout"]),
        nameservers=nameservers,
        hold_unverified=_choice(path, "classify", "hold_unverified", values["hold_unverified"],
                                ("failed", "unverified", "never")),
        trusted_relays=tuple(relays), spf_from_received=values["spf_from_received"],
        automatic_answer_days=max(0, int(values["automatic_answer_days"])))


def from_dict(data: dict[str, Any], path: Path) -> Settings:
    base = path.parent
    for table in data:
        if table not in _SCHEMA and table not in _OPEN_TABLES:
            hint = difflib.get_close_matches(table, list(_SCHEMA) + list(_OPEN_TABLES), n=1)
            also = f" (did you mean [{hint[0]}]?)" if hint else ""
            raise ConfigError(f"{path}: [{table}]: unknown table{also}")
    site = _check_table(path, "site", data.get("site"))
    db = _check_table(path, "database", data.get("database"))
    spool = _check_table(path, "spool", data.get("spool"))
    smtp = _check_table(path, "smtp", data.get("smtp"))
    out = _check_table(path, "outbound", data.get("outbound"))
    host = _check_table(path, "outbound.smtp", (data.get("outbound") or {}).get("smtp"))
    dkim = _check_table(path, "dkim", data.get("dkim"))
    cls = _check_table(path, "classify", data.get("classify"))
    arc = _check_table(path, "archive", data.get("archive"))
    mod = _check_table(path, "moderation", data.get("moderation"))
    reminders = _reminders(path, data.get("reminders"))
    reports = _reports(path, data.get("reports"))

    domain = site["domain"].strip().lower().rstrip(".")
    if not domain or "@" in domain or " " in domain or "." not in domain:
        raise ConfigError(f"{_where(path, 'site', 'domain')}: expected a mail domain such as "
                          f"\"ask.example.org\", got {site['domain']!r}")
    secret = _secret(path, "site", site, "secret")
    if len(secret) < 16:
        raise ConfigError(f"{_where(path, 'site', 'secret')}: expected a random string of at least "
                          "16 characters (or secret_env naming an environment variable)")
    from mailflow.i18n import available
    if site["language"] not in available():
        raise ConfigError(f"{_where(path, 'site', 'language')}: no translation for "
                          f"{site['language']!r}; available: {', '.join(available())}")
    url = site["url"] or f"https://{domain}/"
    listen_host, listen_port = _hostport(path, "smtp", "listen", smtp["listen"])
    for key in ("max_message_size", "max_recipients", "idle_timeout", "max_connections"):
        if smtp[key] <= 0:
            raise ConfigError(f"{_where(path, 'smtp', key)}: expected a positive number")
    if smtp["max_connections_per_ip"] < 0:
        raise ConfigError(f"{_where(path, 'smtp', 'max_connections_per_ip')}: expected 0 (no "
                          "cap) or a positive number")
    if bool(smtp["tls_cert"]) != bool(smtp["tls_key"]):
        missing = "tls_key" if smtp["tls_cert"] else "tls_cert"
        raise ConfigError(f"{_where(path, 'smtp', missing)}: STARTTLS needs both tls_cert and "
                          "tls_key (PEM files)")
    schedule = out["retry_schedule"]
    if not schedule or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                               for s in schedule):
        raise ConfigError(f"{_where(path, 'outbound', 'retry_schedule')}: expected a list of "
                          f"positive whole numbers of seconds, got {schedule!r}")
    db_url = db["url"]
    if "://" not in db_url:
        raise ConfigError(f"{_where(path, 'database', 'url')}: expected a URL such as "
                          f"\"sqlite:///var/mailflow.db\", got {db_url!r}")
    if db_url.startswith("sqlite:///") and not db_url.startswith("sqlite:////"):
        rel = db_url[len("sqlite:///"):]
        if rel and rel != ":memory:":
            db_url = "sqlite:///" + str(_resolve(base, rel))
    from mailflow.ingress.imap import parse_accounts
    parse_accounts(data.get("imap"), path)  # validated now; the daemon and CLI parse it again
    return Settings(
        path=path,
        site=SiteSettings(
            domain=domain, name=site["name"], url=url, secret=secret,
            rules=_resolve(base, site["rules"]),
            templates=_resolve(base, site["templates"]) if site["templates"] else None,
            default_law=site["default_law"], language=site["language"]),
        database=DatabaseSettings(url=db_url),
        spool=SpoolSettings(dir=_resolve(base, spool["dir"]),
                            keep_done_days=spool["keep_done_days"],
                            max_attempts=spool["max_attempts"],
                            processor_niceness=_niceness(path, spool["processor_niceness"])),
        smtp=SmtpSettings(listen_host=listen_host, listen_port=listen_port,
                          hostname=smtp["hostname"] or domain,
                          max_message_size=smtp["max_message_size"],
                          max_recipients=smtp["max_recipients"], lmtp=smtp["lmtp"],
                          idle_timeout=float(smtp["idle_timeout"]),
                          max_connections=smtp["max_connections"],
                          max_connections_per_ip=smtp["max_connections_per_ip"],
                          tls_cert=_resolve(base, smtp["tls_cert"]) if smtp["tls_cert"] else None,
                          tls_key=_resolve(base, smtp["tls_key"]) if smtp["tls_key"] else None),
        outbound=OutboundSettings(
            transport=_choice(path, "outbound", "transport", out["transport"], ("maildir", "smtp")),
            maildir=_resolve(base, out["maildir"]),
            bounce_address=out["bounce_address"] or f"bounces@{domain}",
            retry_schedule=tuple(schedule),
            smtp=SmarthostSettings(
                host=host["host"], port=host["port"],
                tls=_choice(path, "outbound.smtp", "tls", host["tls"],
                            ("starttls", "implicit", "none")),
                user=host["user"] or None,
                password=_secret(path, "outbound.smtp", host, "password") or None,
                timeout=float(host["timeout"]))),
        dkim=DkimSettings(selector=dkim["selector"], domain=(dkim["domain"] or domain).lower(),
                          key_file=_resolve(base, dkim["key_file"])),
        classify=_classify(path, cls),
        reminders=reminders,
        reports=reports,
        archive=ArchiveSettings(dir=_resolve(base, arc["dir"]), base_url=arc["base_url"] or url,
                                debounce_seconds=arc["debounce_seconds"],
                                workers=_archive_workers(path, arc["workers"])),
        moderation=ModerationSettings(
            new_requests=_choice(path, "moderation", "new_requests", mod["new_requests"],
                                 ("publish", "premoderate")),
            authority_replies=_choice(path, "moderation", "authority_replies",
                                      mod["authority_replies"], ("publish", "hold")),
            first_time_citizens=_choice(path, "moderation", "first_time_citizens",
                                        mod["first_time_citizens"], ("publish", "hold"))),
        raw=data,
    )
