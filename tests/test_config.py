"""Settings: environment over TOML over defaults; secrets never shown; bad values named."""
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
