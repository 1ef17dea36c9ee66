"""The package's layers hold: import-linter checks the contracts of pyproject.toml ([tool.importlinter]),
function-level imports included, and reports write no artifact of the run."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from llava_gguf import reports
from llava_gguf.run import registry

ROOT = registry.repo_root()
REPORTS = Path(reports.__file__).parent


def _lint_imports(*args: str) -> subprocess.CompletedProcess:
    # lint-imports imports the package from lib/ (this checkout's, not an installed copy) and, with
    # --no-cache, writes nothing into the checkout.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "lib"), os.environ.get("PYTHONPATH"))
                                                       if p)}
    return subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache", "--no-logo", *args,
                           str(ROOT / "pyproject.toml")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_contracts_hold():
    proc = _lint_imports()
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in proc.stdout, proc.stdout[-4000:]


def test_every_package_module_stands_on_a_layer():
    """`exhaustive`: a module added at the package root, or a new package, must be given its layer."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")
    assert layers["exhaustive"] is True and layers["containers"] == ["llava_gguf"]
    named = {m.strip() for layer in layers["layers"] for m in layer.replace(":", "|").split("|")}
    package = REPORTS.parent
    children = {p.stem for p in package.glob("*.py") if p.name != "__init__.py"}
    children |= {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert children == named


def test_reports_record_no_artifact():
    """A report draws what the run folder holds; the steps write and record what it holds."""
    recorded = []
    for path in sorted(REPORTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "record":
                recorded.append(f"{path.name}:{node.lineno}")
    assert recorded == []
