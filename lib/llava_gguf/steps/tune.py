"""Step 07: the fastest llama-mtmd-cli configuration on this machine within a quality budget.

Everything is measured against the seed's command, run in the same step on the same machine:
the Q5_K_M text GGUF (else the run's first type), the f16 mmproj at its full image budget, the
tool's default runtime settings and `--chat-template vicuna`, on `evaluate.cases[0]`.

Before any answer is timed, the quant types are chosen and screened (tune_screen.py): this CPU's
candidates from its repack table (or `tune.quant_types`), quantized where step 05 did not make them,
their KL divergence measured where step 06 did not (the low-bit ones also with an importance matrix,
the better file kept), then one `llama-bench` call each (prefill and generation rates, repacked or
not from its load log); a type slower at both than a more precise one, over the KLD budget or
failing is screened out with its reason. A second baseline, the published recipe (the seed's
command on the unpatched pinned llama.cpp, tune/published.py), is timed like the first, and each
budget's recommendation gets its bound as a number (tune/bound.py).

The search is staged, not a cartesian product (each stage keeps the winner of the one before):

1. threads (-t and -tb together) on the baseline's text GGUF: on a CPU with clusters, one core set
   per stage candidate (big, big+medium, all; topology.py), its threads pinned to its CPUs;
2. quant types (only those within the KL-divergence budget can be recommended; step 06 measured it);
3. flash attention x KV-cache type x ubatch;
4. mmproj type x image budget (x the allowed quant types, below the full budget).

Screening runs are single short runs (`tune.screen_n_predict` tokens, ranked by the answer time
projected to `evaluate.n_predict` tokens) and stop when
`tune.budget_minutes` is spent, but for one run per image budget (the best configuration so far, at
that budget): each budget gets a recommendation. Then, per image budget, the best `tune.finalists` screened
configurations and the baseline are confirmed with full runs (`evaluate.n_predict` tokens): a
warm-up run plus `tune.repetitions` measured runs each; a confirmation run taken under load
(machine_load.py: other processes over `evaluate.load_threshold` cores) is dropped and run again, at
most `tune.load_retries` times per configuration. The winner and "faster" follow winner.py (the one
rule: medians, and ranges that do not overlap).

The answer time of a run is what a user waits for a full-length answer: process start to first
token (model loading, image encode, prefill) plus (n_predict - 1) x the generation time per token,
so a run that stops early does not look faster.

Image budgets and the q8_0 mmproj are copies of the run's mmproj (mmproj_variants.py).
A configuration that fails (a flag this build lacks, a type it rejects) is recorded and skipped.
"""
from __future__ import annotations

import logging
import math
import re
import shutil
import statistics
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from tqdm.auto import tqdm

from ..checks import quality
from ..checks.acceptance import Checks
from ..llama_cpp import toolchain
from ..llama_cpp.mtmd import EvaluationError, MtmdOptions, run_mtmd
from ..reports import tune as tune_report
from ..reports.headline import tune_claim
from ..reports.tables import format_seconds, plural
from ..run import machine_load as load, winner
from ..run.winner import Sample
from ..run.workspace import Run, atomic_path
from . import tune_checks, tune_quality, tune_screen
from .evaluate import case_inputs, variants_for_run
from ..tune import bound as tune_bound, published as tune_published, results as tune_results
from ..tune.config import (SEED_TEMPLATE, Config, TuneError, answer_seconds, baseline_config, config_from_row,
                           config_row, runtime_grid, spread, thread_candidates)
