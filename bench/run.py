"""Run mailflow's benchmarks and write the table: `python -m bench [--quick] [--only NAME]
[--database sqlite|postgresql|both]`.

Every figure is a ratio against a baseline measured in the same invocation on the same
machine (see bench/README.md). The table is printed and written to bench/results.md
(bench/results-postgresql.md when PostgreSQL is in --database, bench/results-quick.md with
--quick) together with the machine it ran on.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):   # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.common import Row, Section  # noqa: E402

BENCHES = ["smtp", "pipeline", "archive", "memory", "reminders", "instances", "ingest"]
TITLES = {"smtp": "1. SMTP accept", "pipeline": "2. Pipeline", "archive": "3. Archive",
          "memory": "4. Memory", "reminders": "5. Reminders", "instances": "6. Instances",
          "ingest": "7. Ingest"}
IN_PROCESS = {"pipeline", "archive", "reminders"}   # what --profile can see
PER_DATABASE = {"smtp", "pipeline", "reminders"}    # run once per database of --database
SIZED = {"pipeline": "messages", "reminders": "threads", "instances": "messages",
         "ingest": "messages, each in a process of its own",
         "smtp": "bytes: only the cases of messages of about this size (5000 or 1000000)",
         "archive": "threads (the larger site; the smaller is a tenth)"}
HERE = Path(__file__).resolve().parent


def _module(name: str):  # type: ignore[no-untyped-def]
    import importlib
    return importlib.import_module(f"bench.{name}_bench")


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("pass" if ok else "FAIL")


def print_table(sections: list[Section]) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title="mailflow benchmarks (ratio = mailflow ÷ baseline, same run)",
                  show_lines=False, expand=False)
    for col in ("bench", "case", "mailflow", "baseline", "ratio", "target", "pass"):
        table.add_column(col, overflow="fold")
    for s in sections:
        if s.error:
            table.add_row(_shown(s), "[red]error[/red]", s.error.splitlines()[-1][:80], "", "", "",
                          "[red]error[/red]")
        for r in s.rows:
            v = _verdict(r.ok)
            style = {"pass": "green", "FAIL": "bold red"}.get(v, "dim")
            table.add_row(r.bench, r.case, r.measured, r.baseline, r.ratio, r.target,
                          f"[{style}]{v}[/{style}]")
        table.add_section()
    console = Console(width=max(160, shutil.get_terminal_size().columns))
    console.print(table)
    both = comparison(sections)
    if both:
        t2 = Table(title="SQLite beside PostgreSQL (same run)", expand=False)
        for col in ("bench", "case", "SQLite", "PostgreSQL", "PostgreSQL vs SQLite"):
            t2.add_column(col, overflow="fold")
        for row in both:
            t2.add_row(*row)
        console.print(t2)


def _shown(s: Section) -> str:
    db = s.database if s.name in PER_DATABASE else None
    return s.name + (f" ({common.DB_LABEL[db]})" if db else "")


def _with_ratio(r: Row) -> str:
    return f"{r.measured} [{r.ratio}]" if r.ratio else r.measured


def comparison(sections: list[Section]) -> list[tuple[str, str, str, str, str]]:
    """(benchmark, case, SQLite, PostgreSQL, PostgreSQL against SQLite) for every row that both
    databases' runs of a benchmark have."""
    by = {(s.name, s.database): s for s in sections if not s.error}
    out = []
    for name in [n for n in BENCHES if n in PER_DATABASE]:
        lite, pg = by.get((name, "sqlite")), by.get((name, "postgresql"))
        if lite is None or pg is None:
            continue
        pg_rows = {r.case: r for r in pg.rows}
        for r in lite.rows:
            q = pg_rows.get(r.case)
            if r.value is None or q is None or q.value is None or not r.value:
                continue
            against = (f"{q.value / r.value:.0%} of the rate" if r.higher_is_better else
                       f"{q.value / r.value:.2f}× the time")
            out.append((name, r.case, _with_ratio(r), _with_ratio(q), against))
    return out


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def write_markdown(path: Path, sections: list[Section], machine: dict[str, str], argv: list[str],
                   seconds: float, load_end: str, quick: bool) -> None:
    lines = ["# mailflow benchmark results", ""]
    if quick:
        lines += ["**Quick run (`--quick`): tiny sizes, to check the suite works. The figures "
                  "mean nothing.**", ""]
    lines += [f"Produced by `{' '.join(argv)}` in {seconds / 60:.1f} minutes. Each ratio is "
              "mailflow's figure over a baseline measured in the same run on the same machine; "
              "see [README.md](README.md) for what each baseline is and how to read the table.",
              "", "## Machine", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {_md(v)} |" for k, v in machine.items()]
    lines += [f"| Load average at end | {load_end} |", "",
              f"The machine has {machine.get('Cores', '?')} cores and other work (other "
              "sessions' builds and tests) was running on it during the run, so absolute "
              "figures drift; the ratios are what to compare between runs.", "",
              "## Results", "",
              "| benchmark | case | mailflow | baseline | ratio | target | pass | notes |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in sections:
        if s.error:
            lines.append(f"| {_shown(s)} | error | {_md(s.error.strip().splitlines()[-1])} | | | | "
                         "error | |")
        for r in s.rows:
            v = _verdict(r.ok)
            v = f"**{v}**" if v == "FAIL" else v
            lines.append(f"| {r.bench} | {_md(r.case)} | {_md(r.measured)} | {_md(r.baseline)} "
                         f"| {_md(r.ratio)} | {_md(r.target)} | {v} | {_md(r.note)} |")
    both = comparison(sections)
    if both:
        lines += ["", "## SQLite beside PostgreSQL", "",
                  "The same benchmark on each database, in this run: mailflow's figures, in "
                  "brackets each one's ratio to its own baseline from the same run (the SMTP "
                  "and pipeline baselines touch no database, so their ratios compare the two "
                  "runs despite the machine's drift; the reminders baseline is the bare sweep "
                  "on the same database). Last column: for a rate, PostgreSQL's as a "
                  "percentage of SQLite's (higher is better for PostgreSQL); for a time, "
                  "PostgreSQL's as a multiple of SQLite's (lower is better).", "",
                  "| benchmark | case | SQLite | PostgreSQL | PostgreSQL vs SQLite |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {' | '.join(_md(x) for x in row)} |" for row in both]
    lines += ["", "Where the time goes in the rows that miss their targets, with profiles and the "
              "proposed fixes: [README.md, Findings](README.md#findings).", "", "## Notes", ""]
    for s in sections:
        title = _title(s.name, s.database if s.name in PER_DATABASE else None)
        lines.append(f"**{title}** ({s.seconds:.0f} s). " + " ".join(s.notes) if s.notes else
                     f"**{title}** ({s.seconds:.0f} s).")
        lines.append("")
    path.write_text("\n".join(lines))


def _title(name: str, database: str | None) -> str:
    return TITLES.get(name, name) + (f" on {common.DB_LABEL[database]}" if database else "")


def _size(text: str) -> tuple[str, int]:
    name, sep, n = text.partition("=")
    if not sep or name not in SIZED or not n.replace("_", "").replace(",", "").isdigit():
        raise argparse.ArgumentTypeError(
            f"expected NAME=N with NAME one of {', '.join(SIZED)}, got {text!r}")
    return name, int(n.replace("_", "").replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the suite runs")
    ap.add_argument("--only", action="append", choices=BENCHES, metavar="NAME",
                    help=f"run only this benchmark (repeatable): {', '.join(BENCHES)}")
    ap.add_argument("--out", type=Path, help="where to write the table (default: "
                    "bench/results.md; bench/results-postgresql.md when PostgreSQL is used; "
                    "bench/results-quick.md with --quick)")
    ap.add_argument("--tmp", type=Path, help="folder for the sites (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the sites afterwards")
    ap.add_argument("--src", type=Path, help="benchmark the mailflow package in this folder "
                    "(e.g. an unpacked `git archive`) instead of the checkout's")
    ap.add_argument("--commit", metavar="REV", help="benchmark mailflow as committed at REV "
                    "(`git archive`, unpacked in the temp folder), not the working tree")
    ap.add_argument("--profile", action="store_true", help="cProfile the in-process "
                    "benchmarks (pipeline, archive, reminders) into bench/profiles/ (their "
                    "figures are then slowed by the profiler: the table goes to "
                    "bench/results-profile.md)")
    ap.add_argument("--database", choices=["sqlite", "postgresql", "both"], default="sqlite",
                    help="the store the SMTP, pipeline and reminders benchmarks use (`both`: "
                    "each runs twice, and the table shows them side by side). The instances "
                    "benchmark always runs on PostgreSQL (plus a 1-daemon SQLite reference "
                    "when SQLite is included), and is part of the default list only when "
                    "PostgreSQL is in --database")
    ap.add_argument("--pg", metavar="URL", help="the PostgreSQL server to make the "
                    "databases on, as a superuser's URL (default: $MAILFLOW_BENCH_PG or "
                    f"{common.PG_ADMIN}); each benchmark gets a fresh database, dropped after")
    ap.add_argument("--size", action="append", type=_size, default=[], metavar="NAME=N",
                    help="override a benchmark's size: " + ", ".join(
                        f"{k}=N {v}" for k, v in SIZED.items()))
    ap.add_argument("--dns", choices=["local", "system"], default="local",
                    help="the DNS resolver the sites ask for SPF, DKIM and DMARC: `local` (the "
                    "default) a server on 127.0.0.1 that answers at once, standing in for the "
                    "caching resolver a site runs beside mailflow; `system` this machine's "
                    "resolver (/etc/resolv.conf). The pipeline benchmark also measures the "
                    "other in a diagnostic row")
    args = ap.parse_args(argv)
    databases = (["sqlite", "postgresql"] if args.database == "both" else [args.database])
    names = args.only or [n for n in BENCHES
                          if n != "instances" or "postgresql" in databases]
    sizes = dict(args.size)
    if args.pg:
        common.PG_ADMIN = args.pg
    needs_pg = "postgresql" in databases or "instances" in names
    if needs_pg:
        why = common.pg_available()
        if why:
            print(f"PostgreSQL at {common.PG_ADMIN} is needed (--database {args.database}"
                  f"{', instances' if 'instances' in names else ''}) and does not answer: {why}",
                  file=sys.stderr)
            return 2
    label_db = databases != ["sqlite"]   # name the database in the table's rows
    out = args.out or HERE / ("results-profile.md" if args.profile else
                              "results-quick.md" if args.quick else
                              "results-postgresql.md" if needs_pg else "results.md")
    base = Path(tempfile.mkdtemp(prefix="mailflow-bench-", dir=args.tmp))
    machine = common.machine(base, postgresql=needs_pg)
    if args.commit:
        args.src = base / "src"
        machine["mailflow"] = common.export_commit(args.commit, args.src)
    elif args.src:
        machine["mailflow"] = f"from {args.src.resolve()} (not the checkout)"
    else:
        machine["mailflow"] = "the checkout's working tree at " + machine["mailflow"]
    common.use_src(args.src)
    if args.dns == "local":
        machine["dns"] = (f"a local DNS server ({common.start_dns()}, tests/dns_server.py: "
                          "NXDOMAIN to every question, as this machine's resolver answers)")
    else:
        machine["dns"] = "this machine's resolver (/etc/resolv.conf)"
    started = time.monotonic()
    sections: list[Section] = []
    try:
        for name, database in [(n, d) for n in names
                               for d in (databases if n in PER_DATABASE else [None])]:
            title = _title(name, database if label_db else None)
            print(f"== {title}{' (quick)' if args.quick else ''} ...", flush=True)
            folder = base / (name + (f"-{database}" if database else ""))
            folder.mkdir()
            prof = cProfile.Profile() if args.profile and name in IN_PROCESS else None
            kwargs: dict[str, object] = {}
            if database:
                kwargs["database"] = database
            if name == "instances":
                kwargs["databases"] = tuple(databases)
            if name in sizes:
                kwargs["size"] = sizes[name]
            t0 = time.monotonic()
            try:
                sec = _module(name).run(folder, args.quick, prof, **kwargs)
            except Exception:  # noqa: BLE001 - one broken benchmark must not hide the rest
                sec = Section(name, error=traceback.format_exc())
                print(sec.error, file=sys.stderr)
            finally:
                common.drop_pg_databases()
            sec.seconds = time.monotonic() - t0
            if label_db and database:   # name the database (a SQLite-only run, as before)
                sec.database = database
                for r in sec.rows:
                    r.bench = f"{r.bench} ({common.DB_LABEL[database]})"
            sections.append(sec)
            for r in sec.rows:
                print(f"   {r.case}: {r.measured} vs {r.baseline} → {r.ratio} "
                      f"[{_verdict(r.ok)}]", flush=True)
            if prof is not None:
                _save_profile(prof, name + (f"-{database}" if label_db and database else ""))
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        common.stop_dns()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"sites kept in {base}")
    seconds = time.monotonic() - started
    load_end = " ".join(Path("/proc/loadavg").read_text().split()[:3]) \
        if Path("/proc/loadavg").exists() else "?"
    print_table(sections)
    cmd = ["python -m bench", *(argv if argv is not None else sys.argv[1:])]
    write_markdown(out, sections, machine, cmd, seconds, load_end, args.quick)
    print(f"table written to {out}")
    return 1 if any(s.error for s in sections) else 0


def _save_profile(prof: cProfile.Profile, name: str) -> None:
    folder = HERE / "profiles"
    folder.mkdir(exist_ok=True)
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("cumulative").print_stats(60)
    st.sort_stats("tottime").print_stats(40)
    (folder / f"{name}.txt").write_text(buf.getvalue())
    prof.dump_stats(str(folder / f"{name}.pstats"))
    print(f"   profile written to {folder / (name + '.txt')}")


if __name__ == "__main__":
    sys.exit(main())
