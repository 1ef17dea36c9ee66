"""Which llama.cpp tools each step runs, for these params: asked before anything runs (preflight)
and at the start of each step, so a missing tool is named before minutes of work, not after."""
from __future__ import annotations

from pathlib import Path

from .llama_cpp import toolchain
from .params import Params


def tools_for(params: Params, step: str) -> tuple[list[str], list[str]]:
    """(required, optional) tools of a step. Optional ones only skip a check when missing (the
    notebook then says "skipped, not passed")."""
    ready_gguf = params.model.format == "gguf"
    if step == "vision" and not ready_gguf:
        return [], (["llama-mtmd-debug"] if params.convert.verify else [])
    if step == "text" and not ready_gguf and params.convert.verify:
        return ["llama-debug", "llama-tokenize"], []
    if step == "quantize" and not ready_gguf:
        return ["llama-quantize"] + (["llama-imatrix"] if params.quantize.imatrix else []), []
    if step == "evaluate":
        return ["llama-mtmd-cli", "llama-tokenize"] + (["llama-perplexity"] if params.evaluate.perplexity else []), []
    if step == "tune":  # llama-mtmd-debug only for the q8_0 mmproj's embedding NMSE
        return ["llama-mtmd-cli"], ["llama-mtmd-debug"]
    return [], []


def require(params: Params, step: str) -> dict[str, Path]:
    """Find every tool the step requires (ToolNotFound naming the first missing one)."""
    return {tool: toolchain.find_tool(tool, params.llama_cpp.dir) for tool in tools_for(params, step)[0]}
