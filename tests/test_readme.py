"""The README, as a user follows it: every command of its ``bash`` blocks and every ``python`` block,
run in order in a fresh folder against the stack its first command starts.

``WALKTHROUGH`` is the order and what each command must print; a command added to the README without a
step here (or a step whose command left the README) fails ``test_every_readme_command_has_a_step``.
Not run here: the ``make`` lines (``make test`` is what CI runs, ``make demo`` is the demo itself) and
the ``sql`` blocks, which are SQL for ``hashlake sql`` and ``connect()``, not commands (the ``sql``
and ``search`` steps run their first statement).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # the venv running the tests: the README's .venv/bin
SAMPLE = ROOT / "hashlake" / "samples" / "cifar10-sample.parquet"
STEP_TIMEOUT_S = 600
INDEX_TIMEOUT_S = 300


@dataclass(frozen=True)
class Step:
    command: str  # as the README writes it (comment removed); VERSION, RUN, V1, V2 filled in when run
    prints: str  # a regular expression its output must match
    status: int = 0


WALKTHROUGH = [
    Step(".venv/bin/hashlake stack up --workers 1", r"model\s+\S+"),
    Step(".venv/bin/hashlake stack status", r"intake.*yes"),
    Step(".venv/bin/hashlake upload hashlake/samples/cifar10-sample.parquet", r"uploaded 1000 images"),
    Step(".venv/bin/hashlake sql \"SELECT count(*) FROM codes\"", r"\b1000\b"),
    # cat.jpg is the bytes of an uploaded image: its own key comes first, at distance 0
    Step(".venv/bin/hashlake sql \"SELECT key, distance, labels FROM search_rows(hash_image('cat.jpg'), 10)\"",
         r"CAT_KEY\s*│\s*0\s*│"),
    Step(".venv/bin/hashlake search cat.jpg -k 10", r"CAT_KEY\s*│\s*0\s*│"),
    Step(".venv/bin/hashlake sql \"SELECT reason, count(*) FROM failures GROUP BY reason\"", r"reason"),
    Step("python:connect", r"\('CAT_KEY', 0, "),
    Step(".venv/bin/hashlake intake dead-letters", r"no dead letters"),
    Step(".venv/bin/hashlake reconcile", r"."),
    Step(".venv/bin/hashlake lake compact", r"."),
    Step(".venv/bin/hashlake report", r"mAP@ALL"),
    Step("python:train", r""),
    Step(".venv/bin/hashlake model publish hashnet-64.pt --no-activate", r"published (?P<VERSION>\S+):"),
    Step(".venv/bin/hashlake model promote VERSION", r"active model is now VERSION \(was (?P<V1>\S+)\)"),
    Step(".venv/bin/hashlake model list", r"\*\s*│\s*VERSION"),
    Step(".venv/bin/hashlake report --model V1 --model V2 --out out/", r"wrote out/report\.md"),
    Step(".venv/bin/hashlake model rollback", r"active model is now V1 \(was VERSION"),
    Step(".venv/bin/hashlake model activate VERSION", r"active model is now VERSION"),
    Step(".venv/bin/hashlake model gc --yes", r"."),
    Step(".venv/bin/hashlake retrain --wait", r"run (?P<RUN>\S+): succeeded"),
    Step(".venv/bin/hashlake jobs", r"RUN"),
    # a run that ended is not run again: resuming is for failed or killed runs (tests/test_retrain.py)
    Step(".venv/bin/hashlake retrain --resume RUN --wait", r"already ended succeeded; nothing to resume", 1),
    Step(".venv/bin/hashlake stack down", r"stopped"),
]


def readme_commands() -> list[str]:
    """The command lines of the README's bash blocks, then ``python:<name>`` for each python block."""
    commands, blocks = [], re.findall(r"```(\w*)\n(.*?)```", README.read_text(), flags=re.S)
    for lang, body in blocks:
        if lang == "bash":
            for line in body.splitlines():
                line = re.sub(r"\s+#\s.*$", "", line).strip()
                if line and not line.startswith("make "):
                    commands.append(line)
        elif lang == "python":
            commands.append(f"python:{python_block_name(body)}")
    return commands


def python_block_name(body: str) -> str:
    return "train" if "train(" in body else "connect"


