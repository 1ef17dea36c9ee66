"""The shared cache's lock: a second holder waits, but not without end."""
from __future__ import annotations

import logging

import pytest

from llava_gguf.run import workspace


def test_a_second_holder_gives_up_naming_the_lock_file(tmp_path, caplog):
    target = tmp_path / "cache" / "llama.cpp-build"
    with workspace.cache_lock(target):  # the first holder, e.g. another checkout building
        with caplog.at_level(logging.INFO, logger="llava_gguf.run.workspace"):
            with pytest.raises(workspace.CacheBusy) as err:
                with workspace.cache_lock(target, timeout=0.2):
                    pytest.fail("the second holder got a lock the first one holds")
    message = str(err.value)
    assert str(tmp_path / "cache" / ".llama.cpp-build.lock") in message and "another process" in message
    assert "delete the lock file" in message
    waits = [r for r in caplog.records if "waiting for another process" in r.getMessage()]
    assert len(waits) == 1 and waits[0].levelno == logging.INFO
    with workspace.cache_lock(target, timeout=0.2):  # released by the first holder: free again
        pass


def test_a_build_waits_for_another_as_long_as_a_build_may_take_here(tmp_path, monkeypatch):
    """The build's wait follows the tools' limits, so a board with $LLAVA_GGUF_TIMEOUT_SCALE does not
    give up on another process's build that is still within its own limit."""
    from llava_gguf.llama_cpp import limits, toolchain

    waits = []

    class Stop(Exception):
        pass

    def lock(target, timeout):
        waits.append(timeout)
        raise Stop

    monkeypatch.setattr(toolchain, "cache_lock", lock)
    for factor in ("1", "20"):
        monkeypatch.setenv(limits.SCALE_ENV, factor)
        with pytest.raises(Stop):
            toolchain.build_llama_cpp(tmp_path / f"build-{factor}", force=True)
    assert waits[0] == workspace.CACHE_LOCK_TIMEOUT_S
    assert waits[1] > 20 * (limits.LIMITS["cmake configure"].base_s + limits.LIMITS["cmake build"].base_s)
    assert waits[1] >= 20 * workspace.CACHE_LOCK_TIMEOUT_S


def test_the_default_wait_is_scaled_like_every_tool_limit(tmp_path, monkeypatch, caplog):
    """A shared-cache lock other than the build's (the legacy venv, the source) waits
    CACHE_LOCK_TIMEOUT_S times $LLAVA_GGUF_TIMEOUT_SCALE: under qemu (scale 20) it must not give up
    on a holder that is only slow. The wait it announces is the scaled one."""
    from llava_gguf.run import timeout_scale

    target = tmp_path / "cache" / "legacy-env"
    monkeypatch.setenv(timeout_scale.SCALE_ENV, str(0.3 / workspace.CACHE_LOCK_TIMEOUT_S))  # 0.3 s
    with workspace.cache_lock(target):
        with caplog.at_level(logging.INFO, logger="llava_gguf.run.workspace"):
            with pytest.raises(workspace.CacheBusy) as err:
                with workspace.cache_lock(target):
                    pytest.fail("the second holder got a lock the first one holds")
    assert "for over 0 s" in str(err.value)
    waits = [r.getMessage() for r in caplog.records if "waiting for another process" in r.getMessage()]
    assert waits and waits[0].endswith("for up to 0 s)")
    monkeypatch.setenv(timeout_scale.SCALE_ENV, "20")
    seen = []

    class Stop(Exception):
        pass

    class Lock:
        def __init__(self, path):
            self.lock_file = str(path)

        def acquire(self, timeout):
            seen.append(timeout)
            if timeout:
                raise Stop
            raise workspace.Timeout("held")

    monkeypatch.setattr(workspace, "FileLock", Lock)
    with pytest.raises(Stop):
        with workspace.cache_lock(target):
            pass
    assert seen == [0, 20 * workspace.CACHE_LOCK_TIMEOUT_S]
