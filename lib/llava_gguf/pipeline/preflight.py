"""Before step 01 does any work: everything the planned steps will need, checked at once.

At 7B a bad input found by step 04, 05 or 06 costs minutes of conversion first. `preflight(run,
steps)` returns every problem it can see up front, each naming the file or params key and the fix;
`check(run, steps)` raises one `PreflightError` listing them all. The pipeline calls it before the
first step; nothing is read beyond headers and nothing is written.

What can be known up front:
- the `model` params (a local path that is no folder, a ready-GGUF run without its file names, ...);
- `quantize.types` empty, or a q8_0 text export that llama-quantize cannot requantize;
- `evaluate.cases`: each image exists and is an image llama-mtmd-cli reads (decoded with Pillow);
- the llama.cpp tools each step runs (`step_tools`), all missing ones named together;
- a local checkpoint (`model.source: local`): shard headers, index, layout and projector (what the
  surgery step checks), the vision config (step 03's plan), the text config, shapes and the
  tokenizer (step 04's plan) - all from headers;
- ready GGUF files in a local folder (`model.format: gguf`): present, complete, text and mmproj
  not swapped.
A hub checkpoint is not on disk yet: the download step checks its files and tokenizer as soon as
they arrive, and steps 02-04 plan (and so check) everything before they write.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..llama_cpp import toolchain
from ..model.checkpoint import CheckpointError
from ..model.config_vit import VisionExportError
from ..model.layout import LayoutError
from ..model.manifest import ManifestError
from ..model.text_model import TextExportError, plan_from_manifest
from ..model.tokenizer import model_problem
from ..model.vision_config import VisionConfigError
from ..run.workspace import Run, params_vision_config, resolve
from ..steps import download, evaluate, tools as step_tools
from ..steps.surgery import analyze
from ..steps.vision_export import plan_mmproj

log = logging.getLogger(__name__)

# What makes the checkpoint's static checks worth doing: steps that read it.
_CHECKPOINT_STEPS = ("download", "surgery", "vision", "text")


class PreflightError(ValueError):
    """The run cannot succeed as configured; lists every problem found before anything ran."""


def _names(steps) -> list[str]:
    return [getattr(s, "name", s) for s in steps]


def preflight(run: Run, steps) -> list[str]:
    """Every problem the planned `steps` (names or pipeline Steps) would meet, found before any work."""
    names = _names(steps)
    model_params = download.params_problems(run)
    problems = model_params + _params_problems(run, names)
    if "evaluate" in names:
        problems += evaluate.case_problems(run)
    problems += _tool_problems(run, names)
    if not model_params:
        problems += _model_problems(run, names)
    return problems


def check(run: Run, steps) -> None:
    """Raise PreflightError listing every problem of `preflight`; log that the run may start otherwise."""
    problems = preflight(run, steps)
    if problems:
        raise PreflightError(f"{run.params_file}: this run cannot succeed as configured; nothing was run. "
                             f"Fix these first:\n" + "\n".join(f"  - {p}" for p in problems))
    log.info("preflight: %s ready", ", ".join(_names(steps)) or "nothing")


def _params_problems(run: Run, names: list[str]) -> list[str]:
    p, where = run.params, run.params_file
    out = []
    if "quantize" in names and p.model.format == "checkpoint":
        if not p.quantize.types:
            out.append(f"{where}: quantize.types is empty; list at least one type, e.g. [Q5_K_M] (or run only up "
                       "to `make text`)")
        elif p.convert.outtype not in ("f16", "bf16", "f32"):
            out.append(f"{where}: convert.outtype {p.convert.outtype} makes a {p.convert.outtype.upper()} text GGUF, "
                       f"which llama-quantize will not requantize to {p.quantize.types}; set convert.outtype: f16 "
                       "(or bf16/f32) for quantize.types")
    return out


def _tool_problems(run: Run, names: list[str]) -> list[str]:
    missing: dict[str, list[str]] = {}  # tool -> the steps that need it
    for step in names:
        required, optional = step_tools.tools_for(run.params, step)
        for tool in required + optional:
            try:
                toolchain.find_tool(tool, run.params.llama_cpp.dir)
            except toolchain.ToolNotFound:
                if tool in required:
                    missing.setdefault(tool, []).append(step)
                else:
                    log.warning("llama.cpp tool %s not found: step %s will skip its check (not passed)", tool, step)
    if not missing:
        return []
    looked = ", ".join(f"{label} {path}" for label, path in toolchain.candidate_dirs(run.params.llama_cpp.dir))
    listed = ", ".join(f"{tool} ({', '.join(steps)})" for tool, steps in missing.items())
    return [f"llama.cpp tools not found: {listed}; looked in {looked}. Run `make llama-cpp` to build the pinned "
            f"toolchain, or set {toolchain.ENV_DIR} (or params llama_cpp.dir) to a llama.cpp build that has them"]


def _model_problems(run: Run, names: list[str]) -> list[str]:
    p = run.params.model
    if p.source != "local":
        return []  # made here (tiny) or not downloaded yet: the download step checks what arrives
    folder = resolve(p.path)
    if p.format == "gguf":
        return download.gguf_input_problems(folder, run) if {"download", "evaluate"} & set(names) else []
    if not set(names) & set(_CHECKPOINT_STEPS):
        return []
    return checkpoint_problems(folder, run, names)


def checkpoint_problems(folder: Path, run: Run, names: list[str] | None = None) -> list[str]:
    """What steps 01-04 would refuse in this checkpoint folder, from its headers (nothing written)."""
    names = names or list(_CHECKPOINT_STEPS)
    refusals = (CheckpointError, LayoutError, ManifestError, TextExportError, VisionExportError,
                VisionConfigError)
    try:
        manifest = analyze(folder)  # shards, index, headers, layout, projector: step 02
    except refusals as err:
        return [str(err)]  # the later plans read the same headers
    out = []
    tokenizer = model_problem(folder / "tokenizer.model") if {"download", "text"} & set(names) else None
    if tokenizer:
        out.append(f"{folder / 'tokenizer.model'}: {tokenizer}")
    if "vision" in names:
        try:
            plan_mmproj(manifest, run.params.convert.mmproj_outtype, params_vision_config(run.params))
        except refusals as err:
            out.append(str(err))
    if "text" in names and not tokenizer:  # the text plan reads the tokenizer too: one report of it is enough
        try:
            plan_from_manifest(manifest, run.params.convert.outtype)
        except refusals as err:
            out.append(str(err))
    return out