def python_blocks() -> dict[str, str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return {python_block_name(body): body for body in blocks}


def test_every_readme_command_has_a_step():
    assert sorted(readme_commands()) == sorted(step.command for step in WALKTHROUGH)


def user_dataset(path: Path) -> None:
    """images.parquet as the training snippet expects: the sample with 800 images marked train."""
    table = pq.read_table(SAMPLE)
    split = ["train" if i % 5 else "test" for i in range(table.num_rows)]
    pq.write_table(table.set_column(table.schema.get_field_index("split"), "split", pa.array(split)), path)


def first_image(folder: Path) -> str:
    """Write the sample's first image as cat.jpg; return the key the upload gives it."""
    from hashlake.image_sources import iter_images

    image = next(iter(iter_images(SAMPLE, limit=1)))
    (folder / "cat.jpg").write_bytes(image.body)
    return image.name


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_readme_walkthrough_runs_as_written():
    # Not under pytest's 0700 tmp folder: run as root, the stack's PostgreSQL runs as the postgres user.
    cwd = Path(tempfile.mkdtemp(prefix="hashlake-readme-"))
    cwd.chmod(0o755)
    env = {**os.environ, "HASHLAKE_FEATURE_CACHE": str(cwd / "features")}
    env.pop("HASHLAKE_CONFIG", None)
    values = {"CAT_KEY": first_image(cwd)}
    user_dataset(cwd / "images.parquet")
    snippets = python_blocks()
    try:
        for step in WALKTHROUGH:
            if step.command == ".venv/bin/hashlake sql \"SELECT count(*) FROM codes\"":
                wait_until_indexed(cwd, env, 1000)
            if step.command.startswith(".venv/bin/hashlake retrain --wait"):
                # the gate compares against a version promoted seconds ago on 1,000 images: let it pass
                with (cwd / ".hashlake" / "stack.toml").open("a") as f:
                    f.write("\nretrain_tolerance = 1.0\nretrain_epochs = 5\n")
            output, status = run(step, cwd, env, values, snippets)
            expected = fill(step.prints, values, escape=True)
            assert status == step.status, f"{step.command}: exit {status}, expected {step.status}\n{output}"
            match = re.search(expected, output)
            assert match, f"{step.command}: output does not match {expected!r}:\n{output}"
            values.update({name: value for name, value in match.groupdict().items() if value})
            if "V1" in values:
                values.setdefault("V2", values["VERSION"])
    finally:
        subprocess.run([str(BIN / "hashlake"), "stack", "down"], cwd=cwd, env=env, capture_output=True)
        shutil.rmtree(cwd, ignore_errors=True)


def fill(text: str, values: dict[str, str], escape: bool = False) -> str:
    """``text`` with each placeholder (VERSION, RUN, ...) replaced by its value, regex-escaped if asked."""
    for name, value in values.items():
        text = re.sub(rf"\b{name}\b", lambda _: re.escape(value) if escape else value, text)
    return text


def run(step: Step, cwd: Path, env: dict, values: dict[str, str], snippets: dict[str, str]) -> tuple[str, int]:
    if step.command.startswith("python:"):
        name = step.command.removeprefix("python:")
        # the connect snippet's answer, for its step to check
        argv = [sys.executable, "-c", snippets[name] + ("\nprint(rows)" if name == "connect" else "")]
    else:
        line = fill(step.command, values).replace(".venv/bin/", f"{BIN}/", 1)
        line = line.replace("hashlake/samples/", f"{SAMPLE.parent}/")
        argv = ["bash", "-c", line]
    done = subprocess.run(argv, cwd=cwd, env={**env, "COLUMNS": "200"}, capture_output=True, text=True,
                          timeout=STEP_TIMEOUT_S)
    return done.stdout + done.stderr, done.returncode


def wait_until_indexed(cwd: Path, env: dict, n: int) -> None:
    query = "SELECT (SELECT count(*) FROM codes) + (SELECT count(*) FROM failures)"
    deadline, seen = time.monotonic() + INDEX_TIMEOUT_S, ""
    while time.monotonic() < deadline:
        seen = subprocess.run([str(BIN / "hashlake"), "sql", query], cwd=cwd, env=env, capture_output=True,
                              text=True).stdout
        if re.search(rf"\b{n}\b", seen):
            return
        time.sleep(2)
    raise AssertionError(f"{n} images not indexed within {INDEX_TIMEOUT_S} s: {seen}")
