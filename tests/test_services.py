"""Starting back-end processes: ready within the deadline, or stopped and named in the error."""
import pytest

from hashlake.local.services import ServiceError, spawn, wait_ready


def test_a_service_that_never_gets_ready_is_stopped(tmp_path):
    svc = spawn("sleeper", ["sleep", "60"], tmp_path / "sleeper.log")
    with pytest.raises(ServiceError, match="never-ready thing was not ready"):
        wait_ready(svc, lambda: False, 0.5, "never-ready thing")
    assert not svc.alive()


def test_a_service_that_exits_early_is_named_with_its_log(tmp_path):
    svc = spawn("crasher", ["sh", "-c", "echo bad config line 3; exit 3"], tmp_path / "crasher.log")
    with pytest.raises(ServiceError, match="(?s)exited with code 3.*bad config line 3"):
        wait_ready(svc, lambda: False, 10, "crasher")
