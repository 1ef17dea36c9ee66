"""Step 06: llama-mtmd-cli on every variant x case, quality, plots and the metrics folder.

`run_evaluate(run)` is the whole step, called by the notebook and the CLI alike. Everything lands in `outputs/<run>/metrics/` (CSV + JSON per table, `summary.json`
for the report's summary) and `outputs/<run>/plots/`; `metrics` is recorded in artifacts.json.

Variants: the unquantized text GGUF (`text_gguf`, when `evaluate.include_unquantized` and the run
made one) and every `quantized` file. Ready-made GGUF runs (`model.format: gguf`) have no
`text_gguf`: the downloaded files are the variants.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tqdm.auto import tqdm

from ..checks import image_sequence as image_sequence_check, quality
from ..checks.acceptance import Checks
from ..llama_cpp import build_info, corpus, mtmd, toolchain
from ..model.gguf_io import gguf_summary, open_gguf, quant_table
from ..reports import plots, summary
from ..reports.tables import plural
from ..run import machine, machine_load as load
from ..run.workspace import Run, rel_to_root, resolve, write_json, write_table
from . import tools as step_tools

log = logging.getLogger(__name__)


@dataclass
class EvalReport:
    runs: pd.DataFrame                 # one row per llama-mtmd-cli run (evaluate.run_evaluations)
    tokens: pd.DataFrame               # one row per generated token: variant, case, token, piece, itl_ms
    variants: pd.DataFrame             # one row per variant: size, quality and mean timings
    quant: pd.DataFrame                # quantize.quant_table of every file involved
    kld: pd.DataFrame | None           # quality.kld_table, None when not measured
    agreement: pd.DataFrame            # quality.answer_agreement
    summary: dict                      # what summary.json holds
    figures: dict = field(default_factory=dict)
    metrics_dir: Path | None = None
    checks: Checks = field(default_factory=lambda: Checks("evaluate"))

    def __str__(self) -> str:
        return (f"EvalReport({len(self.runs)} runs, variants {list(self.variants['variant'])}, "
                f"chosen {self.summary.get('chosen', {}).get('variant')}, metrics {self.metrics_dir})")


# ----------------------------------------------------------------------------- inputs
def variants_for_run(run: Run) -> dict[str, Path]:
    """name -> text GGUF of every variant to evaluate, most precise first."""
    artifacts = run.artifacts()
    # Ready GGUF files are the user's: the fix is another copy, not rerunning a step.
    fix = {"fix": "replace it with a complete copy (params model.text_file / model.mmproj_file)"} \
        if run.params.model.format == "gguf" else {}
    out: dict[str, Path] = {}
    quantized = {k: run.resolve(v) for k, v in (artifacts.get("quantized") or {}).items()}
    if run.params.evaluate.include_unquantized and "text_gguf" in artifacts:
        text = run.artifact_path("text_gguf")
        name = gguf_summary(text)["file_type"]
        if name in quantized:
            log.info("the unquantized %s is also a quantize.types entry; evaluated once", name)
        else:
            out[name] = text
    out.update(quantized)
    if not out:
        raise FileNotFoundError(
            f"{run.artifacts_file}: nothing to evaluate (no 'quantized' and no 'text_gguf'); run "
            f"`make quantize PARAMS={run.params_file}` first")
    for name, path in out.items():
        open_gguf(path, f"text GGUF of variant '{name}'", **fix)
    return {n: out[n] for n in plots.precision_order(out)}


def reference(run: Run, variants: dict[str, Path]) -> tuple[str | None, Path | None]:
    """The quality reference: the unquantized text GGUF, else the most precise of several variants."""
    if "text_gguf" in run.artifacts():
        path = run.artifact_path("text_gguf")
        for name, p in variants.items():
            if Path(p).resolve() == path.resolve():
                return name, path
        return gguf_summary(path)["file_type"], path
    if len(variants) < 2:
        return None, None
    name = quality.reference_variant(variants)
    return name, Path(variants[name])


def token_table(run: Run, runs: pd.DataFrame) -> pd.DataFrame:
    """Per generated token: variant, case, token index, piece, arrival (s), the gap before it (ms) and
    whether its run was under load.

    Read from the per-run JSON records `evaluate.run_evaluations` writes next to the runs' logs.
    """
    rows = []
    for _, r in runs.iterrows():
        record_file = run.sub("metrics") / f"{Path(str(r['log'])).stem}.json"
        if not record_file.exists():
            log.warning("no per-token record %s for %s case %s", record_file, r["variant"], r["case"])
            continue
        rec = json.loads(record_file.read_text())
        times, pieces, itl = rec.get("token_times_s") or [], rec.get("pieces") or [], rec.get("itl_ms") or []
        for i, t in enumerate(times):
            rows.append({"variant": r["variant"], "case": r["case"], "token": i,
                         "piece": pieces[i] if i < len(pieces) else None, "t_s": t,
                         "itl_ms": itl[i - 1] if 0 < i <= len(itl) else None,
                         "under_load": (rec.get("load") or {}).get("under_load")})
    return pd.DataFrame(rows, columns=["variant", "case", "token", "piece", "t_s", "itl_ms", "under_load"])


# ----------------------------------------------------------------------------- tables
TIMING_COLUMNS = ["load_ms", "image_encode_ms", "image_decode_ms", "text_prompt_ms", "prompt_eval_ms",
                  "prompt_tokens", "prompt_tokens_per_s", "eval_ms", "eval_ms_per_token", "eval_tokens_per_s",
                  "ttft_ms", "itl_median_ms", "n_tokens", "peak_rss_mib",
                  "image_tokens", "image_tokens_llava"]  # used (from the log) / LLaVA 1.6's own count


def answer_ms(df: pd.DataFrame, n_predict: int) -> pd.Series:
    """Image encode + prompt eval + (n_predict - 1) x generation ms/token, per row; NaN (not 0) when a
    log lacked a figure: an incomplete row must not look fastest."""
    encode = df["image_encode_ms"].fillna(0.0) if "image_encode_ms" in df else 0.0
    return encode + df["prompt_eval_ms"] + df["eval_ms_per_token"] * max(n_predict - 1, 0)


def variant_table(runs: pd.DataFrame, quant: pd.DataFrame, kld: pd.DataFrame | None,
                  agreement: pd.DataFrame, n_predict: int) -> pd.DataFrame:
    """One row per variant: size, quality, mean timings over cases and the normalised answer time.

    `answer_ms` = image encode + prompt eval (image decode included) + (n_predict - 1) x the
    generation ms/token: the time to a full-length answer, not counting the one-time model load,
    so a variant that stops early does not look faster.
    """
    staged = plots.with_stages(runs)
    cols = [c for c in TIMING_COLUMNS if c in staged]
    table = staged.groupby("variant", sort=False)[cols].mean().reset_index()
    table["cases"] = staged.groupby("variant", sort=False).size().to_numpy()
    # Rates from the mean times (a mean of per-run rates would weight short runs up).
    if {"prompt_tokens", "prompt_eval_ms"} <= set(table):
        table["prompt_tokens_per_s"] = 1000.0 * table["prompt_tokens"] / table["prompt_eval_ms"]
    if "eval_ms_per_token" in table:
        table["eval_tokens_per_s"] = 1000.0 / table["eval_ms_per_token"]
    table["answer_ms"] = answer_ms(table, n_predict)
    # Per run, for the winner rule (winner.py): median, fastest, slowest, count, and runs under load.
    per_run = staged.assign(answer_ms=answer_ms(staged, n_predict)).groupby("variant", sort=False)
    for col, how in (("answer_ms_median", "median"), ("answer_ms_min", "min"), ("answer_ms_max", "max"),
                     ("runs", "count")):
        table[col] = table["variant"].map(getattr(per_run["answer_ms"], how)())
    hot = (per_run["under_load"].agg(lambda f: sum(load.loaded({"under_load": v}) for v in f))
           if "under_load" in staged else {})
    table["runs_under_load"] = table["variant"].map(hot).fillna(0).astype(int)
    keep = ["variant", "file", "file_type", "size_mib", "params", "bpw", "imatrix"]
    table = table.merge(quant[[c for c in keep if c in quant]], on="variant", how="left")
    if kld is not None and len(kld):
        table = table.merge(kld[["variant", "ppl", "kld", "kld_p99", "same_top_pct"]], on="variant", how="left")
    else:
        table["kld"] = float("nan")
    if len(agreement):
        agree = agreement.groupby("variant").agg(same_answer=("same_answer", "mean"),
                                                 prefix_tokens=("prefix_tokens", "mean"))
        table = table.merge(agree.reset_index(), on="variant", how="left")
    order = plots.precision_order(table["variant"])
    return table.set_index("variant").loc[order].reset_index()


# ----------------------------------------------------------------------------- the step
def report_metrics(run: Run, runs: pd.DataFrame, variants: dict[str, Path]) -> EvalReport:
    """Quality, tables, plots and the summary for the evaluation `runs`; writes metrics/, records it."""
    if runs.empty:
        raise ValueError("no evaluation runs to report (evaluate.cases empty?)")
    metrics = run.sub("metrics")
    e = run.params.evaluate
    ref_name, ref_path = reference(run, variants)
    files = dict(variants)
    if ref_name and ref_name not in files:
        files = {ref_name: ref_path, **files}
    quant = quant_table(files)
    notes: list[str] = []
    kld = None
    if not e.perplexity:
        notes.append("KL divergence not measured (evaluate.perplexity is false)")
    elif ref_path is None:
        notes.append("KL divergence not measured: no unquantized model and a single variant")
    else:
        kld = quality.kld_table(ref_path, dict(variants), corpus.corpus_path("eval"), run, base_name=ref_name)
    tokens = token_table(run, runs)
    baseline = ref_name if ref_name in set(runs["variant"]) else None
    # Every variant shares the reference's vocabulary; any of the files tokenizes for all.
    tokenize = quality.llama_tokenizer(ref_path or next(iter(variants.values())), run)
    agreement = quality.answer_agreement(runs, tokenize, baseline=baseline)
    table = variant_table(runs, quant, kld, agreement, e.n_predict)
    info = summary.build_summary(run, table, quant, ref_name, notes, runs)
    figures = {"latency_breakdown": plots.latency_breakdown(runs, run),
               "token_latency": plots.token_latency(tokens, run),
               "size_kld_speed": plots.size_kld_speed(table, run)}
    for name, df in [("runs", runs), ("tokens", tokens), ("variants", table), ("quant", quant), ("kld", kld),
                     ("agreement", agreement)]:
        if df is not None:
            write_table(df, metrics / name)
    write_json(metrics / "summary.json", info)
    # The board and llama.cpp build these timings belong to.
    machine.record_machine(run, build_info.llama_cpp_build(run.params.llama_cpp.dir, run.dir / "logs"))
    run.record("metrics", metrics)
    return EvalReport(runs, tokens, table, quant, kld, agreement, info, figures, metrics)


# ----------------------------------------------------------------------------- running
def _safe(name: str) -> str:
    return re.sub(r"[^\w.+-]", "_", name)


def case_problems(run) -> list[str]:
    """What is wrong with the params cases' images, each naming the case (empty: nothing)."""
    out = []
    if not run.params.evaluate.cases:
        out.append(f"{run.params_file}: evaluate.cases is empty; list at least one {{image, prompt}} "
                   "(image: null is llama.cpp's test image)")
    for i, case in enumerate(run.params.evaluate.cases):
        if case.image is None:
            continue  # llama.cpp's own test image
        image = resolve(case.image)
        problem = mtmd.image_problem(image)
        if problem == "not found":
            problem += " (paths are absolute or relative to the repo root)"
        if problem:
            out.append(f"{run.params_file}: evaluate.cases[{i}].image: {image} {problem}")
    return out


