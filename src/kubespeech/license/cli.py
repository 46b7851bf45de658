"""Commands: ``kubespeech license keygen|issue|inspect|usage-export``, ``license-proxy``, ``license-server``."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from kubespeech.config import LogSettings
from kubespeech.license import constants

license_app = typer.Typer(
    name="license", help="Vendor tooling for signed license keys.", no_args_is_help=True, add_completion=False
)


def _utc_date(text: str, option: str) -> dt.datetime:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=dt.UTC)
    except ValueError as exc:
        raise typer.BadParameter(f"expected YYYY-MM-DD, got {text!r}", param_hint=option) from exc


def _parse_limits(items: list[str]) -> dict[str, float | int]:
    limits: dict[str, float | int] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in constants.LIMIT_KEYS:
            raise typer.BadParameter(
                f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(constants.LIMIT_KEYS)}",
                param_hint="--limit",
            )
        try:
            number = float(value)
        except ValueError as exc:
            raise typer.BadParameter(f"{item!r}: VALUE must be a number", param_hint="--limit") from exc
        if number < 0:
            raise typer.BadParameter(f"{item!r}: VALUE must not be negative", param_hint="--limit")
        limits[key] = number if key == "audio_hours_per_day" else int(number)
    return limits


@license_app.command()
def keygen(
    private_key: Annotated[
        Path, typer.Option(help="Where to write the vendor private key (PEM, mode 0600).")
    ],
    public_key: Annotated[Path, typer.Option(help="Where to write the public key to ship to customers.")],
    force: Annotated[bool, typer.Option(help="Overwrite existing files.")] = False,
) -> None:
    """Create a vendor Ed25519 key pair for signing license keys."""
    from kubespeech.license import token as tokens

    for path in (private_key, public_key):
        if path.exists() and not force:
            typer.echo(f"error: {path} exists (use --force to overwrite)", err=True)
            raise typer.Exit(1)
    key = tokens.generate_private_key()
    fd = os.open(private_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(tokens.private_key_pem(key))
    public_key.write_bytes(tokens.public_key_pem(key.public_key()))
    typer.echo(
        f"wrote {private_key} (keep secret) and {public_key}; key id {tokens.key_id(key.public_key())}"
    )


@license_app.command()
def issue(
    private_key: Annotated[Path, typer.Option(help="Vendor private key (PEM).")],
    customer: Annotated[str, typer.Option(help="Customer name.")],
    expires: Annotated[
        str, typer.Option(help="Last day of validity, YYYY-MM-DD (valid through 23:59:59 UTC).")
    ],
    features: Annotated[str, typer.Option(help="Comma-separated: asr,tts,streaming.")] = "asr,tts,streaming",
    limit: Annotated[
        list[str] | None,
        typer.Option(help=f"KEY=VALUE, repeatable; keys: {', '.join(constants.LIMIT_KEYS)}."),
    ] = None,
    offline: Annotated[bool, typer.Option(help="Air-gapped: the proxy never calls out.")] = False,
    online: Annotated[
        bool, typer.Option(help="Online required: only a missed check-in or two is tolerated.")
    ] = False,
    grace_hours: Annotated[
        float, typer.Option(help="Service without a check-in for this long (default mode).")
    ] = constants.DEFAULT_GRACE_HOURS,
    upstream: Annotated[str | None, typer.Option(help="License server URL the proxy checks in with.")] = None,
    not_before: Annotated[str | None, typer.Option(help="First day of validity, YYYY-MM-DD.")] = None,
    license_id: Annotated[str | None, typer.Option(help="License id (generated when unset).")] = None,
) -> None:
    """Sign a license key and print it."""
    from kubespeech.license import token as tokens

    if offline and online:
        raise typer.BadParameter("--offline and --online exclude each other")
    if grace_hours < 0:
        raise typer.BadParameter("must not be negative", param_hint="--grace-hours")
    try:
        key = tokens.load_private_key(private_key)
    except (OSError, ValueError) as exc:
        typer.echo(f"error: cannot read the private key: {type(exc).__name__}", err=True)
        raise typer.Exit(1) from exc
    exp = _utc_date(expires, "--expires") + dt.timedelta(days=1)
    nbf = _utc_date(not_before, "--not-before").timestamp() if not_before else None
    mode = "offline" if offline else "online" if online else "grace"
    try:
        claims = tokens.new_claims(
            signing_key=key,
            customer=customer,
            expires_at=exp.timestamp(),
            features=[f.strip() for f in features.split(",") if f.strip()],
            limits=_parse_limits(limit or []),
            checkin=tokens.CheckinPolicy(mode=mode, grace_hours=grace_hours),
            upstream=upstream,
            not_before=nbf,
            license_id=license_id,
        )
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if claims.exp <= claims.nbf:
        typer.echo("error: the license would expire before it becomes valid", err=True)
        raise typer.Exit(2)
    typer.echo(tokens.sign(claims, key))


@license_app.command()
def inspect(
    public_key: Annotated[Path, typer.Option(help="Vendor public key (PEM).")],
    token: Annotated[str, typer.Argument(help="The license key ('-' reads it from stdin).")],
    clock_skew_s: Annotated[
        float, typer.Option(help="Tolerated clock difference.")
    ] = constants.DEFAULT_CLOCK_SKEW_S,
) -> None:
    """Print a license key's claims; exit 0 only if it is validly signed and currently valid."""
    from kubespeech.license import token as tokens

    if token == "-":
        token = sys.stdin.read()
    try:
        key = tokens.load_public_key(public_key)
    except (OSError, ValueError) as exc:
        typer.echo(f"invalid: cannot read the public key ({type(exc).__name__})", err=True)
        raise typer.Exit(2) from exc
    try:
        claims = tokens.verify_signature(token, key)
    except tokens.TokenError as exc:
        typer.echo(f"invalid: {exc.reason}: {exc.message}", err=True)
        raise typer.Exit(1) from exc
    shown = claims.model_dump()
    for name in ("iat", "nbf", "exp"):
        shown[f"{name}_utc"] = tokens.iso(shown[name])
    typer.echo(json.dumps(shown, indent=2))
    try:
        tokens.check_times(claims, skew_s=clock_skew_s)
    except tokens.TokenError as exc:
        typer.echo(f"invalid: {exc.reason}: {exc.message}", err=True)
        raise typer.Exit(1) from exc
    if claims.kid == _dev_key_id():
        typer.echo("note: signed with the public DEVELOPMENT key", err=True)
    typer.echo("valid", err=True)


