"""A real Dovecot for the IMAP tests: its own config, folder and port, never the system one.

`Dovecot()` writes the config (the one in ../shared/LIBRARIES.md), starts
`dovecot -c CONF` on a free 127.0.0.1 port and waits until it greets; `deliver()` puts a
message in a folder with `doveadm save`, `stop()` kills the master by its pid file. The
folder is made 0755 because Dovecot's own users must traverse it (a 0700 `mkdtemp` folder
makes auth fail with "Permission denied"); `remove()` stops it and deletes the folder.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER, PASSWORD = "alice", "secret"
NOBODY = 65534

_CONF = """\
base_dir = {d}/run
state_dir = {d}/state
instance_name = mailflow-test-{port}
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
log_path = {d}/dovecot.log
mail_location = maildir:~/Maildir
first_valid_uid = 1
mail_uid = {nobody}
mail_gid = {nobody}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = static
  args = uid={nobody} gid={nobody} home={d}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Archive {{
    auto = create
  }}
}}
"""


def available() -> bool:
    return shutil.which("dovecot") is not None and shutil.which("doveadm") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dovecot:
    def __init__(self) -> None:
        # Not under pytest's tmp_path: its parents are 0700 and Dovecot's users must get in.
        self.dir = Path(tempfile.mkdtemp(prefix="mailflow-dovecot-"))
        os.chmod(self.dir, 0o755)
        self.port = _free_port()
        self.conf = self.dir / "dovecot.conf"
        self.conf.write_text(_CONF.format(d=self.dir, port=self.port, nobody=NOBODY))
        (self.dir / "users").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
        (self.dir / "mail").mkdir()
        os.chown(self.dir / "mail", NOBODY, NOBODY)
        self.start()

    def start(self) -> None:
        # Not capture_output: the daemonised master keeps the pipes open and run() would hang.
        err = self.dir / "start.err"
        with open(err, "wb") as f:
            r = subprocess.run(["dovecot", "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                               stdout=f, stderr=f)
        assert r.returncode == 0, err.read_text() + self.log()
        end = time.monotonic() + 15
        while time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(200).startswith(b"* OK"):
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("dovecot did not start: " + self.log())

    def stop(self) -> None:
        pidfile = self.dir / "run" / "master.pid"
        if not pidfile.exists():
            return
        pid = int(pidfile.read_text().split()[0])
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        f = self.dir / "dovecot.log"
        return f.read_text(errors="replace") if f.exists() else ""

    def doveadm(self, *args: str, input: bytes | None = None) -> str:
        r = subprocess.run(["doveadm", "-c", str(self.conf), *args], input=input,
                           capture_output=True, timeout=30)
        assert r.returncode == 0, (args, r.stderr.decode(), self.log())
        return r.stdout.decode()

    def deliver(self, raw: bytes, folder: str = "INBOX") -> None:
        self.doveadm("save", "-u", USER, "-m", folder, input=raw)

    def uids(self, folder: str = "INBOX", query: str = "all") -> list[int]:
        """UIDs in a folder that match a doveadm search query ("all", "seen", "unseen")."""
        out = self.doveadm("-f", "flow", "fetch", "-u", USER, "uid", "mailbox", folder,
                           *query.split())
        return [int(line.split("=", 1)[1]) for line in out.splitlines() if line.startswith("uid=")]
