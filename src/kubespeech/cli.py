"""The ``kubespeech`` command line: one entry point, one subcommand per component (each image runs one).

Each component module owns its commands through a ``register(app)`` function; heavy imports (engines,
kopf, NeMo) happen inside the commands, so ``kubespeech --help`` stays fast.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="kubespeech",
    help="Self-hosted speech AI stack for Kubernetes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Self-hosted speech AI stack for Kubernetes: one entry point, one subcommand per component."""


# Modules that contribute commands, in the order they appear in --help.
_COMMAND_MODULES = [
    "kubespeech.dev",
    "kubespeech.api.cli",
    "kubespeech.worker.cli",
    "kubespeech.license.cli",
    "kubespeech_operator.cli",
    "kubespeech.models.cli",
    "kubespeech.bench.cli",
]


def _register_all() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A component whose package is absent from this image simply has no commands here.
            if exc.name and (exc.name == name or name.startswith(exc.name + ".")):
                continue
            raise
        module.register(app)


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