from ..tune.mmproj_variants import make_mmproj_files, mmproj_nmse

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- measuring
@dataclass
class Measurer:
    """Runs configurations on one image/prompt; every run becomes a row (failures included)."""

    cli: Path
    text: dict[str, Path]
    mmproj: dict[tuple[str, str], Path]
    image: Path
    prompt: str
    base_opts: MtmdOptions
    logs: Path
    runner: Callable = run_mtmd  # tests swap in recorded runs
    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[Config, str] = field(default_factory=dict)

    def options(self, cfg: Config, n_predict: int) -> MtmdOptions:
        # Always the seed's template, so every configuration (and run-llava.sh) formats the prompt alike.
        update = {**cfg.settings(), "n_predict": n_predict, "chat_template": SEED_TEMPLATE}
        return MtmdOptions(self.base_opts.evaluate.model_copy(update=update), self.base_opts.log_verbosity,
                           list(self.base_opts.extra_args) + list(cfg.extra_args))

    def run_settings(self, cfg: Config, n_predict: int) -> tuple[dict[str, Any], list[str]]:
        """(flag-table settings, extra args) of a run on the step's image and prompt: what `measure`
        runs and what run-llava*.sh is rendered from."""
        opts = self.options(cfg, n_predict)
        return (opts.run_settings(self.text[cfg.quant], self.mmproj[(cfg.mmproj, cfg.budget)], self.image,
                                  self.prompt), list(opts.extra_args))

    def measure(self, cfg: Config, phase: str, n_predict: int, rep: int = 0, image: Path | None = None,
                prompt: str | None = None, case: int = 0, answer_tokens: int | None = None) -> dict[str, Any] | None:
        """One run; None (and the failure recorded) when the tool fails. `answer_s` is projected to an
        answer of `answer_tokens` tokens (default n_predict): a short screening run still ranks
        configurations by the full answer, generation included."""
        if cfg in self.failed:
            return None
        n = len(self.rows)
        # e.g. 012-screen-runtime-Q4_K_M_mmproj-f16_budget-full_t-2_fa-on.log
        name = f"{n:03d}-{phase}-{cfg.label.replace(', ', '_').replace(' ', '-')}"
        log_path = self.logs / (re.sub(r"[^\w.+-]", "_", name.replace(" ", "-")) + ".log")
        row: dict[str, Any] = {"phase": phase, "config": cfg.label, "rep": rep, "case": case, **config_row(cfg),
                               "n_predict": n_predict}
        try:
            result = self.runner(self.cli, self.text[cfg.quant], self.mmproj[(cfg.mmproj, cfg.budget)],
                                 image or self.image, prompt or self.prompt, self.options(cfg, n_predict), log_path)
        except (EvaluationError, OSError) as err:
            first = str(err).splitlines()[0]
            log.warning("configuration failed, skipped: %s: %s", cfg.label, first)
            self.failed[cfg] = str(err)
            self.rows.append({**row, "status": "failed", "error": str(err), "log": str(log_path)})
            return None
        s = result.summary()
        row.update(status="ok", error=None, command=result.command, **s)
        row["answer_s"] = answer_seconds(s, answer_tokens or n_predict)
        self.rows.append(row)
        return row

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


# ----------------------------------------------------------------------------- the search
@dataclass
class TuneResult:
    runs: pd.DataFrame            # every run: screening, confirmation, agreement (failures included)
    confirmed: pd.DataFrame       # one row per confirmed configuration: median and spread
    recommended: dict             # what tune/recommended.json holds
    agreement: pd.DataFrame       # greedy answers per budget x mmproj type vs full/f16
    quality: dict                 # kld per quant type, mmproj NMSE, synthetic or not
    skipped: list[dict]           # configurations not run, with why
    files: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    types: dict = field(default_factory=dict)       # tune_screen.ScreenResult.to_dict(): the llama-bench screen
    coverage: pd.DataFrame | None = None           # every type x image budget: screened answer or why not
    published: dict = field(default_factory=dict)   # tune_published.summary: the second baseline and the ratios
    bound: dict = field(default_factory=dict)       # per budget: tune_bound.configuration_bound
    checks: Checks = field(default_factory=lambda: Checks("tune"))

    def __str__(self) -> str:
        rec = self.recommended.get("recommended") or {}
        claim = tune_claim(self.recommended) if rec else "nothing recommended"
        return (f"TuneResult({plural(len(self.runs), 'run')}, recommended {rec.get('config')}: "
                f"{format_seconds(rec.get('answer_s'))}, {claim})")


