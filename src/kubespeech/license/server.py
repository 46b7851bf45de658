"""Reference upstream license server (``kubespeech license-server``): check-in, revocations, usage ingestion.

A small vendor-side FastAPI app backed by SQLite, so vendors have something to run and tests have a real
peer. Licensees authenticate with their license key (``Authorization: Bearer``), which must verify with the
vendor public key. Usage events are deduplicated by (license id, event id), so at-least-once delivery from
the proxies counts every event exactly once. Revocation and reporting endpoints need the admin token.
"""

from __future__ import annotations

import hmac
import logging
import sqlite3
import time
from typing import Annotated, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubespeech.license.export import ExportError, verify_export
from kubespeech.license.token import LicenseClaims, TokenError, iso, verify_signature

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS revocations (license_id TEXT PRIMARY KEY, reason TEXT, revoked_at REAL);
CREATE TABLE IF NOT EXISTS checkins (
  license_id TEXT, instance TEXT, customer TEXT, at REAL, PRIMARY KEY (license_id, instance));
CREATE TABLE IF NOT EXISTS events (
  license_id TEXT, event_id TEXT, ts REAL, feature TEXT, model TEXT, audio_seconds REAL,
  characters INTEGER, status_code INTEGER, received_at REAL, PRIMARY KEY (license_id, event_id));
CREATE TABLE IF NOT EXISTS export_keys (license_id TEXT PRIMARY KEY, installation_key TEXT);
CREATE TABLE IF NOT EXISTS terms (license_id TEXT PRIMARY KEY, token TEXT, updated_at REAL);
"""


class UsageEvent(BaseModel):
    """One metered request; unknown fields are refused, so content can never be smuggled in."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., min_length=1, max_length=64)
    ts: float
    feature: str = Field(..., max_length=16)
    model: str = Field(..., max_length=128)
    audio_seconds: float = Field(..., ge=0)
    characters: int = Field(..., ge=0)
    status_code: int = Field(..., ge=100, le=599)
    cached: bool = Field(False, description="Answered from the API's result cache (no engine ran).")


class UsageBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    license_id: str
    events: list[UsageEvent]


class CheckinRequest(BaseModel):
    license_id: str
    instance: str | None = Field(None, max_length=200)
    proxy_version: str | None = Field(None, max_length=32)


class Revocation(BaseModel):
    license_id: str = Field(..., min_length=1, max_length=64)
    reason: str = Field("", max_length=200)


