"""Attachments the archive could not check are put before an admin, once each.

The build only reads the store; this records what it withheld as queue items (reason
`withheld_attachment`), deduplicated by message and attachment number, so the admin can review
and release them.
"""
from __future__ import annotations

from typing import Any

from mailflow.site import Site


def queue_withheld(site: Site, withheld: list[dict[str, Any]]) -> int:
    added = 0
    with site.store.tx() as tx:
        seen = {((q.detail or {}).get("message_id"), (q.detail or {}).get("n"))
                for q in tx.queue(include_decided=True, reason="withheld_attachment")}
        for w in withheld:
            if (w["message_id"], w["n"]) in seen:
                continue
            tx.add_queue_item("withheld_attachment",
                              f"attachment {w['filename']!r} withheld: {w['reason']}"[:500],
                              thread_id=w["thread_id"], detail=dict(w))
            added += 1
    return added
