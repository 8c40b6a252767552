"""Diagnostic micro-benchmark: `mailflow.mail.parse.parse` against the standard library.

`python -m bench.parse_micro [--rounds N] [--src DIR]`: CPU time per message (process time,
so other work on a shared machine costs little) over every message of tests/corpus, for
mailflow's parse, `email.message_from_bytes(policy=default)` and the same with `compat32`.
The three are run in alternating rounds and the median round of each is reported, with
mailflow's time as a multiple of each baseline's. No target: it explains the pipeline row.
"""
from __future__ import annotations

import argparse
import email
import email.policy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


def corpus() -> list[bytes]:
    return [p.read_bytes() for p in sorted((ROOT / "tests" / "corpus").rglob("*"))
            if p.is_file() and p.suffix != ".md"]


def timed(fn: Callable[[bytes], object], raws: list[bytes]) -> float:
    t0 = time.process_time()
    for raw in raws:
        try:
            fn(raw)
        except Exception:
            pass
    return (time.process_time() - t0) / len(raws)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--src", help="import mailflow from this folder")
    a = ap.parse_args()
    if a.src:
        sys.path.insert(0, a.src)
    from mailflow.mail.parse import parse
    raws = corpus()
    fns = {"mailflow parse": parse,
           "policy.default": lambda r: email.message_from_bytes(r, policy=email.policy.default),
           "compat32": lambda r: email.message_from_bytes(r, policy=email.policy.compat32)}
    for fn in fns.values():
        timed(fn, raws[:50])
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(a.rounds):
        for k, fn in fns.items():
            times[k].append(timed(fn, raws))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{len(raws)} messages, {a.rounds} rounds, median CPU ms/message")
    for k, v in med.items():
        print(f"  {k:16} {v * 1000:7.3f} ms   mailflow = {med['mailflow parse'] / v:5.2f}x")


if __name__ == "__main__":
    main()
