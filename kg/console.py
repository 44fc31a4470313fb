"""Console plumbing shared by every package's CLI: errors, JSON output, progress bars.

Library code raises domain errors; the CLI turns them into ``Error: ...`` on stderr and exit
code 1, never a traceback (set ``KGDX_DEBUG=1`` to see one).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from typing import Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)

from kg.errors import KgError

P = ParamSpec("P")
R = TypeVar("R")

stderr = Console(stderr=True)

#: Exceptions whose message is safe and useful to show as is. Other packages add theirs.
USER_ERRORS: list[type[BaseException]] = [KgError, OSError, ValueError]


def fail(message: str) -> NoReturn:
    """Print ``Error: message`` on stderr and exit with code 1."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code=1)


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a CLI command so user errors end as ``Error: ...`` with exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            fail("interrupted")
        except tuple(USER_ERRORS) as exc:
            if os.environ.get("KGDX_DEBUG"):
                raise
            fail(_describe(exc))
        except Exception as exc:
            if os.environ.get("KGDX_DEBUG"):
                raise
            fail(f"internal error ({type(exc).__name__}): {exc}")

    return wrapper


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"no such file: {exc.filename}"
    if isinstance(exc, IsADirectoryError):
        return f"is a directory, not a file: {exc.filename}"
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename}"
    return str(exc) or type(exc).__name__


def print_json(data: Any) -> None:
    """Write ``data`` as indented JSON on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def progress_enabled(quiet: bool = False) -> bool:
    """Bars only when stderr is a terminal and the user did not ask for quiet."""
    return not quiet and sys.stderr.isatty()


@contextmanager
def _progress(
    description: str, columns: tuple[ProgressColumn, ...], quiet: bool
) -> Iterator[Callable[[int, int], None]]:
    if not progress_enabled(quiet):
        yield lambda done, total: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        *columns,
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def byte_progress(
    description: str, *, quiet: bool = False
) -> ContextManager[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback that draws a bar on stderr when it may."""
    return _progress(description, (DownloadColumn(),), quiet)


def step_progress(
    description: str, *, quiet: bool = False
) -> ContextManager[Callable[[int, int], None]]:
    """Like :func:`byte_progress` for counts of items."""
    return _progress(description, (TextColumn("{task.completed}/{task.total}"),), quiet)
