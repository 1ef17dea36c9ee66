"""Step 07's products: recommended.json, run-llava*.sh and serve-llava*.sh, the params snippet, the tables.

`run-llava.sh` runs, given no options, the llama-mtmd-cli command that 07_tune measured for the
recommendation (greedy, its `-n`, threads and flags, on the step's image and prompt); both are
rendered from the flag table (llama_cpp/flags.py). Each option given on its command line replaces
the script's own value of it; `--image` replaces the default image. recommended.json records the
measured argv (`command`), which tests/test_tune.py compares with the argv a script prints.

The step writes them (steps/tune.py calls `write_results`); reports/tune.py only draws and reads them.
"""
from __future__ import annotations

import shlex
import time
from pathlib import Path

import pandas as pd
import yaml

from ..llama_cpp import flags, server, toolchain
from ..reports import headline
from ..run import machine_load as load, winner
from ..run.machine import machine_info
from ..run.topology import usable_cores
from ..run.workspace import Run, atomic_path, json_safe, write_json, write_table
from .config import SEED_TEMPLATE, TuneError, config_from_row

SYNTHETIC_NOTE = ("synthetic model (model.source: tiny): its answers are noise, so answer agreement between "
                  "configurations carries no meaning here and is not a quality measure")


def script_text(m, cfg, n_predict: int, header: list[str], name: str = "run-llava.sh") -> str:
    """run-llava*.sh: the command `m.measure` ran for this configuration, with the matching llama-server
    command (what serve-llava*.sh runs bare) in a comment."""
    settings, extra = m.run_settings(cfg, n_predict)
    served = flags.server_command(Path(m.cli).with_name(flags.SERVER), server.serve_settings(settings), extra)
    header = [*header, f"The matching {flags.SERVER} command (serve-llava.sh runs it):", "  " + shlex.join(served)]
    return flags.script_text(m.cli, settings, extra, header, name=name)


def serve_script_text(m, cfg, n_predict: int, header: list[str], name: str = server.SCRIPT_NAME) -> str:
    """serve-llava*.sh: llama-server with the settings `script_text` renders (llama_cpp/server.py)."""
    settings, extra = m.run_settings(cfg, n_predict)
    return server.script_text(Path(m.cli).with_name(flags.SERVER), settings, extra, header, name=name)


def measured_run(runs: pd.DataFrame, label: str) -> dict:
    """The argv and the (greedy) answer of a configuration's first confirmation run, as run_mtmd ran it."""
    rows = runs[(runs["config"] == label) & (runs["phase"] == "confirm") & (runs["status"] == "ok")] \
        if "command" in runs else runs.iloc[:0]
    if not len(rows):
        return {"command": None, "answer": None}
    return {"command": list(rows["command"].iloc[0]), "answer": rows["answer"].iloc[0]}


def _write_script(path: Path, body: str) -> Path:
    with atomic_path(path, suffix=".sh") as tmp:
        tmp.write_text(body)
        tmp.chmod(0o755)
    path.chmod(0o755)
    return path


def write_results(run: Run, result, base, chosen: dict[str, dict], full: str, m) -> dict:
    """recommended.json, run-llava*.sh, params-snippet.yaml and the tables; records artifact `tune`.
    `m` is the step's Measurer: the scripts are rendered from the settings it ran with."""
    folder = run.sub("tune")
    board = machine_info(run.params.evaluate.board)["board"]
    baseline = _baseline_row(result.confirmed, base)
    budgets: dict[str, dict] = {}
    for name, row in chosen.items():
        names = ["run-llava.sh"] if name == full else []
        if len(chosen) > 1:
            names.append(f"run-llava-{name}.sh")
        budgets[name] = _budget(run, result, m, name, row, baseline, board, names)
    snippet = _write_params_snippet(folder / "params-snippet.yaml", run.params_file, config_from_row(chosen[full]))
    info = _recommended(run, result, base, m, baseline, budgets, full, board, snippet)
    write_json(folder / "recommended.json", info)
    _write_tables(folder, result)
    run.record("tune", {"recommended": folder / "recommended.json", "script": run.dir / "run-llava.sh",
                        "serve_script": run.dir / server.SCRIPT_NAME})
    return info


