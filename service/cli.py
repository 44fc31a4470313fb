"""The ``kgdx`` command root: each package mounts its own commands here."""

from __future__ import annotations

from typing import Annotated

import typer

from kg.cli import app as ontology_app
from models.cli import evaluate, train
from service.apikey_cli import app as apikey_app
from service.commands import predict, serve
from service.doctor_cli import doctor

app = typer.Typer(
    name="kgdx",
    help="Knowledge-graph-augmented diagnosis of medical images.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(ontology_app, name="ontology")
app.command("train")(train)
app.command("evaluate")(evaluate)
app.add_typer(apikey_app, name="apikey")
app.command("serve")(serve)
app.command("predict")(predict)
app.command("doctor")(doctor)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"kgdx {version('kgdx')}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Knowledge-graph-augmented diagnosis of medical images."""


def main() -> None:
    """Console-script entry point."""
    app()
