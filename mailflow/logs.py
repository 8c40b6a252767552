"""Logging that an operator of several daemons can search: which instance, which thread.

Every record carries the instance (host:pid) and, while a message, a reminder or an outbox row
of one thread is being handled, that thread's id (a context variable, so concurrent tasks and
worker threads each keep their own). Two formats: "text" for a person at a terminal, "json"
(one object per line) for journald, Loki or Elasticsearch. Chosen with `MAILFLOW_LOG_FORMAT`
or `mailflow --log-format`, so that it is set before the config is even read.
"""
from __future__ import annotations

import contextvars
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

_thread: contextvars.ContextVar[int | None] = contextvars.ContextVar("mailflow_thread",
                                                                     default=None)
INSTANCE = f"{socket.gethostname()}:{os.getpid()}"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(instance)s thread=%(thread_id)s]: %(message)s"


@contextmanager
def thread_context(thread_id: int | None) -> Iterator[None]:
    """Within this block, every log line names `thread_id`."""
    token = _thread.set(thread_id)
    try:
        yield
    finally:
        _thread.reset(token)


def set_thread(thread_id: int | None) -> None:
    """For code that cannot wrap a block (the pipeline learns the thread part-way through)."""
    _thread.set(thread_id)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.instance = INSTANCE
        if not hasattr(record, "thread_id"):
            tid = _thread.get()
            record.thread_id = "-" if tid is None else tid
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "instance": getattr(record, "instance", INSTANCE),
            "thread_id": None if getattr(record, "thread_id", "-") == "-"
            else record.thread_id,  # type: ignore[attr-defined]
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def configure(level: int, fmt: str | None = None) -> None:
    """Set up the root logger once, for the CLI and the daemon alike."""
    global INSTANCE
    INSTANCE = f"{socket.gethostname()}:{os.getpid()}"
    fmt = (fmt or os.environ.get("MAILFLOW_LOG_FORMAT") or "text").lower()
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")
    # dkimpy logs every signature it cannot verify at ERROR; mailflow records the verdict
    # itself, so those lines are noise to an operator.
    logging.getLogger("dkimpy").setLevel(logging.CRITICAL)
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        if getattr(h, "_mailflow", False):
            root.removeHandler(h)
        else:
            # Someone else set logging up (a test runner, an embedding program): as
            # logging.basicConfig does, leave their handlers be, and only add our fields.
            if not any(isinstance(f, _ContextFilter) for f in h.filters):
                h.addFilter(_ContextFilter())
            return
    handler = logging.StreamHandler()
    handler._mailflow = True  # type: ignore[attr-defined]
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
