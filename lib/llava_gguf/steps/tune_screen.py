"""07_tune's quant types: which ones, their files, and a cheap llama-bench screen before any answer is timed.

1. **Which types** (`candidate_types`): those `tune.quant_types` names, else the candidates of this
   CPU's repack table (`quant_candidates`: Q8_0, Q6_K, Q5_K_M (the seed's), Q4_K_M, Q4_K_S, IQ4_NL,
   Q4_0, and every other type whose main ggml type this CPU repacks, e.g. Q2_K with AVX-512).
2. **Their files** (`prepare_files`): the run's own quantized files where step 05 made them, the
   others made with step 05's `quantize_file` (same names, same reuse rules: a file already in
   `models/` from an earlier tune is reused). A type that cannot be made (ready-made GGUF files,
   no disk) says why.
3. **Quality** (tune_quality.py): the KL divergence of the types step 06 did not measure, and of
   the low-bit ones with an importance matrix too, so every type is held to the budget.
4. **The screen** (`bench_types`): one `llama-bench` call per type (pp<tune.bench_prompt> and
   tg<tune.bench_gen> at the candidate thread counts): its prefill and generation rates, and whether
   llama.cpp repacked it, read from that load's log (llama_cpp/repack_log), beside what the table
   expected.
5. **Screened out** (`screen_out`), each with its reason: no file, llama-bench failed, KL divergence
   over the budget, or dominated: another type within the budget, at least as precise (lower or equal
   KLD; bits per weight where KLD is unknown), that prefills *and* generates faster by more than
   `tune.screen_margin`. Such a type is slower at every image budget, whatever the budget's share
   of prefill and generation. The seed's type is never screened out as dominated: it is the
   baseline, timed whatever its screen says (a failed llama-bench or a KLD over the budget is still
   shown as its reason).

`coverage` then says, for every type and image budget, the screened answer time or why there is none.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from ..llama_cpp import llama_bench, toolchain
from ..llama_cpp.toolchain import ToolFailed, ToolNotFound
from ..model import quant_types
from ..model.gguf_io import GGUFError
from ..run.machine import usable_cores
from . import quantize
from ..tune.config import SEED_TYPE, Config
from ..tune.quant_candidates import ALWAYS_CONSIDERED, Candidate, CpuFeatures, quant_candidates, this_cpu

log = logging.getLogger(__name__)

KEPT = "kept"


@dataclass
class TypeScreen:
    """One quant type's way through the screen."""

    quant: str
    why: str  # why it is a candidate
    repacked_expected: bool | None = None  # from the repack table (None: not a table candidate)
    layout_expected: str | None = None
    file: Path | None = None
    source: str | None = None  # "run" (step 05's), "quantized" (made now), "reused" (an earlier tune's)
    kld: float | None = None  # of the file used (the better of the two variants where both were measured)
    # 4-bit types (`low_bit`): the KLD without and with the importance matrix, and whether the file used has it.
    kld_plain: float | None = None
    kld_imatrix: float | None = None
    imatrix: bool | None = None
    bench: Any = None  # llama_bench.BenchRun
    bench_error: str | None = None
    status: str = KEPT  # or "screened out"
    reason: str | None = None

    def rates(self) -> dict[str, Any]:
        b = self.bench
        pp, tg = (b.best("pp"), b.best("tg")) if b else (None, None)
        # The best repetition at the best thread count: what the type can do here (see BenchTest).
        return {"pp_test": pp.test if pp else None, "pp_tokens_per_s": pp.best_tokens_per_s if pp else None,
                "pp_threads": pp.threads if pp else None, "tg_test": tg.test if tg else None,
                "tg_tokens_per_s": tg.best_tokens_per_s if tg else None, "tg_threads": tg.threads if tg else None}

    def row(self) -> dict[str, Any]:
        load = self.bench.load if self.bench else None
        s = load.summary() if load else {}
        final = load.final if load else None
        return {"quant": self.quant, "bpw": quant_types.bits_per_weight(self.quant) or None, "why": self.why,
                "file": self.file.name if self.file else None, "source": self.source,
                **self.rates(),
                "repacked": s.get("repacked"), "repack_MiB": s.get("repack_MiB"),
                "repacked_types": ", ".join(final.repacked_types()) if final and final.repacked else None,
                "layouts": s.get("layouts"), "repacked_expected": self.repacked_expected,
                "layout_expected": self.layout_expected, "kld": self.kld, "kld_plain": self.kld_plain,
                "kld_imatrix": self.kld_imatrix, "imatrix": self.imatrix,
                "status": self.status, "reason": self.reason,
                "bench_log": str(self.bench.log_file) if self.bench and self.bench.log_file else None}


