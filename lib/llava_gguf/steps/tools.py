"""Which llama.cpp tools each step runs, for these params: asked before anything runs (preflight)
and at the start of each step, so a missing tool is named before minutes of work, not after.

Each step says it itself: its entry module's `llama_cpp_tools(params) -> (required, optional)`
(none: the step runs no llama.cpp tool). Optional tools only skip a check when missing (the
notebook then says "skipped, not passed")."""
from __future__ import annotations

import importlib
from pathlib import Path

from ..llama_cpp import toolchain
from ..run import registry
from ..run.params import Params


def tools_for(params: Params, step: str) -> tuple[list[str], list[str]]:
    """(required, optional) tools of a step for these params."""
    entry = registry.get(step).entry
    if not entry:
        return [], []
    declared = getattr(importlib.import_module(entry.partition(":")[0]), "llama_cpp_tools", None)
    return declared(params) if declared else ([], [])


def require(params: Params, step: str) -> dict[str, Path]:
    """Find every tool the step requires (ToolNotFound naming the first missing one)."""
    return {tool: toolchain.find_tool(tool, params.llama_cpp.dir) for tool in tools_for(params, step)[0]}
