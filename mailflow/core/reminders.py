"""Which reminders a thread's clock calls for, and whether one still applies when it falls due.

Pure: dates in, reminder specifications out. Each reminder has a kind and an *event* (the due
date it is about, the response it follows): the store keeps one row per (thread, kind, event),
which is what makes each one go out once. When the clock moves (an extension, a clarification,
a holiday added to the calendar), new events get new rows, and the old rows no longer apply
when they fall due, so they are skipped rather than sent.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

# States in which the authority owes an answer, so reminders about the due date apply.
CLOCK_RUNNING = frozenset({"waiting_response", "internal_review"})
# States in which the citizen has said how it ended (or withdrew): nothing more to remind.
FINAL = frozenset({"successful", "partially_successful", "rejected", "not_held",
                   "user_withdrawn"})
KINDS = ("citizen_due", "citizen_late", "authority_followup", "very_late", "describe",
         "questionnaire")
# A fault report has no statutory clock: its one reminder is the questionnaire ("has it been
# fixed?"), asked while the report is open (sent, not yet fixed, not withdrawn).
REPORT_OPEN = "open"


@dataclass(frozen=True)
class ReminderPolicy:
    """What a site (or one law on it) sends, and when. Set in [reminders] of the config."""
    timezone: str = "UTC"
    hour: int = 9                  # local hour at which a date-based reminder falls due
    citizen_due: bool = True       # tell the citizen on the due date
    citizen_late: bool = True      # tell the citizen the day after, with what they can do
    authority_followup: bool = True
    followup_every: int = 10       # days between follow-ups, counted the law's way
    followup_max: int = 2
    very_late: bool = True
    describe_after_days: int = 7   # calendar days after a response: "how did it end?"


@dataclass(frozen=True)
class ReminderSpec:
    kind: str
    event: str
    on: date


def due_at(on: date, policy: ReminderPolicy) -> datetime:
    """The moment a reminder for a calendar day falls due, in UTC."""
    local = datetime.combine(on, time(policy.hour), tzinfo=ZoneInfo(policy.timezone))
    return local.astimezone(timezone.utc)


def for_deadline(due: date, very_late: date, policy: ReminderPolicy,
                 add_days: Callable[[date, int], date]) -> list[ReminderSpec]:
    """Reminders about one due date. `add_days(d, n)` counts days the law's way."""
    out = []
    if policy.citizen_due:
        out.append(ReminderSpec("citizen_due", f"due:{due}", due))
    if policy.citizen_late:
        out.append(ReminderSpec("citizen_late", f"due:{due}", due + timedelta(days=1)))
    if policy.authority_followup and policy.followup_max > 0:
        out.append(ReminderSpec("authority_followup", f"due:{due}:1", add_days(due, 1)))
    if policy.very_late:
        # `very_late` is the last day that is merely late: the notice goes the day after.
        out.append(ReminderSpec("very_late", f"very_late:{very_late}",
                                very_late + timedelta(days=1)))
    return out


def next_followup(event: str, sent_on: date, policy: ReminderPolicy,
                  add_days: Callable[[date, int], date]) -> ReminderSpec | None:
    """The follow-up after the one for `event` ("due:<date>:<n>"), if the policy allows."""
    prefix, _, n = event.rpartition(":")
    if not n.isdigit() or int(n) >= policy.followup_max:
        return None
    return ReminderSpec("authority_followup", f"{prefix}:{int(n) + 1}",
                        add_days(sent_on, policy.followup_every))


def after_response(message_pk: int, received: date, policy: ReminderPolicy) -> ReminderSpec:
    return ReminderSpec("describe", f"response:{message_pk}",
                        received + timedelta(days=policy.describe_after_days))


def questionnaire_event(n: int) -> str:
    """The n-th "has it been fixed?" of a fault report: one reminders row per event."""
    return f"q:{n}"


def questionnaire_number(event: str) -> int | None:
    """n from "q:<n>", or None for any other event."""
    prefix, _, n = event.partition(":")
    return int(n) if prefix == "q" and n.isdigit() else None


def applies(kind: str, event: str, *, state: str, due: date | None, very_late: date | None,
            awaiting_description: bool, today: date) -> tuple[bool, str]:
    """Whether a reminder still makes sense now, and why (or why not)."""
    if kind == "questionnaire":
        if state != REPORT_OPEN:
            return False, f"the report is no longer open ({state})"
        return True, "the report is open: ask whether it was fixed"
    if state in FINAL:
        return False, f"the request has ended ({state})"
    if kind == "describe":
        if not awaiting_description:
            return False, "the citizen already said how it ended"
        return True, "a response came and the citizen has not said how it ended"
    if state not in CLOCK_RUNNING:
        return False, f"the clock is not running ({state})"
    if awaiting_description:
        # As Alaveteli does: an authority that has answered is not chased until the citizen
        # says the answer was not the end of it ("waiting").
        return False, "a response came; the citizen has not yet said how the request stands"
    if kind == "very_late":
        if very_late is None or event != f"very_late:{very_late}":
            return False, "the very-late date has moved"
        return True, f"very late since {very_late}"
    if due is None or not event.startswith(f"due:{due}"):
        return False, "the due date has moved"
    if kind in ("citizen_late", "authority_followup") and today <= due:
        return False, "not late yet"
    return True, f"due {due}"
