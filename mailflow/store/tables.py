"""The database schema, as SQLAlchemy Core tables. Alembic migrations are written from this.

Raw messages are content-addressed (sha256) and stored once however many threads or queue
items refer to them, so the original bytes of every message are always there to re-process,
re-publish or hand to an admin.
"""
from __future__ import annotations

from sqlalchemy import (JSON, false, BigInteger, Boolean, Column, Date, DateTime, Float, ForeignKey, Index,
                        Integer, LargeBinary, MetaData, String, Table, Text, UniqueConstraint)

metadata = MetaData(naming_convention={
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})

UTC_DT = DateTime(timezone=True)

# `data` is the last column (migration 0008 on SQLite): SQLite then writes a big message into
# the row a piece at a time (zeroblob + incremental blob I/O, `Tx.put_raw`) instead of
# building the whole record in memory. PostgreSQL keeps the order it was created with.
raw_messages = Table(
    "raw_messages", metadata,
    Column("sha256", String(64), primary_key=True),
    Column("size", Integer, nullable=False),
    Column("created_at", UTC_DT, nullable=False),
    Column("data", LargeBinary, nullable=False),
)

threads = Table(
    "threads", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False, default="foi"),
    Column("state", String(32), nullable=False),
    Column("authority", String(64), nullable=False),
    Column("law", String(32), nullable=False),
    Column("title", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("citizen_email", String(320), nullable=False),
    Column("citizen_name", String(200), nullable=False),
    Column("request_token", String(40), nullable=False),
    Column("reply_token", String(40), nullable=False),
    Column("confirm_token", String(40), nullable=True, unique=True),
    Column("created_at", UTC_DT, nullable=False),
    Column("confirmed_at", UTC_DT, nullable=True),
    Column("sent_at", UTC_DT, nullable=True),
    Column("due_date", Date, nullable=True),
    Column("delivery_status", String(16), nullable=False, default="pending"),
    Column("delivery_detail", Text, nullable=True),
    # Who may still write to the thread: "anybody", "authority" (its known senders only) or
    # "nobody" (closed). Enforced at RCPT time over SMTP, by the queue for ingest and IMAP.
    Column("allow", String(16), nullable=False, default="anybody", server_default="anybody"),
    # The clock: it runs from `clock_start` (when the request went out, or when a requested
    # clarification was given), plus a claimed extension; `very_late_date` follows the law.
    Column("clock_start", Date, nullable=True),
    Column("extension", String(32), nullable=True),
    Column("very_late_date", Date, nullable=True),
    # A response arrived and the citizen has not yet said how the request ended.
    Column("awaiting_description", Boolean, nullable=False, default=False,
           server_default=false()),
    # Hidden by an admin: not published in the archive (the thread still works by email).
    Column("hidden", Boolean, nullable=False, default=False, server_default=false()),
)
# The state first, then every input of a running clock (migration 0012): the reminder sweep's
# check of every clock reads only this index, its groups in order.
Index("ix_threads_clock", threads.c.state, threads.c.law, threads.c.clock_start,
      threads.c.extension, threads.c.due_date, threads.c.very_late_date, threads.c.kind)
Index("ix_threads_authority", threads.c.authority)

messages = Table(
    "messages", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("thread_id", Integer, ForeignKey("threads.id"), nullable=True),
    Column("direction", String(3), nullable=False),          # "in" | "out"
    Column("kind", String(24), nullable=False),              # request, confirmation, response, ...
    Column("message_id", String(998), nullable=True),
    Column("from_addr", String(320), nullable=False, default=""),
    Column("from_name", String(200), nullable=False, default=""),
    Column("to_addrs", JSON, nullable=False, default=list),
    Column("subject", Text, nullable=False, default=""),
    Column("date", UTC_DT, nullable=True),
    Column("text", Text, nullable=False, default=""),
    Column("raw_sha256", String(64), ForeignKey("raw_messages.sha256"), nullable=False),
    Column("classification", String(16), nullable=True),
    Column("classification_reason", Text, nullable=True),
    Column("match_method", String(32), nullable=True),
    Column("match_detail", JSON, nullable=True),
    Column("flags", JSON, nullable=False, default=list),
    Column("hidden", Boolean, nullable=False, default=False),
    # Our own Authentication-Results (RFC 8601) for mail received: DKIM, SPF, DMARC verdicts.
    Column("authentication", Text, nullable=True),
    Column("created_at", UTC_DT, nullable=False),
)
Index("ix_messages_thread", messages.c.thread_id)
Index("ix_messages_message_id", messages.c.message_id)