def case_inputs(run) -> list[tuple[Path, str]]:
    """(image, prompt) per params case; errors name the case before anything runs."""
    problems = case_problems(run)
    if problems:
        kind = FileNotFoundError if all(p.endswith("repo root)") for p in problems) else ValueError
        raise kind("\n".join(problems))
    return [(toolchain.source_asset(mtmd.DEFAULT_IMAGE) if case.image is None else resolve(case.image), case.prompt)
            for case in run.params.evaluate.cases]


def run_evaluations(run, variants: dict[str, str | Path], mmproj: str | Path):
    """Every variant x every params case; returns one row per run (also written to metrics/)."""
    cli = toolchain.find_tool("llama-mtmd-cli", run.params.llama_cpp.dir)
    cases = case_inputs(run)
    for name, path in variants.items():
        mtmd.check_input(Path(path), f"text GGUF of variant '{name}'")
    mtmd.check_input(Path(mmproj), "mmproj GGUF")
    opts = mtmd.MtmdOptions(run.params.evaluate)
    version = toolchain.tool_version(cli)
    logs, metrics = run.sub("logs"), run.sub("metrics")
    rows = []
    jobs = [(name, Path(path), i, image, prompt) for name, path in variants.items()
            for i, (image, prompt) in enumerate(cases)]
    for name, gguf, i, image, prompt in tqdm(jobs, desc="llama-mtmd-cli", unit="run"):
        stem = f"{_safe(name)}__{i}"
        result = mtmd.run_mtmd(cli, gguf, mmproj, image, prompt, opts, logs / f"{stem}.log")
        # Image tokens used (from the log) beside LLaVA 1.6's own count for this image.
        tokens = image_sequence_check.evaluate_fields(image, mmproj, result.timings.image_tokens)
        record = {"variant": name, "case": i, "prompt": prompt, "image": str(image), "text_gguf": str(gguf),
                  "mmproj": str(mmproj), "llama_cpp": version, "options": opts.to_dict(), **result.to_dict(),
                  **tokens}
        write_json(metrics / f"{stem}.json", record)
        rows.append({"variant": name, "case": i, "prompt": prompt, **result.summary(), **tokens})
        log.info("%s case %d: %d tokens, ttft %.0f ms, %s tok/s (stream), peak %.0f MiB", name, i,
                 result.n_tokens, result.ttft_ms or float("nan"),
                 f"{rows[-1]['stream_tokens_per_s']:.2f}" if rows[-1]["stream_tokens_per_s"] else "n/a",
                 result.peak_rss_mib or float("nan"))
    return pd.DataFrame(rows)