class Terms(BaseModel):
    token: str = Field(..., min_length=1, max_length=8192)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class LicenseServer:
    """The server's state: vendor public key, SQLite database and admin token."""

    def __init__(
        self,
        public_key: Ed25519PublicKey,
        *,
        db: str = ":memory:",
        admin_token: str | None = None,
        revoked: list[str] | None = None,
        max_events_per_request: int = 10000,
    ) -> None:
        self.public_key = public_key
        self.admin_token = admin_token
        self.max_events = max_events_per_request
        # One connection used only from the event loop thread (the handlers do not await while using it).
        self.db = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
        self.db.executescript(_SCHEMA)
        for lid in revoked or []:
            self.revoke(lid, "revoked at server start")

    def revoke(self, license_id: str, reason: str) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO revocations VALUES (?, ?, ?)", (license_id, reason, time.time())
        )

    def unrevoke(self, license_id: str) -> bool:
        return self.db.execute("DELETE FROM revocations WHERE license_id = ?", (license_id,)).rowcount > 0

    def revocation(self, license_id: str) -> str | None:
        row = self.db.execute("SELECT reason FROM revocations WHERE license_id = ?", (license_id,)).fetchone()
        return None if row is None else str(row[0] or "")

    def ingest(self, license_id: str, events: list[UsageEvent]) -> tuple[int, int]:
        now = time.time()
        accepted = 0
        self.db.execute("BEGIN")
        try:
            for e in events:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (license_id, e.id, e.ts, e.feature, e.model, e.audio_seconds, e.characters,
                     e.status_code, now),
                )  # fmt: skip
                accepted += cur.rowcount
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return accepted, len(events) - accepted

    def licensee(self, authorization: str | None) -> LicenseClaims:
        """The claims of the caller's license key (signature checked; expiry is the proxy's business)."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(401, "INVALID_LICENSE", "A license key is required.")
        try:
            return verify_signature(authorization[7:], self.public_key)
        except TokenError as exc:
            raise ApiError(401, "INVALID_LICENSE", f"The license key is not valid ({exc.reason}).") from exc

    def require_admin(self, authorization: str | None) -> None:
        if self.admin_token is None:
            raise ApiError(403, "FORBIDDEN", "Admin endpoints are disabled (no admin token configured).")
        given = (authorization or "")[7:] if (authorization or "").lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.admin_token.encode()):
            raise ApiError(401, "UNAUTHORIZED", "The admin token is required.")


Auth = Annotated[str | None, Header(alias="Authorization")]


def _require_admin(request: Request, authorization: Auth = None) -> None:
    request.app.state.server.require_admin(authorization)


Admin = Annotated[None, Depends(_require_admin)]


def create_server_app(server: LicenseServer) -> FastAPI:
    app = FastAPI(title="kubespeech reference license server", docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"code": exc.code, "message": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        return JSONResponse(
            {"code": "INVALID_PARAMETER", "message": "The request body is not valid.", "errors": errors[:20]},
            status_code=422,
        )

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", extra={"path": request.url.path, "error": type(exc).__name__})
        return JSONResponse({"code": "INTERNAL_ERROR", "message": "Internal error."}, status_code=500)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/checkin")
    async def checkin(body: CheckinRequest, authorization: Auth = None) -> dict[str, Any]:
        claims = server.licensee(authorization)
        if claims.lid != body.license_id:
            raise ApiError(403, "LICENSE_MISMATCH", "license_id does not match the license key.")
        server.db.execute(
            "INSERT OR REPLACE INTO checkins VALUES (?, ?, ?, ?)",
            (claims.lid, body.instance or "", claims.customer, time.time()),
        )
        reason = server.revocation(claims.lid)
        if reason is not None:
            return {"status": "revoked", "message": reason, "server_time": iso(time.time())}
        answer: dict[str, Any] = {"status": "active", "server_time": iso(time.time())}
        row = server.db.execute("SELECT token FROM terms WHERE license_id = ?", (claims.lid,)).fetchone()
        presented = (authorization or "")[7:].strip()
        if row is not None and row[0] != presented:
            answer["token"] = row[0]  # updated terms: the proxy adopts them if newer and validly signed
        return answer

    @app.post("/v1/usage")
    async def usage(body: UsageBatch, authorization: Auth = None) -> dict[str, int]:
        claims = server.licensee(authorization)
        if claims.lid != body.license_id:
            raise ApiError(403, "LICENSE_MISMATCH", "license_id does not match the license key.")
        if len(body.events) > server.max_events:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", f"At most {server.max_events} events per request.")
        accepted, duplicates = server.ingest(claims.lid, body.events)
        return {"accepted": accepted, "duplicates": duplicates}

    @app.post("/v1/usage/import")
    async def usage_import(request: Request, _: Admin) -> dict[str, Any]:
        """Ingest an air-gapped export file (the vendor uploads what the customer sent)."""
        try:
            doc = await request.json()
            claims, install_key, raw_events = verify_export(doc, server.public_key)
            events = [UsageEvent.model_validate(e) for e in raw_events]
        except (ValueError, ExportError, ValidationError) as exc:
            message = str(exc) if isinstance(exc, ExportError) else "The file is not a valid usage export."
            raise ApiError(422, "INVALID_EXPORT", message) from exc
        server.db.execute("INSERT OR IGNORE INTO export_keys VALUES (?, ?)", (claims.lid, install_key))
        pinned = server.db.execute(
            "SELECT installation_key FROM export_keys WHERE license_id = ?", (claims.lid,)
        ).fetchone()[0]
        if pinned != install_key:
            raise ApiError(422, "INVALID_EXPORT", "The file was signed by a different installation key.")
        accepted, duplicates = server.ingest(claims.lid, events)
        return {"license_id": claims.lid, "accepted": accepted, "duplicates": duplicates}

    @app.put("/v1/licenses/{license_id}/token")
    async def set_terms(license_id: str, body: Terms, _: Admin) -> dict[str, str]:
        """Deliver updated terms (a newer license key for the same license) at the next check-in."""
        try:
            claims = verify_signature(body.token, server.public_key)
        except TokenError as exc:
            raise ApiError(422, "INVALID_LICENSE", f"The license key is not valid ({exc.reason}).") from exc
        if claims.lid != license_id:
            raise ApiError(422, "LICENSE_MISMATCH", "The license key belongs to another license.")
        server.db.execute(
            "INSERT OR REPLACE INTO terms VALUES (?, ?, ?)", (license_id, body.token.strip(), time.time())
        )
        return {"license_id": license_id, "status": "updated", "expires_at": iso(claims.exp) or ""}

    @app.get("/v1/revocations")
    async def revocations() -> dict[str, list[str]]:
        rows = server.db.execute("SELECT license_id FROM revocations ORDER BY license_id").fetchall()
        return {"revoked": [r[0] for r in rows]}

    @app.post("/v1/revocations", status_code=201)
    async def revoke(body: Revocation, _: Admin) -> dict[str, str]:
        server.revoke(body.license_id, body.reason)
        return {"license_id": body.license_id, "status": "revoked"}

    @app.delete("/v1/revocations/{license_id}")
    async def unrevoke(license_id: str, _: Admin) -> dict[str, str]:
        if not server.unrevoke(license_id):
            raise ApiError(404, "NOT_FOUND", "That license is not revoked.")
        return {"license_id": license_id, "status": "active"}

    @app.get("/v1/usage/summary")
    async def summary(license_id: str, _: Admin) -> dict[str, Any]:
        row = server.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(audio_seconds), 0), COALESCE(SUM(characters), 0) "
            "FROM events WHERE license_id = ?",
            (license_id,),
        ).fetchone()
        return {"license_id": license_id, "events": row[0], "audio_seconds": row[1], "characters": row[2]}

    @app.get("/v1/usage/events")
    async def events(license_id: str, _: Admin, limit: int = 10000) -> dict[str, Any]:
        cur = server.db.execute(
            "SELECT event_id, ts, feature, model, audio_seconds, characters, status_code FROM events "
            "WHERE license_id = ? ORDER BY ts LIMIT ?",
            (license_id, limit),
        )
        names = ["id", "ts", "feature", "model", "audio_seconds", "characters", "status_code"]
        return {"events": [dict(zip(names, row, strict=True)) for row in cur.fetchall()]}

    return app