def _best(rows: list[dict | None]) -> dict | None:
    ok = [r for r in rows if r and r.get("answer_s") is not None]
    return min(ok, key=lambda r: r["answer_s"]) if ok else None


def screen(m: Measurer, base: Config, p, quant_types: list[str], allowed: set[str],
           n_predict: int, budget_s: float, answer_tokens: int | None = None) -> tuple[dict[str, list[dict]], list[dict]]:
    """The staged screening; returns (best screened rows per budget, skipped configurations).

    `budget_s` (tune.budget_minutes) counts from here: at 7B the type screen before it (quantizing,
    KLD, llama-bench) takes longer than the whole budget, and a deadline set at the step's start had
    expired before the first screening run."""
    deadline = time.monotonic() + budget_s
    skipped: list[dict] = []
    durations: list[float] = []

    def stage(name: str, configs: list[Config], required: frozenset[Config] = frozenset()) -> list[dict]:
        rows = []
        for cfg in tqdm(configs, desc=f"screen: {name}", unit="run"):
            left = deadline - time.monotonic()
            est = statistics.median(durations) if durations else 0.0
            if left < est and cfg not in required:
                skipped.append({"config": cfg.label, "quant": cfg.quant, "budget": cfg.budget,
                                "why": f"over tune.budget_minutes (needs ~{est:.0f} s, {left:.0f} s left)"})
                continue
            if left < est:
                log.info("%s: over tune.budget_minutes (~%.0f s, %.0f s left), run anyway: image budget %s has "
                         "no screened configuration without it", cfg.label, est, left, cfg.budget)
            t0 = time.monotonic()
            row = m.measure(cfg, f"screen-{name}", n_predict, answer_tokens=answer_tokens)
            durations.append(time.monotonic() - t0)
            if row:
                rows.append(row)
        if durations:
            log.info("screen %s: %d runs, ~%.1f s each", name, len(configs), statistics.median(durations))
        return rows

    best = _best(stage("threads", thread_candidates(base, p.threads))) or {}
    cur = config_from_row(best) if best else base
    within = [q for q in quant_types if q in allowed]
    skipped += [{"config": replace(cur, quant=q).label, "why": "KL divergence over tune.kld_budget"}
                for q in quant_types if q not in allowed]
    rows = stage("quant types", [replace(cur, quant=q) for q in within if q != cur.quant]) + ([best] if best else [])
    best = _best([r for r in rows if r["quant"] in allowed]) or best
    cur = config_from_row(best) if best else cur
    grid, pruned = runtime_grid(cur, p.flash_attn, p.cache_type, p.ubatch_size)
    skipped += [{"config": c.label, "why": why} for c, why in pruned]
    rows = stage("runtime", [c for c in grid if c != cur]) + ([best] if best else [])
    best = _best(rows) or best
    cur = config_from_row(best) if best else cur
    per_budget: dict[str, list[dict]] = {}
    # Fewer image tokens move the answer's time from prefill to generation, where another type can
    # win (at 7B here Q4_0 prefilled 1.5x slower than Q5_K_M and generated 16 % faster): below the
    # full budget every allowed quant type is tried again with the runtime flags found above.
    broken = {r["quant"] for r in m.rows if r.get("status") == "failed" and r["phase"] == "screen-quant types"}
    quants = [q for q in dict.fromkeys([cur.quant, *within]) if q not in broken]
    # Each budget's first run is the winner so far at that budget: every budget is recommended for
    # (tune_checks requires it), so the time budget skips only the variations after it.
    required = [replace(cur, budget=b) for b in p.image_budgets if b != cur.budget]
    configs = required + [replace(cur, mmproj=t, budget=b, quant=q) for b in p.image_budgets for t in p.mmproj_types
                          for q in (quants if b != base.budget else [cur.quant])]
    for row in stage("mmproj x budget", [c for c in dict.fromkeys(configs) if c != cur],
                     frozenset(required)) + ([best] if best else []):
        if row["quant"] in allowed:
            per_budget.setdefault(row["budget"], []).append(row)
    # Every screened row of the full budget competes too (the runtime stages ran at the full budget).
    screened = [r for r in m.rows if r.get("status") == "ok" and r["phase"].startswith("screen")
                and r["quant"] in allowed]
    for b in p.image_budgets:
        per_budget[b] = sorted({r["config"]: r for r in per_budget.get(b, []) + [r for r in screened if r["budget"] == b]}
                               .values(), key=lambda r: r["answer_s"] if r["answer_s"] is not None else math.inf)
    return per_budget, skipped


