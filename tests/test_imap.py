"""IMAP ingress against a real Dovecot on 127.0.0.1: fetch --once, settle, UIDVALIDITY, IDLE."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import DOMAIN, JANE, Site, compose
from dovecot import PASSWORD, USER, Dovecot, available

from mailflow.spool import read_spool_file

pytestmark = pytest.mark.skipif(not available() and not os.environ.get("CI"),
                                reason="dovecot is not installed (apt-get install dovecot-imapd)")

# The `imap` group, whether or not cli.py registers it yet.
MAILFLOW_IMAP = [sys.executable, "-c",
                 "from mailflow.cli import cli; from mailflow.cli_imap import imap; "
                 "cli.add_command(imap); cli(prog_name='mailflow')"]


@pytest.fixture(scope="module")
def dovecot():  # type: ignore[no-untyped-def]
    d = Dovecot()
    yield d
    d.remove()


@pytest.fixture()
def folder(dovecot: Dovecot, request: pytest.FixtureRequest) -> str:
    """A fresh folder per test, so tests sharing one Dovecot never see each other's mail."""
    name = "T" + request.node.name.replace("_", "")[-20:]
    dovecot.doveadm("mailbox", "create", "-u", USER, name)
    return name


def configure(site: Site, dovecot: Dovecot, folder: str, password: str = PASSWORD,
              processed: str | None = None) -> None:
    text = site.config.read_text() + (
        f'\n[[imap.accounts]]\nhost = "127.0.0.1"\nport = {dovecot.port}\ntls = false\n'
        f'user = "{USER}"\npassword = "{password}"\nfolders = ["{folder}"]\n'
        f'idle_seconds = 20\ntimeout = 10\n')
    if processed:
        text += f'processed_folder = "{processed}"\n'
    site.config.write_text(text)


