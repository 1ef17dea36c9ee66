"""Run the numbered notebooks in order with papermill, skipping steps that are up to date.

Each step declares its notebook, the steps it needs, the products it records in artifacts.json
and the params sections it reads. Its fingerprint hashes those params, the notebook, the source
of every `llava_gguf` module it imports (transitively), the fingerprints of the steps it needs,
the llama.cpp build for steps that run its tools, and the files of a local checkpoint. A step
runs when its fingerprint changed or a product is missing; `force` reruns it.

Executed notebooks are written to `outputs/<run>/notebooks/` (the sources are never executed in
place) and rendered to HTML under `outputs/<run>/reports/`, also when a cell fails.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from . import partials, preflight, report, toolchain
from .workspace import Run, forcing, repo_root, resolve, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    name: str
    notebook: str
    needs: tuple[str, ...]
    products: tuple[str, ...]
    params: tuple[str, ...]
    uses_llama_cpp: bool = False
    checkpoint_only: bool = False  # not applicable when the model arrives as ready GGUF files

    @property
    def source(self) -> Path:
        return repo_root() / "notebooks" / self.notebook


STEPS: dict[str, Step] = {s.name: s for s in (
    Step("download", "01_download.ipynb", (), ("checkpoint",), ("model",)),
    Step("surgery", "02_surgery.ipynb", ("download",), ("surgery",), ("model",), checkpoint_only=True),
    Step("vision", "03_vision_export.ipynb", ("surgery",), ("mmproj",), ("model", "convert", "llama_cpp"),
         uses_llama_cpp=True, checkpoint_only=True),
    Step("text", "04_text_export.ipynb", ("surgery",), ("text_gguf",), ("model", "convert", "llama_cpp"),
         uses_llama_cpp=True, checkpoint_only=True),
    Step("quantize", "05_quantize.ipynb", ("text",), ("quantized",),
         ("model", "convert", "quantize", "llama_cpp"), uses_llama_cpp=True, checkpoint_only=True),
    Step("evaluate", "06_evaluate.ipynb", ("vision", "quantize"), ("metrics",),
         ("model", "convert", "quantize", "llama_cpp", "evaluate"), uses_llama_cpp=True),
)}


class StepFailed(RuntimeError):
    pass


def available_steps() -> list[str]:
    """Steps whose notebook exists in this checkout, in order."""
    return [name for name, step in STEPS.items() if step.source.exists()]


def applicable(step: Step, run: Run) -> bool:
    return not (step.checkpoint_only and run.params.model.format == "gguf")


def _needs(step: Step, run: Run) -> tuple[str, ...]:
    needs = tuple(n for n in step.needs if applicable(STEPS[n], run))
    if not needs and step.needs:
        return ("download",)  # the ready-GGUF path: everything comes from the download
    return needs


def _products(step: Step, run: Run) -> tuple[str, ...]:
    if step.name == "download" and run.params.model.format == "gguf":
        return ("mmproj", "quantized")
    return step.products


def plan(targets: list[str], run: Run) -> list[Step]:
    """The targets and the steps they need, in dependency order."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in STEPS:
            raise KeyError(f"unknown step '{name}'; steps: {', '.join(STEPS)}")
        for need in _needs(STEPS[name], run):
            visit(need)
        if name not in order:
            order.append(name)

    for t in targets:
        visit(t)
    return [STEPS[n] for n in order if applicable(STEPS[n], run)]


# ----------------------------------------------------------------------------- fingerprints
def _notebook_imports(path: Path) -> set[str]:
    nb = json.loads(path.read_text())
    mods: set[str] = set()
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        try:
            tree = ast.parse("".join(cell["source"]))
        except SyntaxError:
            continue
        mods |= _imports_of(tree)
    return mods


def _imports_of(tree: ast.AST) -> set[str]:
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.module in ("llava_gguf", None) or (node.level and not node.module):
                mods |= {a.name for a in node.names}
            elif node.module.startswith("llava_gguf.") or node.level:
                mods.add(node.module.removeprefix("llava_gguf."))
        elif isinstance(node, ast.Import):
            mods |= {a.name.removeprefix("llava_gguf.") for a in node.names if a.name.startswith("llava_gguf.")}
    return mods


def code_closure(modules: set[str]) -> list[Path]:
    """Source files of the given package modules and of everything they import from the package."""
    pkg = Path(__file__).parent
    seen: dict[str, Path] = {}
    todo = [m.split(".")[0] for m in modules]
    while todo:
        mod = todo.pop()
        path = pkg / f"{mod}.py"
        if mod in seen or not path.exists():
            continue
        seen[mod] = path
        todo.extend(m.split(".")[0] for m in _imports_of(ast.parse(path.read_text())))
    return [seen[m] for m in sorted(seen)]