def _baseline_row(confirmed: pd.DataFrame, base) -> dict:
    """The seed's command's confirmed row, which every speedup and claim is against ({} when none of
    its confirmation runs succeeded)."""
    b = confirmed[(confirmed["config"] == base.label) & (confirmed["status"] == "ok")]
    return json_safe(b.iloc[0].to_dict()) if len(b) else {}


def _budget(run: Run, result, m, name: str, row: dict, baseline: dict, board: str, script_names: list[str]) -> dict:
    """One image budget's entry of recommended.json, after its scripts are written (the entry lists them).

    Raises TuneError when the scripts would not run the argv 07_tune measured for this configuration:
    a script is only worth publishing if it runs what was timed.
    """
    e = run.params.evaluate
    cfg = config_from_row(row)
    settings, extra = m.run_settings(cfg, e.n_predict)
    speedup = baseline["answer_s"] / row["answer_s"] if baseline.get("answer_s") and row["answer_s"] else None
    row_load = load.config_summary(row)
    header = _script_header(run, cfg.label, name, row, row_load, baseline, board)
    paths = _write_scripts(run.dir, m, cfg, e.n_predict, header, script_names)
    measured = measured_run(result.runs, cfg.label)
    rendered = flags.command(m.cli, settings, flags.MTMD, extra)
    if measured["command"] is not None and measured["command"] != rendered:
        raise TuneError(f"run-llava script for budget '{name}' would run {shlex.join(rendered)}, but 07_tune "
                        f"measured {shlex.join(measured['command'])}: a configuration field is lost on its "
                        "way through the runs table (tune_config.config_from_row)")
    kld = result.quality["kld"].get(cfg.quant)
    return json_safe({
        "config": cfg.label, "settings": {k: v for k, v in row.items() if k in cfg.__dataclass_fields__},
        "answer_s": row["answer_s"], "answer_min_s": row["answer_min_s"], "answer_max_s": row["answer_max_s"],
        "runs": row["runs"], "answer_s_all": row["answer_s_all"], "speedup": speedup,
        "vs_baseline": row["vs_baseline"], "pick": row.get("pick"), "load": row_load,
        "image_tokens": row.get("image_tokens"), "kld": kld,
        "text_gguf": settings["model"], "mmproj": settings["mmproj"],
        "flags": flags.flag_args(flags.runtime(settings)) + extra,
        **measured, "flag_table": flags.table(settings),
        "scripts": [str(p) for p in paths],
        "stages": {k: row.get(k) for k in ("load_ms", "image_encode_ms", "image_decode_ms", "prompt_eval_ms",
                                           "prompt_tokens_per_s", "eval_ms_per_token")}})


def _script_header(run: Run, label: str, name: str, row: dict, row_load: dict, baseline: dict, board: str) -> list[str]:
    """The scripts' comment lines: what the configuration is, when and on which board it was measured,
    and how it compared with the seed's command under which load, so a copied script keeps its evidence."""
    e = run.params.evaluate
    return [f"{label} -- recommended by 07_tune for image budget '{name}' (run {run.params.run}, "
            f"{time.strftime('%Y-%m-%d %H:%M')}, {board})",
            f"measured: {headline.spread_text(row)} for {e.n_predict} tokens, "
            + winner.claim(winner.verdict(headline.sample(row), headline.sample(baseline)),
                           f"the seed's command ({', '.join(headline.spread_parts(baseline))})") + "; "
            f"{load.describe(load.merge(row_load, load.config_summary(baseline)), e.load_threshold)}"]


def _write_scripts(run_dir: Path, m, cfg, n_predict: int, header: list[str], names: list[str]) -> list[Path]:
    """run-llava*.sh under `names`, then their serve-llava*.sh twins (llama-server on the same settings)."""
    paths = [_write_script(run_dir / n, script_text(m, cfg, n_predict, header, n)) for n in names]
    return paths + [_write_script(run_dir / n.replace("run-", "serve-"),
                                  serve_script_text(m, cfg, n_predict, header, n.replace("run-", "serve-")))
                    for n in names]


