"""The `hashlake` command's error contract: a user error is one line on stderr and exit status 1.

A user error is what a person causes and can fix (a service not running, a missing model, a non-image,
a bad query, file or setting); a bug keeps its traceback. ``OneLineErrors`` is the command group's
class, so every command (and ``typer.testing.CliRunner``) goes through it.
"""
from __future__ import annotations

import os
from typing import NoReturn

import click
import typer
from typer.core import TyperGroup

# Set to see the traceback behind a one-line error.
TRACEBACK_ENV = "HASHLAKE_TRACEBACK"


def user_errors() -> tuple[type[BaseException], ...]:
    """What a person causes and can fix (a service not running, a missing model, a bad file or query,
    a bad setting), as opposed to a bug, which keeps its traceback. Imported when needed: redis,
    duckdb and pydantic are not loaded for `--help`."""
    import duckdb
    import redis
    from kombu.exceptions import OperationalError
    from pydantic import ValidationError

    from hashing_models.decode import UndecodableImage
    from hashlake.catalog import ModelNotFound
    from hashlake.extras import MissingExtra
    from hashlake.local.services import ServiceError
    from hashlake.store import StoreError
    from scheduler.submit import SubmitError

    return (StoreError, SubmitError, ModelNotFound, MissingExtra, UndecodableImage, ServiceError, FileNotFoundError, FileExistsError,
            NotADirectoryError, PermissionError, ValueError, ValidationError, redis.RedisError, OperationalError,
            duckdb.Error)


def one_line(exc: BaseException) -> str:
    """The error's message on one line: DuckDB's Python-UDF stack ("\n\nAt:\n  file(line): function")
    and its wrapper words dropped, pydantic's per-field lines joined, whitespace collapsed."""
    from pydantic import ValidationError

    from hashlake.store import StoreUnavailable

    if isinstance(exc, ValidationError):
        problems = [f"{'.'.join(map(str, e['loc'])) or '?'}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()]
        return f"invalid settings (HASHLAKE_* variables or the config file): {'; '.join(problems)}"
    text = str(exc).split("\n\nAt:\n", 1)[0]
    text = " ".join(text.replace("Python exception occurred while executing the UDF: ", "").split())
    where = ("object store" if isinstance(exc, StoreUnavailable)
             else "Redis" if exc.__class__.__module__.startswith(("redis", "kombu")) else None)
    if where:
        text += (f"; is the {where} running? (`hashlake stack status` for the local stack; HASHLAKE_CONFIG or "
                 f"HASHLAKE_* variables say where it is)")
    return text


class OneLineErrors(TyperGroup):
    """The command group's error contract: a user error (``user_errors``) is one line on stderr,
    ``error: <message>``, and exit status 1, never a traceback (unless ``HASHLAKE_TRACEBACK`` is set)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if isinstance(exc, click.exceptions.ClickException | click.exceptions.Exit | click.exceptions.Abort):
                raise
            if os.environ.get(TRACEBACK_ENV) or not isinstance(exc, user_errors()):
                raise
            fail(one_line(exc))


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr, unwrapped (one line whatever the terminal width); exit 1."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)