def fingerprint(step: Step, run: Run, upstream: dict[str, str], llama_cpp: dict | None = None) -> str:
    """`llama_cpp`: the build's info (toolchain.llama_cpp_info), for steps that run its tools."""
    h = hashlib.sha256()
    params = run.params.model_dump(mode="json")
    h.update(json.dumps({k: params[k] for k in step.params}, sort_keys=True).encode())
    h.update(step.source.read_bytes())
    for path in code_closure(_notebook_imports(step.source)):
        h.update(path.name.encode() + path.read_bytes())
    for need in _needs(step, run):
        h.update(upstream.get(need, "").encode())
    if step.uses_llama_cpp and llama_cpp:
        h.update(json.dumps(llama_cpp, sort_keys=True).encode())
    if step.name == "download" and run.params.model.source == "local" and run.params.model.path:
        folder = resolve(run.params.model.path)
        for f in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- state
def _state_file(run: Run) -> Path:
    return run.dir / "steps.json"


def load_state(run: Run) -> dict:
    f = _state_file(run)
    return json.loads(f.read_text()) if f.exists() else {}


def _products_exist(step: Step, run: Run) -> bool:
    artifacts = run.artifacts()
    for name in _products(step, run):
        value = artifacts.get(name)
        if value is None:
            return False
        paths = value.values() if isinstance(value, dict) else [value]
        if not all(resolve(p).exists() for p in paths if isinstance(p, str)):
            return False
    return True


# ----------------------------------------------------------------------------- running
def execute_notebook(step: Step, run: Run) -> Path:
    """papermill the step's notebook into the run folder; HTML report even on failure."""
    import papermill

    out = run.sub("notebooks") / step.source.name
    params_file = run.params_file
    try:
        papermill.execute_notebook(
            str(step.source), str(out), parameters={"params_file": str(params_file)},
            cwd=str(step.source.parent), kernel_name="python3", progress_bar=False,
            request_save_on_cell_execute=True)
    except papermill.PapermillExecutionError as err:
        report.render_notebook(out, run)
        raise StepFailed(f"step '{step.name}' failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                         f"partly executed notebook: {out}") from None
    except Exception as err:  # the kernel died (e.g. killed for memory) or could not start
        report.render_notebook(out, run)
        raise StepFailed(f"step '{step.name}' stopped: {type(err).__name__}: {err}\n"
                         f"partly executed notebook: {out}") from None
    report.render_notebook(out, run)
    return out


def run_steps(run: Run, targets: list[str], force: bool | set[str] = False) -> list[tuple[str, str]]:
    """Run the targets (and what they need); returns (step, 'ran'|'skipped') in order."""
    steps = plan(targets, run)
    partials.remove_stale(run.dir)  # what killed runs left half-written
    preflight.check(run, steps)  # every problem the steps would meet, before any of them runs
    forced = set(targets) if force is True else set(force or ())
    state = load_state(run)
    done: list[tuple[str, str]] = []
    fingerprints = {k: v.get("fingerprint", "") for k, v in state.items()}
    llama_cpp = None
    if any(s.uses_llama_cpp for s in steps):
        try:
            llama_cpp = toolchain.llama_cpp_info(run.params.llama_cpp.dir)
        except toolchain.ToolNotFound as err:
            log.warning("%s", err)  # the steps that need the tools will report it
    try:
        for step in steps:
            fp = fingerprint(step, run, fingerprints, llama_cpp)
            prev = state.get(step.name, {})
            if step.name not in forced and prev.get("fingerprint") == fp and _products_exist(step, run):
                log.info("step %s: up to date, skipped", step.name)
                done.append((step.name, "skipped"))
                fingerprints[step.name] = fp
                continue
            if step.uses_llama_cpp and llama_cpp:
                run.record("llama_cpp", llama_cpp)
            log.info("step %s: running %s", step.name, step.notebook)
            state.pop(step.name, None)
            write_json(_state_file(run), state)
            started = time.time()
            with forcing(step.name in forced):
                execute_notebook(step, run)
            missing = [p for p in _products(step, run) if p not in run.artifacts()]
            if missing:
                raise StepFailed(f"step '{step.name}' finished without recording {missing} in {run.artifacts_file}")
            fingerprints[step.name] = fp
            state[step.name] = {"fingerprint": fp, "seconds": round(time.time() - started, 1),
                                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            write_json(_state_file(run), state)
            done.append((step.name, "ran"))
    finally:
        report.render_index(run)
    return done
