"""The pinned environments: one constraints file per (machine, Python), complete and CPU-only."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llava_gguf.run import platform_pins as pins

FILES = {(m, p): pins.CONSTRAINTS_DIR / pins.constraints_name(m, p) for m, _, p in pins.TARGETS}
REQUIRED = pins.pinned(pins.REQUIREMENTS)


@pytest.mark.parametrize("target", list(FILES), ids=lambda t: f"{t[0]}-py{t[1]}")
def test_every_target_has_a_complete_exact_constraints_file(target):
    path = FILES[target]
    assert path.exists(), f"{path} missing: run `make constraints`"
    locked = pins.pinned(path)  # raises on any line not pinned with ==
    # Every direct requirement is in the file, at the version requirements.txt pins.
    for name, version in REQUIRED.items():
        if name == "torch":
            continue
        assert locked.get(name) == version, f"{path.name}: {name} {locked.get(name)} != requirements.txt {version}"
    # The packages a notebook run needs transitively are pinned too.
    for name in ("jinja2", "ipython", "jupyter-client", "tokenizers", "pyzmq", "contourpy"):
        assert name in locked, f"{path.name} lacks the transitive package {name}"


def test_aarch64_gets_a_cpu_only_torch_and_no_gpu_package():
    locked = pins.pinned(FILES[("aarch64", "3.11")])
    gpu = sorted(n for n in locked if pins.GPU_PACKAGE.match(n))
    assert not gpu, f"aarch64 constraints pull GPU packages onto a board: {gpu}"
    # PyPI's aarch64 torch wheels from 2.11 on are CUDA builds; 2.10 is the newest CPU-only one.
    major, minor = map(int, locked["torch"].split(".")[:2])
    assert (major, minor) <= (2, 10), locked["torch"]


def test_x86_64_keeps_the_cpu_build():
    locked = pins.pinned(FILES[("x86_64", "3.11")])
    assert locked["torch"] == "2.13.0+cpu"
    assert not [n for n in locked if pins.GPU_PACKAGE.match(n)]


def test_gpu_package_rule_catches_what_cuda_torch_pulls():
    for name in ("nvidia-cudnn-cu13", "cuda-toolkit", "cuda-bindings", "triton"):
        assert pins.GPU_PACKAGE.match(name), name
    for name in ("torch", "jinja2", "tokenizers", "cudatext"):
        assert not pins.GPU_PACKAGE.match(name), name


def test_requirements_pin_every_direct_package_exactly():
    text = pins.REQUIREMENTS.read_text()
    assert "torch==2.10.0; platform_machine == \"aarch64\"" in text
    assert {"numpy", "pandas", "matplotlib", "jupyterlab", "papermill", "nbclient", "ipykernel"} <= set(REQUIRED)


def test_environment_yml_agrees_with_the_constraints():
    env = yaml.safe_load((pins.ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    python = next(d.split("=", 1)[1] for d in deps if isinstance(d, str) and d.startswith("python="))
    assert python in {p for _, _, p in pins.TARGETS}
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert "-r requirements.txt" in pip_section
    # Whatever environment.yml pins itself must match the constraints of every platform.
    for dep in deps:
        if isinstance(dep, str) and "==" in dep:
            name, version = dep.split("==")
            for path in FILES.values():
                assert pins.pinned(path).get(pins.normalize(name)) == version, (dep, path.name)


@pytest.mark.parametrize("system,machine,python", [("Linux", "riscv64", "3.11"), ("Linux", "x86_64", "3.9"),
                                                   ("Darwin", "arm64", "3.11")])
def test_unsupported_platform_names_what_is_supported(system, machine, python):
    with pytest.raises(pins.UnsupportedPlatform) as err:
        pins.constraints_file(system, machine, python)
    msg = str(err.value)
    assert "Linux aarch64 with Python 3.11" in msg and "Linux x86_64 with Python 3.11" in msg


def test_cli_exits_2_with_a_message_not_a_trace(monkeypatch, tmp_path):
    script = Path(pins.__file__)
    ok = subprocess.run([sys.executable, str(script), "constraints-file"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip().startswith("constraints/linux-")
    bad = subprocess.run([sys.executable, "-c",
                          "import platform, runpy, sys; platform.machine = lambda: 'riscv64'; "
                          f"sys.argv = ['x', 'constraints-file']; runpy.run_path({str(script)!r}, run_name='__main__')"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "riscv64" in bad.stderr and "Supported:" in bad.stderr
