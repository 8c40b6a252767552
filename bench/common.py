"""Shared helpers for the benchmarks: sites, machine facts, timing, the corpus, results."""
from __future__ import annotations

import atexit
import os
import platform
import re
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "corpus"
SHARED_CORPUS = ROOT.parent / "shared" / "corpus"
MAILFLOW = [sys.executable, "-m", "mailflow"]
DOMAIN = "ask.example"
SRC: Path | None = None
"""Where mailflow is imported from when not the checkout (`--src`): set by `use_src`."""
DATABASES = ("sqlite", "postgresql")
DB_LABEL = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
PG_ADMIN = os.environ.get("MAILFLOW_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
"""The PostgreSQL server the benchmarks make their databases on (a superuser's URL to its
`postgres` database); `--pg URL` or $MAILFLOW_BENCH_PG to change it."""


def use_src(src: Path | None) -> None:
    """Benchmark the mailflow in `src` (e.g. an unpacked `git archive` of a commit) instead of
    the checkout: in this process and in every subprocess."""
    global SRC
    SRC = Path(src).resolve() if src else None
    if SRC is not None:
        sys.path.insert(0, str(SRC))
        for name in [m for m in sys.modules if m == "mailflow" or m.startswith("mailflow.")]:
            del sys.modules[name]


def env() -> dict[str, str]:
    """The environment of every subprocess: mailflow from SRC (if set), then the checkout
    (for `bench` itself). Subprocesses run with another cwd, so the checkout's mailflow/
    does not shadow SRC."""
    paths = [str(SRC)] if SRC else []
    paths.append(str(ROOT))
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths + ([old] if old else []))}


# -- results -----------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the table. `ratio` is mailflow's figure over the baseline's, in the unit
    the target is stated in; `ok` is None when the issue sets no target for the row."""
    bench: str
    case: str
    measured: str
    baseline: str
    ratio: str
    target: str = ""
    ok: bool | None = None
    note: str = ""
    value: float | None = None
    """The row's figure as a number, for the SQLite-beside-PostgreSQL table: a rate (per
    second) when `higher_is_better`, otherwise a time in seconds."""
    higher_is_better: bool = True


@dataclass
class Section:
    name: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    database: str | None = None
    """"sqlite" or "postgresql" for the benchmarks run on either (set by the runner)."""


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}/s" if x >= 100 else f"{x:,.1f}/s" if x >= 1 else f"{x:.3f}/s"


def fmt_s(x: float) -> str:
    if x < 1e-3:
        return f"{x * 1e6:.0f} µs"
    if x < 1:
        return f"{x * 1e3:.1f} ms"
    return f"{x:.2f} s"


def fmt_mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


# -- the machine -------------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine(tmp: Path, postgresql: bool = False) -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    mem = re.search(r"MemTotal:\s+(\d+) kB", _read("/proc/meminfo"))
    ram = f"{int(mem.group(1)) / 2**20:.1f} GiB" if mem else "unknown"
    disk = "unknown"
    try:
        src = subprocess.run(["findmnt", "-no", "SOURCE,FSTYPE", "-T", str(tmp)],
                             capture_output=True, text=True, timeout=5).stdout.split()
        if src:
            dev = Path(src[0]).name
            base = re.sub(r"p?\d+$", "", dev) if not Path(f"/sys/block/{dev}").exists() else dev
            rot = _read(f"/sys/block/{base}/queue/rotational").strip()
            kind = {"0": "non-rotational", "1": "rotational"}.get(rot, "?") + " per the kernel"
            st = os.statvfs(tmp)
            disk = (f"{src[0]} ({src[1] if len(src) > 1 else '?'}, {kind}, "
                    f"{st.f_blocks * st.f_frsize / 2**30:.0f} GiB)")
    except (OSError, subprocess.SubprocessError):
        pass
    virt = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        hv = re.search(r"Hypervisor vendor:\s*(\S+)", lscpu)
        virt = f"{hv.group(1)} guest" if hv else ""
    except (OSError, subprocess.SubprocessError):
        pass
    import sqlalchemy
    load = " ".join(_read("/proc/loadavg").split()[:3])
    return {
        "Date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "CPU": cpu + (f" ({virt})" if virt else ""),
        "Cores": str(os.cpu_count()),
        "RAM": ram,
        "Disk": disk,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "SQLite": sqlite3.sqlite_version,
        "SQLAlchemy": sqlalchemy.__version__,
        **(pg_facts() if postgresql else {}),
        "Load average at start": load,
        "mailflow": _git_commit(),
    }


def pg_facts() -> dict[str, str]:
    """The PostgreSQL server's version and the settings that decide its commit cost."""
    import psycopg
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as c:
        version = c.execute("SHOW server_version").fetchone()[0]
        settings = {k: c.execute(f"SHOW {k}").fetchone()[0] for k in (
            "fsync", "synchronous_commit", "wal_sync_method", "shared_buffers", "max_connections")}
    host = PG_ADMIN.split("@")[-1].split("/")[0]
    local = " (this machine)" if host.split(":")[0] in ("127.0.0.1", "localhost", "::1") else ""
    return {"PostgreSQL": f"{version} at {host}{local}, psycopg {psycopg.__version__}",
            "PostgreSQL settings": ", ".join(f"{k}={v}" for k, v in settings.items())}


