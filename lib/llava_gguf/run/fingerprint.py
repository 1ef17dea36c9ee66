"""What a step's result depends on, hashed: when it is unchanged the step is skipped.

A step's fingerprint hashes the params sections it declares, its notebook, the normalized code of
every package module its notebook imports (transitively, through the import graph below), the
fingerprints of the steps it needs, the llama.cpp build for steps that run its tools, and the
files of a local checkpoint. The same import graph backs the test that the package has no
import cycles.

A module counts by its code, not its text: its syntax tree without docstrings, comments or line
numbers (`normalized_code`), so editing a comment or a docstring reruns nothing (at 7B a rerun of
every step takes hours), while any change to what the code does reruns the steps that import it.
"""
from __future__ import annotations

import ast
import hashlib
import json
import sys
from pathlib import Path

from .registry import Step

PACKAGE = __name__.partition(".")[0]
_PKG_DIR = Path(sys.modules[PACKAGE].__file__).parent  # the package, wherever this module lies in it


def module_file(module: str) -> Path | None:
    """`steps.vision_export` -> its source file (a module or a package's __init__)."""
    base = _PKG_DIR.joinpath(*module.split(".")) if module else _PKG_DIR
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def package_modules() -> list[str]:
    """Every module of the package, dotted and relative to it ('' is the package itself)."""
    mods = []
    for path in sorted(_PKG_DIR.rglob("*.py")):
        parts = path.relative_to(_PKG_DIR).with_suffix("").parts
        mods.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return mods


def _is_package(module: str) -> bool:
    path = module_file(module)
    return path is not None and path.name == "__init__.py"


def imports_of(tree: ast.AST, module: str = "") -> set[str]:
    """Package modules imported anywhere in `tree` (function-level imports included).

    `module` is the importing module's dotted name, to resolve its relative imports."""
    here = module if _is_package(module) else module.rpartition(".")[0]
    found: set[str] = set()

    def add(base: str, names: list[str]) -> None:
        for name in names:
            candidate = f"{base}.{name}" if base else name
            found.add(candidate if module_file(candidate) else base)

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here.split(".") if here else []
                parts = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(parts + ([node.module] if node.module else []))
            elif node.module == PACKAGE or (node.module or "").startswith(PACKAGE + "."):
                base = node.module.removeprefix(PACKAGE).lstrip(".")
            else:
                continue
            add(base, [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(PACKAGE + "."):
                    found.add(a.name.removeprefix(PACKAGE + "."))
    return {m for m in found if module_file(m) is not None}


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (a package's __init__ counts as its own node)."""
    return {m: imports_of(ast.parse(module_file(m).read_text()), m) - {m} for m in package_modules()}


def notebook_imports(path: Path) -> set[str]:
    nb = json.loads(path.read_text())
    mods: set[str] = set()
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            try:
                mods |= imports_of(ast.parse("".join(cell["source"])))
            except SyntaxError:  # IPython magics
                continue
    return mods


def code_closure(modules: set[str]) -> list[Path]:
    """Source files of the given modules and of everything they import from the package."""
    graph = import_graph()
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        mod = todo.pop()
        if mod in seen or mod not in graph:
            continue
        seen.add(mod)
        todo.extend(graph[mod])
    return [module_file(m) for m in sorted(seen)]


def normalized_code(path: Path) -> bytes:
    """The module's syntax tree less docstrings, comments and positions: what its code does."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                # An empty body is not valid Python, so a docstring-only body keeps a placeholder.
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False).encode()


def fingerprint(step: Step, params: dict, upstream: list[str], llama_cpp: dict | None = None,
                local_files: Path | None = None) -> str:
    """`params`: the run's params as JSON data; `upstream`: the needed steps' fingerprints;
    `llama_cpp`: the build's info for steps that run its tools; `local_files`: a folder whose
    files' names, sizes and mtimes count (a local checkpoint read in place)."""
    h = hashlib.sha256()
    h.update(json.dumps({k: params.get(k) for k in step.params}, sort_keys=True).encode())
    h.update(step.source.read_bytes())
    for path in code_closure(notebook_imports(step.source)):
        h.update(str(path.relative_to(_PKG_DIR)).encode() + b"\0" + normalized_code(path))
    for fp in upstream:
        h.update(fp.encode())
    if step.uses_llama_cpp and llama_cpp:
        h.update(json.dumps(llama_cpp, sort_keys=True).encode())
    if local_files is not None and local_files.is_dir():
        for f in sorted(local_files.rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(local_files)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
