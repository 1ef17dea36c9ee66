"""07_tune's quality inputs for the types it measures (tune_screen.py): what step 06 did not measure.

* `missing_kld`: the mean KL divergence of the types step 06 did not measure (made by tune, or
  step 06 not run), with step 06's reference logits and corpus (checks/quality.kld_table), so every
  type is held to the same budget.
* `imatrix_variants`: each low-bit type (4 bits per weight or fewer) also with an importance matrix
  (`llama-imatrix` over the calibration text the project ships, llama_cpp/corpus.py, as gguf-my-repo
  makes them; without one when `quantize.imatrix` made the run's files with it). Both KLDs are kept
  on the type's screen; the lower one decides the file tune uses and whether the type is within
  the budget. On synthetic weights the KLD ranks the types but predicts no real quality.
* `quality_inputs`: step 06's KLD per type with tune's own, and the types the budget allows.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from ..checks import quality
from ..llama_cpp import corpus
from ..llama_cpp.toolchain import ToolFailed, ToolNotFound
from ..model import quant_types
from ..model.gguf_io import gguf_summary
from ..tune.config import TuneError
from . import quantize
from .evaluate import reference

if TYPE_CHECKING:
    from .tune_screen import TypeScreen

log = logging.getLogger(__name__)


def missing_kld(run, files: dict[str, Path], known: dict[str, float | None]) -> dict[str, float | None]:
    """Mean KLD of the types in `files` that `known` (step 06's table) lacks, measured as step 06 does;
    {} when step 06 measures none (evaluate.perplexity false, or no reference)."""
    todo = {q: p for q, p in files.items() if known.get(q) is None}
    if not todo or not run.params.evaluate.perplexity:
        return {}
    ref_name, ref_path = reference(run, files)
    if ref_path is None:
        return {}
    todo = {q: p for q, p in todo.items() if Path(p).resolve() != Path(ref_path).resolve()}
    if not todo:
        return {}
    log.info("KL divergence of the types step 06 did not measure: %s", ", ".join(todo))
    try:
        table = quality.kld_table(ref_path, todo, corpus.corpus_path("eval"), run, base_name=ref_name)
    except (RuntimeError, OSError, ValueError) as err:  # a tool, a file, a GGUF: the types stay unmeasured, said so
        log.warning("KL divergence of %s not measured: %s", ", ".join(todo), str(err).splitlines()[0])
        return {}
    return {r["variant"]: float(r["kld"]) for _, r in table.iterrows() if r["variant"] in todo}


def low_bit(quant: str) -> bool:
    """4 bits per weight or fewer (Q4_1 and below): the types an importance matrix can help."""
    row = quant_types.get(quant)
    return bool(row) and row.main not in ("f32", "f16", "bf16") and row.bpw <= 5.0


def imatrix_variants(run, screens: list[TypeScreen], text: dict[str, Path], known: dict[str, float | None],
                     enabled: bool = True) -> dict[str, float]:
    """For every low-bit type with a file: the other variant (with llama-imatrix's importance matrix over
    the shipped calibration text where the run's file has none, as gguf-my-repo makes them, else without),
    its KLD measured as step 06 measures it, and the better of the two as the type's file (`text` and the
    screen are updated). Returns quant -> the better KLD, for the types where both were measured."""
    todo = [s for s in screens if s.file and low_bit(s.quant)]
    if not enabled or not todo or not run.params.evaluate.perplexity or "text_gguf" not in run.artifacts():
        return {}
    text_gguf = run.artifact_path("text_gguf")
    ref_name, ref_path = reference(run, text)
    if ref_path is None:
        return {}
    has = {s.quant: bool(gguf_summary(s.file)["imatrix"]) for s in todo}
    try:
        matrix = quantize.compute_imatrix(run, text_gguf)
    except (ToolFailed, ToolNotFound, OSError, RuntimeError) as err:
        log.warning("no importance matrix (%s): the low-bit types are measured without it only",
                    str(err).splitlines()[0])
        return {}
    alts: dict[str, tuple[str, Path, bool]] = {}
    for s in todo:
        with_matrix = not has[s.quant]
        name = f"{s.quant}+imatrix" if with_matrix else f"{s.quant}-noimatrix"
        out = run.sub("models") / f"{quantize.output_stem(text_gguf)}-{s.quant}-{'imatrix' if with_matrix else 'noimatrix'}.gguf"
        try:
            path, _ = quantize.quantize_file(run, text_gguf, s.quant, matrix if with_matrix else None, out=out)
        except (ToolFailed, ToolNotFound, OSError, RuntimeError) as err:
            log.warning("%s not made: %s", name, str(err).splitlines()[0])
            continue
        alts[s.quant] = (name, path, with_matrix)
    if not alts:
        return {}
    try:
        table = quality.kld_table(ref_path, {n: p for n, p, _ in alts.values()}, corpus.corpus_path("eval"), run,
                                  base_name=ref_name)
    except (RuntimeError, OSError, ValueError) as err:  # unmeasured: the types keep their one variant, said so
        log.warning("KL divergence of the importance-matrix variants not measured: %s", str(err).splitlines()[0])
        return {}
    alt_kld = {r["variant"]: float(r["kld"]) for _, r in table.iterrows()}
    out_kld: dict[str, float] = {}
    for s in todo:
        if s.quant not in alts or alts[s.quant][0] not in alt_kld:
            continue
        name, path, with_matrix = alts[s.quant]
        own, alt = known.get(s.quant), alt_kld[name]
        s.kld_plain, s.kld_imatrix = (own, alt) if with_matrix else (alt, own)
        s.imatrix = has[s.quant]
        if own is None or alt < own:
            s.file, s.imatrix, s.source = path, with_matrix, f"tune, {'with' if with_matrix else 'without'} imatrix"
            text[s.quant] = path
        out_kld[s.quant] = alt if own is None else min(own, alt)
        log.info("%s: KLD %s without the importance matrix, %s with it: using the file %s it", s.quant,
                 _g(s.kld_plain), _g(s.kld_imatrix), "with" if s.imatrix else "without")
    return out_kld


def _g(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def step06_kld(run) -> dict[str, float]:
    """Mean KLD per variant from step 06's metrics ({} when it has none)."""
    folder = run.resolve(run.artifacts().get("metrics") or run.dir / "metrics")
    table = folder / "variants.csv"
    if not table.exists():
        log.warning("%s not found: no KL divergence per quant type from step 06", table)
        return {}
    df = pd.read_csv(table)
    return {r["variant"]: float(r["kld"]) for _, r in df.iterrows() if "kld" in df and pd.notna(r["kld"])}


def quality_inputs(run, quant_types: list[str], kld_budget: float,
                   measured: dict[str, float | None] | None = None) -> tuple[dict[str, float | None], set[str]]:
    """(mean KLD per quant type from step 06's metrics and `measured` (tune's own, for the types step
    06 did not measure), the types allowed by the budget)."""
    if not quant_types:
        # Without a type there is nothing to allow, nor a closest one to fall back to.
        raise TuneError("no quant type to tune: tune.quant_types and the run's quantized types (step 05, "
                        "quantize.types) give none with a text GGUF; list at least one type in tune.quant_types "
                        "(e.g. [Q4_K_M]) or in quantize.types and rerun step 05")
    known = {**step06_kld(run), **{k: v for k, v in (measured or {}).items() if v is not None}}
    kld: dict[str, float | None] = {q: known.get(q) for q in quant_types}
    # Without a measurement (a single ready-made GGUF, evaluate.perplexity false) a type is allowed.
    allowed = {q for q, v in kld.items() if v is None or v <= kld_budget}
    if not allowed:
        closest = min(kld, key=lambda q: kld[q])
        log.warning("no quant type within KLD %s (%s); tuning the closest one, %s", kld_budget, kld, closest)
        allowed = {closest}
    return kld, allowed
