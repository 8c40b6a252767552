"""2. Pipeline: spool → parsed, classified, matched, stored (and the mail it causes queued).

Driven in-process as the daemon's worker drives it: every spooled id is claimed by name and
handed to `Pipeline.process_item`, one message per transaction. The baseline parses the same
bytes with `email.message_from_bytes(policy=default)` and nothing else.
"""
from __future__ import annotations

import email
import email.policy
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import Row, Section, Timer, fmt_rate, make_site, open_site
from bench.world import make_threads, mixed_corpus

NAME = "pipeline"


def run(tmp: Path, quick: bool, profile: Any = None) -> Section:
    sec = Section(NAME)
    n_threads, n_msgs = (6, 60) if quick else (40, 2000)
    site = open_site(make_site(tmp / "pipeline-site"))
    threads = make_threads(site, n_threads)
    corpus = mixed_corpus(threads, n_msgs)
    kinds = Counter(k for k, *_ in corpus)
    total_bytes = sum(len(raw) for _, raw, _, _ in corpus)

    from mailflow.pipeline import Pipeline
    from mailflow.spool import Envelope
    pipeline = Pipeline(site)
    spool = site.spool
    for _, raw, sender, rcpt in corpus:
        spool.put(raw, Envelope(mail_from=sender, rcpt_tos=[rcpt], via="smtp",
                                peer="127.0.0.1:1"))
    ids = spool.pending()

    # Baseline first (it warms the page cache for nothing: the bytes are in memory).
    raws = [raw for _, raw, _, _ in corpus]
    with Timer() as base:
        for raw in raws:
            email.message_from_bytes(raw, policy=email.policy.default)
    base_rate = len(raws) / base.seconds

    outcomes: Counter[str] = Counter()
    failed = 0
    if profile is not None:
        profile.enable()
    with Timer() as mf:
        for id in ids:
            item = spool.claim(id)
            if item is None:
                continue
            try:
                result = pipeline.process_item(spool, item)
            except Exception:  # noqa: BLE001 - left in the spool for a retry, counted
                failed += 1
                continue
            for o in result.outcomes:
                outcomes[o.outcome] += 1
    if profile is not None:
        profile.disable()
    rate = len(ids) / mf.seconds
    ratio = rate / base_rate
    sec.rows.append(Row(
        "pipeline", f"mixed corpus, {len(ids):,} msgs", fmt_rate(rate),
        f"{fmt_rate(base_rate)} (email parse)", f"{ratio:.1%}",
        "≥ 50 % of parse", ratio >= 0.5))
    sec.rows.append(Row(
        "pipeline", "absolute rate", fmt_rate(rate), "", "", "≥ 500 msg/s", rate >= 500))
    sec.notes.append(
        f"Mixed corpus: {len(ids):,} messages, {total_bytes / 2**20:.1f} MB, to {n_threads} real "
        f"threads (made through the pipeline: written, confirmed, sent); kinds sent: "
        + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        + ". Outcomes recorded by mailflow: "
        + ", ".join(f"{k} {v}" for k, v in outcomes.most_common())
        + (f"; {failed} raised and were left for retry" if failed else "") + ".")
    site.close()
    return sec