def export_commit(rev: str, dest: Path) -> str:
    """Unpack mailflow (package, templates, rules) as committed at `rev` into `dest`."""
    dest.mkdir(parents=True)
    full = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", full, "mailflow", "templates", "rules",
                              "config.example.toml"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    # Bytecode, as an installed package has it (`make bytecode`): with PYTHONDONTWRITEBYTECODE
    # set, every subprocess (the daemon, each `mailflow ingest`) would otherwise compile the
    # whole package from source at its start, about 0.3 s of CPU that no deployment pays.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(dest / "mailflow")],
                   check=True)
    return f"commit {full} (`git archive`, not the working tree)"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mailflow"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out + (" + uncommitted changes in mailflow/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def rss_of(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    out = {}
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    return out


# -- sites -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- DNS: a resolver on this machine ---------------------------------------------------------------
DNS: str | None = None
"""`[classify] nameservers` of every site made (`--dns local`, the default): a DNS server on
127.0.0.1 (tests/dns_server.py, in its own process) answering NXDOMAIN to every question, as
this machine's resolver does, cut off from the internet, but without its round trips. It
stands in for the caching resolver a production site runs beside mailflow
(docs/operations.md). None (`--dns system`): the sites ask the system's resolver."""
_DNS_PROC: subprocess.Popen[str] | None = None


def start_dns() -> str:
    """Start the local DNS server; returns "127.0.0.1:PORT" and sets `DNS` to it."""
    global DNS, _DNS_PROC
    _DNS_PROC = subprocess.Popen([sys.executable, str(ROOT / "tests" / "dns_server.py")],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert _DNS_PROC.stdout is not None
    DNS = f"127.0.0.1:{int(_DNS_PROC.stdout.readline())}"
    return DNS


def stop_dns() -> None:
    global DNS, _DNS_PROC
    if _DNS_PROC is not None:
        _DNS_PROC.communicate(timeout=10)   # closing its stdin stops it
        _DNS_PROC = None
    DNS = None


def _configurable_dns() -> bool:
    """Whether the mailflow benchmarked has `[classify] nameservers` (not before 27 Nov 2026)."""
    from mailflow import config
    return "nameservers" in getattr(config, "_SCHEMA", {}).get("classify", {})


def make_site(folder: Path, domain: str = DOMAIN, database: str = "sqlite",
              dns: str | None = "default") -> Path:
    """A site as an admin makes one: `mailflow init`. Returns its config.toml. On
    `database="postgresql"` its `[database] url` names a fresh, empty PostgreSQL database
    (`fresh_pg_database`), which the site's first opening migrates. `dns`: the resolver its
    `[classify] nameservers` names (default `DNS`; None: the system's)."""
    dns = DNS if dns == "default" else dns
    r = subprocess.run([*MAILFLOW, "init", str(folder), "--domain", domain],
                       capture_output=True, timeout=120, cwd=folder.parent, env=env())
    if r.returncode != 0:
        raise RuntimeError(f"mailflow init failed: {r.stderr.decode()}")
    config = folder / "config.toml"
    if database == "postgresql":
        set_config(config, "database", "url", f'"{fresh_pg_database()}"')
    elif database != "sqlite":
        raise ValueError(f"database: {database!r}?")
    if dns and _configurable_dns():
        set_config(config, "classify", "nameservers", f'["{dns}"]')
    return config


# -- PostgreSQL databases ------------------------------------------------------------------------
_PG_MADE: list[str] = []


def _pg_admin():  # type: ignore[no-untyped-def]
    import psycopg
    return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)


def pg_url(name: str) -> str:
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"


def pg_available() -> str | None:
    """None when the PostgreSQL server answers, else why not."""
    try:
        with _pg_admin() as c:
            c.execute("SELECT 1")
        return None
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def fresh_pg_database(template: str | None = None) -> str:
    """CREATE DATABASE a new one (a copy of `template` if given; nobody may be connected to
    it) and return its URL. `drop_pg_databases` drops every one made; so does exit."""
    import secrets
    name = f"mailflow_bench_{secrets.token_hex(5)}"
    with _pg_admin() as c:
        c.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    _PG_MADE.append(name)
    return pg_url(name)


def drop_pg_databases() -> None:
    """DROP every database this process made (WITH (FORCE): connections a stopped daemon
    left are ended)."""
    if not _PG_MADE:
        return
    try:
        with _pg_admin() as c:
            while _PG_MADE:
                c.execute(f'DROP DATABASE IF EXISTS "{_PG_MADE.pop()}" WITH (FORCE)')
    except Exception as e:  # noqa: BLE001 - never hide the benchmark's own result
        print(f"could not drop the benchmark databases {_PG_MADE}: {e}", file=sys.stderr)


atexit.register(drop_pg_databases)


def db_name(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?")[0]


# -- CPU accounting ------------------------------------------------------------------------------
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads) so far; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def runqueue_wait(pid: int | str = "self") -> float | None:
    """Seconds the live threads of a process have spent runnable but waiting for a core
    (/proc/PID/task/*/schedstat, second field); None if the kernel does not say."""
    total, found = 0.0, False
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        parts = _read(f"/proc/{pid}/task/{task}/schedstat").split()
        if len(parts) >= 2:
            total += int(parts[1]) / 1e9
            found = True
    return total if found else None


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores (/proc/stat)."""
    line = _read("/proc/stat").splitlines()[0].split()
    vals = [int(x) for x in line[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)       # idle + iowait
    total = sum(vals[:8])                                      # guest time is inside user
    return (total - idle) / CLK_TCK, total / CLK_TCK


_PG_BACKGROUND = {"walwriter", "checkpointer", "background writer", "autovacuum launcher",
                  "logical replication launcher"}


class PgWatch:
    """CPU of the PostgreSQL processes that work for one database, and the WAL counters."""

    def __init__(self, dbname: str, skip_pid: int | None):
        self.admin = _pg_admin()
        self.dbname, self.skip = dbname, skip_pid

    def sample(self) -> tuple[dict[int, tuple[str, float, float]], int]:
        """({pid: (kind, CPU s, run-queue wait s)}, WAL fsyncs so far); kind is "db" for the
        backends connected to the database, "bg" for the server's background processes."""
        rows = self.admin.execute("SELECT pid, backend_type, datname FROM pg_stat_activity"
                                  ).fetchall()
        out = {}
        for pid, btype, dat in rows:
            kind = ("db" if dat == self.dbname and pid != self.skip else
                    "bg" if btype in _PG_BACKGROUND else None)
            cs = cpu_seconds(pid) if kind else None
            if cs is not None:
                out[pid] = (kind, cs, runqueue_wait(pid) or 0.0)
        wal = self.admin.execute("SELECT wal_sync FROM pg_stat_wal").fetchone()
        return out, int(wal[0]) if wal else 0

    @staticmethod
    def delta(a: dict[int, tuple[str, float, float]], b: dict[int, tuple[str, float, float]]
              ) -> dict[str, float]:
        """CPU used between two samples by kind ("db", "bg"), and the database backends'
        run-queue wait ("db wait"); a backend that appeared meanwhile counts from zero, one
        that ended meanwhile is lost (the daemons' pools keep theirs open)."""
        out = {"db": 0.0, "bg": 0.0, "db wait": 0.0}
        for pid, (kind, cs, wait) in b.items():
            out[kind] += cs - (a[pid][1] if pid in a else 0.0)
            if kind == "db":
                out["db wait"] += wait - (a[pid][2] if pid in a else 0.0)
        return out

    def close(self) -> None:
        self.admin.close()


def wait_quiet(pids: list[int], settle: float = 2.0, timeout: float = 120) -> float:
    """Wait until none of `pids` has used CPU for `settle` seconds (start-up sweeps over)."""
    t0 = time.monotonic()
    last = [cpu_seconds(p) for p in pids]
    quiet_since = time.monotonic()
    while time.monotonic() - t0 < timeout:
        time.sleep(0.25)
        now = [cpu_seconds(p) for p in pids]
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= settle:
            break
    return time.monotonic() - t0


def set_config(config: Path, table: str, key: str, value: str) -> None:
    """Set `key = value` (TOML literal) in `[table]` of a config written by `mailflow init`."""
    text = config.read_text()
    m = re.search(rf"(?ms)^(\[{re.escape(table)}\]\n)(.*?)(?=^\[|\Z)", text)
    if not m:
        text += f"\n[{table}]\n{key} = {value}\n"
    else:
        body = re.sub(rf"(?m)^#?\s*{re.escape(key)} = .*\n", "", m.group(2))
        text = text[:m.start()] + m.group(1) + f"{key} = {value}\n" + body + text[m.end():]
    config.write_text(text)


def open_site(config: Path) -> Any:
    from mailflow.site import Site
    return Site.open(config)


class Daemon:
    """`mailflow serve` in a subprocess, on a free port of 127.0.0.1."""

    def __init__(self, config: Path, log: Path):
        self.config, self.logfile = config, log
        self.port = free_port()
        set_config(config, "smtp", "listen", f'"127.0.0.1:{self.port}"')
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> "Daemon":
        self.proc = subprocess.Popen([*MAILFLOW, "--config", str(self.config), "serve"],
                                     stdout=open(self.logfile, "ab"), stderr=subprocess.STDOUT,
                                     cwd=self.config.parent, start_new_session=True,
                                     env=env())
        wait_for_banner(self.port, self.proc, timeout, self.logfile)
        return self

    def stop(self) -> None:
        import signal
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_banner(port: int, proc: subprocess.Popen[bytes], timeout: float,
                    log: Path | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError("server exited at start-up: "
                               + (log.read_text()[-2000:] if log and log.exists() else ""))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(100).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"no SMTP banner on port {port} after {timeout} s")


# -- the corpus --------------------------------------------------------------------------------
def corpus_index() -> list[tuple[Path, str]]:
    """(file, category) for every message of tests/corpus/INDEX.md (or ../shared/corpus)."""
    for base in (CORPUS, SHARED_CORPUS):
        index = base / "INDEX.md"
        if index.exists():
            out = []
            for line in index.read_text().splitlines():
                parts = [p.strip() for p in line.split("|")]
                if len(parts) >= 2 and (base / parts[0]).is_file():
                    out.append((base / parts[0], parts[1]))
            if out:
                return out
    return []


def process_family(pid: int) -> list[int]:
    """A daemon and its child processes: `mailflow serve` runs its processor in one, so the
    daemon's memory and CPU are the sum over both."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return [pid, *(int(k) for k in kids)]
