"""The project's layout: the core does not reach up into the faces, every package names its modules,
and production code imports without the developer extras (moto, matplotlib, faiss).

Core is hashlake/ without hashlake/cli (the command) and hashlake/local (the local stack, the demo):
the encode workers, the intake, beat and the retraining job import it, and it imports none of them.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FACES = ("hashlake/cli", "hashlake/local")
UPWARD = ("workers", "scheduler", "hashlake.cli", "hashlake.local")
PACKAGES = ("hashlake", "hashlake/local", "hashlake/cli", "hashlake/index", "hashlake/lake", "hashlake/native",
            "hashing_models", "hashing_models/losses", "hashing_models/backbones", "workers", "workers/encode",
            "workers/intake", "scheduler", "scheduler/retrain")
EXTRAS = ("moto", "matplotlib", "faiss")


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def core_modules() -> list[Path]:
    return sorted(p for p in (ROOT / "hashlake").rglob("*.py")
                  if not any(relative(p).startswith(face + "/") for face in FACES))


def imported_names(path: Path) -> list[tuple[int, str]]:
    """Every absolute module name ``path`` imports (at module level or inside a function), with its line;
    ``from hashlake import local`` counts as ``hashlake.local``."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append((node.lineno, node.module))
            names += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return names


def reaches_up(name: str) -> bool:
    return any(name == up or name.startswith(up + ".") for up in UPWARD)


def test_the_core_imports_neither_workers_scheduler_nor_the_faces():
    assert len(core_modules()) > 20  # the walk found the core
    found = [f"{relative(path)}:{line} imports {name}"
             for path in core_modules() for line, name in imported_names(path) if reaches_up(name)]
    assert not found, "the core reaches up:\n" + "\n".join(found)


def test_production_imports_no_face_and_the_models_import_nothing_of_the_service():
    """workers and scheduler run without the command or the local stack; hashing_models is a library
    of models alone (the service imports it, never the reverse)."""
    found = []
    for top, refused in (("workers", ("hashlake.cli", "hashlake.local")),
                         ("scheduler", ("hashlake.cli", "hashlake.local")),
                         ("hashing_models", ("hashlake", "workers", "scheduler"))):
        for path in sorted((ROOT / top).rglob("*.py")):
            found += [f"{relative(path)}:{line} imports {name}" for line, name in imported_names(path)
                      if any(name == r or name.startswith(r + ".") for r in refused)]
    assert not found, "\n".join(found)


def test_the_upward_check_sees_function_level_and_from_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from hashlake import local\n"
                      "def f():\n    from scheduler.submit import submit_retrain\n    import workers.tasks\n")
    upward = {name for _, name in imported_names(module) if reaches_up(name)}
    assert {"hashlake.local", "scheduler.submit", "workers.tasks"} <= upward
    assert not reaches_up("hashlake") and not reaches_up("hashlake.local_things") and not reaches_up("workersx")


# --- every package names its modules ------------------------------------------------------------
def named_in(docstring: str) -> tuple[set[str], set[str]]:
    """The module files (``name.py``, not a path such as ``hashlake/local/stack.py``) and sub-packages
    (``name/``) a package docstring names."""
    modules = set(re.findall(r"(?<![\w./])(\w+\.py)\b", docstring))
    packages = set(re.findall(r"(?<![\w./])(\w+)/(?![\w/])", docstring))
    return modules, packages


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_docstring_names_every_module_it_holds(package):
    folder = ROOT / package
    init = folder / "__init__.py"
    assert init.is_file(), f"{package} is not a package"
    docstring = ast.get_docstring(ast.parse(init.read_text())) or ""
    modules, packages = named_in(docstring)
    on_disk = {p.name for p in folder.glob("*.py")} - {"__init__.py"}
    subpackages = {p.parent.name for p in folder.glob("*/__init__.py")}
    assert not on_disk - modules, f"{package}/__init__.py does not name {sorted(on_disk - modules)}"
    assert not modules - on_disk, f"{package}/__init__.py names modules that do not exist: {sorted(modules - on_disk)}"
    assert not subpackages - packages, f"{package}/__init__.py does not name {sorted(subpackages - packages)}"