# One row per (raw message, recipient address of ours) handled: what makes processing
# idempotent. The same bytes delivered again to the same address change nothing.
deliveries = Table(
    "deliveries", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("raw_sha256", String(64), ForeignKey("raw_messages.sha256"), nullable=False),
    Column("rcpt", String(320), nullable=False),
    Column("envelope", JSON, nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("detail", JSON, nullable=True),
    Column("processed_at", UTC_DT, nullable=False),
    UniqueConstraint("raw_sha256", "rcpt", name="uq_deliveries_raw_rcpt"),
)

outbox = Table(
    "outbox", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_pk", Integer, ForeignKey("messages.id"), nullable=False),
    Column("thread_id", Integer, ForeignKey("threads.id"), nullable=True),
    Column("mail_from", String(320), nullable=False),
    Column("rcpt", String(320), nullable=False),
    Column("state", String(16), nullable=False),             # queued, sending, sent, failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UTC_DT, nullable=False),
    Column("claimed_until", UTC_DT, nullable=True),
    Column("claimed_by", String(128), nullable=True),        # the instance sending it
    Column("last_error", Text, nullable=True),
    Column("result", Text, nullable=True),
    Column("created_at", UTC_DT, nullable=False),
    Column("sent_at", UTC_DT, nullable=True),
    # "forward": a forward to the citizen still to be composed and signed by the sender
    # (`mailflow.outbound.outbox`); until then `message_pk` is the message it forwards.
    Column("compose", String(16), nullable=True),
)
Index("ix_outbox_due", outbox.c.state, outbox.c.next_attempt_at)

# The directory mailflow learns: addresses that wrote for an authority on one of its threads.
# `rules/authorities.toml` stays the source of truth for contacts; these are known senders.
authority_senders = Table(
    "authority_senders", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("authority", String(64), nullable=False),
    Column("address", String(320), nullable=False),
    Column("reply_to", Boolean, nullable=False, default=False),   # learned from a Reply-To
    Column("thread_id", Integer, ForeignKey("threads.id"), nullable=True),  # where first seen
    Column("first_seen", UTC_DT, nullable=False),
    Column("last_seen", UTC_DT, nullable=False),
    UniqueConstraint("authority", "address", name="uq_authority_senders_authority_address"),
)

# Reminders and automatic follow-ups: one row per (thread, kind, event), so each is sent once
# however often the sweep runs, from however many daemons.
reminders = Table(
    "reminders", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("thread_id", Integer, ForeignKey("threads.id"), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("event", String(64), nullable=False),
    Column("due_at", UTC_DT, nullable=False),
    Column("state", String(16), nullable=False, default="pending"),  # pending|sent|skipped
    Column("created_at", UTC_DT, nullable=False),
    Column("done_at", UTC_DT, nullable=True),
    Column("note", Text, nullable=True),
    UniqueConstraint("thread_id", "kind", "event", name="uq_reminders_thread_kind_event"),
)
Index("ix_reminders_due", reminders.c.state, reminders.c.due_at)

# What happened to a thread and who did it: state changes, clock changes, admin actions.
thread_events = Table(
    "thread_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("thread_id", Integer, ForeignKey("threads.id"), nullable=False),
    Column("at", UTC_DT, nullable=False),
    Column("actor", String(64), nullable=False),     # citizen | authority | admin:<name> | mailflow
    Column("kind", String(32), nullable=False),
    Column("detail", JSON, nullable=True),
)
Index("ix_thread_events_thread", thread_events.c.thread_id)

# Every admin action: who, when, what and why. Never updated, never deleted.
audit_log = Table(
    "audit_log", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", UTC_DT, nullable=False),
    Column("actor", String(64), nullable=False),
    Column("action", String(32), nullable=False),
    Column("thread_id", Integer, ForeignKey("threads.id"), nullable=True),
    Column("target", String(64), nullable=True),      # "queue:5", "message:12", "thread:3"
    Column("reason", Text, nullable=True),
    Column("detail", JSON, nullable=True),
)
Index("ix_audit_log_thread", audit_log.c.thread_id)

# What a fault report (a thread of kind "report") adds to its thread: the category, where it
# is and how mailflow knows, the area it was routed by, and when the citizen said it was fixed.
# Every column but the key may be empty while mailflow is still asking the citizen for details.
reports = Table(
    "reports", metadata,
    Column("thread_id", Integer, ForeignKey("threads.id"), primary_key=True, autoincrement=False),
    Column("category", String(64), nullable=True),
    Column("lat", Float, nullable=True),
    Column("lon", Float, nullable=True),
    Column("location_source", String(16), nullable=True),   # text | exif | gazetteer | reply
    Column("location_text", Text, nullable=True),           # what the citizen wrote that gave it
    Column("area", String(64), nullable=True),              # Area.id from rules/areas.geojson
    Column("fixed_at", UTC_DT, nullable=True),
    Column("updated_at", UTC_DT, nullable=False),
)
Index("ix_reports_category", reports.c.category)

# Senders an admin blocked as spammers: refused at RCPT over SMTP, dropped (bytes kept) otherwise.
blocked_senders = Table(
    "blocked_senders", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pattern", String(320), nullable=False, unique=True),   # an address, or "@domain"
    Column("created_at", UTC_DT, nullable=False),
    Column("actor", String(64), nullable=False),
    Column("reason", Text, nullable=True),
)

queue_items = Table(
    "queue_items", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("reason", String(32), nullable=False),
    Column("state", String(16), nullable=False, default="open"),   # open | decided
    Column("thread_id", Integer, ForeignKey("threads.id"), nullable=True),
    Column("raw_sha256", String(64), ForeignKey("raw_messages.sha256"), nullable=True),
    Column("summary", Text, nullable=False, default=""),
    Column("detail", JSON, nullable=True),
    Column("created_at", UTC_DT, nullable=False),
    Column("decided_at", UTC_DT, nullable=True),
    Column("decision", Text, nullable=True),
    Column("decided_by", String(64), nullable=True),
)
Index("ix_queue_items_state", queue_items.c.state)


# Every `mailflow serve` running for this site, and its heartbeat: `mailflow status`, the
# health check, and releasing what a dead instance had claimed.
instances = Table(
    "instances", metadata,
    Column("id", String(128), primary_key=True),          # host:pid
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", UTC_DT, nullable=False),
    Column("heartbeat_at", UTC_DT, nullable=False),
    Column("state", String(16), nullable=False),          # running | stopped | dead
    Column("version", String(32), nullable=False, default=""),
    Column("detail", JSON, nullable=True),                # spool depth, oldest item, ...
)


# Which threads changed, and when (a *change mark*): kept by triggers on threads, messages,
# thread_events and reports (migration 0011, which explains the marks), read by the archive
# builder to visit only the threads changed since its last build. Derived, not data: on a
# MetaData of its own, so `db copy` and the emptiness checks leave it alone.
derived = MetaData(naming_convention=metadata.naming_convention)
thread_changes = Table(
    "thread_changes", derived,
    Column("thread_id", Integer, primary_key=True, autoincrement=False),
    Column("changed", BigInteger, nullable=False),
)
Index("ix_thread_changes_changed", thread_changes.c.changed)
