"""``kgdx apikey ...``: create, list and revoke the service's API keys.

The database is the service's: ``$KGDX_DB_URL``, else SQLite under ``$KGDX_HOME``. A new key
is printed once, as the last line of stdout, so ``kgdx apikey create ... | tail -n1`` captures
it; nothing else ever shows the secret again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kg.console import handle_errors, print_json

if TYPE_CHECKING:
    from service.apikeys import ApiKey, ApiKeyStore

app = typer.Typer(
    name="apikey",
    help="Create, list and revoke API keys for the kgdx service.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


@contextmanager
def _keys() -> Iterator[ApiKeyStore]:
    # Imported lazily so `kgdx --help` stays fast.
    from service.apikeys import ApiKeyStore
    from service.db import ServiceDatabase

    db = ServiceDatabase()
    try:
        db.create_all()
        yield ApiKeyStore(db)
    finally:
        db.close()


def _key_dict(key: ApiKey) -> dict[str, Any]:
    d = asdict(key)
    d["scopes"] = list(key.scopes)
    return d


@app.command()
@handle_errors
def create(
    name: Annotated[str, typer.Option("--name", "-n", help="A label for who uses the key.")],
    scope: Annotated[
        list[str],
        typer.Option("--scope", "-s", help="predict | ingest | admin (repeat for several)."),
    ],
    json: JsonOpt = False,
) -> None:
    """Create an API key and print it once, as the last line.

    Example: kgdx apikey create --name orthanc --scope ingest
    """
    with _keys() as keys:
        key, plaintext = keys.create(name, scope)
    if json:
        print_json({**_key_dict(key), "key": plaintext})
        return
    typer.echo(f"created API key {key.key_id} named {key.name!r}, scopes: {' '.join(key.scopes)}")
    typer.echo("store it now, it is not shown again; send it as 'Authorization: Bearer <key>'")
    typer.echo(plaintext)


@app.command("list")
@handle_errors
def list_(json: JsonOpt = False) -> None:
    """List API keys (ids, names, scopes, last use), never their secrets.

    Example: kgdx apikey list
    """
    with _keys() as keys:
        found = keys.list()
    if json:
        print_json({"keys": [_key_dict(k) for k in found]})
        return
    if not found:
        typer.echo("no API keys; create one with `kgdx apikey create --name N --scope predict`")
        return
    typer.echo(f"{'KEY ID':12s}  {'NAME':24s}  {'SCOPES':22s}  {'CREATED':19s}  LAST USED")
    for k in found:
        state = "  (revoked)" if k.revoked else ""
        typer.echo(
            f"{k.key_id:12s}  {k.name:24s}  {','.join(k.scopes):22s}  {k.created_at[:19]:19s}  "
            f"{(k.last_used_at or 'never')[:19]}{state}"
        )


@app.command()
@handle_errors
def revoke(
    key: Annotated[str, typer.Argument(help="Key id (from `kgdx apikey list`) or key name.")],
    json: JsonOpt = False,
) -> None:
    """Revoke an API key by id or name; it stops working at once.

    Example: kgdx apikey revoke orthanc
    """
    with _keys() as keys:
        revoked = keys.revoke(key)
    if json:
        print_json(_key_dict(revoked))
        return
    typer.echo(f"revoked API key {revoked.key_id} named {revoked.name!r}")
