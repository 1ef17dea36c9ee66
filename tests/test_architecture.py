"""The package's shape (no import cycles, small modules, one nmse) and the step registry: a step
added as one declared notebook (plus its library module) runs through make, the CLI and index.html."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import nbformat
import pytest
import yaml

from llava_gguf.pipeline import runner as pipeline
from llava_gguf.run import fingerprint, registry, workspace
from llava_gguf.checks import numeric
from llava_gguf.steps import vision_export

ROOT = registry.repo_root()
PACKAGE = ROOT / "lib" / "llava_gguf"
MAX_LINES = 400


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_among_the_package_modules():
    graph = fingerprint.import_graph()
    assert {m.__name__.partition(".")[2] for m in (pipeline, registry, vision_export, numeric)} <= set(graph)
    assert "checks.vision" in graph["steps.vision_export"]  # function-level imports count too
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_over_the_size_limit():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {k: v for k, v in sizes.items() if v > MAX_LINES} == {}


def test_one_nmse_definition_and_no_private_names_across_modules():
    defs = [p for p in PACKAGE.rglob("*.py") if re.search(r"^\s*def nmse\(", p.read_text(), re.M)]
    assert [p.relative_to(PACKAGE).as_posix() for p in defs] == ["checks/numeric.py"]
    private_use = []
    for p in PACKAGE.rglob("*.py"):
        for m in re.finditer(r"\b(?:plots|summary|legacy|toolchain|quality|mtmd|surgery|vision_check|text_check)"
                             r"\._[a-z]\w*", p.read_text()):
            private_use.append(f"{p.relative_to(PACKAGE)}: {m.group(0)}")
    assert private_use == []


def test_one_file_hash_helper():
    """A file's sha256 is read in one place (run/workspace.sha256_file): a function that streams a file
    into hashlib.sha256 elsewhere is a copy of it."""
    copies = []
    for p in PACKAGE.rglob("*.py"):
        text = p.read_text()
        for m in re.finditer(r"^def (\w+)\(.*\n(?:(?:    .*)?\n)*?    h = hashlib\.sha256\(\)\n(?:    .*\n)*?.*open\(", text, re.M):
            copies.append(f"{p.relative_to(PACKAGE)}: {m.group(1)}")
    assert copies == ["run/workspace.py: sha256_file"]


def test_every_notebook_declares_a_step_with_a_real_entry_point():
    steps = registry.steps()
    assert list(steps) == ["download", "surgery", "vision", "text", "quantize", "evaluate", *list(steps)[6:]]
    for step in steps.values():
        assert callable(step.entry_point()), step.name
        assert step.description, step.name
        for need in step.needs:
            assert need in steps
    assert registry.producer("mmproj") == "vision" and registry.producer("llama_cpp") == "all"


# ----------------------------------------------------------------------------- a throwaway step
HELLO_MODULE = '''
"""A throwaway step for the registry test."""


def run_hello(run):
    path = run.dir / "hello" / "greeting.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"hello from {run.params.run}")
    run.record("greeting", path)
    return path
'''


@pytest.fixture
def hello_step(tmp_path, notebooks, declare_step):
    """99_hello.ipynb declared as step 'hello' beside the project's notebooks, its module on
    PYTHONPATH; returns the environment that makes it visible to make and the CLI."""
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "hello_step.py").write_text(textwrap.dedent(HELLO_MODULE))
    declare_step("hello", "import hello_step\nfrom llava_gguf.run import workspace\n\n"
                 "run = workspace.open_run(params_file, params)\nresult = hello_step.run_hello(run)",
                 "assert run.artifact_path('greeting') == result", number=99,
                 description="say hello (a test fixture)", needs=["download"], products=["greeting"],
                 entry="hello_step:run_hello")
    outputs = tmp_path / "outputs"
    env = {**os.environ, registry.NOTEBOOKS_ENV: str(notebooks), workspace.OUTPUTS_ENV: str(outputs),
           "PYTHONPATH": os.pathsep.join([str(modules), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    # A params path with a space and a non-ASCII character, as users have them (make must quote it).
    params = tmp_path / "my params ü" / "hello.yaml"
    params.parent.mkdir()
    params.write_text(yaml.safe_dump({"run": "hello", "model": {"source": "tiny"}}))
    return env, params, outputs


def test_a_new_step_runs_through_make_the_cli_and_the_index(hello_step):
    env, params, outputs = hello_step
    help_text = subprocess.run(["make", "-s", "-C", str(ROOT), "help"], env=env, capture_output=True,
                               text=True, check=True).stdout
    assert re.search(r"hello\b.*99: say hello", help_text)

    made = subprocess.run(["make", "-s", "-C", str(ROOT), "hello", f"PARAMS={params}"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stdout + made.stderr
    run_dir = outputs / "hello"
    artifacts = json.loads((run_dir / "artifacts.json").read_text())
    assert (run_dir / artifacts["greeting"]).read_text() == "hello from hello"
    assert {"checkpoint", "greeting"} <= set(artifacts)  # what it needs ran first
    index = (run_dir / "reports" / "index.html").read_text()
    assert "99_hello.html" in index and "01_download.html" in index
    executed = nbformat.read(run_dir / "notebooks" / "99_hello.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and '"run": "hello"' in "".join(injected[0].source)  # the resolved values
    # Quiet logs: no plain-TCP kernel warning, no interrupted kernel on a normal end.
    logs = made.stdout + made.stderr + "".join(p.read_text() for p in (run_dir / "logs").glob("kernel-*.log"))
    assert "without encryption" not in logs and "KeyboardInterrupt" not in logs, logs[-3000:]

    cli = subprocess.run([sys.executable, "-m", "llava_gguf", "step", "hello", "--params", str(params)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    again = subprocess.run(["make", "-s", "-C", str(ROOT), "hello", f"PARAMS={params}"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "hello: up to date, skipped" in again.stderr.replace("step ", "")


def test_every_package_import_resolves_function_level_ones_included():
    """A moved module leaves no stale import behind in a function that the tests may not reach."""
    import ast
    import importlib

    stale = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        here = ["llava_gguf", *parts[:-1]]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.level or (node.module or "").startswith("llava_gguf")):
                continue
            base = here[:len(here) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            module = importlib.import_module(target)
            for alias in node.names:
                if not hasattr(module, alias.name) and importlib.util.find_spec(f"{target}.{alias.name}") is None:
                    stale.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {target}.{alias.name}")
    assert stale == []


def test_no_module_writes_the_host_name():
    """Run folders get published (model cards, pages): the machine is named by evaluate.board, not the host.
    The run lock alone names the holder's host while it runs (it is emptied when released)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for call in ("platform.node(", "socket.gethostname(", "os.uname().nodename", "uname().nodename"):
            if call in text and not (path.name == "workspace.py" and call == "socket.gethostname("):
                offenders.append(f"{path.relative_to(PACKAGE)}: {call}")
    assert not offenders, offenders
