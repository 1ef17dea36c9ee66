"""PARAMS is checked before setup and the build: keys, types and the paths it names."""
from __future__ import annotations

import os
import subprocess
import sys

import yaml

from llava_gguf.run import params_check, registry

ROOT = registry.repo_root()


def _write(tmp_path, data, name="p.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_missing_paths_are_named_by_key(tmp_path):
    path = _write(tmp_path, {"run": "x", "model": {"source": "local", "path": str(tmp_path / "nope")},
                             "llama_cpp": {"dir": "no/such/build"},
                             "evaluate": {"cases": [{"prompt": "a"}, {"image": "missing.jpg", "prompt": "b"}]}})
    problems = params_check.path_problems(params_check.load_params(path), str(path))
    keys = [p.split("key '")[1].split("'")[0] for p in problems]
    assert keys == ["llama_cpp.dir", "model.path", "evaluate.cases[1].image"]
    assert str(ROOT / "no/such/build") in problems[0]  # relative paths are read from the repo root


def test_existing_paths_pass(tmp_path):
    image = tmp_path / "img.jpg"
    image.write_bytes(b"x")
    path = _write(tmp_path, {"run": "x", "evaluate": {"cases": [{"image": str(image), "prompt": "a"}]}})
    assert params_check.check_file(path).run == "x"


def test_cli_runs_with_only_pydantic_and_yaml(tmp_path):
    """The module is run before torch, numpy or the rest are installed: it must not import them."""
    bad = _write(tmp_path, {"run": "x", "evaluate": {"n_predcit": 3}})
    code = ("import sys, builtins\n"
            "real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name.split('.')[0] in {'torch', 'numpy', 'transformers', 'gguf', 'pandas', 'matplotlib'}:\n"
            "        raise ImportError('not installed before setup: ' + name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "from llava_gguf.run import params_check\n"
            f"sys.exit(params_check.main([{str(bad)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "lib")})
    assert proc.returncode == 2, proc.stderr
    assert "unknown key 'evaluate.n_predcit'" in proc.stderr and "Traceback" not in proc.stderr


def test_make_all_checks_params_before_setup_and_build():
    out = subprocess.run(["make", "-n", "--no-print-directory", "all", "PARAMS=params/default.yaml"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    check = out.index("llava_gguf.run.params_check")
    assert all(check < out.index(later) for later in ("build-llama-cpp", "run all") if later in out), out
    assert "install --quiet -r requirements.txt" not in out[:check]
