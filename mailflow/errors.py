"""Every error mailflow raises on purpose, in one tree.

    MailflowError            anything mailflow reports to a person as a clear message
    ├── ConfigError          a config file or key is wrong (names the file, the key, what was expected)
    ├── RulesError           a file in rules/ is wrong (names the file and the entry)
    ├── SpoolError           the spool could not durably take a message (caller answers 4xx / exit 75)
    ├── StoreError           the database could not be reached or migrated
    ├── DeliveryError        an outgoing message could not be handed over
    │   ├── TemporaryDeliveryError   try again later (4xx, connection refused, timeout)
    │   └── PermanentDeliveryError   give up and record it on the thread (5xx)
    └── NotFound             a thread, message or item named on the command line does not exist

Library exceptions are translated into these at the adapter that calls the library, so the
CLI and the daemon only ever need to know this tree.
"""
from __future__ import annotations


class MailflowError(Exception):
    """Base of every error that is meant to be shown to a person."""


class ConfigError(MailflowError):
    pass


class RulesError(MailflowError):
    pass


class SpoolError(MailflowError):
    pass


class StoreError(MailflowError):
    pass


class DeliveryError(MailflowError):
    pass


class TemporaryDeliveryError(DeliveryError):
    pass


class PermanentDeliveryError(DeliveryError):
    pass


class NotFound(MailflowError):
    pass
