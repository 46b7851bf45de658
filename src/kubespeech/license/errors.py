"""License errors the API returns to clients, each with a stable code (registered with kubespeech.errors)."""

from __future__ import annotations

from kubespeech.errors import KubespeechError, register_error


@register_error
class InvalidLicenseError(KubespeechError):
    """The license key is missing, malformed, badly signed, revoked or not yet valid (401)."""

    code = "INVALID_LICENSE"
    http_status = 401


@register_error
class LicenseExpiredError(KubespeechError):
    """The license (or its offline grace period) has ended; ``details.expires_at`` says when (403)."""

    code = "LICENSE_EXPIRED"
    http_status = 403


@register_error
class FeatureNotLicensedError(KubespeechError):
    """The license does not include the requested feature (asr, tts, streaming) (403)."""

    code = "FEATURE_NOT_LICENSED"
    http_status = 403


@register_error
class LicenseLimitExceededError(KubespeechError):
    """A licensed limit (concurrent streams, audio hours per day) is reached; see ``retry_after`` (429)."""

    code = "LICENSE_LIMIT_EXCEEDED"
    http_status = 429


@register_error
class LicenseUnavailableError(KubespeechError):
    """The license proxy cannot be reached and no earlier answer is cached yet (503)."""

    code = "LICENSE_UNAVAILABLE"
    http_status = 503