# ----------------------------------------------------------------------------- 1. which types
def candidate_types(named: list[str] | None, cpu: CpuFeatures | None = None,
                    extra: list[str] = ()) -> list[TypeScreen]:
    """The types tune measures: `named` (tune.quant_types) as given, else this CPU's candidates and
    `extra` (the types step 05 made: the user asked for them), most precise first."""
    try:
        cands = {c.name: c for c in quant_candidates(cpu or this_cpu())}
    except (OSError, ValueError) as err:  # no /proc/cpuinfo, or flags no kernel tests
        log.warning("CPU features not readable (%s): tune measures the table's usual types", err)
        cands = {}
    if named:
        return [_screen(q, "named in tune.quant_types", cands.get(q)) for q in named]
    if cands:
        out = [_screen(c.name, c.why, c) for c in cands.values()]
    else:
        out = [_screen(q, "always considered (CPU features unknown)", None)
               for q in dict.fromkeys([*ALWAYS_CONSIDERED, SEED_TYPE])]
    have = {s.quant for s in out}
    out += [_screen(q, "made by step 05 (quantize.types)", None) for q in extra if q not in have]
    order = list(quant_types.QUANT_TYPES)
    return sorted(out, key=lambda s: order.index(s.quant) if s.quant in order else len(order))


def _screen(name: str, why: str, cand: Candidate | None) -> TypeScreen:
    return TypeScreen(name, why, cand.repacked if cand else None, cand.layout if cand else None)


# ----------------------------------------------------------------------------- 2. files
def prepare_files(run, screens: list[TypeScreen], existing: dict[str, Path]) -> dict[str, Path]:
    """quant -> text GGUF for every type that has or gets one (reasons set on the others). `existing`:
    the run's variants (step 05's files and the unquantized export), used as they are."""
    out: dict[str, Path] = {}
    text_gguf = run.artifact_path("text_gguf") if "text_gguf" in run.artifacts() else None
    imatrix = None
    # Made in this order: the types this CPU repacks, then the others, smallest first in each, so a disk
    # too small for every 7B file loses the least likely winners (those say why they have none).
    for s in sorted(screens, key=lambda s: (s.quant not in existing, not s.repacked_expected,
                                            quant_types.bits_per_weight(s.quant, 99.0))):
        if s.quant in existing:
            s.file, s.source = Path(existing[s.quant]), "run"
            out[s.quant] = s.file
            continue
        if text_gguf is None:
            _out(s, "no unquantized text GGUF to quantize from (model.format gguf: only the downloaded files)")
            continue
        try:
            if run.params.quantize.imatrix and imatrix is None:
                imatrix = quantize.compute_imatrix(run, text_gguf)  # as step 05 made the run's files
            path, reused = quantize.quantize_file(run, text_gguf, s.quant, imatrix)
        except (ToolFailed, ToolNotFound, GGUFError, OSError, RuntimeError) as err:
            _out(s, f"not quantized: {str(err).splitlines()[0]}")
            continue
        s.file, s.source = path, "reused" if reused else "quantized"
        log.info("%s: %s %s", s.quant, "reused" if reused else "quantized", path.name)
        out[s.quant] = path
    return out


def _out(s: TypeScreen, reason: str) -> None:
    s.status, s.reason = "screened out", reason


# ----------------------------------------------------------------------------- 4. llama-bench
def bench_groups(thread_configs: list[Config]) -> list[dict[str, Any]]:
    """llama-bench calls covering the candidate thread counts: one for every unpinned count (a single
    model load), one per pinned core set (its -C mask and --cpu-strict)."""
    plain = sorted({c.threads for c in thread_configs if c.threads and not c.cpu_mask})
    groups = [{"threads": plain, "cpu_mask": None, "cpu_strict": None}] if plain else []
    groups += [{"threads": [c.threads], "cpu_mask": c.cpu_mask, "cpu_strict": c.cpu_strict}
               for c in thread_configs if c.threads and c.cpu_mask]
    if not groups:  # the tool's default thread count
        groups = [{"threads": [usable_cores()], "cpu_mask": None, "cpu_strict": None}]
    return groups


