"""Every tool call is bounded (issue 19, item 4): a hung stand-in tool is stopped at its limit with
what it started, reported by name with its limit and last log lines, and leaves no output behind."""
from __future__ import annotations

import stat
import time
from pathlib import Path

import psutil
import pytest

from llava_gguf.llama_cpp import limits, runner, toolchain

# A tool that logs, starts a worker of its own (in its process group), then hangs.
HANG = """#!/bin/sh
echo "loading model from $1"
echo "step 3 of 9"
sleep 600 &
echo $! > "{pids}"
echo "worker $! started"
wait
"""


def _tool(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _gone(pid: int) -> bool:
    """The process has ended (within 10 s: SIGKILL is delivered asynchronously)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped by init
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _worker(pids: Path) -> int:
    deadline = time.monotonic() + 30
    while not pids.read_text().strip() if pids.exists() else True:
        assert time.monotonic() < deadline, "the stand-in never started its worker"
        time.sleep(0.05)
    return int(pids.read_text())


def test_a_hung_tool_is_stopped_at_its_limit_with_its_group_and_named(tmp_path):
    pids = tmp_path / "worker.pid"
    tool = _tool(tmp_path / "bin", "llama-hang", HANG.format(pids=pids))
    log_file = tmp_path / "logs" / "hang.log"
    t0 = time.monotonic()
    with pytest.raises(toolchain.ToolFailed) as err:
        toolchain.run_tool([tool, "model.gguf"], log_file, timeout=1.5, what="llama-hang on model.gguf")
    assert time.monotonic() - t0 < 60  # stopped, not waited out (600 s)
    msg = str(err.value)
    assert msg.startswith("llama-hang on model.gguf ran past its limit of 1.5 s and was stopped"), msg
    assert "step 3 of 9" in msg.split("last lines:")[1] and f"full log kept at {log_file}" in msg
    assert err.value.log_file == log_file and "loading model from model.gguf" in log_file.read_text()
    assert _gone(_worker(pids))  # what the tool started went with it


def test_a_hung_tool_with_captured_output_is_stopped_too(tmp_path):
    pids = tmp_path / "worker.pid"
    tool = _tool(tmp_path / "bin", "llama-tokenize", HANG.format(pids=pids))
    with pytest.raises(runner.ToolFailed, match=r"(?s)llama-tokenize ran past its limit of 1 s.*step 3 of 9"):
        runner.run_tool([tool, "x.gguf"], timeout=1, capture=True)
    assert _gone(_worker(pids))


# A tool that exits at once, leaving a worker of its group that holds its output pipe open.
DETACH = """#!/bin/sh
sleep 600 &
echo $! > "{pids}"
echo "worker $! started"
exit 0
"""


@pytest.mark.parametrize("how", ["capture", "on_line"])
def test_a_worker_holding_the_output_after_its_tool_exited_is_stopped_at_the_limit(tmp_path, how):
    pids = tmp_path / "worker.pid"
    tool = _tool(tmp_path / "bin", "llama-tokenize", DETACH.format(pids=pids))
    kw = {"capture": True} if how == "capture" else {"log_file": tmp_path / "detach.log", "on_line": lambda line: None}
    with pytest.raises(runner.ToolFailed, match="ran past its limit of 1 s"):
        runner.run_tool([tool, "x.gguf"], timeout=1, **kw)
    assert _gone(_worker(pids))


def test_a_worker_left_behind_by_a_tool_that_exited_goes_with_it(tmp_path):
    pids = tmp_path / "worker.pid"
    tool = _tool(tmp_path / "bin", "llama-tokenize", DETACH.format(pids=pids))
    log_file = tmp_path / "detach.log"  # the worker holds the log file, not a pipe: the tool's exit ends the run
    assert "worker" in runner.run_tool([tool, "x.gguf"], log_file, timeout=60)
    worker = _worker(pids)
    gone = _gone(worker)
    if not gone:
        runner.kill_tree(worker)  # a failing test leaves nothing running either
    assert gone


def test_an_interrupted_caller_leaves_no_tool_running(tmp_path):
    pids = tmp_path / "worker.pid"
    tool = _tool(tmp_path / "bin", "llama-hang", HANG.format(pids=pids))

    def interrupt(line: str) -> None:
        if "worker" in line:
            raise KeyboardInterrupt  # as Ctrl-C in a notebook does while the tool runs

    with pytest.raises(KeyboardInterrupt):
        runner.run_tool([tool, "m.gguf"], tmp_path / "hang.log", timeout=600, on_line=interrupt)
    assert _gone(_worker(pids))


def test_every_tool_has_a_declared_limit_scaled_to_the_work(tmp_path, monkeypatch):
    monkeypatch.delenv(limits.SCALE_ENV, raising=False)
    small, large = limits.seconds("llama-quantize", 0.04), limits.seconds("llama-quantize", 12.55)
    assert 300 <= small < large and large > 10 * 260  # well above the 260 s the 7B took here
    assert limits.seconds("llama-imatrix", 12.55, 5120) > limits.seconds("llama-imatrix", 12.55, 512)
    monkeypatch.setenv(limits.SCALE_ENV, "3")
    assert limits.seconds("llama-quantize", 12.55) == pytest.approx(3 * large)
    with pytest.raises(limits.LimitError, match="llama-nonesuch.*limits.py"):
        runner.run_tool(["llama-nonesuch"], tmp_path / "x.log")
    for name in toolchain.TOOLS:
        if name not in ("llama-perplexity", "llama-server"):  # evaluate.timeout_s; runs until stopped
            limits.seconds(name)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"x" * 2**20)
    (tmp_path / "d" / "b").symlink_to(tmp_path / "d" / "a")
    assert limits.gib([tmp_path / "d", tmp_path / "d" / "a"]) == pytest.approx(1 / 1024)
    # A missing model is an error naming it, not 0 GiB and so the shortest limit.
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf: no such file"):
        limits.gib([tmp_path / "d" / "a", tmp_path / "missing.gguf"])


def test_a_hung_quantize_fails_the_step_and_leaves_no_file(local_run, tiny_ggufs, tmp_path, monkeypatch):
    from llava_gguf.steps import quantize

    pids = tmp_path / "worker.pid"
    # Writes half a file to the output name it is given, then hangs.
    _tool(tmp_path / "build" / "bin", "llama-quantize",
          HANG.format(pids=pids).replace("wait", 'echo partial > "$2"\nwait'))
    monkeypatch.setenv(toolchain.ENV_DIR, str(tmp_path / "build"))
    monkeypatch.setenv(limits.SCALE_ENV, str(1 / 200))  # 300 s base -> 1.5 s
    run = local_run(quantize={"types": ["Q8_0"]})
    models = run.sub("models")
    with pytest.raises(toolchain.ToolFailed) as err:
        quantize.quantize_file(run, tiny_ggufs["text"], "Q8_0")
    limit = limits.seconds("llama-quantize", limits.gib([tiny_ggufs["text"]]))  # ~1.5 s: scaled to the file
    assert 1.5 < limit < 2
    assert f"llama-quantize Q8_0 ran past its limit of {limit:.3g} s" in str(err.value)
    assert "step 3 of 9" in str(err.value)
    assert list(models.iterdir()) == []  # neither the product nor its temporary file
    assert _gone(_worker(pids))
