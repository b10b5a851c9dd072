"""Builds the ``hashlake_hamming`` DuckDB extension from ``src/`` (C, one file per role) for the installed DuckDB.

    python -m hashlake.native.build          # what `make setup` runs; a no-op when up to date

The extension uses DuckDB's C extension API, so it compiles against two headers alone (``duckdb.h``,
``duckdb_extension.h``), not against DuckDB's sources. The headers come from the source
distribution of the installed DuckDB version on PyPI (checked against the index's sha256), cached
under ``~/.cache/hashlake/duckdb-include/<version>/``; offline, point ``HASHLAKE_DUCKDB_INCLUDE`` at a
folder holding the two headers.

DuckDB reads a 512-byte footer at the end of an extension file before loading it: eight 32-byte
fields, stored last field first (magic "4", platform, C API version, extension version, ABI type,
three unused), then a 256-byte signature. This build is unsigned, so connections that load it are
opened with ``allow_unsigned_extensions`` (``hashlake.native.loader``).

The output lands in ``hashlake/native/_build/`` beside a stamp of what it was built from (source,
headers, DuckDB version, platform); a changed stamp rebuilds. Concurrent builders (test workers,
several processes starting at once) serialize on a lock file.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import platform
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import duckdb

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SOURCE_DIR = HERE / "src"  # *.c compiled together into one library; *.h their shared declarations
BUILD_DIR = HERE / "_build"
EXTENSION = BUILD_DIR / "hashlake_hamming.duckdb_extension"
STAMP = BUILD_DIR / "hashlake_hamming.stamp"
HEADERS = ("duckdb.h", "duckdb_extension.h")
C_API_VERSION = "v1.2.0"  # the stable C extension API src/ is written against (its default)
EXTENSION_VERSION = "v1"
PYPI_SIMPLE = "https://pypi.org/simple/duckdb/"
CFLAGS = ("-O3", "-std=gnu11", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall", "-Werror")
# x86-64 CPUs since 2008 have POPCNT; without the flag every popcount is a library call (~5x slower
# here). AVX-512 is chosen at run time, per CPU, not by a flag.
ARCH_CFLAGS = ("-mpopcnt",) if platform.machine() in ("x86_64", "AMD64") else ()


class BuildError(RuntimeError):
    """The extension could not be built; the message says which step failed and how to fix it."""


def ensure_built() -> Path:
    """The extension file for the installed DuckDB, built first when missing or stale."""
    BUILD_DIR.mkdir(exist_ok=True)
    with open(BUILD_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        include = _include_dir()
        stamp = _stamp(include)
        if EXTENSION.is_file() and STAMP.is_file() and STAMP.read_text() == stamp:
            return EXTENSION
        _compile(include)
        STAMP.write_text(stamp)
        return EXTENSION


def _platform() -> str:
    return duckdb.sql("PRAGMA platform").fetchone()[0]


def sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.c"))


def _stamp(include: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.glob("*.[ch]")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for name in HEADERS:
        digest.update((include / name).read_bytes())
    digest.update(" ".join([duckdb.__version__, _platform(), C_API_VERSION, *CFLAGS, *ARCH_CFLAGS]).encode())
    return digest.hexdigest()


def _compile(include: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise BuildError("no C compiler found (cc or gcc, or set CC): the hashlake_hamming DuckDB extension "
                         "is compiled at setup; install gcc (Debian: apt-get install gcc)")
    with tempfile.TemporaryDirectory(dir=BUILD_DIR) as tmp:
        out = Path(tmp) / EXTENSION.name
        cmd = [compiler, *CFLAGS, *ARCH_CFLAGS, f"-I{include}", f"-I{SOURCE_DIR}", "-o", str(out),
               *map(str, sources()), "-lpthread"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"compiling {SOURCE_DIR} failed ({' '.join(cmd)}):\n{done.stderr}")
        with open(out, "ab") as f:
            f.write(footer(_platform()))
        os.replace(out, EXTENSION)  # atomic: a process loading it sees the old file or the new one
    log.info("built %s for DuckDB %s", EXTENSION, duckdb.__version__)


def footer(platform: str) -> bytes:
    """The 512-byte metadata footer DuckDB checks before loading an extension built on the C API."""
    fields = ["4", platform, C_API_VERSION, EXTENSION_VERSION, "C_STRUCT", "", "", ""]
    encoded = []
    for value in fields:
        raw = value.encode()
        if len(raw) > 32:
            raise BuildError(f"extension metadata field {value!r} is longer than 32 bytes")
        encoded.append(raw.ljust(32, b"\0"))
    return b"".join(reversed(encoded)) + b"\0" * 256


def _include_dir() -> Path:
    configured = os.environ.get("HASHLAKE_DUCKDB_INCLUDE")
    if configured:
        path = Path(configured).expanduser()
        missing = [h for h in HEADERS if not (path / h).is_file()]
        if missing:
            raise BuildError(f"HASHLAKE_DUCKDB_INCLUDE={configured} lacks {', '.join(missing)}")
        return path
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hashlake" / "duckdb-include"
    path = cache / duckdb.__version__
    if all((path / h).is_file() for h in HEADERS):
        return path
    _fetch_headers(duckdb.__version__, path)
    return path


def _fetch_headers(version: str, dest: Path) -> None:
    """Take duckdb.h and duckdb_extension.h out of DuckDB's sdist on PyPI (sha256-checked)."""
    name = f"duckdb-{version}.tar.gz"
    try:
        index = urllib.request.urlopen(PYPI_SIMPLE, timeout=60).read().decode()
        match = re.search(r'href="([^"#]*/' + re.escape(name) + r')#sha256=([0-9a-f]{64})"', index)
        if not match:
            raise BuildError(f"{PYPI_SIMPLE} lists no {name}")
        url, sha256 = match.groups()
        body = urllib.request.urlopen(url, timeout=300).read()
    except OSError as exc:
        raise BuildError(f"cannot download DuckDB {version}'s headers from PyPI ({exc}); offline, set "
                         f"HASHLAKE_DUCKDB_INCLUDE to a folder with {' and '.join(HEADERS)}") from exc
    if hashlib.sha256(body).hexdigest() != sha256:
        raise BuildError(f"{url} does not match the sha256 the index gives")
    found = {}
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        for member in tar:
            base = member.name.rsplit("/", 1)[-1]
            if base in HEADERS and member.name.endswith(f"duckdb/src/include/{base}"):
                found[base] = tar.extractfile(member).read()
    if set(found) != set(HEADERS):
        raise BuildError(f"{name} lacks {set(HEADERS) - set(found)}")
    dest.mkdir(parents=True, exist_ok=True)
    for base, data in found.items():
        tmp = dest / f".{base}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, dest / base)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_built())