def bench_types(tool: Path, screens: list[TypeScreen], thread_configs: list[Config], n_prompt: int, n_gen: int,
                repetitions: int, logs: Path, timeout: float | None = None, runner=None) -> None:
    """One llama-bench screen per type with a file (results, or the error, set on each)."""
    runner = runner or llama_bench.run_bench
    groups = bench_groups(thread_configs)
    for s in tqdm([s for s in screens if s.file], desc="llama-bench screen", unit="type"):
        runs = []
        for i, g in enumerate(groups):
            log_file = logs / f"bench-{s.quant}" f"{'' if len(groups) == 1 else f'-{i}'}.log"
            try:
                runs.append(runner(tool, s.file, g["threads"], n_prompt, n_gen, log_file, repetitions,
                                   g["cpu_mask"], g["cpu_strict"], timeout))
            except (ToolFailed, llama_bench.BenchParseError, OSError) as err:
                s.bench_error = str(err).splitlines()[0]
                log.warning("llama-bench failed on %s: %s", s.quant, s.bench_error)
                break
        if runs and not s.bench_error:
            first = runs[0]
            s.bench = llama_bench.BenchRun(first.gguf, [t for r in runs for t in r.tests], first.load, first.log_file,
                                           first.command)
            r = s.rates()
            log.info("%s: %s %.1f t/s (%s threads), %s %.1f t/s (%s threads), repacked: %s", s.quant, r["pp_test"],
                     r["pp_tokens_per_s"] or math.nan, r["pp_threads"], r["tg_test"], r["tg_tokens_per_s"] or math.nan,
                     r["tg_threads"], first.load.repacked)


# ----------------------------------------------------------------------------- 5. screened out
def screen_out(screens: list[TypeScreen], allowed: set[str] | None, kld_budget: float, margin: float,
               seed: str = SEED_TYPE) -> list[str]:
    """Set status and reason on every type (`allowed`: the types within the KLD budget, None: every
    type whose KLD is unknown or within `kld_budget`); returns the kept types, most precise first."""
    for s in screens:
        if s.status != KEPT:
            continue
        over = (s.quant not in allowed) if allowed is not None else (s.kld is not None and s.kld > kld_budget)
        if s.bench_error:
            _out(s, f"llama-bench failed: {s.bench_error}")
        elif over:
            _out(s, f"KL divergence {s.kld:.4g} over tune.kld_budget {kld_budget:g}" if s.kld is not None
                 else "not within tune.kld_budget")
    # Dominators are found among the types kept so far before any is screened out: precision is the
    # KLD where both types have one and bits per weight otherwise, so domination is not transitive, and
    # a type screened out early could no longer screen out another: what survived depended on the order.
    kept = [s for s in screens if s.status == KEPT]
    dominated_by = {id(s): [o for o in kept if o is not s and o.bench and _dominates(o, s, margin)]
                    for s in kept if s.quant != seed and s.bench}
    for s in kept:
        better = dominated_by.get(id(s))
        if better:
            o = max(better, key=lambda o: o.rates()["pp_tokens_per_s"])
            a, b = s.rates(), o.rates()
            _out(s, f"dominated by {o.quant}: at least as precise and faster at both prefill "
                    f"({b['pp_tokens_per_s']:.4g} vs {a['pp_tokens_per_s']:.4g} t/s) and generation "
                    f"({b['tg_tokens_per_s']:.4g} vs {a['tg_tokens_per_s']:.4g} t/s) by more than "
                    f"tune.screen_margin {margin:.0%}")
    return [s.quant for s in screens if s.status == KEPT]


def _dominates(o: TypeScreen, s: TypeScreen, margin: float) -> bool:
    a, b = s.rates(), o.rates()
    if None in (a["pp_tokens_per_s"], a["tg_tokens_per_s"], b["pp_tokens_per_s"], b["tg_tokens_per_s"]):
        return False
    if o.kld is not None and s.kld is not None:
        precise = o.kld <= s.kld
    else:
        precise = quant_types.bits_per_weight(o.quant, 0.0) >= quant_types.bits_per_weight(s.quant, 0.0)
    return (precise and b["pp_tokens_per_s"] > a["pp_tokens_per_s"] * (1 + margin)
            and b["tg_tokens_per_s"] > a["tg_tokens_per_s"] * (1 + margin))


def screen_table(screens: list[TypeScreen]) -> pd.DataFrame:
    """One row per type: rates, repacked (from the load log) and expected (from the table), KLD, status."""
    return pd.DataFrame([s.row() for s in screens])


def repack_mismatches(screens: list[TypeScreen]) -> list[str]:
    """Types whose load log disagrees with the repack table (a build without REPACK, an AMX buffer...)."""
    out = []
    for s in screens:
        got = s.bench.load.repacked if s.bench else None
        if got is None or s.repacked_expected is None:
            continue
        final = s.bench.load.final
        main = quant_types.get(s.quant).main if quant_types.get(s.quant) else None
        main_repacked = bool(final and main in final.repacked_types()) if final and final.repacked else got
        if main_repacked != s.repacked_expected:
            out.append(f"{s.quant}: the repack table expected its {main} matrices "
                       f"{'repacked' if s.repacked_expected else 'left as they are'}, the load log says "
                       f"{'repacked' if main_repacked else 'not repacked'}")
    return out


