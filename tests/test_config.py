"""Settings are validated at load: a wrong key or value names the file, the key, the expectation."""
from __future__ import annotations

from pathlib import Path

import pytest

from mailflow import config
from mailflow.errors import ConfigError

GOOD = '[site]\ndomain = "ask.example"\nsecret = "0123456789abcdef0123"\n'


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    s = config.load(write(tmp_path, GOOD))
    assert s.smtp.listen_host == "127.0.0.1" and s.smtp.listen_port == 2525
    assert s.outbound.transport == "maildir" and s.outbound.maildir == tmp_path / "var/outbox"
    assert s.database.url == f"sqlite:///{tmp_path}/var/mailflow.db"
    assert s.outbound.bounce_address == "bounces@ask.example"


@pytest.mark.parametrize("extra, words", [
    ('[smtp]\nlisten = "nonsense"\n', ["[smtp] listen", "host:port"]),
    ('[smtp]\nlisten_port = 25\n', ["[smtp] listen_port", "unknown key", "listen"]),
    ('[smtp]\nmax_message_size = "big"\n', ["max_message_size", "expected int"]),
    ('[outbound]\ntransport = "carrier-pigeon"\n', ["transport", "maildir, smtp"]),
    ('[outbund]\n', ["unknown table", "outbound"]),
    ('[outbound]\nretry_schedule = [60, -1]\n', ["retry_schedule"]),
    ('[spool]\nprocessor_niceness = 20\n', ["[spool] processor_niceness", "0", "19", "got 20"]),
    ('[spool]\nprocessor_niceness = -5\n', ["[spool] processor_niceness", "got -5"]),
])
def test_wrong_keys_and_values_are_named(tmp_path: Path, extra: str, words: list[str]) -> None:
    p = write(tmp_path, GOOD + extra)
    with pytest.raises(ConfigError) as e:
        config.load(p)
    msg = str(e.value)
    assert str(p) in msg
    for w in words:
        assert w in msg


def test_secret_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write(tmp_path, '[site]\ndomain = "ask.example"\nsecret_env = "MF_TEST_SECRET"\n')
    with pytest.raises(ConfigError, match="MF_TEST_SECRET"):
        config.load(p)
    monkeypatch.setenv("MF_TEST_SECRET", "x" * 20)
    assert config.load(p).site.secret == "x" * 20


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        config.load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[site\n"))
    with pytest.raises(ConfigError, match="domain"):
        config.load(write(tmp_path, '[site]\ndomain = "not a domain"\nsecret = "0123456789abcdef0"\n'))


def test_example_config_is_valid(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    s = config.load(write(tmp_path, (root / "config.example.toml").read_text()))
    assert s.site.domain == "ask.example"


def test_errors_with_brackets_are_printed_whole(tmp_path: Path) -> None:
    """A config error naming [smtp] must not lose its brackets to rich's markup."""
    import subprocess
    import sys
    p = write(tmp_path, GOOD + '[smtp]\nlisten = "nonsense"\n')
    r = subprocess.run([sys.executable, "-m", "mailflow", "--config", str(p), "status"],
                       capture_output=True)
    assert r.returncode == 1 and b"[smtp] listen" in r.stderr