def run_evaluate(run: Run) -> EvalReport:
    """Step 06: every variant on every case, then quality, tables, plots and the summary."""
    step_tools.require(run.params, "evaluate")  # llama-perplexity is first run after every case
    variants = variants_for_run(run)
    runs = run_evaluations(run, variants, run.artifact_path("mmproj"))
    report = report_metrics(run, runs, variants)
    report.checks = acceptance_checks(run, report).enforce()
    return report


METRICS_FILES = ("runs", "variants", "agreement")


def acceptance_checks(run: Run, report: EvalReport) -> Checks:
    """Every variant answered every case, the divergences are divergences, a variant was chosen
    for the summary and the metrics tables are on disk."""
    checks = Checks("evaluate")
    runs, n_cases = report.runs, len(run.params.evaluate.cases)
    n_variants = len(report.variants)
    checks.add("runs", len(runs), f"{plural(n_variants, 'variant')} x {plural(n_cases, 'case')} = "
               f"{n_variants * n_cases}", len(runs) == n_variants * n_cases)
    empty = [f"{r['variant']} case {r['case']}" for _, r in runs.iterrows() if not r["n_tokens"] > 0]
    checks.add("generated tokens", f"fewest {runs['n_tokens'].min():.0f}" + (f" (none: {', '.join(empty)})"
               if empty else ""), "at least 1 in every run", not empty)
    if report.kld is None:
        checks.add("KL divergence", "not measured", "0 or more for every variant, when measured", True)
    else:
        kld = report.kld["kld"]
        checks.add("KL divergence", f"{kld.min():.3g} to {kld.max():.3g}", "0 or more for every variant",
                   bool((kld >= 0).all()))
    chosen = report.summary.get("chosen")
    checks.add("chosen variant", (chosen or {}).get("variant", "none"), "a variant chosen for the summary",
               chosen is not None)
    missing = [f"{n}.csv" for n in METRICS_FILES if not (report.metrics_dir / f"{n}.csv").exists()]
    checks.add("metrics tables", f"missing {', '.join(missing)}" if missing else "all written",
               f"{', '.join(f'{n}.csv' for n in METRICS_FILES)} in {rel_to_root(report.metrics_dir)}", not missing)
    return checks


def llama_cpp_tools(params) -> tuple[list[str], list[str]]:
    """(required, optional)."""
    return ["llama-mtmd-cli", "llama-tokenize"] + (["llama-perplexity"] if params.evaluate.perplexity else []), []
