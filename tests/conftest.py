"""Fixtures: a real site made by `mailflow init`, the real CLI, a real daemon on a free port."""
from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, getaddresses, make_msgid
from pathlib import Path

import pytest
from hypothesis import settings as _hypothesis_settings

# Speed is measured in bench/, never asserted in tests: hypothesis's default 200 ms deadline per
# example is a timed assertion, and it failed property tests on a loaded 2-core machine. Every
# @settings(...) in the tests inherits this (it is loaded before any test module is imported).
_hypothesis_settings.register_profile("mailflow", deadline=None)
_hypothesis_settings.load_profile("mailflow")

ROOT = Path(__file__).resolve().parent.parent
MAILFLOW = [sys.executable, "-m", "mailflow"]
DOMAIN = "ask.example"
JANE = "jane.citizen@citizen.example"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose(frm: str, to: str, subject: str, body: str, *, in_reply_to: str | None = None,
            extra: dict[str, str] | None = None, msgid: str | None = None) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = frm, to, subject
    m["Date"] = formatdate()
    m["Message-ID"] = msgid or make_msgid(domain="sender.example")
    if in_reply_to:
        m["In-Reply-To"] = m["References"] = in_reply_to
    for k, v in (extra or {}).items():
        m[k] = v
    m.set_content(body)
    return m.as_bytes(policy=email.policy.SMTP)


def addresses(msg: EmailMessage, *headers: str) -> list[str]:
    vals = [str(v) for h in headers for v in msg.get_all(h, [])]
    return [a for _, a in getaddresses(vals) if a]


# Each `mailflow` subprocess spends about a second of CPU importing (SQLAlchemy, the rules'
# libraries) before 0.1-0.2 s of work, and the suite runs thousands: in-process, the same
# click commands run with the imports paid once per worker. Daemons, `init` and the tests of
# process behaviour (exit codes from a pipe, crashes, resource limits) still use subprocesses.
CLI_SUBPROCESS = os.environ.get("MAILFLOW_TEST_CLI", "in-process") == "subprocess"


def _run_in_process(site: "Site", args: list[str], input: bytes | None,
                    env: dict[str, str] | None) -> subprocess.CompletedProcess[bytes]:
    import logging
    import traceback
    import warnings

    from click.testing import CliRunner

    import mailflow.site as site_mod
    from mailflow.cli import cli

    opened: list = []
    real_open = site_mod.Site.open.__func__  # type: ignore[attr-defined]

    def tracked_open(cls, *a, **k):  # type: ignore[no-untyped-def]
        s = real_open(cls, *a, **k)
        opened.append(s)
        return s

    root = logging.getLogger()
    saved_logging = (root.handlers[:], root.level)
    root.handlers[:] = []          # a fresh process's logging: the command sets up its own
    cwd = os.getcwd()
    os.chdir(site.dir)
    site_mod.Site.open = classmethod(tracked_open)  # type: ignore[method-assign]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")          # as in a process of its own
            result = CliRunner().invoke(cli, ["--config", str(site.config), *args],
                                        input=input, env=env, prog_name="mailflow")
    finally:
        site_mod.Site.open = classmethod(real_open)  # type: ignore[method-assign]
        os.chdir(cwd)
        root.handlers[:], _ = saved_logging
        root.setLevel(saved_logging[1])
        for s in opened:
            s.close()
    err = result.stderr_bytes or b""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        err += "".join(traceback.format_exception(result.exception)).encode()
    return subprocess.CompletedProcess([*MAILFLOW, *args], result.exit_code,
                                       result.stdout_bytes, err)


