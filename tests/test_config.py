"""Settings: environment over TOML over defaults; secrets never shown; bad values named."""
import os

import pytest
from pydantic import ValidationError

from hashlake.config import Settings


def test_env_overrides_toml_overrides_defaults(tmp_path, monkeypatch):
    toml = tmp_path / "hashlake.toml"
    toml.write_text('batch_size = 64\nimages_bucket = "photos"\ns3_endpoint = "http://minio:9000"\n')
    monkeypatch.setenv("HASHLAKE_CONFIG", str(toml))
    monkeypatch.setenv("HASHLAKE_BATCH_SIZE", "16")
    s = Settings()
    assert s.batch_size == 16  # environment wins
    assert s.images_bucket == "photos"  # from the file
    assert s.batch_window_ms == 500  # default
    assert s.s3_netloc == "minio:9000" and not s.s3_secure


def test_secrets_are_masked(monkeypatch):
    monkeypatch.setenv("HASHLAKE_S3_SECRET_KEY", "hunter2-very-secret")
    monkeypatch.setenv("HASHLAKE_WEBHOOK_TOKEN", "tok-123456")
    s = Settings()
    assert s.s3_secret_key.get_secret_value() == "hunter2-very-secret"
    for text in (str(s), repr(s), s.model_dump_json()):
        assert "hunter2" not in text and "tok-123456" not in text


def test_missing_config_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HASHLAKE_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        Settings()


def test_bad_values_are_refused():
    with pytest.raises(ValidationError, match="s3_endpoint"):
        Settings(s3_endpoint="minio:9000")
    with pytest.raises(ValidationError, match="batch_size"):
        Settings(batch_size=0)
    with pytest.raises(ValidationError, match="no_such_setting"):
        Settings(no_such_setting=1)


def test_load_settings_reads_the_local_stack_of_the_current_folder(tmp_path, monkeypatch):
    from hashlake.config import load_settings

    for name in [n for n in os.environ if n.startswith("HASHLAKE_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    assert load_settings().s3_endpoint == "http://127.0.0.1:9000"  # no stack here: the defaults
    (tmp_path / ".hashlake").mkdir()
    (tmp_path / ".hashlake" / "stack.toml").write_text('s3_endpoint = "http://127.0.0.1:41234"\nbatch_size = 7\n')
    assert load_settings().s3_endpoint == "http://127.0.0.1:41234"
    assert Settings().s3_endpoint == "http://127.0.0.1:9000"  # a plain Settings() never looks for a stack
    monkeypatch.setenv("HASHLAKE_BATCH_SIZE", "9")
    assert load_settings().batch_size == 9  # the environment still wins
    other = tmp_path / "other.toml"
    other.write_text("batch_size = 3\n")
    monkeypatch.delenv("HASHLAKE_BATCH_SIZE")
    monkeypatch.setenv("HASHLAKE_CONFIG", str(other))
    assert (load_settings().batch_size, load_settings().s3_endpoint) == (3, "http://127.0.0.1:9000")
    monkeypatch.delenv("HASHLAKE_CONFIG")
    monkeypatch.setenv("HASHLAKE_STACK_DIR", str(tmp_path / "elsewhere"))
    assert load_settings().batch_size == 32  # the stack lives where HASHLAKE_STACK_DIR says
