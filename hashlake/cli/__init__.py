"""The `hashlake` command: the local stack, the intake, models, SQL, search and the demo.

Settings come from ``hashlake.config.load_settings``: ``HASHLAKE_*`` variables and the TOML file
``HASHLAKE_CONFIG``; when that is unset and a local stack runs from ``.hashlake/``, its ``stack.toml``
(as for ``hashlake.sql.connect()``), so commands run after ``hashlake stack up`` talk to that stack
without further setup.

A user error (a service not running, a missing model, a non-image, a bad query or setting) is one line
on stderr, ``error: ...``, and exit status 1; ``HASHLAKE_TRACEBACK=1`` shows the traceback behind it.

``app`` (the ``hashlake`` script, ``python -m hashlake.cli``) is assembled here from one module per
command group; each imports what its commands need inside them, so ``--help`` stays cheap:

    __main__.py  ``python -m hashlake.cli``: runs ``app``
    errors.py    the error contract: ``OneLineErrors`` (the group class), ``one_line``, ``fail``
    output.py    the shared rich ``console`` and ``print_relation`` (SQL results as a table)
    local.py     ``hashlake stack up|down|status`` and ``hashlake demo``: the local stack
    intake.py    ``hashlake intake`` (run it), ``intake dead-letters`` and ``hashlake reconcile``
    lake.py      ``hashlake lake init|compact``
    model.py     ``hashlake model init|publish|promote|list|activate|rollback|gc``: model versions
    report.py    ``hashlake report``: retrieval figures of versions over the lake, ``--out`` writes them
    retrain.py   ``hashlake retrain`` (submit a run to Ray) and ``hashlake jobs`` (the runs so far)
    data.py      ``hashlake upload``, ``hashlake sql`` and ``hashlake search``
"""
from __future__ import annotations

import typer

from hashlake.cli import data, intake, lake, local, model, report, retrain
from hashlake.cli.errors import OneLineErrors

app = typer.Typer(help="hashlake: deep-hashing image retrieval over object storage, queried with SQL.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineErrors)
app.add_typer(local.stack_app, name="stack")
app.add_typer(intake.intake_app, name="intake")
app.add_typer(model.model_app, name="model")
app.add_typer(lake.lake_app, name="lake")
for command in (intake.reconcile, report.report, retrain.retrain, retrain.jobs, data.upload, data.sql, data.search,
                local.demo):
    app.command()(command)

__all__ = ["app"]