def _dev_key_id() -> str:
    from kubespeech.license.dev_keys import DEV_KEY_ID

    return DEV_KEY_ID


@license_app.command("usage-export")
def usage_export(
    out: Annotated[Path, typer.Option(help="File to write (signed JSON).")],
    keep: Annotated[bool, typer.Option(help="Leave the exported events in the buffer.")] = False,
    dev: Annotated[bool, typer.Option(help="Use the dev license (as `license-proxy --dev`).")] = False,
) -> None:
    """Export buffered usage as a signed file for the vendor (air-gapped licenses); settings as the proxy."""
    from kubespeech.config import RedisSettings
    from kubespeech.license.export import export_usage
    from kubespeech.license.proxy import LicenseProxy
    from kubespeech.license.settings import ProxySettings
    from kubespeech.redis_client import connect

    async def run() -> int:
        settings = ProxySettings(dev=True) if dev else ProxySettings()
        redis_settings = RedisSettings()
        redis = connect(redis_settings)
        proxy = LicenseProxy(settings, redis, key_prefix=redis_settings.key_prefix)
        try:
            proxy.load()
            if proxy.claims is None or proxy.token is None:
                reason = proxy.token_error.reason if proxy.token_error else "no_license"
                typer.echo(f"error: license key not usable: {reason}", err=True)
                raise typer.Exit(1)
            return await export_usage(
                redis, proxy.keys, token=proxy.token, claims=proxy.claims, out=out, keep=keep
            )
        finally:
            await proxy.aclose()
            await redis.aclose()

    count = asyncio.run(run())
    typer.echo(f"wrote {count} usage events to {out}")


def license_proxy(
    dev: Annotated[bool, typer.Option(help="Use the built-in dev license (offline, all features).")] = False,
    host: Annotated[str | None, typer.Option(help="Bind address (KUBESPEECH_LICENSE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (KUBESPEECH_LICENSE_PORT, default 3369).")] = None,
) -> None:
    """Run the license proxy (:3369): verifies the license, checks in, ships usage metadata upstream."""
    import uvicorn

    from kubespeech.config import RedisSettings
    from kubespeech.license.proxy import create_proxy_app
    from kubespeech.license.settings import ProxySettings
    from kubespeech.logging_setup import setup_logging
    from kubespeech.redis_client import connect

    setup_logging(LogSettings().level)
    overrides: dict[str, object] = {}
    if dev:
        overrides["dev"] = True
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    settings = ProxySettings(**overrides)  # type: ignore[arg-type]
    redis_settings = RedisSettings()
    app = create_proxy_app(
        settings,
        connect(redis_settings),
        key_prefix=redis_settings.key_prefix,
        close_redis=True,
        handle_sighup=True,
    )
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False, lifespan="on"
    )
    uvicorn.Server(config).run()


def license_server(
    public_key: Annotated[
        Path | None, typer.Option(help="Vendor public key (or KUBESPEECH_LICENSE_SERVER_PUBLIC_KEY_FILE).")
    ] = None,
    db: Annotated[str | None, typer.Option(help="SQLite file (default: in memory).")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 3370).")] = None,
) -> None:
    """Run the reference upstream license server (check-in, revocations, usage ingestion)."""
    import uvicorn

    from kubespeech.license import token as tokens
    from kubespeech.license.server import LicenseServer, create_server_app
    from kubespeech.license.settings import ServerSettings
    from kubespeech.logging_setup import setup_logging

    setup_logging(LogSettings().level)
    settings = ServerSettings()
    key_source: str | Path | None = public_key or settings.public_key or settings.public_key_file
    if key_source is None:
        typer.echo("error: the vendor public key is required (--public-key)", err=True)
        raise typer.Exit(2)
    try:
        key = tokens.load_public_key(key_source)
    except (OSError, ValueError) as exc:
        typer.echo(f"error: cannot read the public key ({type(exc).__name__})", err=True)
        raise typer.Exit(2) from exc
    admin_token = settings.admin_token_file.read_text().strip() if settings.admin_token_file else None
    server = LicenseServer(
        key,
        db=db or settings.db,
        admin_token=admin_token or None,
        revoked=[x.strip() for x in settings.revoked.split(",") if x.strip()],
        max_events_per_request=settings.max_events_per_request,
    )
    config = uvicorn.Config(
        create_server_app(server),
        host=host or settings.host,
        port=port if port is not None else settings.port,
        log_config=None,
        access_log=False,
    )
    uvicorn.Server(config).run()


def register(app: typer.Typer) -> None:
    app.add_typer(license_app, name="license")
    app.command("license-proxy")(license_proxy)
    app.command("license-server")(license_server)