def confirm(m: Measurer, configs: list[Config], repetitions: int, n_predict: int,
            load_retries: int = 0) -> pd.DataFrame:
    """A warm-up run and `repetitions` full runs per configuration; one row each with the spread.
    A run under load (machine_load.py) is dropped (phase DROPPED) and run again, at most
    `load_retries` times per configuration; one still under load after that is kept, and counted."""
    jobs = [(c, r) for c in configs for r in range(repetitions + 1)]
    rows = {c: [] for c in configs}
    retries = {c: load_retries for c in configs}
    for cfg, rep in tqdm(jobs, desc="confirm (warm-up + repetitions)", unit="run"):
        row = m.measure(cfg, "warmup" if rep == 0 else "confirm", n_predict, rep)
        while rep and row and row.get("under_load") and retries[cfg] > 0:
            retries[cfg] -= 1
            row["phase"] = load.DROPPED
            log.warning("run under load (%s), dropped and run again: %s", load.describe(load.summarize([row])), cfg.label)
            row = m.measure(cfg, "confirm", n_predict, rep)
        if row and rep > 0:
            rows[cfg].append(row)
    log.info("confirmation: %s", load.retry_note(m.rows, load_retries))
    out = []
    for cfg, runs in rows.items():
        if not runs:
            out.append({**config_row(cfg), "status": "failed", "error": m.failed.get(cfg)})
            continue
        df = pd.DataFrame(runs)
        s = spread(list(df["answer_s"]))
        stages = df[[c for c in STAGE_COLUMNS if c in df]].median(numeric_only=True).to_dict()
        out.append({**config_row(cfg), "status": "ok", "answer_s": s["median"],
                    "answer_min_s": s["min"], "answer_max_s": s["max"], "rel_range": s["rel_range"], "runs": s["n"],
                    "answer_s_all": list(df["answer_s"]), "image_tokens": df["image_tokens"].iloc[0], **stages,
                    **load.config_columns(runs, load_retries - retries[cfg])})
    return pd.DataFrame(out)


STAGE_COLUMNS = ["load_ms", "image_encode_ms", "image_decode_ms", "prompt_eval_ms", "prompt_tokens",
                 "prompt_tokens_per_s", "eval_ms", "eval_ms_per_token", "eval_tokens_per_s", "ttft_ms",
                 "peak_rss_mib"]


def choose(confirmed: pd.DataFrame, baseline: Config, kld: dict[str, float | None] | None = None) -> dict[str, dict]:
    """Per budget: the fastest confirmed configuration (candidates were already within the KLD budget).

    winner.pick: configurations not slower than the fastest median beyond the spread tie with it; among
    those the more precise one wins: the f16 mmproj, then the quant type of lower KL divergence, then
    the lower median. `vs_baseline` (winner.verdict) says whether the choice beat the seed's command
    beyond the spread.
    """
    kld = kld or {}
    ok = confirmed[confirmed["status"] == "ok"]
    base = ok[ok["config"] == baseline.label]
    base_runs = Sample.of(base.iloc[0]["answer_s_all"] if len(base) else [])
    out = {}
    for budget, group in ok.groupby("budget", sort=False):
        rows = {r["config"]: r for _, r in group.iterrows()}
        chosen = winner.pick({c: Sample.of(r["answer_s_all"]) for c, r in rows.items()},
                             prefer=lambda c: (rows[c]["mmproj"] != "f16", kld.get(rows[c]["quant"]) or 0.0))
        best = rows[chosen.name].to_dict()
        best["vs_baseline"] = winner.verdict(Sample.of(best["answer_s_all"]), base_runs).relation
        best["pick"] = chosen.how()
        out[budget] = best
    return out


