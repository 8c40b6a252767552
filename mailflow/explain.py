"""`mailflow explain`: the pipeline's plan for a message, shown instead of carried out.

It uses the very same door, classifier, matcher and plan as `ingest`, inside a transaction
that writes nothing, so what it says is what would happen.
"""
from __future__ import annotations

from typing import Any

from mailflow.mail.parse import ParseError, parse
from mailflow.pipeline import Pipeline, recipients_from_headers
from mailflow.site import Site
from mailflow.spool import Envelope

_DECISIONS = {"authority_mail": "thread", "citizen_mail": "thread", "authority": "new_request",
              "confirm": "confirmation", "report": "new_report"}


def explain_bytes(site: Site, raw: bytes, rcpts: list[str], sender: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"classification": None, "classification_reason": None,
                           "decision": "reject", "threads": [], "reasons": [], "evidence": [],
                           "suggestions": [], "steps": [], "queue_reason": None}
    try:
        pm = parse(raw)
    except ParseError as e:
        out.update(decision="queue", queue_reason="unparseable",
                   reasons=[f"the message cannot be parsed: {e}"])
        return out
    from_headers = not rcpts
    if from_headers:
        rcpts = recipients_from_headers(pm)
    pipeline = Pipeline(site)
    door = [site.check_recipient(r) for r in rcpts]
    accepted = [r for r, d in zip(rcpts, door) if d.accept]
    refused = [f"{r}: {d.reply}" for r, d in zip(rcpts, door) if not d.accept]
    out["reasons"].extend(f"refused at the door: {x}" for x in refused)
    if not accepted and from_headers and pipeline.names_us(pm):
        accepted = rcpts
        out["reasons"].append("no recipient is ours, but our Message-ID, address or tag names it")
    envelope = Envelope(mail_from=sender if sender is not None else pm.from_addr,
                        rcpt_tos=accepted, via="ingest" if sender is not None else "explain",
                        rcpt_from_headers=from_headers)
    cls = pipeline.classify(pm, envelope)
    out["classification"], out["classification_reason"] = cls.kind.value, cls.reason
    if not accepted:
        out["reasons"].append("no recipient is one of ours: the message would be refused "
                              "(550 over SMTP, exit 67 from ingest)")
        return out
    with site.store.read() as tx:
        plan = pipeline.plan(tx, pm, envelope)
    out["reasons"].extend(plan.reasons)
    if plan.decision is not None:
        out["evidence"] = [{"method": e.method, "source": e.source, "thread_id": e.thread_id,
                            "verified": e.verified, "strong": e.strong, "detail": e.detail}
                           for e in plan.decision.evidence]
        out["suggestions"] = [{"thread_id": s.thread_id, "score": round(s.score, 2),
                               "reason": s.reason} for s in plan.decision.suggestions]
    out["steps"] = [{"key": st.key, "action": st.action, "thread_id": st.thread_id,
                     "queue_reason": st.queue_reason, "why": st.why} for st in plan.steps]
    decisions = [_DECISIONS.get(st.action, "queue") for st in plan.steps]
    out["threads"] = sorted({st.thread_id for st in plan.steps
                             if st.action in ("authority_mail", "citizen_mail")
                             and st.thread_id is not None})
    out["decision"] = next((d for d in decisions if d != "queue"), "queue" if decisions else "reject")
    queued = [st for st in plan.steps if st.action == "queue" or _DECISIONS.get(st.action) is None]
    if queued:
        out["queue_reason"] = queued[0].queue_reason or queued[0].action
        out["reasons"].extend(st.why for st in queued if st.why)
    out["reasons"].append(f"classified {cls.kind.value}: {cls.reason}")
    return out