# ----------------------------------------------------------------------------- coverage
def coverage(rows: list[dict], screens: list[TypeScreen], budgets: list[str], skipped: list[dict],
             screening_phase_prefix: str = "screen") -> pd.DataFrame:
    """Per type and image budget: the best screened answer (s, projected to the full length; from the
    successful rows whose phase starts with `screening_phase_prefix`) with its configuration, or why that
    type has none at that budget."""
    out = []
    for s in screens:
        for b in budgets:
            ok = [r for r in rows if r.get("quant") == s.quant and r.get("budget") == b and r.get("status") == "ok"
                  and str(r.get("phase", "")).startswith(screening_phase_prefix) and r.get("answer_s") is not None]
            row = {"quant": s.quant, "budget": b, "answer_s": None, "config": None, "why_not": None}
            if ok:
                best = min(ok, key=lambda r: r["answer_s"])
                row.update(answer_s=best["answer_s"], config=best["config"])
            elif s.status != KEPT:
                row["why_not"] = s.reason
            else:
                row["why_not"] = _why_not_screened(s.quant, b, rows, skipped)
            out.append(row)
    return pd.DataFrame(out, columns=["quant", "budget", "answer_s", "config", "why_not"])


def _why_not_screened(quant: str, budget: str, rows: list[dict], skipped: list[dict]) -> str:
    """Why a kept type has no screened answer at `budget`: its failure at this budget, else what skipped it
    at this budget (a failure elsewhere may not be why: the budget ran out first), else a failure at another
    budget, said as such."""
    failed = [r for r in rows if r.get("quant") == quant and r.get("status") == "failed"]
    here = [r for r in failed if r.get("budget") == budget]
    over = [k for k in skipped if k.get("quant") == quant and k.get("budget") == budget]
    if here:
        return f"failed: {_first_line(here[0])}"
    if over:
        return over[0]["why"]
    if failed:
        return f"failed at budget {failed[0].get('budget')}: {_first_line(failed[0])}"
    return "not screened at this budget"


def _first_line(row: dict) -> str:
    return str(row.get("error")).splitlines()[0]


@dataclass
class ScreenResult:
    """What the report shows of the type screen."""

    screens: list[TypeScreen] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    test: dict[str, Any] = field(default_factory=dict)  # n_prompt, n_gen, repetitions, threads, margin
    notes: list[str] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        return screen_table(self.screens)

    def best_pp(self) -> dict[str, Any] | None:
        """The fastest prefill of any type at any thread count: this CPU's measured int8 matmul ceiling."""
        rated = [(s.rates(), s.quant) for s in self.screens if s.bench and s.rates()["pp_tokens_per_s"]]
        if not rated:
            return None
        r, q = max(rated, key=lambda x: x[0]["pp_tokens_per_s"])
        return {"quant": q, "test": r["pp_test"], "tokens_per_s": r["pp_tokens_per_s"], "threads": r["pp_threads"]}

    def to_dict(self) -> dict[str, Any]:
        return {"test": self.test, "kept": self.kept, "types": self.table().to_dict("records"),
                "ceiling": self.best_pp(), "notes": self.notes}


def screen_types(run, screens: list[TypeScreen], kld: dict[str, float | None], allowed: set[str],
                 thread_configs: list[Config], logs: Path, seed: str, kld_budget: float,
                 runner=None) -> ScreenResult:
    """Steps 4 and 5 for the step: llama-bench on every type with a file, then the screen-out rules."""
    p, e = run.params.tune, run.params.evaluate
    for s in screens:
        s.kld = kld.get(s.quant)
    notes = []
    logs.mkdir(parents=True, exist_ok=True)
    for stale in logs.glob("*.log"):
        stale.unlink()
    try:
        tool = toolchain.find_tool("llama-bench", run.params.llama_cpp.dir)
    except toolchain.ToolNotFound as err:
        tool = None
        notes.append(f"types not screened with llama-bench: {str(err).splitlines()[0]}")
        log.warning("%s", notes[-1])
    if tool is not None:
        bench_types(tool, screens, thread_configs, p.bench_prompt, p.bench_gen, p.bench_repetitions, logs,
                    e.timeout_s, runner)
    kept = screen_out(screens, allowed, kld_budget, p.screen_margin, seed)
    notes += repack_mismatches(screens)
    if run.params.model.source == "tiny" and any(s.kld is not None for s in screens):
        notes.append("synthetic weights (model.source: tiny): the KL divergence ranks the types, and shows what "
                     "the importance matrix changes, but predicts no real quality")
    threads = sorted({t for g in bench_groups(thread_configs) for t in g["threads"]})
    return ScreenResult(screens, kept, {"n_prompt": p.bench_prompt, "n_gen": p.bench_gen,
                                        "repetitions": p.bench_repetitions, "threads": threads,
                                        "margin": p.screen_margin}, notes)
