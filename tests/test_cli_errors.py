"""The CLI's user errors, run as a person runs it (a real `hashlake` process against moto and Redis):
each is one line on stderr and exit status 1, never a traceback; and settings are found the same way
by the CLI and by `hashlake.sql.connect()` from Python, in a folder where a local stack runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env, jpeg_bytes
from hashlake.model_versions import init_model
from hashlake.local.services import free_port
from workers.encode.active_model import ModelHandle
from workers.encode.runner import encode_batch
from workers.messages import Batch, ObjectRef

ROOT = Path(__file__).resolve().parents[1]


def hashlake(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, with only ``env``'s HASHLAKE_* settings (none inherited from this process)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("HASHLAKE_")}
    return subprocess.run([sys.executable, "-m", "hashlake.cli", *args], env={**base, **env, "COLUMNS": "80"},
                          cwd=cwd or ROOT, capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == "" and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    for fragment in fragments:
        assert fragment in line, line
    return line


@pytest.fixture
def indexed(settings, store):
    """An active model (LSH on the pretrained backbone, 32 px) and one image encoded by the workers' runner."""
    card = init_model(settings, "lsh_effnetlite0_64", img_size=32, store=store)
    body = jpeg_bytes()
    etag = store.put(settings.images_bucket, "red.jpg", body)
    batch = Batch("encode", (ObjectRef(settings.images_bucket, "red.jpg", etag, len(body)),))
    assert encode_batch(batch, settings, ModelHandle(settings, store), store=store).encoded == 1
    return card


def test_the_object_store_not_running(settings, tmp_path):
    down = {**cli_env(settings), "HASHLAKE_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}",
            "HASHLAKE_STACK_DIR": str(tmp_path)}
    assert_one_line_error(hashlake("sql", "SELECT count(*) FROM codes", env=down),
                          "object store unreachable", "Connection refused", "is the object store running?")


def test_no_model_and_a_missing_model(settings, store):
    env = cli_env(settings)
    assert_one_line_error(hashlake("sql", "SELECT count(*) FROM codes", env=env), "no active model",
                          "hashlake model init")
    assert_one_line_error(hashlake("model", "activate", "no-such-version", env=env),
                          "model version 'no-such-version' not found")


def test_a_non_image_a_wrong_code_length_and_bad_sql(settings, indexed, tmp_path):
    env = cli_env(settings)
    query = tmp_path / "query.jpg"
    query.write_bytes(jpeg_bytes())
    found = hashlake("search", str(query), "-k", "1", env=env)
    assert found.returncode == 0 and "red.jpg" in found.stdout  # the index answers: the errors below are the inputs'

    notes = tmp_path / "notes.txt"
    notes.write_text("a shopping list, not an image")
    assert_one_line_error(hashlake("search", str(notes), env=env), "not_an_image", "notes.txt")
    assert_one_line_error(hashlake("search", str(tmp_path / "absent.jpg"), env=env), "absent.jpg is not a file")
    assert_one_line_error(hashlake("sql", "SELECT * FROM search('00ff', 3)", env=env),
                          "query code has 16 bits but the index of model version", "holds 64-bit codes")
    assert_one_line_error(hashlake("sql", "SELECT hamming('00ff', '00ff00')", env=env),
                          "the codes have different lengths, 16 bits and 24 bits")
    assert_one_line_error(hashlake("sql", f"SELECT hash_image('{notes}')", env=env), "not_an_image")
    assert_one_line_error(hashlake("sql", "SELEC key FROM codes", env=env), "syntax error")


def test_bad_settings_and_a_weak_webhook_token(settings, tmp_path):
    env = {**cli_env(settings), "HASHLAKE_STACK_DIR": str(tmp_path)}
    assert_one_line_error(hashlake("sql", "SELECT 1", env={**env, "HASHLAKE_BATCH_SIZE": "0"}),
                          "invalid settings", "batch_size: Input should be greater than or equal to 1 (got '0')")
    assert_one_line_error(hashlake("intake", env={**env, "HASHLAKE_WEBHOOK_TOKEN": ""}),
                          "(HASHLAKE_WEBHOOK_TOKEN) is empty", "at least 16 characters")
    assert_one_line_error(hashlake("intake", "dead-letters", env={**env, "HASHLAKE_REDIS_URL":
                                                                  f"redis://127.0.0.1:{free_port()}/0"}),
                          "Connection refused", "is the Redis running?")


def test_python_and_the_cli_find_the_local_stack_of_the_folder(settings, indexed, tmp_path):
    """`hashlake stack up` writes .hashlake/stack.toml; from that folder, with no HASHLAKE_* variable,
    both `hashlake sql` and `hashlake.sql.connect()` read it (the defaults would point at port 9000)."""
    project = tmp_path / "project"
    (project / ".hashlake").mkdir(parents=True)
    values = {**cli_env(settings), "HASHLAKE_WEBHOOK_TOKEN": "x" * 24}
    toml = "".join(f'{name[len("HASHLAKE_"):].lower()} = "{value}"\n' for name, value in values.items())
    (project / ".hashlake" / "stack.toml").write_text(toml)
    query = "SELECT key FROM codes"
    by_cli = hashlake("sql", query, env={}, cwd=project)
    assert by_cli.returncode == 0 and "red.jpg" in by_cli.stdout, by_cli.stderr
    code = f"from hashlake.sql import connect; print(connect().sql({query!r}).fetchall())"
    base = {k: v for k, v in os.environ.items() if not k.startswith("HASHLAKE_")}
    by_python = subprocess.run([sys.executable, "-c", code], env=base, cwd=project, capture_output=True, text=True,
                               timeout=120)
    assert by_python.returncode == 0, by_python.stderr
    assert by_python.stdout.strip() == "[('red.jpg',)]"
    # An explicit HASHLAKE_CONFIG wins over the folder's stack.
    elsewhere = hashlake("sql", query, env={"HASHLAKE_CONFIG": str(tmp_path / "absent.toml")}, cwd=project)
    assert_one_line_error(elsewhere, "HASHLAKE_CONFIG points to", "absent.toml")
