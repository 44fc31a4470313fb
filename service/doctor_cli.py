"""``kgdx doctor``: the command over :func:`service.doctor.examine`.

It examines the home and database the service uses (``$KGDX_HOME``, ``$KGDX_DB_URL``) with
the service's own settings (``KGDX_STABLE_SECONDS``, ``KGDX_JOB_MAX_ATTEMPTS``,
``KGDX_SR_DESTINATION_URL``), prints a table per check and one line per finding (or JSON),
and exits 0 when healthy, 1 when problems are left (after the repairs, with ``--repair``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from kg.console import handle_errors, print_json
from kg.errors import KgError

if TYPE_CHECKING:
    from service.doctor import DoctorReport

GraceOpt = Annotated[
    float | None,
    typer.Option(
        "--grace",
        help="Files younger than this many seconds may belong to a request in progress and "
        "are left alone [3600, as the service; 0 with the service stopped].",
        min=0.0,
    ),
]


@handle_errors
def doctor(
    repair: Annotated[
        bool, typer.Option("--repair", help="Fix what is safe to fix, and say what was done.")
    ] = False,
    json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    grace: GraceOpt = None,
    no_hash: Annotated[
        bool,
        typer.Option("--no-hash", help="Compare file sizes only; do not read every file."),
    ] = False,
) -> None:
    """Check that the database and the files under $KGDX_HOME agree; --repair fixes them.

    Exit code 0 when healthy, 1 when problems are left.

    Example: kgdx doctor --repair
    """
    from kg.home import kgdx_home
    from service.db import ServiceDatabase
    from service.doctor import examine
    from service.instances import SPOOL_MAX_AGE_S
    from service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in e.errors()
        )
        raise KgError(f"invalid settings: {problems}") from None
    with ServiceDatabase(settings.db_url) as db:
        db.create_all()
        report = examine(
            db,
            kgdx_home(),
            repair=repair,
            grace_s=SPOOL_MAX_AGE_S if grace is None else grace,
            stable_seconds=settings.stable_seconds,
            verify_hashes=not no_hash,
            destination_configured=settings.sr_destination_url is not None,
            max_attempts=settings.job_max_attempts,
        )
    if json:
        print_json(report.to_dict())
    else:
        _print(report)
    if not report.healthy:
        raise typer.Exit(code=1)


def _print(report: DoctorReport) -> None:
    out = Console(highlight=False)
    out.print(f"kgdx doctor: {report.home} ({report.database})")
    table = Table("check", "found", "repaired", "left", "notes")
    for check, row in report.by_check().items():
        if not any(row.values()):
            table.add_row(check, "ok", "", "", "")
            continue
        table.add_row(
            check,
            str(row["found"]),
            str(row["repaired"]) if report.repair else "-",
            str(row["left"]),
            str(row["notes"]) if row["notes"] else "",
        )
    out.print(table)
    for f in report.findings:
        tag = "note" if not f.problem else "repaired" if f.repaired else "problem"
        action = f" -> {f.action}" if f.action else " (no automatic repair)" if f.problem else ""
        # One line per finding, unwrapped, so that it can be grepped.
        out.print(f"{tag:8s} {f.check}: {f.subject}: {f.detail}{action}", soft_wrap=True)
    out.print(report.summary(), soft_wrap=True)
