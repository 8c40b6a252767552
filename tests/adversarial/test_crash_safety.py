"""The crash test (tests/crash_test.py) in a shortened form: SIGKILL at random points while
mail flows, then every acknowledged message stored once, nothing sent twice, the archive
complete. The full run (5,000 messages, 200 kills) is by hand; its figures are in
docs/guarantees.md."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from test_store_backends import _pg_database

SCALE = float(os.environ.get("MAILFLOW_CRASH_SCALE", "1"))


def _run(tmp_path: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "crash_test.py"), "--seed", "7",
                        "--dir", str(tmp_path), *args], capture_output=True, timeout=1200,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = r.stdout.decode() + r.stderr.decode()
    assert r.returncode == 0 and "crash test holds" in out, out[-4000:]
    return out


def test_sigkill_during_a_stream_of_mail_loses_nothing_and_doubles_nothing(tmp_path: Path) -> None:
    out = _run(tmp_path, "--messages", str(int(250 * SCALE)), "--kills", str(int(12 * SCALE)),
               "--threads", "6")
    assert "12 kills" in out or SCALE != 1


def test_three_daemons_on_postgresql_do_each_thing_once_while_one_is_killed(
        tmp_path: Path) -> None:
    gen = _pg_database()
    url = next(gen)
    try:
        _run(tmp_path, "--daemons", "3", "--database", url,
             "--messages", str(int(1200 * SCALE)), "--kills", str(int(5 * SCALE)),
             "--threads", "8")
    finally:
        next(gen, None)