def test_every_package_is_in_the_list():
    found = {relative(p.parent) for top in ("hashlake", "hashing_models", "workers", "scheduler")
             for p in (ROOT / top).rglob("__init__.py")}
    assert found == set(PACKAGES)


# --- production code imports without the developer extras ---------------------------------------
def production_modules() -> list[str]:
    """Dotted names of every module of the core, hashing_models, workers and scheduler (not the faces,
    not a ``__main__``, which runs when imported)."""
    paths = [*core_modules(), *(p for top in ("hashing_models", "workers", "scheduler")
                                for p in (ROOT / top).rglob("*.py"))]
    names = []
    for path in sorted(paths):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


BLOCKED_IMPORT = textwrap.dedent("""
    import importlib, sys

    BLOCKED = {blocked!r}

    class Unavailable:
        # as if the extras were not installed: importing one (or a submodule) raises ImportError
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is made unavailable by this test", name=name)
            return None

    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    sys.meta_path.insert(0, Unavailable())
    failed = []
    for module in {modules!r}:
        try:
            importlib.import_module(module)
        except Exception as exc:
            failed.append(f"{{module}}: {{exc.__class__.__name__}}: {{exc}}")
    leaked = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    print("\\n".join(failed))
    sys.exit(1 if failed or leaked else 0)
""")


def test_production_code_imports_without_moto_matplotlib_or_faiss():
    modules = production_modules()
    assert {"hashlake.sql", "workers.tasks", "scheduler.retrain.job", "hashing_models.trainer"} <= set(modules)
    out = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT.format(blocked=EXTRAS, modules=modules)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, f"modules that need an extra to import:\n{out.stdout}\n{out.stderr[-3000:]}"


def test_the_blocking_finder_refuses_an_extra():
    code = BLOCKED_IMPORT.format(blocked=("json",), modules=["json"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "json: ImportError" in out.stdout, out.stdout + out.stderr


def test_a_missing_extra_is_one_clear_error():
    from hashlake.extras import MissingExtra, require

    code = BLOCKED_IMPORT.format(blocked=EXTRAS, modules=[])
    probe = code.replace("sys.exit(1 if failed or leaked else 0)", textwrap.dedent("""
        from hashlake.extras import MissingExtra, require
        try:
            require("matplotlib", "plotting a report")
        except MissingExtra as exc:
            print(exc)
    """))
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "plotting a report needs matplotlib, which is not installed: pip install 'hashlake[bench]'" in out.stdout, \
        out.stdout + out.stderr
    assert issubclass(MissingExtra, ImportError) and require("json", "x").dumps([]) == "[]"


def without_extras(snippet: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``snippet`` in a fresh interpreter in which moto, matplotlib and faiss cannot be imported."""
    code = BLOCKED_IMPORT.format(blocked=EXTRAS, modules=[]).replace(
        "sys.exit(1 if failed or leaked else 0)", textwrap.dedent(snippet))
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"})


def test_report_out_without_matplotlib_is_one_line_naming_the_extra(tmp_path):
    out = without_extras("""
        from hashlake.cli import app
        app(sys.argv[1:], prog_name="hashlake")
    """, "report", "--out", str(tmp_path / "report"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: `hashlake report --out` (its pr_curve.png) needs matplotlib, which is not installed: "
        "pip install 'hashlake[bench]'"], out.stderr
    assert not (tmp_path / "report").exists()


def test_the_stacks_s3_server_without_moto_says_which_extra(tmp_path):
    out = without_extras("""
        from hashlake.local.services import ServiceError, free_port, start_moto
        try:
            start_moto(free_port(), __import__("pathlib").Path(sys.argv[1]))
        except ServiceError as exc:
            print(exc)
    """, str(tmp_path))
    assert out.stdout.strip() == ("the local stack's S3 server needs moto, which is not installed: "
                                  "pip install 'hashlake[local]'"), out.stdout + out.stderr
    served = without_extras("""
        from hashlake.local import s3_server
        s3_server.main(["-p", "1"])
    """)
    assert served.returncode == 1 and served.stderr.strip().splitlines() == [
        "error: the local stack's S3 server needs moto, which is not installed: pip install 'hashlake[local]'"], \
        served.stderr
