"""The workflow's steps, each declared once: in its own notebook's metadata.

A step is a notebook `notebooks/NN_<name>.ipynb` whose top-level metadata holds

    "llava_gguf": {
      "step": "vision",                      # the name used by make, the CLI and artifacts
      "description": "write mmproj-model-f16.gguf and check it against PyTorch",
      "needs": ["surgery"],                  # steps whose products it reads
      "products": ["mmproj"],                # what it records in artifacts.json
      "gguf_products": [...],                # optional: its products when model.format is gguf
      "params": ["model", "convert", "llama_cpp"],   # params sections it reads (its fingerprint)
      "entry": "llava_gguf.steps.vision_export:run_vision",  # the library call, checks included
      "llama_cpp": true,                     # runs llama.cpp tools
      "checkpoint_only": true                # not applicable to ready GGUF files
    }

The pipeline, the CLI (`python -m llava_gguf step NAME`), `make help`, the per-step make targets,
the artifact producers, the run index and the benchmark all read this registry, so adding a step
is one notebook (with its declaration) plus its library module.

Stdlib only: the Makefile runs this file with the system Python (`make help` works before
`make setup`). The notebooks folder is `$LLAVA_GGUF_NOTEBOOKS`, else `notebooks/` of the checkout.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT_ENV = "LLAVA_GGUF_ROOT"
NOTEBOOKS_ENV = "LLAVA_GGUF_NOTEBOOKS"
METADATA_KEY = "llava_gguf"
_NOTEBOOK_NAME = re.compile(r"^\d\d_[A-Za-z0-9_]+\.ipynb$")


class StepDeclarationError(ValueError):
    """A notebook's `llava_gguf` metadata is missing a key or names an unknown step."""


def repo_root() -> Path:
    """The project checkout: $LLAVA_GGUF_ROOT, else the folder above lib/ (the package is editable)."""
    env = os.environ.get(ROOT_ENV)
    return Path(env).resolve() if env else Path(__file__).resolve().parents[3]


def notebooks_dir() -> Path:
    env = os.environ.get(NOTEBOOKS_ENV)
    return Path(env).resolve() if env else repo_root() / "notebooks"


@dataclass(frozen=True)
class Step:
    name: str
    source: Path  # the notebook
    description: str
    needs: tuple[str, ...]
    products: tuple[str, ...]
    params: tuple[str, ...]
    entry: str | None = None
    uses_llama_cpp: bool = False
    checkpoint_only: bool = False
    gguf_products: tuple[str, ...] | None = None

    @property
    def notebook(self) -> str:
        return self.source.name

    def products_for(self, model_format: str) -> tuple[str, ...]:
        if model_format == "gguf" and self.gguf_products is not None:
            return self.gguf_products
        return self.products

    def entry_point(self) -> Callable:
        """The library function the notebook's main cell calls (`module:function`)."""
        if not self.entry:
            raise StepDeclarationError(f"{self.source}: step '{self.name}' declares no 'entry' (module:function)")
        module, _, func = self.entry.partition(":")
        return getattr(importlib.import_module(module), func)


def _declaration(path: Path) -> Step | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8")).get("metadata", {}).get(METADATA_KEY)
    except (OSError, ValueError) as err:
        raise StepDeclarationError(f"{path}: not a readable notebook ({err})") from None
    if meta is None:
        return None
    missing = [k for k in ("step", "products", "params") if k not in meta]
    if missing:
        raise StepDeclarationError(f"{path}: metadata '{METADATA_KEY}' lacks {missing} (see registry.py)")
    return Step(name=meta["step"], source=path, description=meta.get("description", ""),
                needs=tuple(meta.get("needs", ())), products=tuple(meta["products"]), params=tuple(meta["params"]),
                entry=meta.get("entry"), uses_llama_cpp=bool(meta.get("llama_cpp", False)),
                checkpoint_only=bool(meta.get("checkpoint_only", False)),
                gguf_products=tuple(meta["gguf_products"]) if "gguf_products" in meta else None)


def steps(folder: Path | None = None) -> dict[str, Step]:
    """Every declared step, in notebook order."""
    folder = folder or notebooks_dir()
    found: dict[str, Step] = {}
    for path in sorted(p for p in folder.glob("*.ipynb") if _NOTEBOOK_NAME.match(p.name)):
        step = _declaration(path)
        if step is None:
            continue
        if step.name in found:
            raise StepDeclarationError(f"{path}: step '{step.name}' is also declared by {found[step.name].source}")
        found[step.name] = step
    for step in found.values():
        unknown = [n for n in step.needs if n not in found]
        if unknown:
            raise StepDeclarationError(f"{step.source}: needs unknown step(s) {unknown}; steps: {', '.join(found)}")
    return found


def get(name: str) -> Step:
    all_steps = steps()
    if name not in all_steps:
        raise KeyError(f"unknown step '{name}'; steps: {', '.join(all_steps)}")
    return all_steps[name]


def producer(product: str) -> str:
    """The step that records `product` in artifacts.json ('all' when none does, e.g. llama_cpp)."""
    all_steps = steps().values()
    for step in all_steps:
        if product in step.products:
            return step.name
    for step in all_steps:  # only on the ready-GGUF path (e.g. mmproj from the download)
        if product in (step.gguf_products or ()):
            return step.name
    return "all"


def main(argv: list[str]) -> int:
    """`registry.py names | help | uses-llama-cpp NAME`: what the Makefile needs."""
    command = argv[0] if argv else "names"
    if command == "names":
        print(" ".join(steps()))
    elif command == "help":
        for step in steps().values():
            print(f"  \033[1m{step.name:<22}\033[0m {step.source.stem[:2]}: {step.description}")
    elif command == "uses-llama-cpp" and len(argv) == 2:
        return 0 if get(argv[1]).uses_llama_cpp else 1
    else:
        print("usage: registry.py names | help | uses-llama-cpp STEP", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
