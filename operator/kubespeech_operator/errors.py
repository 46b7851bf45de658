"""Operator exceptions: the class decides the retry policy (permanent: report and wait for a new spec)."""

from __future__ import annotations

from kubespeech_operator.kube import ApiError


class ReconcileError(Exception):
    """Base of every error the reconciler raises on purpose; ``reason`` becomes the condition reason."""

    reason = "ReconcileFailed"
    permanent = False

    def __init__(self, message: str, *, delay_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.delay_s = delay_s


class InvalidSpecError(ReconcileError):
    """The spec cannot be reconciled as written; retrying without a spec change cannot help."""

    reason = "SpecInvalid"
    permanent = True

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}" if field_path else message)
        self.field_path = field_path


class ChildRejectedError(ReconcileError):
    """The API server refused a child as invalid (HTTP 422/400): a builder bug or an admission policy."""

    reason = "ChildRejected"
    permanent = True


class ForbiddenError(ReconcileError):
    """The operator's RBAC does not allow an operation; fixable by an admin without a spec change."""

    reason = "Forbidden"

    def __init__(self, message: str) -> None:
        super().__init__(message, delay_s=60.0)


class ClusterUnavailableError(ReconcileError):
    """The API server did not answer, answered 5xx/429, or a write conflicted: retry soon."""

    reason = "ClusterUnavailable"


def from_api_error(exc: ApiError, what: str) -> ReconcileError:
    """Classify an API failure while doing ``what`` (e.g. "apply Deployment ns/name")."""
    message = f"{what}: {exc}"
    if exc.status in (400, 422):
        return ChildRejectedError(message)
    if exc.status in (401, 403):
        return ForbiddenError(message)
    return ClusterUnavailableError(message)


def retry_delay(error: ReconcileError, retry: int) -> float:
    """Exponential backoff (1, 2, 4 ... 60 s) unless the error names its own delay."""
    if error.delay_s is not None:
        return error.delay_s
    return float(min(2 ** max(retry, 0), 60))
