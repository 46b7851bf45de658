"""Typed errors with stable machine-readable codes, shared by the API, the job protocol and the workers."""

from __future__ import annotations

from typing import Any, ClassVar


class KubespeechError(Exception):
    """Base error: carries a stable ``code``, the HTTP status it maps to, and a human message.

    Workers serialize these into job results (``to_dict``) and the API turns them back into the same
    class (``from_dict``), so an error raised on a worker reaches the client with its code intact.
    """

    code: ClassVar[str] = "INTERNAL_ERROR"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, *, retry_after: float | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.retry_after is not None:
            data["retry_after"] = self.retry_after
        if self.details:
            data["details"] = self.details
        return data

    @staticmethod
    def from_dict(data: dict[str, Any]) -> KubespeechError:
        cls = _BY_CODE.get(str(data.get("code")), KubespeechError)
        err = cls(
            str(data.get("message", "")), retry_after=data.get("retry_after"), **data.get("details", {})
        )
        return err


class InvalidInput(KubespeechError):
    """The request is well-formed but a parameter is invalid (422)."""

    code = "INVALID_PARAMETER"
    http_status = 422


class EmptyInput(InvalidInput):
    code = "EMPTY_INPUT"


class TextTooLong(InvalidInput):
    code = "TEXT_TOO_LONG"


class CorruptAudio(KubespeechError):
    code = "CORRUPT_AUDIO"
    http_status = 400


class UnsupportedAudioFormat(KubespeechError):
    code = "UNSUPPORTED_AUDIO_FORMAT"
    http_status = 415


class PayloadTooLarge(KubespeechError):
    code = "PAYLOAD_TOO_LARGE"
    http_status = 413


class AudioTooLong(KubespeechError):
    code = "AUDIO_TOO_LONG"
    http_status = 413


class UnsupportedSampleRate(KubespeechError):
    """The audio's sample rate is outside the range the decoder accepts (400)."""

    code = "UNSUPPORTED_SAMPLE_RATE"
    http_status = 400


class TooManyChannels(KubespeechError):
    """The audio has more channels than the decoder accepts (400)."""

    code = "TOO_MANY_CHANNELS"
    http_status = 400


class UnknownModel(KubespeechError):
    code = "MODEL_NOT_FOUND"
    http_status = 404


class UnknownVoice(KubespeechError):
    code = "VOICE_NOT_FOUND"
    http_status = 404


class Unauthorized(KubespeechError):
    code = "UNAUTHORIZED"
    http_status = 401


class QueueFull(KubespeechError):
    """The model's queue is at its bound: the caller should retry after ``retry_after`` seconds."""

    code = "QUEUE_FULL"
    http_status = 429


class NoWorkers(KubespeechError):
    """No worker serves the model yet (cold start or scaled to zero)."""

    code = "WORKERS_UNAVAILABLE"
    http_status = 503


class ServiceUnavailable(KubespeechError):
    code = "SERVICE_UNAVAILABLE"
    http_status = 503


class DeadlineExceeded(KubespeechError):
    code = "DEADLINE_EXCEEDED"
    http_status = 504


class ClientClosedRequest(KubespeechError):
    """The client disconnected before its answer was ready (nginx's 499; nobody reads the response)."""

    code = "CLIENT_CLOSED_REQUEST"
    http_status = 499


class JobFailed(KubespeechError):
    """The job failed on every allowed delivery and was moved to the dead-letter stream."""

    code = "JOB_FAILED"
    http_status = 500


class EngineError(KubespeechError):
    code = "ENGINE_ERROR"
    http_status = 500


_BY_CODE: dict[str, type[KubespeechError]] = {}


def register_error(cls: type[KubespeechError]) -> type[KubespeechError]:
    """Make ``from_dict`` rebuild ``cls`` from its code (modules defining more errors call this)."""
    _BY_CODE[cls.code] = cls
    return cls


def _register_all(base: type[KubespeechError]) -> None:
    for sub in base.__subclasses__():
        _BY_CODE.setdefault(sub.code, sub)
        _register_all(sub)


_register_all(KubespeechError)