def _write_params_snippet(snippet: Path, params_file, cfg) -> Path:
    """params-snippet.yaml: the recommendation as `evaluate` keys, so `make evaluate` can run with it."""
    # Every key, null ones included: null is the tool's default, which a params file's value would override.
    keys = cfg.settings()
    with atomic_path(snippet, suffix=".yaml") as tmp:
        tmp.write_text(f"# Add to {params_file} so `make evaluate` runs with the recommendation:\n"
                       f"#   {cfg.label}\n# (step 06 evaluates the run's own mmproj and every quant type; "
                       "the mmproj type and image budget are in run-llava.sh)\n"
                       + yaml.safe_dump({"evaluate": {**keys, "chat_template": SEED_TEMPLATE}}, sort_keys=False))
    return snippet


def _recommended(run: Run, result, base, m, baseline: dict, budgets: dict[str, dict], full: str, board: str,
                 snippet: Path) -> dict:
    """recommended.json's content: the recommendation (the `full` budget's entry) with what it was measured
    on and against, every budget, the quality numbers, failures, notes and the type screen."""
    e = run.params.evaluate
    notes = ([SYNTHETIC_NOTE] if result.quality.get("synthetic") else []) + \
        [load.retry_note(result.runs.to_dict("records"), run.params.tune.load_retries)]
    failed = result.runs[result.runs["status"] == "failed"] if "status" in result.runs else result.runs.iloc[:0]
    main = budgets[full]
    # Top-level scalars: the one-line summary (the compare page lists them); details nested below.
    return json_safe({
        "run": run.params.run, "config": main["config"], "answer_s": main["answer_s"],
        "seed_answer_s": baseline.get("answer_s"), "speedup": main["speedup"], "vs_seed": main["vs_baseline"],
        "setup": {"machine": {"board": board, "cores": usable_cores()},
                  "llama_cpp": toolchain.tool_version(m.cli), "image": str(m.image), "prompt": m.prompt,
                  "n_predict": e.n_predict, "repetitions": run.params.tune.repetitions,
                  "rule": winner.RULE, "load_threshold": e.load_threshold},
        "baseline": _baseline_entry(result.runs, base, baseline, m, e.n_predict),
        "recommended": {"budget": full, **budgets[full]}, "budgets": budgets, "quality": result.quality,
        "failed": [{"config": r["config"], "error": str(r["error"]).splitlines()[0]} for _, r in failed.iterrows()],
        "skipped": result.skipped, "notes": notes, "params_snippet": str(snippet),
        # The llama-bench type screen, every type at every budget, the published recipe and the bounds.
        "types": result.types, "published": result.published, "bound": result.bound,
        "coverage": result.coverage.to_dict("records") if result.coverage is not None else []})


def _baseline_entry(runs: pd.DataFrame, base, baseline: dict, m, n_predict: int) -> dict:
    """recommended.json's `baseline`: the seed's command as run and as flags, and its measured numbers."""
    return {"config": base.label, "command": measured_run(runs, base.label)["command"],
            "command_flags": flags.flag_args(flags.runtime(m.run_settings(base, n_predict)[0])),
            **{k: baseline.get(k) for k in ("answer_s", "answer_min_s", "answer_max_s", "runs", "answer_s_all",
                                            "image_tokens", "load_ms", "image_encode_ms", "image_decode_ms",
                                            "prompt_eval_ms", "eval_ms_per_token")},
            "load": load.config_summary(baseline)}


def _write_tables(folder: Path, result) -> None:
    """The step's tables (runs, confirmed, agreement, types, coverage), the empty ones left out and
    the argv column dropped (the argvs that scripts run are in recommended.json)."""
    types_table = pd.DataFrame((result.types or {}).get("types") or [])
    for name, df in (("runs", result.runs), ("confirmed", result.confirmed), ("agreement", result.agreement),
                     ("types", types_table), ("coverage", result.coverage)):
        if df is not None and len(df):
            write_table(df.drop(columns=[c for c in ("command",) if c in df]), folder / name)
