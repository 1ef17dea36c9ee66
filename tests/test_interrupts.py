"""Runs that are interrupted, run twice at once, or live on a symlinked disk (issue 12, Found 1, 4, 10, 11)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from llava_gguf import cli
from llava_gguf.pipeline import runner as pipeline
from llava_gguf.run import workspace


def _processes(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_group_stops_the_kernel_and_its_tools(declare_step, tmp_path, sig):
    marker = f"{9000 + int(sig)}.{os.getpid()}"
    declare_step("sleeper", f"import subprocess, time\nsubprocess.Popen(['sleep', '{marker}'])\ntime.sleep(600)")
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"run": f"sleeper-{int(sig)}", "model": {"source": "tiny"}}))
    # As a terminal's foreground job: SIGINT at its default. A shell without job control starts a
    # background job (`make test &`) with SIGINT ignored, the child inherits that, and Python then
    # installs no KeyboardInterrupt handler: the run would rightly ignore the SIGINT sent below.
    proc = subprocess.Popen([sys.executable, "-m", "llava_gguf", "run", "sleeper", "--params", str(params)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not _processes(f"sleep {marker}") and time.time() < deadline:
            time.sleep(0.5)
        assert _processes(f"sleep {marker}"), "the step's tool never started"
        os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C or a service manager's stop does
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(1)
    assert proc.returncode == 130, err
    assert _processes(f"sleep {marker}") == []  # nothing orphaned
    assert "interrupted" in err and "Traceback" not in err, err
    assert "()" not in err and "step 'sleeper' interrupted" in err, err
    assert f"to resume: make sleeper PARAMS={params}" in err, err
    assert "KeyboardInterrupt caught in kernel" not in err


def test_a_second_run_of_the_same_run_is_refused_naming_the_holder(write_params, caplog):
    path = write_params({"run": "locked", "model": {"source": "tiny"}})
    run = workspace.open_run(path)
    with run.lock():
        assert cli.main(["run", "download", "--params", str(path)]) == 2
    assert f"in use by pid {os.getpid()}" in caplog.text
    assert pipeline.load_state(run) == {}  # nothing ran


def test_stale_partials_are_removed_at_the_next_run(write_params):
    run = workspace.open_run(write_params({"run": "partials", "model": {"source": "tiny"}}))
    stale = run.sub("models") / ".x-F16.gguf.abc123.partial"
    stale.write_bytes(b"half")
    pipeline.run_steps(run, ["download"])
    assert not stale.exists()


def test_a_symlinked_run_folder_keeps_its_paths(tmp_path, monkeypatch, write_params):
    """People move 35 GB of 7B outputs to a bigger disk with a symlink."""
    outputs, disk = tmp_path / "outputs", tmp_path / "bigger-disk" / "moved"
    outputs.mkdir()
    disk.mkdir(parents=True)
    (outputs / "linked").symlink_to(disk)
    monkeypatch.setenv(workspace.OUTPUTS_ENV, str(outputs))
    run = workspace.open_run(write_params({"run": "linked", "model": {"source": "tiny"}}))
    assert pipeline.run_steps(run, ["surgery"]) == [("download", "ran"), ("surgery", "ran")]
    assert (disk / "surgery" / "manifest.json").exists()
    assert run.artifact_path("surgery") == run.dir / "surgery" / "manifest.json"


def test_a_cell_past_its_limit_is_stopped_with_the_tools_it_started(declare_step, write_params):
    """papermill's execution_timeout (params pipeline.cell_timeout_s): the step fails naming the limit and
    the cell's last lines; the tools the cell started (one in a session of its own) do not outlive it."""
    marker = f"7001.{os.getpid()}"
    declare_step("hanger", "import subprocess, time\nprint('about to hang', flush=True)\n"
                 f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
                 f"subprocess.Popen(['sleep', '{marker}'])\ntime.sleep(600)")
    run = workspace.open_run(write_params({"run": "hanger", "model": {"source": "tiny"},
                                           "pipeline": {"cell_timeout_s": 5}}))
    t0 = time.monotonic()
    with pytest.raises(pipeline.StepFailed) as err:
        pipeline.run_steps(run, ["hanger"])
    assert time.monotonic() - t0 < 300
    msg = str(err.value)
    assert "step 'hanger': a cell ran past its limit of 5 s (params pipeline.cell_timeout_s)" in msg, msg
    assert "about to hang" in msg.split("last lines:")[1], msg
    deadline = time.time() + 30
    while _processes(f"sleep {marker}") and time.time() < deadline:
        time.sleep(0.5)
    assert _processes(f"sleep {marker}") == []
