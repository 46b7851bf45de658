"""Redis Streams job protocol shared by the API server (producer) and the workers (consumers)."""

from kubespeech.jobs.protocol import (
    GROUP,
    Job,
    JobClient,
    JobConsumer,
    Keys,
    QueueDepth,
    Result,
    Ticket,
    live_workers,
    queue_depth,
)
from kubespeech.jobs.sessions import (
    SessionClient,
    SessionConsumer,
    SessionKeys,
    SessionSettings,
    active_sessions,
)

__all__ = [
    "GROUP",
    "Job",
    "JobClient",
    "JobConsumer",
    "Keys",
    "QueueDepth",
    "Result",
    "SessionClient",
    "SessionConsumer",
    "SessionKeys",
    "SessionSettings",
    "Ticket",
    "active_sessions",
    "live_workers",
    "queue_depth",
]