def agreement_runs(m: Measurer, run: Run, best: Config, budgets: list[str], types: list[str],
                   n_predict: int, reference: str) -> pd.DataFrame:
    """Greedy answers of every budget x mmproj type on evaluate.cases, vs (reference budget, f16)."""
    rows = []
    jobs = [(b, t, i, img, pr) for b in budgets for t in types for i, (img, pr) in enumerate(case_inputs(run))]
    for b, t, i, img, pr in tqdm(jobs, desc="answer agreement", unit="run"):
        row = m.measure(replace(best, budget=b, mmproj=t), "agreement", n_predict, image=img, prompt=pr, case=i)
        if row:
            rows.append({"variant": f"{b}/{t}", "case": i, "prompt": pr, "answer": row["answer"]})
    df = pd.DataFrame(rows, columns=["variant", "case", "prompt", "answer"])
    return quality.answer_agreement(df, baseline=f"{reference}/f16")


def run_tune(run: Run) -> TuneResult:
    """Step 07: baseline, screening, confirmation, quality, choice; writes tune/ and run-llava*.sh."""
    p, e = run.params.tune, run.params.evaluate
    started = time.monotonic()
    text = {k: Path(v) for k, v in variants_for_run(run).items()}
    quantized = {k: text[k] for k in (run.artifacts().get("quantized") or {}) if k in text} or dict(text)
    # The published recipe's build first (once, when absent): a build must not overlap a measurement.
    published_cli, published_why = tune_published.find_or_build(p.published_baseline)
    # The quant types: the params' or this CPU's candidates, with files made where step 05 did not.
    screens = tune_screen.candidate_types(p.quant_types, extra=list(quantized))
    text.update(tune_screen.prepare_files(run, screens, text))
    quant_types = [s.quant for s in screens if s.file]
    if not quant_types:
        raise TuneError("no quant type has a text GGUF: " + "; ".join(f"{s.quant}: {s.reason}" for s in screens))
    base = baseline_config(quant_types)
    cli = toolchain.find_tool("llama-mtmd-cli", run.params.llama_cpp.dir)
    # f16 always: the baseline and the agreement reference use it.
    mm_types = list(dict.fromkeys(["f16", *p.mmproj_types]))
    mmproj = make_mmproj_files(run, run.artifact_path("mmproj"), mm_types, p.image_budgets)
    full = next(b for b, pins in p.image_budgets.items() if pins is None)  # params require one
    base = replace(base, budget=full)
    image, prompt = case_inputs(run)[0]
    image = stage_image(run, image)
    logs = run.sub("tune") / "logs"
    for stale in logs.glob("*.log"):  # a previous tune's: the same numbered names, its tables replaced too
        stale.unlink()
    # What tune decides starts at the tool's defaults (the seed's command), whatever the params say.
    m = Measurer(cli, text, mmproj, image, prompt, MtmdOptions(e.model_copy(update=base.settings())), logs)
    kld_budget = p.kld_budget if p.kld_budget is not None else e.kld_budget
    measured_kld = tune_quality.missing_kld(run, {q: text[q] for q in quant_types}, tune_quality.step06_kld(run))
    # The low-bit types with and without an importance matrix: the better file decides (`text` is the
    # Measurer's dict: the better file is what every later run uses).
    measured_kld.update(tune_quality.imatrix_variants(run, screens, text, {**tune_quality.step06_kld(run), **measured_kld},
                                                     p.imatrix))
    kld, allowed = tune_quality.quality_inputs(run, quant_types, kld_budget, measured_kld)
    # The cheap screen, before any answer is timed: llama-bench per type at the candidate threads.
    types = tune_screen.screen_types(run, screens, kld, allowed, thread_candidates(base, p.threads), logs / "bench",
                                     base.quant, kld_budget)
    # The baseline must run: it is the yardstick (a failure here is the step's failure).
    if m.measure(base, "screen-baseline", p.screen_n_predict, answer_tokens=e.n_predict) is None:
        raise TuneError(f"the seed's command failed on this machine: {m.failed[base]}")
    per_budget, skipped = screen(m, base, p, types.kept, allowed, p.screen_n_predict, 60.0 * p.budget_minutes,
                                 e.n_predict)
    finalists = [base] + [config_from_row(r) for b in p.image_budgets for r in per_budget.get(b, [])[:p.finalists]]
    finalists = list(dict.fromkeys(finalists))
    screen_s = statistics.median([r["answer_s"] for r in m.rows if r.get("answer_s")] or [0.0])
    log.info("confirming %d configurations x %d runs (estimate ~%.0f s from the screening)", len(finalists),
             p.repetitions + 1, len(finalists) * (p.repetitions + 1) * screen_s)
    # The published recipe, timed as the seed's command is (a warm-up and tune.repetitions runs).
    published_row, published_runs = (tune_published.measure(m, published_cli, base, p.repetitions, e.n_predict,
                                                            partial(confirm, load_retries=p.load_retries))
                                     if published_cli else (None, []))
    confirmed = confirm(m, finalists, p.repetitions, e.n_predict, p.load_retries)
    m.rows.extend(published_runs)
    chosen = choose(confirmed, base, kld)
    if full not in chosen:
        raise TuneError("no configuration at the full image budget completed; see the runs table and tune/logs/")
    main = chosen[full]
    same_build = confirmed[(confirmed["config"] == base.label) & (confirmed["status"] == "ok")]
    published = tune_published.summary(published_row, published_why, published_cli, chosen,
                                       same_build.iloc[0].to_dict() if len(same_build) else None)
    bound = tune_bound.bounds(chosen, text, types.best_pp(), e.n_predict)
    agreement = (agreement_runs(m, run, config_from_row(main), list(p.image_budgets), mm_types, e.n_predict, full)
                 if p.agreement else pd.DataFrame())
    quality = {"kld": kld, "kld_budget": kld_budget, "allowed": sorted(allowed),
               "mmproj_nmse": mmproj_nmse(run, mmproj, full),
               "synthetic": run.params.model.source == "tiny"}
    result = TuneResult(m.table(), confirmed, {}, agreement, quality, skipped, types=types.to_dict(),
                        coverage=tune_screen.coverage(m.rows, screens, list(p.image_budgets), skipped),
                        published=published, bound=bound)
    result.recommended = tune_results.write_results(run, result, base, chosen, full, m)
    result.figures = tune_report.figures(run, result, base)
    result.checks = tune_checks.acceptance_checks(run, result).enforce()
    log.info("%s (%.0f s)", result, time.monotonic() - started)
    return result


def stage_image(run: Run, image: Path) -> Path:
    """The measured image, copied into the run folder: run-llava*.sh names it, and it must outlive
    the llama.cpp source cache the default image comes from."""
    target = (run.sub("tune") / image.name).absolute()
    if not target.exists() or target.read_bytes() != image.read_bytes():
        with atomic_path(target, suffix=image.suffix) as tmp:
            shutil.copyfile(image, tmp)
    return target


def llama_cpp_tools(params) -> tuple[list[str], list[str]]:
    """(required, optional): llama-bench for the type screen, llama-quantize for the types step 05 did
    not make, llama-perplexity for their KLD, llama-mtmd-debug for the q8_0 mmproj's embedding NMSE."""
    return ["llama-mtmd-cli"], ["llama-bench", "llama-quantize", "llama-perplexity", "llama-mtmd-debug"]
