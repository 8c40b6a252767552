"""The spool: every state change, crash leftovers, and claims racing across processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailflow.errors import SpoolError
from mailflow.spool import HEADER_MAGIC, Envelope, Spool, read_spool_file

RAW = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: t\r\n\r\nbody\r\n"


def env(**kw: object) -> Envelope:
    base: dict[str, object] = {"mail_from": "a@example.org", "rcpt_tos": ["b@example.net"]}
    base.update(kw)
    return Envelope(**base)  # type: ignore[arg-type]


def files(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def legacy_item(root: Path, id: str, raw: bytes, envelope: Envelope, state: str = "new") -> None:
    """An item as mailflow wrote it before the one-file format: <id>.eml and <id>.json."""
    meta = {"version": 1, "id": id, "size": len(raw), "sha256": "", "attempts": 0,
            "errors": [], "envelope": envelope.to_json()}
    (root / state / (id + ".json")).write_text(json.dumps(meta, indent=1))
    (root / state / (id + ".eml")).write_bytes(raw)


def test_put_writes_one_file_into_new(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    id = spool.put(RAW, env(peer="127.0.0.1:1234", helo="mx"))
    assert files(tmp_path / "new") == [id + ".mail"]
    assert files(tmp_path / "tmp") == []
    data = (tmp_path / "new" / (id + ".mail")).read_bytes()
    first, rest = data.split(b"\n", 1)
    assert first.startswith(HEADER_MAGIC) and rest == RAW   # `tail -n +2` is the message
    meta = json.loads(first[len(HEADER_MAGIC):])
    assert meta["envelope"]["rcpt_tos"] == ["b@example.net"]
    assert meta["envelope"]["received_at"].endswith("+00:00")
    assert meta["attempts"] == 0 and meta["errors"] == [] and meta["size"] == len(RAW)
    assert spool.pending() == [id]
    assert read_spool_file(tmp_path / "new" / (id + ".mail")) == (meta, RAW)


def test_envelope_line_stays_one_line_whatever_the_envelope_holds(tmp_path: Path) -> None:
    """JSON escapes line breaks, so odd envelope values cannot end the first line early."""
    odd = env(mail_from="x\n@example.org", rcpt_tos=["ü@例え.jp", "raw\udcff@example.org"],
              helo="h\r\n\u2028x", peer="[::1]:25")
    spool = Spool(tmp_path)
    id = spool.put(b"\n" + RAW, odd)
    data = (tmp_path / "new" / (id + ".mail")).read_bytes()
    assert data.count(b"\n") == RAW.count(b"\n") + 2
    item = spool.claim()
    assert item is not None and item.read() == b"\n" + RAW
    assert item.envelope.rcpt_tos == odd.rcpt_tos and item.envelope.helo == odd.helo
    assert item.envelope.mail_from == odd.mail_from and item.errors == []


def test_put_does_not_modify_callers_envelope(tmp_path: Path) -> None:
    e = env()
    Spool(tmp_path).put(RAW, e)
    assert e.received_at == ""
    e = env(received_at="2026-01-02T03:04:05+00:00")
    id = Spool(tmp_path).put(RAW, e)
    meta, _ = read_spool_file(tmp_path / "new" / (id + ".mail"))
    assert meta["envelope"]["received_at"] == e.received_at   # a given time is kept


def test_envelope_to_json_is_every_field_as_asdict_gives_it() -> None:
    """to_json is written out by hand (asdict was a third of put's CPU): a field added to
    Envelope must be added there too, and the list must be a copy."""
    import dataclasses
    e = env(peer="[::1]:25", helo="mx", received_at="t", rcpt_from_headers=True)
    assert e.to_json() == dataclasses.asdict(e)
    assert list(e.to_json()) == [f.name for f in dataclasses.fields(Envelope)]
    assert e.to_json()["rcpt_tos"] is not e.rcpt_tos


def test_ids_sort_by_arrival_and_claim_takes_oldest(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    ids = [spool.put(RAW + str(i).encode(), env()) for i in range(5)]
    assert ids == sorted(ids) == spool.pending()
    item = spool.claim()
    assert item is not None and item.id == ids[0]
    assert item.read() == RAW + b"0"


def test_claim_done(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    id = spool.put(RAW, env(via="lmtp", peer="10.0.0.1:25", helo="h"))
    item = spool.claim()
    assert item is not None
    assert item.id == id and item.attempts == 0 and item.errors == []
    assert item.envelope.via == "lmtp" and item.envelope.peer == "10.0.0.1:25"
    assert item.eml == tmp_path / "work" / (id + ".mail") and item.eml.exists()
    assert spool.pending() == [] and spool.claim() is None
    spool.done(item)
    assert files(tmp_path / "work") == []
    assert files(tmp_path / "done") == [id + ".mail"]
    assert item.eml.parent.name == "done" and item.read() == RAW


def test_claim_named_id(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    a, b = spool.put(RAW, env()), spool.put(RAW, env())
    item = spool.claim(b)
    assert item is not None and item.id == b
    assert spool.claim(b) is None  # already claimed
    assert spool.pending() == [a]
    with pytest.raises(ValueError):
        spool.claim("../done/x")


def test_retry_counts_attempts_and_keeps_errors(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    id = spool.put(RAW, env())
    item = spool.claim()
    assert item is not None
    spool.retry(item, "database down")
    assert spool.pending() == [id]
    item = spool.claim()
    assert item is not None
    assert item.attempts == 1 and "database down" in item.errors[0]
    spool.retry(item, "still down")
    item = spool.claim()
    assert item is not None and item.attempts == 2 and len(item.errors) == 2
    assert item.envelope.rcpt_tos == ["b@example.net"]
    # The history is in a .json beside the file; the file itself is never rewritten.
    assert files(tmp_path / "work") == [id + ".json", id + ".mail"]
    assert item.read() == RAW
    meta = json.loads((tmp_path / "work" / (id + ".json")).read_text())
    assert meta["attempts"] == 2 and meta["size"] == len(RAW)


def test_an_uncounted_retry_keeps_the_reason_not_the_attempt(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The database down is not the message's fault: its retries do not bring it nearer
    to max_attempts, and a long run of them keeps only the last ERRORS_KEPT reasons."""
    import mailflow.spool as spool_module
    monkeypatch.setattr(spool_module, "ERRORS_KEPT", 4)
    spool = Spool(tmp_path)
    spool.put(RAW, env())
    item = spool.claim()
    assert item is not None
    spool.retry(item, "a bug")
    for n in range(6):
        item = spool.claim()
        assert item is not None
        spool.retry(item, f"store: down {n}", counted=False)
    item = spool.claim()
    assert item is not None and item.attempts == 1
    assert len(item.errors) == 4 and "down 5" in item.errors[-1]
    assert "not counted as an attempt" in item.errors[-1] and "a bug" not in item.errors[0]


def test_retry_with_delay_is_not_claimed_until_due(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    a = spool.put(RAW, env())
    b = spool.put(RAW, env())
    item = spool.claim()
    assert item is not None and item.id == a
    spool.retry(item, "later", delay=3600)
    assert spool.pending() == [a, b]
    nxt = spool.claim()
    assert nxt is not None and nxt.id == b
    assert spool.claim() is None
    assert spool.claim(a) is None  # naming it keeps the delay (the daemon's sweep does this)
    forced = spool.claim(a, force=True)
    assert forced is not None and forced.attempts == 1


def test_fail_records_error_and_requeue(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    id = spool.put(RAW, env())
    item = spool.claim()
    assert item is not None
    spool.fail(item, "unparseable")
    assert spool.failed() == [id] and spool.pending() == []
    meta = json.loads((tmp_path / "failed" / (id + ".json")).read_text())
    assert "unparseable" in meta["errors"][-1] and meta["failed_at"]
    assert spool.requeue(id) is True
    assert spool.failed() == [] and spool.pending() == [id]
    item = spool.claim()
    assert item is not None and item.attempts == 0 and "unparseable" in item.errors[-1]
    assert item.extra.get("failed_at")  # unknown keys survive a round trip
    assert spool.requeue(id) is False


def test_recover_puts_work_back_and_removes_stale_tmp(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    ids = [spool.put(RAW, env()) for _ in range(3)]
    assert spool.claim() is not None and spool.claim() is not None
    old = time.time() - 7200
    stale, fresh = tmp_path / "tmp" / "x.eml", tmp_path / "tmp" / "y.eml"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    os.utime(stale, (old, old))
    # A new Spool object on the same directory, as after a restart.
    spool2 = Spool(tmp_path)
    assert spool2.recover() == 2
    assert files(tmp_path / "work") == []
    assert spool2.pending() == ids
    assert files(tmp_path / "tmp") == ["y.eml"]
    assert spool2.recover() == 0


def test_recover_min_age_leaves_live_work(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put(RAW, env())
    item = spool.claim()
    assert item is not None
    assert spool.recover(min_age_seconds=3600) == 0
    assert item.eml.exists()


def test_recover_reunites_meta_split_by_a_crash(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    id = "00000000000000000001-000000000001"
    legacy_item(tmp_path, id, RAW, env(rcpt_tos=["x@example.org"]))
    # Crash inside claim(): .eml already in work/, .json still in new/.
    os.rename(tmp_path / "new" / (id + ".eml"), tmp_path / "work" / (id + ".eml"))
    assert spool.recover() == 1
    item = spool.claim()
    assert item is not None and item.envelope.rcpt_tos == ["x@example.org"]
    # Crash inside done(): .eml already in done/, .json still in work/.
    os.rename(item.eml, tmp_path / "done" / (id + ".eml"))
    assert spool.recover() == 0
    assert files(tmp_path / "done") == [id + ".eml", id + ".json"]
    assert files(tmp_path / "work") == []


def test_eml_without_json_gets_default_envelope(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    (tmp_path / "new" / "handdropped.eml").write_bytes(RAW)
    assert spool.pending() == ["handdropped"]
    item = spool.claim()
    assert item is not None and item.id == "handdropped"
    assert item.envelope.via == "unknown" and item.envelope.rcpt_tos == []
    assert item.envelope.mail_from == ""
    spool.retry(item, "x")  # writes a json for it
    assert files(tmp_path / "new") == ["handdropped.eml", "handdropped.json"]


def test_corrupt_json_still_gives_the_message(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    legacy_item(tmp_path, "old", RAW, env())
    (tmp_path / "new" / "old.json").write_text("{not json")
    item = spool.claim()
    assert item is not None and item.read() == RAW
    assert item.envelope.via == "unknown" and "metadata unreadable" in item.errors[0]


def test_corrupt_json_beside_a_mail_falls_back_to_its_first_line(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    id = spool.put(RAW, env(via="lmtp"))
    (tmp_path / "new" / (id + ".json")).write_text("{not json")
    item = spool.claim()
    assert item is not None and item.read() == RAW
    assert item.envelope.via == "lmtp" and "from the first line" in item.errors[0]


@pytest.mark.parametrize("damage", [b"", b"garbage\n", b"mailflow-spool/1 {not json\n",
                                    b"mailflow-spool/1 {\"no\": \"newline"])
def test_damaged_first_line_still_gives_the_bytes(tmp_path: Path, damage: bytes) -> None:
    """Never lose mail to a damaged envelope line: where it cannot be read, no guess is made
    about where it ended, and the whole file is processed as the message."""
    spool = Spool(tmp_path)
    (tmp_path / "new" / "x.mail").write_bytes(damage + RAW)
    item = spool.claim()
    assert item is not None and item.envelope.via == "unknown" and item.errors
    assert item.read() == damage + RAW


def test_older_two_file_items_are_processed_beside_new_ones(tmp_path: Path) -> None:
    """A site upgraded with items in its spool: each state change works on both layouts,
    oldest first, and the raw bytes are the message alone either way."""
    spool = Spool(tmp_path)
    legacy_item(tmp_path, "00000000000000000001-aaaaaaaaaaaa", RAW + b"old",
                env(via="lmtp", rcpt_tos=["old@example.net"]))
    new = spool.put(RAW + b"new", env())
    assert spool.pending() == ["00000000000000000001-aaaaaaaaaaaa", new]
    old = spool.claim()
    assert old is not None and old.read() == RAW + b"old" and old.offset == 0
    assert old.envelope.rcpt_tos == ["old@example.net"] and old.envelope.via == "lmtp"
    assert files(tmp_path / "work") == [old.id + ".eml", old.id + ".json"]
    spool.retry(old, "later")
    old = spool.claim(old.id)
    assert old is not None and old.attempts == 1
    spool.fail(old, "gave up")
    assert spool.failed() == [old.id]
    assert files(tmp_path / "failed") == [old.id + ".eml", old.id + ".json"]
    assert spool.requeue(old.id) is True
    old = spool.claim(old.id)
    assert old is not None and old.read() == RAW + b"old"
    # Left in work/ by a crash, both come back.
    item = spool.claim()
    assert item is not None and item.id == new
    assert spool.recover() == 2 and spool.pending() == [old.id, new]
    for _ in range(2):
        it = spool.claim()
        assert it is not None
        spool.done(it)
    assert files(tmp_path / "done") == sorted([old.id + ".eml", old.id + ".json",
                                               new + ".mail"])
    assert read_spool_file(tmp_path / "done" / (old.id + ".eml"))[1] == RAW + b"old"
    t = time.time() - 10 * 86400
    for n in files(tmp_path / "done"):
        os.utime(tmp_path / "done" / n, (t, t))
    assert spool.cleanup_done(7) == 2 and files(tmp_path / "done") == []


def test_a_json_split_from_its_mail_by_a_crash_is_reunited(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    id = spool.put(RAW, env(rcpt_tos=["x@example.org"]))
    item = spool.claim()
    assert item is not None
    spool.retry(item, "once")                           # now it has a .json beside it
    # Crash inside claim(): the .mail already in work/, the .json still in new/.
    os.rename(tmp_path / "new" / (id + ".mail"), tmp_path / "work" / (id + ".mail"))
    assert spool.recover() == 1
    item = spool.claim()
    assert item is not None and item.attempts == 1 and item.read() == RAW
    assert item.envelope.rcpt_tos == ["x@example.org"]
    # Crash inside done(): the .mail already in done/, the .json still in work/.
    os.rename(item.eml, tmp_path / "done" / (id + ".mail"))
    assert spool.recover() == 0
    assert files(tmp_path / "done") == [id + ".json", id + ".mail"]
    assert files(tmp_path / "work") == []


def test_read_gives_a_large_message_exactly(tmp_path: Path) -> None:
    raw = os.urandom(3 << 20)
    spool = Spool(tmp_path)
    spool.put(raw, env())
    item = spool.claim()
    assert item is not None and item.read() == raw


def test_json_without_eml_removed_only_when_old(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    young, old = tmp_path / "new" / "young.json", tmp_path / "new" / "old.json"
    young.write_text("{}")
    old.write_text("{}")
    t = time.time() - 7200
    os.utime(old, (t, t))
    assert spool.pending() == []
    assert spool.claim() is None
    spool.recover()
    assert files(tmp_path / "new") == ["young.json"]


def test_cleanup_done(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for _ in range(2):
        spool.put(RAW, env())
    items = [spool.claim(), spool.claim()]
    for it in items:
        assert it is not None
        spool.done(it)
    t = time.time() - 10 * 86400
    assert items[0] is not None
    os.utime(items[0].eml, (t, t))
    assert spool.cleanup_done(7) == 1
    assert files(tmp_path / "done") == [items[1].id + ".mail"]


def test_put_failure_raises_spoolerror_and_leaves_no_debris(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    # `new` replaced by a file: the rename fails even for root, after tmp files exist.
    os.rmdir(tmp_path / "new")
    (tmp_path / "new").write_bytes(b"")
    with pytest.raises(SpoolError):
        spool.put(RAW, env())
    assert files(tmp_path / "tmp") == []


def test_put_failure_when_tmp_unusable(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    os.rmdir(tmp_path / "tmp")
    (tmp_path / "tmp").write_bytes(b"")
    with pytest.raises(SpoolError):
        spool.put(RAW, env())


def test_envelope_json_round_trip_keeps_odd_addresses() -> None:
    e = Envelope(mail_from="", rcpt_tos=["ü@例え.jp", "raw\udcff@example.org"], via="lmtp",
                 peer="[::1]:25", helo=None, received_at="2026-01-01T00:00:00+00:00",
                 rcpt_from_headers=True)
    blob = json.dumps(e.to_json())
    assert Envelope.from_json(json.loads(blob)) == e
    # Unknown and missing keys are tolerated: a spool outlives versions.
    assert Envelope.from_json({"rcpt_tos": ["a@b"], "new_field": 1}).via == "unknown"


def test_bytes_preserved_exactly(tmp_path: Path) -> None:
    raw = bytes(range(256)) * 4 + b"\r\n.\r\nbare\nlf\rcr\r\n"
    spool = Spool(tmp_path)
    spool.put(raw, env())
    item = spool.claim()
    assert item is not None and item.read() == raw


BARRIER = r"""
import os, sys, time
from pathlib import Path
# Start together, so the claims really overlap: announce readiness, wait for "go".
gate = Path(sys.argv[1])
(gate / f"ready-{os.getpid()}").touch()
while not (gate / "go").exists():
    time.sleep(0.005)
"""

CLAIMER = BARRIER + r"""
from mailflow.spool import Spool
spool = Spool(Path(sys.argv[2]))
got = []
while True:
    item = spool.claim()
    if item is None:
        break
    got.append(item.id)
    spool.done(item)
print("\n".join(got))
"""

NAMED_CLAIMER = BARRIER + r"""
from mailflow.spool import Spool
spool = Spool(Path(sys.argv[2]))
print("\n".join(i for i in sys.argv[3:] if spool.claim(i) is not None))
"""


def race(script: str, n: int, gate: Path, *args: str) -> list[list[str]]:
    """Run n processes of script released at the same moment; each returns its claimed ids."""
    gate.mkdir()
    root = Path(__file__).resolve().parent.parent
    envvars = dict(os.environ, PYTHONPATH=str(root))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(gate), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=envvars)
             for _ in range(n)]
    try:
        while len(list(gate.glob("ready-*"))) < n:
            if any(p.poll() is not None for p in procs):
                break  # one died early; its stderr is reported below
            time.sleep(0.005)
        (gate / "go").touch()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode()
            results.append(out.decode().split())
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.mark.slow
def test_processes_racing_never_claim_the_same_item(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    ids = {spool.put(b"m%d\r\n" % i, env()) for i in range(300)}
    claimed = [i for got in race(CLAIMER, 4, tmp_path / "gate", str(spool.root)) for i in got]
    assert len(claimed) == len(set(claimed)), "an item was claimed twice"
    assert set(claimed) == ids
    assert spool.pending() == [] and files(spool.root / "work") == []


@pytest.mark.slow
def test_processes_racing_on_named_ids(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    ids = [spool.put(b"m\r\n", env()) for _ in range(100)]
    results = race(NAMED_CLAIMER, 3, tmp_path / "gate", str(spool.root), *ids)
    claimed = [i for got in results for i in got]
    assert sorted(claimed) == sorted(ids)


# --- group commit of new/'s fsync ------------------------------------------------------------

class FsyncLog:
    """Records, in one order, each rename into new/ and the start and end of each fsync."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, dir_delay: float = 0.0,
                 dir_error: bool = False) -> None:
        import stat
        import threading
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        real_fsync, real_rename = os.fsync, os.rename
        self.fail = dir_error

        def fsync(fd: int) -> None:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                self.add("file-fsync", "")
                return real_fsync(fd)
            self.add("dir-start", "")
            time.sleep(dir_delay)
            if self.fail:
                self.add("dir-error", "")
                raise OSError(5, "Input/output error")
            real_fsync(fd)
            self.add("dir-end", "")

        def rename(src: object, dst: object) -> None:
            real_rename(src, dst)
            if Path(str(dst)).parent.name == "new" and str(dst).endswith(".mail"):
                self.add("rename", Path(str(dst)).name[:-5])

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)

    def add(self, what: str, id: str) -> None:
        with self.lock:
            self.events.append((what, id))

    def count(self, what: str) -> int:
        return sum(1 for w, _ in self.events if w == what)


def test_a_lone_put_makes_two_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path)
    log = FsyncLog(monkeypatch)
    spool.put(RAW, env())
    assert [w for w, _ in log.events] == ["file-fsync", "rename", "dir-start", "dir-end"]


def test_concurrent_puts_share_directory_fsyncs_that_began_after_their_renames(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit: fewer fsyncs of new/ than puts, yet each put returns only after an fsync
    of new/ that started after its own rename and finished successfully."""
    from concurrent.futures import ThreadPoolExecutor
    spool = Spool(tmp_path)
    log = FsyncLog(monkeypatch, dir_delay=0.01)

    def put(i: int) -> str:
        id = spool.put(RAW + b"%d\r\n" % i, env())
        log.add("return", id)
        return id

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(put, range(80)))
    assert sorted(spool.pending()) == sorted(ids) and len(set(ids)) == 80
    assert log.count("file-fsync") == 80
    assert log.count("dir-start") == log.count("dir-end") < 60   # shared: typically ~12
    ev = log.events
    for id in ids:
        renamed = ev.index(("rename", id))
        returned = ev.index(("return", id))
        starts = [i for i in range(renamed + 1, returned) if ev[i][0] == "dir-start"]
        assert starts, f"{id} returned without a directory fsync after its rename"
        # that fsync ended before the put returned (fsyncs never overlap, so the next end)
        end = next(i for i in range(starts[0], len(ev)) if ev[i][0] == "dir-end")
        assert end < returned, id
    # never two directory fsyncs at once
    running = 0
    for what, _ in ev:
        running += {"dir-start": 1, "dir-end": -1}.get(what, 0)
        assert running in (0, 1)


def test_a_failed_shared_fsync_fails_every_put_it_covered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No 250 for anyone in a batch whose fsync failed, and none of their messages left where a
    claimer would take it; once the disk is back, puts succeed again."""
    from concurrent.futures import ThreadPoolExecutor
    spool = Spool(tmp_path)
    log = FsyncLog(monkeypatch, dir_delay=0.01, dir_error=True)

    def put(i: int) -> str | None:
        try:
            return spool.put(RAW + b"%d\r\n" % i, env())
        except SpoolError:
            return None

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(put, range(24)))
    assert results == [None] * 24
    assert spool.pending() == [] and files(tmp_path / "tmp") == []
    assert [n for n in files(tmp_path / "new") if n.endswith(".eml")] == []
    log.fail = False
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(put, range(8)))
    assert None not in ids and sorted(spool.pending()) == sorted(ids)


def test_batch_failure_is_not_excused_by_a_later_good_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After an fsync error Linux may call the next fsync clean though the earlier writes were
    lost: a waiter's answer is that of the fsync that covered it, not of whichever came last."""
    import threading
    from mailflow import spool as spool_mod
    sync = spool_mod._DirSync(tmp_path)
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def fake(path: Path) -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            entered.set()
            release.wait(5)       # the first fsync runs while the waiters queue up
        elif len(calls) == 2:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_mod, "_fsync_dir", fake)
    outcome: dict[str, object] = {}

    def call(name: str) -> None:
        try:
            sync.sync()
            outcome[name] = "ok"
        except OSError as e:
            outcome[name] = e.errno

    first = threading.Thread(target=call, args=("first",))
    first.start()
    assert entered.wait(5)
    waiters = [threading.Thread(target=call, args=(f"w{i}",)) for i in range(5)]
    for t in waiters:
        t.start()
    time.sleep(0.1)          # all five join the next batch
    release.set()
    for t in [first, *waiters]:
        t.join(5)
    sync.sync()              # a third fsync, clean
    assert outcome == {"first": "ok", **{f"w{i}": 5 for i in range(5)}}
    assert len(calls) == 3


def test_file_fsync_failing_fails_the_put_cleanly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error fsyncing the file is the put's error, nothing is left behind, and no file
    descriptor leaks."""
    spool = Spool(tmp_path)
    spool.put(RAW, env())
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".mail"):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fds = len(os.listdir("/proc/self/fd"))
    before = spool.pending()
    for _ in range(3):
        with pytest.raises(SpoolError, match="Input/output"):
            spool.put(RAW, env())
    assert spool.pending() == before
    assert files(tmp_path / "tmp") == []
    assert len(os.listdir("/proc/self/fd")) == fds


def test_split_envelope_line_for_tools(tmp_path: Path) -> None:
    from mailflow.spool import split_envelope_line
    spool = Spool(tmp_path)
    id = spool.put(RAW, env(rcpt_tos=["x@example.org"]))
    meta, raw = split_envelope_line((tmp_path / "new" / (id + ".mail")).read_bytes())
    assert raw == RAW and meta is not None and meta["envelope"]["rcpt_tos"] == ["x@example.org"]
    assert split_envelope_line(RAW) == (None, RAW)
    damaged = b"mailflow-spool/1 {oops\n" + RAW
    assert split_envelope_line(damaged) == (None, damaged)
