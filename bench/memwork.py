"""The memory benchmark's subprocess: one message processed, peak RSS reported as JSON.

`python -m bench.memwork mailflow --config C --warm ID --item ID`: opens the site, processes
the spooled item `--warm` (a small reply: imports, templates, the DKIM key and the database
are then loaded), takes its resting RSS, resets the peak (`/proc/self/clear_refs`), processes
the spooled item `--item` as the daemon's worker does (claim, `Pipeline.process_item`, then
the outbox sender's one delivery attempt for what it queued: the forward to the citizen is
composed, signed and written then) and reports the peak. `python -m bench.memwork email --eml F` does the same for the baseline:
`email.message_from_bytes(policy=default)` and every attachment's decoded content.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path


def status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["mailflow", "email"])
    ap.add_argument("--config")
    ap.add_argument("--warm")
    ap.add_argument("--item")
    ap.add_argument("--eml")
    a = ap.parse_args()
    if a.what == "mailflow":
        import asyncio

        from mailflow.delivery import deliver
        from mailflow.pipeline import Pipeline
        from mailflow.site import Site
        site = Site.open(a.config)
        p = Pipeline(site)
        warm = site.spool.claim(a.warm)
        asyncio.run(deliver(site, p.process_item(site.spool, warm).outbox_ids))
        gc.collect()
        before = status()
        reset = reset_peak()
        item = site.spool.claim(a.item)
        size = os.path.getsize(item.eml)
        result = p.process_item(site.spool, item)
        asyncio.run(deliver(site, result.outbox_ids))
        after = status()
        outcome = [o.outcome for o in result.outcomes]
    else:
        import email
        import email.policy
        raw = Path(a.eml).read_bytes()
        size = len(raw)
        del raw
        gc.collect()
        before = status()
        reset = reset_peak()
        raw = Path(a.eml).read_bytes()
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        for part in msg.iter_attachments():
            part.get_content()
        after = status()
        outcome = ["parsed"]
    json.dump({"before_rss": before["VmRSS"], "peak": after["VmHWM"], "after_rss": after["VmRSS"],
               "reset": reset, "size": size, "outcome": outcome}, sys.stdout)


if __name__ == "__main__":
    main()
