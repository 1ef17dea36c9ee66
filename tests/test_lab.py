"""`make lab` starts JupyterLab on the notebooks, as root too, with the user's LAB_ARGS."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

from llava_gguf.run import registry

ROOT = registry.repo_root()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_lab_serves_the_notebooks_with_lab_args(tmp_path):
    port = _free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    args = f"--no-browser --ip=127.0.0.1 --port={port} --ServerApp.port_retries=0 --IdentityProvider.token=t"
    proc = subprocess.Popen(["make", "--no-print-directory", "lab", f"LAB_ARGS={args}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if f"127.0.0.1:{port}/lab" in line:
                break
        text = "".join(seen)
        assert f"127.0.0.1:{port}/lab" in text, text[-3000:]
        assert proc.poll() is None, text[-3000:]
        # The page answers (the token is the one passed through LAB_ARGS).
        # jupyter_server logs its address a moment before the socket accepts, so poll briefly.
        names: set = set()
        for _ in range(60):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents?token=t", timeout=30) as resp:
                    names = {item["name"] for item in json.load(resp)["content"]}
                break
            except urllib.error.URLError:
                time.sleep(0.5)
        assert "01_download.ipynb" in names, names
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
