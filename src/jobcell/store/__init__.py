"""Durable state. One narrow :class:`Store` interface; all SQL lives in this package."""

from jobcell.store.base import (
    AttemptRow,
    Changes,
    ConflictError,
    CooldownRow,
    EventRow,
    FileHash,
    JobRow,
    LockInfo,
    LockLostError,
    NewEvent,
    OutputRow,
    StepRow,
    Store,
)

__all__ = ["AttemptRow", "Changes", "ConflictError", "CooldownRow", "EventRow", "FileHash",
           "JobRow", "LockInfo", "LockLostError", "NewEvent", "OutputRow", "StepRow", "Store"]
