"""``kubespeech model fetch``: download a model into a cache directory (what the operator's model-cache Job runs)."""

from __future__ import annotations

import typer

from kubespeech.config import LogSettings

EXIT_CODES_HELP = (
    "Exit codes: 0 fetched or already present; 2 bad source or arguments; 3 not found (404); "
    "4 access denied (401/403); 5 checksum or size mismatch; 6 no space left; 7 network failure after "
    "retries (run again to resume)."
)


def register(app: typer.Typer) -> None:
    model_app = typer.Typer(help="Model files: fetch models into a cache directory.", no_args_is_help=True)

    @model_app.command("fetch", epilog=EXIT_CODES_HELP)
    def fetch_command(
        source: str = typer.Argument(
            ...,
            help="hf://org/name (optionally /file and @revision), ngc://org/team/model:version (optionally "
            "/file), https://..., s3://bucket/key or s3://bucket/prefix/, or a local path.",
        ),
        to: str = typer.Option(..., "--to", help="Destination directory (created if missing)."),
        sha256: str = typer.Option(None, "--sha256", help="Expected sha256 of a single-file source."),
        name: str = typer.Option(None, "--name", help="File name to save a single-file source as."),
        include: str = typer.Option(None, "--include", help="Only files matching this glob (e.g. '*.nemo')."),
        retries: int = typer.Option(5, "--retries", min=0, help="Resume attempts after network failures."),
        timeout: float = typer.Option(
            30.0, "--timeout", min=1.0, help="Network timeout per request (seconds)."
        ),
        log_level: str = typer.Option(LogSettings().level, help="Log level."),
    ) -> None:
        """Download SOURCE into --to: resumable, checksum-verified, atomic; a no-op when already there.

        Prints the path of each file fetched, one per line.
        """
        import sys

        from kubespeech.logging_setup import setup_logging
        from kubespeech.models.fetch import FetchError, Progress, fetch

        setup_logging(log_level, json=not sys.stderr.isatty())
        try:
            result = fetch(
                source, to, sha256=sha256, name=name, include=include, retries=retries, timeout_s=timeout,
                progress=Progress(),
            )  # fmt: skip
        except FetchError as exc:
            typer.echo(f"model fetch failed: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        if not result.downloaded:
            typer.echo(f"already present in {to}", err=True)
        for path in result.paths:
            typer.echo(str(path))

    app.add_typer(model_app, name="model")
