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

__all__ = [
    "GROUP",
    "Job",
    "JobClient",
    "JobConsumer",
    "Keys",
    "QueueDepth",
    "Result",
    "Ticket",
    "live_workers",
    "queue_depth",
]
