"""Evaluated run folders without llama.cpp: step 06's own table/summary/plot functions on synthetic
llama-mtmd-cli timings, so metrics/ has exactly the files and columns step 06 writes.

`speed` scales every timing (a slower board); the GGUF files are small placeholders (their bytes
are hashed by the model card, never parsed).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from llava_gguf.steps import evaluate as evaluation_report
from llava_gguf.run import machine, workspace
from llava_gguf.llama_cpp import build_info
from llava_gguf.reports import plots, html as report, summary

VARIANTS = {"F16": (16.0, 0.0), "Q8_0": (8.5, 0.002), "Q4_K_M": (4.9, 0.03), "Q2_K": (2.6, 0.4)}


def make_evaluated_run(write_params, name: str, slowdown: float = 1.0, n_predict: int = 8,
                       variants: tuple[str, ...] = ("F16", "Q8_0", "Q4_K_M", "Q2_K"),
                       loaded: tuple[str, ...] = ()) -> workspace.Run:
    """`loaded`: variants whose case-0 run was taken under load (other processes 1.2 cores)."""
    run = workspace.open_run(write_params({
        "run": name, "model": {"source": "huggingface", "repo": "liuhaotian/llava-v1.6-vicuna-7b"},
        "quantize": {"types": [v for v in variants if v != "F16"]},
        "evaluate": {"n_predict": n_predict, "cases": [{"prompt": "Describe this image."},
                                                        {"prompt": "What is in the picture?"}]}}, f"{name}.yaml"))
    models = run.sub("models")
    files = {}
    for i, v in enumerate(variants):
        files[v] = models / f"llava-v1.6-vicuna-7b-{v}.gguf"
        files[v].write_bytes(f"GGUF placeholder {v} {name}".encode() * (50 * (i + 1)))
    mmproj = models / "mmproj-model-f16.gguf"
    mmproj.write_bytes(b"GGUF mmproj placeholder" * 40)
    run.record("text_gguf", files["F16"])
    run.record("quantized", {v: files[v] for v in variants if v != "F16"})
    run.record("mmproj", mmproj)

    rows, quant, kld, agreement = [], [], [], []
    for i, v in enumerate(variants):
        bpw, kl = VARIANTS[v]
        gen = slowdown * 40.0 * bpw / 16.0 + slowdown * 10.0
        for case in (0, 1):
            rows.append({"variant": v, "case": case, "prompt": "p", "answer": "a cat", "load_ms": 500.0 * slowdown,
                         "image_encode_ms": 3000.0 * slowdown, "image_decode_ms": 9000.0 * slowdown * bpw / 16,
                         "prompt_eval_ms": 10000.0 * slowdown * bpw / 16, "prompt_tokens": 2900,
                         "prompt_tokens_per_s": 2900 / (10.0 * slowdown * bpw / 16), "eval_ms": gen * (n_predict - 1),
                         "eval_ms_per_token": gen, "eval_tokens_per_s": 1000.0 / gen, "ttft_ms": 14000.0 * slowdown,
                         "itl_median_ms": gen, "n_tokens": n_predict, "peak_rss_mib": 900.0 * bpw / 16 + 600,
                         "log": str(run.sub("logs") / f"{v}__{case}.log"), "loadavg_start": 1.9,
                         "loadavg_end": 2.0, "others_cpu_s": 0.5, "steal_pct": 3.0,
                         "others_cores": 1.2 if v in loaded and case == 0 else 0.05,
                         "under_load": v in loaded and case == 0})
            agreement.append({"variant": v, "case": case, "same_answer": kl < 0.1, "prefix_tokens": 4})
        quant.append({"variant": v, "file": files[v].name, "file_type": v, "size_mib": 13000.0 * bpw / 16,
                      "params": 6_738_415_616, "bpw": bpw, "imatrix": False, "layers": 32, "width": 4096})
        kld.append({"variant": v, "ppl": 6.0 + kl, "kld": kl, "kld_p99": 4 * kl, "same_top_pct": 100 - 100 * kl})
    runs, quant, kld, agreement = map(pd.DataFrame, (rows, quant, kld, agreement))
    table = evaluation_report.variant_table(runs, quant, kld, agreement, n_predict)
    info = summary.build_summary(run, table, quant, "F16", [], runs)
    metrics = run.sub("metrics")
    for stem, df in [("runs", runs), ("variants", table), ("quant", quant), ("kld", kld), ("agreement", agreement)]:
        workspace.write_table(df, metrics / stem)
    workspace.write_json(metrics / "summary.json", info)
    plots.latency_breakdown(runs, run)
    machine.record_machine(run, build_info.llama_cpp_build(run.params.llama_cpp.dir, run.dir / "logs"))
    run.record("metrics", metrics)
    vision = workspace.write_json(run.sub("vision_check") / "uniform.json",
                                  {"status": "passed", "image": "uniform", "nmse": 1.2e-6, "tolerance": 1e-4})
    run.record("vision_check", {"uniform": vision})
    report.render_index(run)
    return run


def summary_of(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics" / "summary.json").read_text())


def move(run_dir: Path, dest: Path) -> Path:
    """Move a run folder elsewhere (as if copied from a board) and return its new path."""
    dest.mkdir(parents=True, exist_ok=True)
    return Path(shutil.move(str(run_dir), str(dest / run_dir.name)))


def recommended_json(label: str, runs: list[float], seed_runs: list[float], repetitions: int = 3,
                     runs_under_load: int = 0) -> dict:
    """tune/recommended.json as reports/tune.py writes it (the fields the pages read)."""
    median = sorted(runs)[len(runs) // 2]
    seed = sorted(seed_runs)[len(seed_runs) // 2]

    def load(n, bad):
        return {"runs": n, "runs_under_load": bad, "runs_judged": n, "loadavg": 1.9, "others_cores": 0.04,
                "steal_pct": 3.0}
    return {
        "config": label, "answer_s": median, "seed_answer_s": seed, "speedup": seed / median, "vs_seed": "faster",
        "setup": {"n_predict": 8, "repetitions": repetitions, "load_threshold": 0.25},
        "recommended": {"budget": "full", "config": label, "answer_s": median, "answer_min_s": min(runs),
                        "answer_max_s": max(runs), "runs": len(runs), "answer_s_all": runs,
                        "flags": ["--threads", "6", "--ubatch-size", "256"], "load": load(len(runs), runs_under_load)},
        "baseline": {"answer_s": seed, "answer_min_s": min(seed_runs), "answer_max_s": max(seed_runs),
                     "runs": len(seed_runs), "answer_s_all": seed_runs, "load": load(len(seed_runs), 0)},
        "budgets": {"full": {"config": label, "answer_s": median, "answer_s_all": runs, "speedup": seed / median},
                    "single": {"config": "Q4_K_M, mmproj f16, budget single", "answer_s": 2.32,
                               "answer_s_all": [2.2, 2.32, 2.4], "speedup": seed / 2.32}},
        "notes": ["no confirmation run was under load"]}