@dataclass
class Site:
    dir: Path
    seen: set[str] = field(default_factory=set)

    @property
    def config(self) -> Path:
        return self.dir / "config.toml"

    def run(self, *args: str, input: bytes | None = None, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        """The real `mailflow` command line, in this process (see `_run_in_process`), or in a
        subprocess as an MTA's pipe or cron would start it with MAILFLOW_TEST_CLI=subprocess."""
        if not CLI_SUBPROCESS:
            return _run_in_process(self, list(args), input, env)
        return subprocess.run([*MAILFLOW, "--config", str(self.config), *args], input=input,
                              capture_output=True, timeout=timeout, cwd=self.dir,
                              env={**os.environ, **(env or {})})

    def json(self, *args: str):  # type: ignore[no-untyped-def]
        import json
        r = self.run(*args, "--json")
        assert r.returncode == 0, r.stderr.decode()
        return json.loads(r.stdout)

    def ingest(self, raw: bytes, rcpts: list[str] | None = None, sender: str | None = None) -> int:
        args = ["ingest"]
        for a in rcpts or []:
            args += ["--rcpt", a]
        if sender is not None:
            args += ["--sender", sender]
        r = self.run(*args, input=raw)
        if r.returncode not in (0, 67):
            print(r.stderr.decode(), file=sys.stderr)
        return r.returncode

    def new_mail(self) -> list[tuple[str, EmailMessage, bytes]]:
        found = []
        for sub in ("new", "cur"):
            d = self.dir / "var" / "outbox" / sub
            if not d.is_dir():
                continue
            for f in sorted(d.iterdir(), key=lambda p: p.stat().st_mtime_ns):
                if f.name in self.seen:
                    continue
                self.seen.add(f.name)
                raw = f.read_bytes()
                msg = email.message_from_bytes(raw, policy=email.policy.default)
                found.append((str(msg["Delivered-To"]).lower(), msg, raw))
        return found

    def mail_to(self, addr: str) -> list[tuple[str, EmailMessage, bytes]]:
        return [m for m in self.new_mail() if m[0] == addr.lower()]

    def set(self, table: str, key: str, value: str) -> None:
        text = self.config.read_text()
        pattern = rf"(?ms)^(\[{re.escape(table)}\]\n)(.*?)(?=^\[|\Z)"
        m = re.search(pattern, text)
        assert m, table
        body = re.sub(rf"(?m)^#?\s*{key} = .*\n", "", m.group(2))
        text = text[:m.start()] + m.group(1) + f"{key} = {value}\n" + body + text[m.end():]
        self.config.write_text(text)


# The databases every site-based test runs against: "sqlite" (the embedded default) and
# "postgresql" (a fresh database per test on 127.0.0.1:5432, made from a migrated template).
# `make test` runs both; PostgreSQL's are skipped when it does not answer, unless $CI is set.
# MAILFLOW_TEST_DATABASES=sqlite (or =postgresql) runs one.
DATABASES = [d.strip() for d in
             os.environ.get("MAILFLOW_TEST_DATABASES", "sqlite,postgresql").split(",")
             if d.strip()]
STORE_PARAMS = {"sqlite", "postgresql"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that picks its own store by a parameter (`mf`, `url`, `backend`: both stores
    already) runs once, on the SQLite site, rather than again on a PostgreSQL site."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        own = [v for k, v in params.items() if k != "site" and isinstance(v, str)
               and v in STORE_PARAMS]
        (drop if own and params.get("site") == "postgresql" else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def site_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `mailflow init` per test session, copied for each test: init (migrations, a DKIM
    key) costs about a second, and the suite makes hundreds of sites. The tests of `init`
    itself call it directly."""
    d = tmp_path_factory.mktemp("template") / "site"
    r = subprocess.run([*MAILFLOW, "init", str(d), "--domain", DOMAIN], capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    # The daemons' processors run beside other tests' busy processes here: at the default
    # nice 10 one got a tenth of a core, and a 40-second test took eight minutes.
    config = d / "config.toml"
    config.write_text(config.read_text().replace("processor_niceness = 10",
                                                 "processor_niceness = 0"))
    assert "processor_niceness = 0" in config.read_text()
    return d


@pytest.fixture(scope="session")
def pg_template(site_template: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> "Iterator[str]":
    """A PostgreSQL database migrated once per session; each test's database is a copy
    (`CREATE DATABASE … TEMPLATE`), which takes milliseconds rather than a migration's seconds."""
    from test_store_backends import _pg_database
    gen = _pg_database()
    url = next(gen)
    d = tmp_path_factory.mktemp("pg-template") / "site"
    shutil.copytree(site_template, d, symlinks=True)
    s = Site(d)
    s.set("database", "url", f'"{url}"')
    r = s.run("db", "upgrade")
    assert r.returncode == 0, r.stderr.decode() + r.stdout.decode()
    try:
        yield url.rsplit("/", 1)[1]
    finally:
        next(gen, None)


@pytest.fixture(params=DATABASES)
def site(tmp_path: Path, request: pytest.FixtureRequest,
         site_template: Path) -> "Iterator[Site]":
    d = tmp_path / "site"
    shutil.copytree(site_template, d, symlinks=True)
    s = Site(d)
    if request.param == "sqlite":
        yield s
        return
    assert request.param == "postgresql", f"MAILFLOW_TEST_DATABASES: {request.param}?"
    from test_store_backends import _pg_database   # one way to make a test database
    gen = _pg_database(template=request.getfixturevalue("pg_template"))
    s.set("database", "url", f'"{next(gen)}"')
    try:
        yield s
    finally:
        for daemon in [x for x in _RUNNING if x.site is s]:
            daemon.stop(signal.SIGKILL)
        next(gen, None)


@pytest.fixture()
def mf(site: Site):  # type: ignore[no-untyped-def]
    """The test's site opened as mailflow opens it (its store, spool and rules), for tests that
    drive the pipeline or the store in-process; closed after. A module may define its own."""
    from mailflow.site import Site as MfSite
    s = MfSite.open(site.config)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, site: Site):  # type: ignore[no-untyped-def]
    """A freshly migrated store of its own, on SQLite and on PostgreSQL, for tests of the
    store itself (the `site` is only its folder; the test runs once per store)."""
    from mailflow.store.repository import Store
    if request.param == "sqlite":
        s = Store(f"sqlite:///{site.dir}/var/store-test.db").migrate()
        yield s
        s.close()
        return
    from test_store_backends import _pg_database
    gen = _pg_database()
    s = Store(next(gen)).migrate()
    try:
        yield s
    finally:
        s.close()
        next(gen, None)


_RUNNING: list["Daemon"] = []


@pytest.fixture(scope="session", autouse=True)
def _no_daemon_outlives_the_tests():  # type: ignore[no-untyped-def]
    """A failing test must not leave a `mailflow serve` running after the suite."""
    yield
    for d in list(_RUNNING):
        d.stop(signal.SIGKILL)


class Daemon:
    def __init__(self, site: Site):
        self.site = site
        self.port = free_port()
        site.set("smtp", "listen", f'"127.0.0.1:{self.port}"')
        self.log = site.dir / f"serve-{self.port}.log"
        self.start()

    def start(self) -> None:
        """Start `mailflow serve` and wait for its own "listening on" line, not just for
        something to answer on the port: free_port() releases the port before the daemon binds
        it, so another xdist worker's test server (or a client's ephemeral port) can take it in
        between, and a test would then talk to a stranger that also says 220 (seen once in CI:
        a 250 from a server whose spool was not this site's). A daemon that lost its port is
        started again on a new one."""
        for attempt in range(5):
            offset = self.log.stat().st_size if self.log.exists() else 0
            self.proc = subprocess.Popen([*MAILFLOW, "--config", str(self.site.config), "serve"],
                                         stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                         cwd=self.site.dir, start_new_session=True)
            _RUNNING.append(self)
            mine = f"listening on 127.0.0.1:{self.port} ".encode()
            end = time.monotonic() + 30
            while time.monotonic() < end:
                with open(self.log, "rb") as f:
                    f.seek(offset)
                    said = f.read()
                if self.proc.poll() is not None:
                    _RUNNING.remove(self)
                    if b"in use" in said and attempt < 4:
                        self.port = free_port()  # lost the race for the port: try another
                        self.site.set("smtp", "listen", f'"127.0.0.1:{self.port}"')
                        break
                    raise AssertionError(said.decode(errors="replace"))
                if mine in said:
                    return
                time.sleep(0.05)
            else:
                raise AssertionError("daemon did not start: " + self.log.read_text())
        raise AssertionError("daemon found no free port: " + self.log.read_text())

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self in _RUNNING:
            _RUNNING.remove(self)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode


@pytest.fixture()
def daemon(site: Site):  # type: ignore[no-untyped-def]
    d = Daemon(site)
    yield d
    d.stop()


def wait_for(predicate, timeout: float = 20, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll until predicate() is truthy (a deadline for the test, not a speed assertion)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
