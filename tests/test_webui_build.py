"""`make webui`'s build (llama_cpp/webui.build_ui) with stand-in node and npm: each npm stage runs
under its declared limit, and the build holds the cache entry's lock."""
from __future__ import annotations

import logging
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from llava_gguf.run import workspace
from llava_gguf.llama_cpp import limits, webui

NODE = "#!/bin/sh\necho v22.12.0\n"
# `npm ci` hangs (an unreachable registry); every call is recorded.
NPM = """#!/bin/sh
echo "$@" >> "{calls}"
[ "$1" = ci ] && exec sleep {hang}
exit 0
"""


def _tool(folder: Path, name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    calls = tmp_path / "npm-calls"
    _tool(tmp_path / "bin", "node", NODE)
    _tool(tmp_path / "bin", "npm", NPM.format(calls=calls, hang=20))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv(workspace.CACHE_ENV, str(tmp_path / "cache"))
    src = tmp_path / "llama.cpp"
    (src / "tools" / "ui").mkdir(parents=True)
    (src / "tools" / "ui" / "package-lock.json").write_text("{}")
    monkeypatch.setattr(webui, "source_dir", lambda: src)
    return calls


def test_a_hung_npm_stage_is_stopped_at_its_limit(stand_ins, monkeypatch):
    monkeypatch.setenv(limits.SCALE_ENV, str(1 / limits.LIMITS["npm ci"].base_s))  # 1 s
    with pytest.raises(webui.WebUIError, match=r"npm ci \(llama-server's chat page\) ran past its limit of 1 s"):
        webui.build_ui()
    assert webui.built_ui() is None


def test_a_page_built_meanwhile_by_another_process_is_used(stand_ins, caplog):
    target = webui.ui_dir()
    got: list = []
    with caplog.at_level(logging.INFO, logger="llava_gguf.run.workspace"):
        with workspace.cache_lock(target):  # the other process, building
            worker = threading.Thread(target=lambda: got.append(webui.build_ui()), daemon=True)
            worker.start()
            deadline = time.monotonic() + 30
            while not any("waiting for another process" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline and worker.is_alive(), "build_ui did not wait for the lock"
                time.sleep(0.05)
            target.mkdir(parents=True)
            (target / "index.html").write_text("<html></html>")
            (target / webui.MARKER).write_text("{}")
        worker.join(60)
    assert got == [target] and not stand_ins.exists()  # npm never ran
