"""What the commands print through: one rich ``console`` (stdout) and ``print_relation`` for SQL results."""
from __future__ import annotations

from rich.console import Console
from rich.table import Column, Table

console = Console()


def print_relation(columns: list[str], rows: list[tuple]) -> None:
    # a narrow terminal wraps values inside their cells rather than cutting them to "…": SQL output is data
    table = Table(*(Column(name, overflow="fold") for name in columns))
    for row in rows:
        table.add_row(*(v.hex() if isinstance(v, bytes) else str(v) for v in row))
    console.print(table)
