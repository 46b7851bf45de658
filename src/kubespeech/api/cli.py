"""The ``kubespeech api`` command: serve the API with uvicorn (uvloop + httptools)."""

from __future__ import annotations

from typing import Annotated

import typer

from kubespeech.config import LogSettings


def register(app: typer.Typer) -> None:
    @app.command("api")
    def api(
        host: Annotated[str | None, typer.Option(help="Address to bind (KUBESPEECH_API_HOST).")] = None,
        port: Annotated[int | None, typer.Option(help="Port (KUBESPEECH_API_PORT, default 7100).")] = None,
        api_key: Annotated[
            list[str] | None, typer.Option("--api-key", help="Accept this key too (development).")
        ] = None,
    ) -> None:
        """Run the API server (Smallest Waves v1, legacy self-host and OpenAI audio surfaces)."""
        import uvicorn
        from pydantic import SecretStr

        from kubespeech.api.app import create_app
        from kubespeech.api.middleware import install_request_id_logging
        from kubespeech.api.settings import ApiSettings
        from kubespeech.logging_setup import setup_logging

        setup_logging(LogSettings().level)
        install_request_id_logging()
        settings = ApiSettings()
        if host is not None:
            settings.host = host
        if port is not None:
            settings.port = port
        if api_key:
            settings.api_keys = [*settings.api_keys, *(SecretStr(k) for k in api_key)]
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            access_log=False,
            log_config=None,
            server_header=False,
            timeout_graceful_shutdown=30,
        )