def run_imap(site: Site, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """A deadline, not a speed check: a fetch that processes hundreds of messages on a busy
    2-core machine gets a longer one."""
    return subprocess.run([*MAILFLOW_IMAP, "--config", str(site.config), "imap", *args],
                          capture_output=True, timeout=timeout, cwd=site.dir)


def request_mail(subject: str) -> bytes:
    """A citizen's new request as a catch-all mailbox holds it: no envelope, headers only."""
    return (f"Return-Path: <{JANE}>\r\nDelivered-To: camden@{DOMAIN}\r\n").encode() + compose(
        f"Jane Citizen <{JANE}>", f"camden@{DOMAIN}", subject, "How much was spent in 2025?")


def spool_count(site: Site, state: str) -> int:
    d = site.dir / "var" / "spool" / state
    return len(list(d.glob("*.mail"))) if d.is_dir() else 0


def test_fetch_once_processes_once_and_flags_seen(site: Site, dovecot: Dovecot, folder: str) -> None:
    configure(site, dovecot, folder)
    dovecot.deliver(request_mail("Potholes"), folder)
    r = run_imap(site, "fetch", "--once")
    assert r.returncode == 0, r.stderr.decode()
    assert b"1 message(s) fetched" in r.stdout
    assert len(site.json("thread", "list")) == 1
    assert len(site.mail_to(JANE)) == 1  # the confirmation: processed and delivered
    assert dovecot.uids(folder, "seen") == [1] and dovecot.uids(folder, "unseen") == []
    env = read_spool_file(next((site.dir / "var" / "spool" / "done").glob("*.mail")))[0]
    assert env["envelope"]["via"] == "imap" and env["envelope"]["rcpt_from_headers"] is True
    assert env["envelope"]["mail_from"] == JANE
    # A second run takes nothing, even though the message is still in the folder.
    r = run_imap(site, "fetch", "--once")
    assert r.returncode == 0, r.stderr.decode()
    assert b"0 message(s) fetched" in r.stdout
    assert spool_count(site, "done") == 1 and site.mail_to(JANE) == []


def test_processed_folder_gets_the_message(site: Site, dovecot: Dovecot, folder: str) -> None:
    configure(site, dovecot, folder, processed="Archive")
    before = len(dovecot.uids("Archive"))
    dovecot.deliver(request_mail("Libraries"), folder)
    r = run_imap(site, "fetch", "--once")
    assert r.returncode == 0, r.stderr.decode()
    assert dovecot.uids(folder) == []
    assert len(dovecot.uids("Archive")) == before + 1
    assert len(site.json("thread", "list")) == 1


def test_uidvalidity_change_loses_nothing_and_duplicates_nothing(
        site: Site, dovecot: Dovecot, folder: str) -> None:
    configure(site, dovecot, folder)
    first, second = request_mail("Street lights"), request_mail("Bus lanes")
    dovecot.deliver(first, folder)
    dovecot.deliver(second, folder)
    assert run_imap(site, "fetch", "--once").returncode == 0
    assert len(site.json("thread", "list")) == 2
    state = json.loads((site.dir / "var" / "imap-state.json").read_text())
    (old,) = [v["uidvalidity"] for k, v in state.items() if k.endswith("/" + folder)]
    # The provider rebuilt the folder: new UIDVALIDITY, UIDs from 1 again. The first message
    # came back with its \Seen flag, the second lost it, and a new one arrived.
    dovecot.doveadm("mailbox", "delete", "-u", USER, folder)
    dovecot.doveadm("mailbox", "create", "-u", USER, folder)
    dovecot.doveadm("mailbox", "update", "-u", USER, "--uid-validity", str(old + 7), folder)
    dovecot.deliver(first, folder)
    dovecot.doveadm("flags", "add", "-u", USER, "\\Seen", "mailbox", folder, "uid", "1")
    dovecot.deliver(second, folder)
    dovecot.deliver(request_mail("Parks"), folder)
    site.new_mail()
    r = run_imap(site, "fetch", "--once")
    assert r.returncode == 0, r.stderr.decode()
    assert b"UIDVALIDITY changed" in r.stderr
    assert b"2 message(s) fetched" in r.stdout  # the unseen old one (again) and the new one
    threads = site.json("thread", "list")
    assert len(threads) == 3  # the new one processed, the old one not processed twice
    assert len(site.mail_to(JANE)) == 1
    assert dovecot.uids(folder, "unseen") == []
    assert b"0 message(s) fetched" in run_imap(site, "fetch", "--once").stdout


def test_wrong_password_is_a_clear_error(site: Site, dovecot: Dovecot, folder: str) -> None:
    configure(site, dovecot, folder, password="not-the-password")
    r = run_imap(site, "check")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "login refused" in err and "not-the-password" not in err and "Traceback" not in err


def test_check_lists_folders_and_counts(site: Site, dovecot: Dovecot, folder: str) -> None:
    configure(site, dovecot, folder)
    dovecot.deliver(request_mail("Trees"), folder)
    dovecot.deliver(request_mail("Bins"), folder)
    r = run_imap(site, "check")
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    assert "Archive" in out and f"{folder}: 2 message(s) would be fetched" in out
    assert dovecot.uids(folder, "unseen") == [1, 2]  # check changes nothing


def test_poller_picks_up_mail_while_idle(site: Site, dovecot: Dovecot, folder: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    from mailflow.ingress.imap import ImapAccount, run_pollers
    from mailflow.spool import Spool

    account = ImapAccount(host="127.0.0.1", port=dovecot.port, tls=False, user=USER,
                          password=PASSWORD, folders=(folder,), poll_seconds=300,
                          idle_seconds=20, timeout=10)
    spool = Spool(site.dir / "var" / "spool")
    got: list[str] = []
    loop = asyncio.new_event_loop()
    stop: asyncio.Event | None = None

    def main() -> None:
        nonlocal stop

        async def go() -> None:
            nonlocal stop
            stop = asyncio.Event()
            await run_pollers([account], spool, got.append, site.dir / "var", stop)
        loop.run_until_complete(go())

    caplog.set_level("INFO", logger="mailflow.imap")
    t = threading.Thread(target=main, daemon=True)
    t.start()
    try:
        end = time.monotonic() + 10
        while "(IDLE)" not in caplog.text and time.monotonic() < end:
            time.sleep(0.1)
        assert "(IDLE)" in caplog.text
        time.sleep(0.5)  # let it enter IDLE after the first (empty) pass
        dovecot.deliver(request_mail("Allotments"), folder)
        end = time.monotonic() + 10  # polling is every 300 s: only IDLE can be this fast
        while not got and time.monotonic() < end:
            time.sleep(0.1)
        assert len(got) == 1
        assert spool.claim(got[0]) is not None
        end = time.monotonic() + 5
        while dovecot.uids(folder, "seen") != [1] and time.monotonic() < end:
            time.sleep(0.1)
        assert dovecot.uids(folder, "seen") == [1]
    finally:
        if stop is not None:
            loop.call_soon_threadsafe(stop.set)
        t.join(15)
    assert not t.is_alive()
    loop.close()


def test_poller_backs_off_and_recovers_when_the_server_is_down(
        site: Site, dovecot: Dovecot, folder: str, caplog: pytest.LogCaptureFixture) -> None:
    """A refused connection is logged and retried; once the server is back, mail flows."""
    from mailflow.ingress.imap import ImapAccount, run_pollers
    from mailflow.spool import Spool

    dovecot.stop()
    try:
        account = ImapAccount(host="127.0.0.1", port=dovecot.port, tls=False, user=USER,
                              password=PASSWORD, folders=(folder,), poll_seconds=1,
                              idle_seconds=20, timeout=5)
        spool = Spool(site.dir / "var" / "spool")
        got: list[str] = []

        async def go() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(run_pollers([account], spool, got.append,
                                                   site.dir / "var", stop))
            await asyncio.sleep(2.5)  # attempts at 0, 1 and 3 s: two failures logged
            await asyncio.to_thread(dovecot.start)
            await asyncio.to_thread(dovecot.deliver, request_mail("Benches"), folder)
            for _ in range(80):
                if got:
                    break
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.wait_for(task, 15)

        caplog.set_level("INFO", logger="mailflow.imap")
        asyncio.run(go())
        assert "cannot connect" in caplog.text and "retrying in 1 s" in caplog.text
        assert "retrying in 2 s" in caplog.text
        assert len(got) == 1
    finally:
        if not (dovecot.dir / "run" / "master.pid").exists():
            dovecot.start()


def test_parse_accounts_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailflow.errors import ConfigError
    from mailflow.ingress.imap import parse_accounts

    cfg = tmp_path / "config.toml"
    base = {"host": "imap.example", "user": "u", "password": "p"}
    (a,) = parse_accounts({"accounts": [base]}, cfg)
    assert (a.port, a.tls, a.folders, a.processed_folder) == (993, True, ("INBOX",), None)
    monkeypatch.setenv("IMAP_PW", "from-env")
    (a,) = parse_accounts({"accounts": [{**base, "password": "", "password_env": "IMAP_PW",
                                         "tls": False}]}, cfg)
    assert (a.password, a.port) == ("from-env", 143)
    for bad, key in [({**base, "prot": 1}, "prot"), ({**base, "port": "x"}, "port"),
                     ({"host": "h", "password": "p"}, "user"),
                     ({**base, "password": "", "password_env": "NOPE_X"}, "password_env"),
                     ({**base, "folders": []}, "folders"),
                     ({**base, "processed_folder": "INBOX"}, "processed_folder")]:
        with pytest.raises(ConfigError, match=rf"\[\[imap.accounts\]\] #1 {key}"):
            parse_accounts({"accounts": [bad]}, cfg)
    assert parse_accounts(None, cfg) == []


def test_serve_reads_the_mailbox_beside_smtp(site: Site, dovecot: Dovecot, folder: str) -> None:
    """`mailflow serve` with an IMAP account: mail in the mailbox becomes a request."""
    from conftest import Daemon, wait_for
    configure(site, dovecot, folder)
    d = Daemon(site)
    try:
        dovecot.deliver(request_mail("Read from the mailbox"), folder)
        wait_for(lambda: site.mail_to(JANE), timeout=30, what="a confirmation from IMAP mail")
        assert [t["title"] for t in site.json("thread", "list")] == ["Read from the mailbox"]
    finally:
        assert d.stop() == 0


def test_a_batch_survives_kill_9_and_a_server_restart(site: Site, dovecot: Dovecot,
                                                       folder: str) -> None:
    """A few hundred messages; mailflow killed (-9) between spooling and flagging, Dovecot
    restarted: after a restart every message is processed exactly once."""
    configure(site, dovecot, folder)
    n = 200
    for i in range(n):
        dovecot.deliver(request_mail(f"Batch request {i:03d}"), folder)
    p = subprocess.Popen([*MAILFLOW_IMAP, "--config", str(site.config), "imap", "fetch", "--once"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=site.dir)
    end = time.monotonic() + 60
    while time.monotonic() < end and p.poll() is None and spool_count(site, "new") < 20:
        time.sleep(0.01)
    p.kill()
    p.wait(10)
    spooled_before_kill = spool_count(site, "new") + spool_count(site, "work")
    dovecot.stop()
    dovecot.start()
    from mailflow.spool import Spool
    Spool(site.dir / "var" / "spool").recover()     # what `mailflow serve` does at start-up
    for _ in range(5):
        r = run_imap(site, "fetch", "--once", timeout=600)   # ~200 messages fetched and processed
        assert r.returncode == 0, r.stderr.decode()
        if b"0 message(s) fetched" in r.stdout and spool_count(site, "new") == 0:
            break
    titles = sorted(t["title"] for t in site.json("thread", "list"))
    assert titles == [f"Batch request {i:03d}" for i in range(n)]
    assert len(site.mail_to(JANE)) == n                  # one confirmation each, no duplicate
    assert dovecot.uids(folder, "unseen") == []
    assert spooled_before_kill > 0


def test_a_message_that_fails_processing_is_kept_for_an_admin_not_refetched(
        site: Site, dovecot: Dovecot, folder: str) -> None:
    configure(site, dovecot, folder)
    site.set("spool", "max_attempts", "1")
    broken = site.dir / "tpl" / "mail"
    broken.mkdir(parents=True)
    (broken / "confirm.txt").write_text("{% this is not a template")   # a site's broken override
    site.set("site", "templates", '"tpl"')
    dovecot.deliver(request_mail("Breaks the pipeline"), folder)
    r = run_imap(site, "fetch", "--once")
    assert r.returncode == 0, r.stderr.decode()
    assert spool_count(site, "failed") == 1
    (item,) = site.json("queue", "list")
    assert item["reason"] == "processing_failed"
    r = run_imap(site, "fetch", "--once")        # not fetched again, not retried in a loop
    assert b"0 message(s) fetched" in r.stdout and spool_count(site, "failed") == 1
    assert len(site.json("queue", "list")) == 1
