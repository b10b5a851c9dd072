"""The pinned requirements a deployment image installs, read from pyproject.toml, by role.

    python image_requirements.py pyproject.toml worker   # intake, encode workers, beat, the CLI
    python image_requirements.py pyproject.toml ray      # Ray head and worker nodes (retraining jobs)

``worker`` is the project's dependencies, none of its extras: ``local`` (the local stack's S3 server),
``bench`` (report plots, the benchmarks' faiss) and ``test`` are for a developer's machine
(``make setup``), and no production module needs them. It keeps Ray: the beat task and
``hashlake retrain`` submit jobs through Ray's Jobs client. ``ray`` adds every pinned ``ray`` requirement
that pyproject.toml declares (among the dependencies or in an optional group); the retraining job
writes no report plots (``scheduler.retrain.gate`` scores with ``hashlake.report``, figures only), so
it needs nothing of ``bench``. One list of pins, pyproject.toml's; this only selects from it.
"""
from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# The optional groups of pyproject.toml an image never installs.
DEVELOPER_EXTRAS = ("local", "bench", "test")
ROLES = ("worker", "ray")


def requirement_name(requirement: str) -> str:
    """``"celery[redis]==5.7.0"`` → ``"celery"`` (normalised as pip compares names)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: Path, role: str) -> list[str]:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    project = tomllib.loads(pyproject.read_text())["project"]
    base = project["dependencies"]
    extras = project.get("optional-dependencies", {})
    developer_only = {requirement_name(r) for group in DEVELOPER_EXTRAS for r in extras.get(group, [])}
    leaked = sorted(developer_only & {requirement_name(r) for r in base})
    if leaked:
        raise ValueError(f"{pyproject} lists {', '.join(leaked)} both among the dependencies and in a developer "
                         f"extra ({', '.join(DEVELOPER_EXTRAS)}): the images would install it")
    worker = list(base)
    if role == "worker":
        return worker
    declared = [*base, *(r for group in extras.values() for r in group)]
    ray = [r for r in declared if requirement_name(r) == "ray"]
    if not ray:
        raise ValueError(f"{pyproject} declares no `ray` requirement: the Ray nodes of the deployment need it "
                         f"(pin it among the dependencies or in an optional group)")
    return [*dict.fromkeys([*worker, *ray])]


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        print("\n".join(requirements(Path(argv[1]), argv[2])))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
