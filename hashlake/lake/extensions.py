"""DuckDB extensions from their PyPI packages (``duckdb-extension-<name>``, the same version as ``duckdb``):
DuckDB cannot download extensions here, and a pinned wheel is the same file on every machine."""
from __future__ import annotations

import importlib
from pathlib import Path

import duckdb

# extension name → the module of its PyPI package
PACKAGES = {"httpfs": "duckdb_extension_httpfs", "postgres_scanner": "duckdb_extension_postgres_scanner",
            "ducklake": "duckdb_extension_ducklake"}
LAKE_EXTENSIONS = ("httpfs", "postgres_scanner", "ducklake")


def extension_path(name: str) -> Path:
    module = PACKAGES[name]
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise FileNotFoundError(f"DuckDB extension {name!r} is not installed: "
                                f"pip install {module.replace('_', '-')}=={duckdb.__version__}") from None
    path = Path(package.__file__).parent / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the installed {module} does not match duckdb "
                                f"{duckdb.__version__}; pip install {module.replace('_', '-')}=={duckdb.__version__}")
    return path


def load(con: duckdb.DuckDBPyConnection, names: tuple[str, ...] = LAKE_EXTENSIONS) -> None:
    for name in names:
        con.execute(f"LOAD '{extension_path(name)}'")
