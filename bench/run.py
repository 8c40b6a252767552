"""Run mailflow's benchmarks and write the table: `python -m bench [--quick] [--only NAME]`.

Every figure is a ratio against a baseline measured in the same invocation on the same
machine (see bench/README.md). The table is printed and written to bench/results.md
(bench/results-quick.md with --quick) together with the machine it ran on.
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
from bench.common import Section  # noqa: E402

BENCHES = ["smtp", "pipeline", "archive", "memory", "reminders"]
TITLES = {"smtp": "1. SMTP accept", "pipeline": "2. Pipeline", "archive": "3. Archive",
          "memory": "4. Memory", "reminders": "5. Reminders"}
IN_PROCESS = {"pipeline", "archive", "reminders"}   # what --profile can see
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
            table.add_row(s.name, "[red]error[/red]", s.error.splitlines()[-1][:80], "", "", "",
                          "[red]error[/red]")
        for r in s.rows:
            v = _verdict(r.ok)
            style = {"pass": "green", "FAIL": "bold red"}.get(v, "dim")
            table.add_row(r.bench, r.case, r.measured, r.baseline, r.ratio, r.target,
                          f"[{style}]{v}[/{style}]")
        table.add_section()
    Console(width=max(160, shutil.get_terminal_size().columns)).print(table)


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
            lines.append(f"| {s.name} | error | {_md(s.error.strip().splitlines()[-1])} | | | | "
                         "error | |")
        for r in s.rows:
            v = _verdict(r.ok)
            v = f"**{v}**" if v == "FAIL" else v
            lines.append(f"| {r.bench} | {_md(r.case)} | {_md(r.measured)} | {_md(r.baseline)} "
                         f"| {_md(r.ratio)} | {_md(r.target)} | {v} | {_md(r.note)} |")
    lines += ["", "Where the time goes in the rows that miss their targets, with profiles and the "
              "proposed fixes: [README.md, Findings](README.md#findings).", "", "## Notes", ""]
    for s in sections:
        lines.append(f"**{TITLES.get(s.name, s.name)}** ({s.seconds:.0f} s). "
                     + " ".join(s.notes) if s.notes else
                     f"**{TITLES.get(s.name, s.name)}** ({s.seconds:.0f} s).")
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the suite runs")
    ap.add_argument("--only", action="append", choices=BENCHES, metavar="NAME",
                    help=f"run only this benchmark (repeatable): {', '.join(BENCHES)}")
    ap.add_argument("--out", type=Path, help="where to write the table (default: "
                    "bench/results.md, or bench/results-quick.md with --quick)")
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
    args = ap.parse_args(argv)
    names = args.only or BENCHES
    out = args.out or HERE / ("results-profile.md" if args.profile else
                              "results-quick.md" if args.quick else "results.md")
    base = Path(tempfile.mkdtemp(prefix="mailflow-bench-", dir=args.tmp))
    machine = common.machine(base)
    if args.commit:
        args.src = base / "src"
        machine["mailflow"] = common.export_commit(args.commit, args.src)
    elif args.src:
        machine["mailflow"] = f"from {args.src.resolve()} (not the checkout)"
    else:
        machine["mailflow"] = "the checkout's working tree at " + machine["mailflow"]
    common.use_src(args.src)
    started = time.monotonic()
    sections: list[Section] = []
    try:
        for name in names:
            print(f"== {TITLES[name]}{' (quick)' if args.quick else ''} ...", flush=True)
            folder = base / name
            folder.mkdir()
            prof = cProfile.Profile() if args.profile and name in IN_PROCESS else None
            t0 = time.monotonic()
            try:
                sec = _module(name).run(folder, args.quick, prof)
            except Exception:  # noqa: BLE001 - one broken benchmark must not hide the rest
                sec = Section(name, error=traceback.format_exc())
                print(sec.error, file=sys.stderr)
            sec.seconds = time.monotonic() - t0
            sections.append(sec)
            for r in sec.rows:
                print(f"   {r.case}: {r.measured} vs {r.baseline} → {r.ratio} "
                      f"[{_verdict(r.ok)}]", flush=True)
            if prof is not None:
                _save_profile(prof, name)
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
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
