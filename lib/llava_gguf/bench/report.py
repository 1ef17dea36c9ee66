"""The benchmark's tables and report (report.md + report.html) from a run's bench.json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from .plots import make_plots
from .procmon import GiB
from .records import (CONVERT_STEPS, LEGACY, PROJECT, REFERENCE, MiB, TARGET_LEFT_FACTOR, TARGET_PEAK_ANON,
                      TARGET_VS_COPY, TARGET_VS_LEGACY, BenchResult, StepRecord, _gib, record_from_json)
from ..model.gguf_io import gguf_summary
from ..run.machine import describe_clusters
from ..run.workspace import Run, atomic_path, open_run


def render(run: Run | str | Path) -> BenchResult:
    """Tables, plots and report of a run's bench.json (`run_bench` ends with this; rerun it after an edit)."""
    run = run if isinstance(run, Run) else open_run(run)
    data = json.loads((run.dir / "bench.json").read_text())
    records = [record_from_json(d) for d in data["records"]]
    info = data["machine"]
    inference, mtmd = pd.DataFrame(data.get("inference", [])), pd.DataFrame(data.get("mtmd", []))
    files_table = pd.DataFrame(data.get("quant_files", []))
    legacy_left = data.get("legacy_left", {})
    totals = totals_table(records, any(r.recipe == LEGACY for r in records))
    targets = targets_table(records, totals, data.get("project_left", {}), legacy_left, info["parameters"],
                            info["largest_tensor"], _cores(info))
    conversion = _write_tables(run, records, totals, targets, files_table, inference, mtmd)
    plots = make_plots(run, records, inference)
    report = write_report(run, info, conversion, totals, targets, files_table, inference, mtmd, plots)
    return BenchResult(run.dir, conversion, totals, targets, inference, mtmd, files_table, report, plots)


# ----------------------------------------------------------------------------- tables
def conversion_table(records: list[StepRecord]) -> pd.DataFrame:
    return pd.DataFrame([r.row() for r in records if r.recipe in (PROJECT, LEGACY, REFERENCE)])


def _sum(records: list[StepRecord], recipe: str, steps: list[str]) -> dict[str, Any] | None:
    chosen = [r for r in records if r.recipe == recipe and r.step in steps]
    if len(chosen) != len(steps):
        return None
    wall = sum(r.m.wall_s for r in chosen)
    return {"recipe": recipe, "span": " + ".join(steps), "wall_s": round(wall, 2),
            "cpu_s": round(sum(r.m.cpu_s for r in chosen), 2),
            "peak_anon_GiB": _gib(max(r.m.peak_anon for r in chosen)),
            "peak_file_GiB": _gib(max(r.m.peak_file for r in chosen)),
            "written_GiB": _gib(sum(r.m.write_bytes for r in chosen)),
            "flush_s": round(sum(r.flush_s for r in chosen), 2)}


def _quant_step(records: list[StepRecord], recipe: str) -> str | None:
    return next((r.step for r in records if r.recipe == recipe and r.step.startswith("quantize")), None)


def totals_table(records: list[StepRecord], legacy: bool) -> pd.DataFrame:
    """Per recipe: the conversion (surgery + vision + text) and end to end to the quantized file."""
    rows = []
    for recipe in (PROJECT, LEGACY) if legacy else (PROJECT,):
        conv = _sum(records, recipe, list(CONVERT_STEPS))
        q = _quant_step(records, recipe)
        e2e = _sum(records, recipe, [*CONVERT_STEPS, q]) if q else None
        for label, row in (("conversion", conv), ("end to end", e2e)):
            if row:
                rows.append({"total": label, **row})
    return pd.DataFrame(rows)


def _bound(records: list[StepRecord], recipe: str, steps: list[str], cores: int, copy_rate: float | None) -> str:
    """What limits a span of steps: the slowest step's CPU use or its writing, in numbers."""
    chosen = [r for r in records if r.recipe == recipe and r.step in steps]
    if not chosen:
        return ""
    parts = ", ".join(f"{r.step} {r.m.wall_s:.1f} s" for r in chosen)
    floor = next((r for r in records if r.recipe == REFERENCE and r.step == "python + imports"), None)
    if floor and recipe == PROJECT:
        # Each project step is its own `python -m llava_gguf step ...`: it pays the interpreter's start.
        parts += f"; each includes a Python start with its imports, {floor.m.wall_s:.1f} s alone"
    slow = max(chosen, key=lambda r: r.m.wall_s)
    busy = slow.m.cpu_s / slow.m.wall_s if slow.m.wall_s else 0.0
    rate = slow.m.write_bytes / MiB / slow.m.wall_s if slow.m.wall_s else 0.0
    if busy >= 0.75 * cores or busy >= 0.9:
        # A step that keeps its one busy thread (or all cores) running is paying for computation.
        what = (f"CPU: {slow.step} used {slow.m.cpu_s:.1f} s of CPU in {slow.m.wall_s:.1f} s "
                f"({busy:.2f} of {cores} cores busy)")
    else:
        what = (f"I/O or waiting: {slow.step} kept {busy:.2f} of {cores} cores busy and wrote "
                f"{slow.m.write_bytes / GiB:.2f} GiB at {rate:.0f} MiB/s")
    if copy_rate:
        what += f"; the plain copy writes {copy_rate:.0f} MiB/s"
    return f"{what} ({parts})"


def targets_table(records: list[StepRecord], totals: pd.DataFrame, project_left: dict[str, int],
                  legacy_left: dict[str, int], n_params: int, largest: dict, cores: int) -> pd.DataFrame:
    """Issue 6's targets: limit, measured, met, and what bounds the measurement."""
    def rec(recipe, step):
        return next((r for r in records if r.recipe == recipe and r.step == step), None)

    def total(recipe, label):
        sel = totals[(totals["recipe"] == recipe) & (totals["total"] == label)] if len(totals) else totals
        return float(sel["wall_s"].iloc[0]) if len(sel) else None

    rows = []
    conv = [r for r in records if r.recipe == PROJECT and r.step in CONVERT_STEPS]
    floor = rec(REFERENCE, "python + imports")
    copy = rec(REFERENCE, "cp shards")
    copy_rate = copy.m.write_bytes / MiB / copy.m.wall_s if copy and copy.m.wall_s else None

    peak = max(conv, key=lambda r: r.m.peak_anon)
    elements = largest["elements"]
    rows.append({
        "target": "peak anonymous memory, surgery + vision + text", "limit": f"<= {TARGET_PEAK_ANON / GiB:.2f} GiB",
        "measured": f"{peak.m.peak_anon / GiB:.2f} GiB ({peak.step})", "met": peak.m.peak_anon <= TARGET_PEAK_ANON,
        "bound": (f"{peak.step}: {peak.m.peak_anon / GiB:.2f} GiB = floor (interpreter + libraries) "
                  f"{(floor.m.peak_anon if floor else 0) / GiB:.2f} GiB + working set; the largest tensor, "
                  f"{largest['name']} {tuple(largest['shape'])}, is {2 * elements / MiB:.0f} MiB as bf16/f16 and "
                  f"{4 * elements / MiB:.0f} MiB as f32; file-backed pages (reclaimable) peaked at "
                  f"{peak.m.peak_file / GiB:.2f} GiB")})

    f16_size = 2 * n_params
    left = sum(project_left.values())
    partials = [f for f in project_left if f.endswith(".partial")]
    biggest = sorted(project_left.items(), key=lambda kv: -kv[1])[:3]
    legacy_note = (f"; the legacy recipe leaves {sum(legacy_left.values()) / GiB:.2f} GiB "
                   f"({sum(legacy_left.values()) / f16_size:.2f}x)") if legacy_left else ""
    rows.append({
        "target": "left behind after the conversion", "limit": f"<= {TARGET_LEFT_FACTOR} x f16 size "
        f"({TARGET_LEFT_FACTOR * f16_size / GiB:.2f} GiB)",
        "measured": f"{left / GiB:.2f} GiB ({left / f16_size:.3f}x)",
        "met": left <= TARGET_LEFT_FACTOR * f16_size and not partials,
        "bound": ", ".join(f"{Path(f).name} {n / GiB:.2f} GiB" for f, n in biggest)
        + (f"; temporary files left: {partials}" if partials else "") + legacy_note})

    project_conv = total(PROJECT, "conversion")
    legacy_conv = total(LEGACY, "conversion")
    bound = _bound(records, PROJECT, list(CONVERT_STEPS), cores, copy_rate)
    written = sum(r.m.write_bytes for r in conv)
    same_bytes = copy.m.wall_s * written / copy.m.write_bytes if copy and copy.m.write_bytes else None
    if legacy_conv is not None:
        limit = TARGET_VS_LEGACY * legacy_conv
        # The output has to be written whatever converts it: a copy of as many bytes is the floor.
        floor_note = (f"; a plain copy of the same {written / GiB:.2f} GiB takes {same_bytes:.1f} s here "
                      f"({same_bytes / limit:.2f}x this limit)") if same_bytes else ""
        rows.append({"target": "conversion time vs the legacy recipe",
                     "limit": f"<= {TARGET_VS_LEGACY} x {legacy_conv:.1f} s = {limit:.1f} s",
                     "measured": f"{project_conv:.1f} s ({project_conv / legacy_conv:.2f}x)",
                     "met": project_conv <= limit, "bound": bound + floor_note})
    if same_bytes:
        rows.append({"target": "conversion time vs a plain copy of the same bytes",
                     "limit": f"<= {TARGET_VS_COPY} x {same_bytes:.1f} s = {TARGET_VS_COPY * same_bytes:.1f} s "
                              f"({written / GiB:.2f} GiB at the copy's {copy_rate:.0f} MiB/s)",
                     "measured": f"{project_conv:.1f} s ({project_conv / same_bytes:.2f}x)",
                     "met": project_conv <= TARGET_VS_COPY * same_bytes, "bound": bound})
    project_e2e = total(PROJECT, "end to end")
    legacy_e2e = total(LEGACY, "end to end")
    if legacy_e2e is not None and project_e2e is not None:
        pq, lq = rec(PROJECT, _quant_step(records, PROJECT)), rec(LEGACY, _quant_step(records, LEGACY))
        rows.append({"target": f"end to end to {pq.step.split()[-1]} vs the legacy recipe",
                     "limit": f"< {legacy_e2e:.1f} s",
                     "measured": f"{project_e2e:.1f} s ({project_e2e / legacy_e2e:.2f}x)",
                     "met": project_e2e < legacy_e2e,
                     # Both recipes end in the same llama-quantize work: equal CPU seconds with unequal
                     # wall seconds mean other load on the machine, not a difference between the recipes.
                     "bound": f"llama-quantize: {pq.m.wall_s:.1f} s from f16 ({pq.m.cpu_s:.0f} s CPU, "
                              f"{pq.m.cpu_s / pq.m.wall_s:.2f} cores busy) vs {lq.m.wall_s:.1f} s from F32 "
                              f"({lq.m.cpu_s:.0f} s CPU, {lq.m.cpu_s / lq.m.wall_s:.2f} cores busy); CPU end to end "
                              f"{_cpu_total(records, PROJECT, pq.step):.0f} s vs "
                              f"{_cpu_total(records, LEGACY, lq.step):.0f} s; "
                              + _bound(records, PROJECT, [*CONVERT_STEPS, pq.step], cores, copy_rate)})
    return pd.DataFrame(rows)


def _cpu_total(records: list[StepRecord], recipe: str, quant_step: str) -> float:
    return sum(r.m.cpu_s for r in records if r.recipe == recipe and r.step in (*CONVERT_STEPS, quant_step))


def quant_files_table(files: dict[str, Path]) -> pd.DataFrame:
    rows = []
    for name, path in files.items():
        s = gguf_summary(path)
        rows.append({"file": name, "file_type": s["file_type"], "GiB": _gib(s["size_bytes"]), "bpw": s["bpw"],
                     "tensors": s["tensors"],
                     "tensor_types": ", ".join(f"{n} {t.lower()}" for t, n in s["tensor_types"].items())})
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (pandas' to_markdown needs tabulate, not installed)."""
    if df is None or not len(df):
        return "_(none)_\n"

    def cell(v):
        if isinstance(v, float):
            return "" if pd.isna(v) else f"{v:g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body]) + "\n"


def _write_tables(run: Run, records, totals, targets, files_table, inference=None, mtmd=None) -> pd.DataFrame:
    conversion = conversion_table(records)
    tables = {"conversion": conversion, "totals": totals, "targets": targets, "quant_files": files_table,
              "inference": inference, "mtmd": mtmd}
    for name, df in tables.items():
        if df is None:
            continue
        with atomic_path(run.dir / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False)
        with atomic_path(run.dir / f"{name}.md") as tmp:
            tmp.write_text(to_markdown(df))
    return conversion


# ----------------------------------------------------------------------------- report
def write_report(run: Run, info: dict, conversion: pd.DataFrame, totals: pd.DataFrame, targets: pd.DataFrame,
                 files_table: pd.DataFrame, inference: pd.DataFrame, mtmd: pd.DataFrame,
                 plots: dict[str, Path]) -> Path:
    """report.md and report.html (the same text) in the run folder; returns the HTML."""
    t = targets.copy()
    if len(t):
        t["met"] = t["met"].map({True: "yes", False: "**no**"})
    lines = ["# Conversion and inference benchmark", "",
             f"{info.get('started', '')}, {info.get('cpu') or info.get('arch') or info.get('machine')}, {_cores(info)} usable cores"
             f"{f' ({clusters})' if (clusters := describe_clusters(info)) else ''}, "
             f"{info.get('memory_GiB', '?')} GiB RAM, {info['disk_free_GiB']} GiB free at the start; "
             f"llama.cpp {info.get('llama_cpp', {}).get('version', '?')}.", "",
             f"Checkpoint: `{info['checkpoint']}` ({info['checkpoint_GiB']} GiB, {info['parameters']:,} parameters), "
             f"read once before the first step in {info.get('source_read_s', '?')} s; "
             f"left unchanged: {'yes' if info.get('source_untouched') else '**no**'}. "
             f"The whole benchmark took {info.get('total_s', '?')} s; load average (1/5/15 min) "
             f"{info.get('load_average_start', '?')} at the start, {info.get('load_average_end', '?')} at the end "
             f"(above {_cores(info)}: other work shared the cores, and every time here is longer for it).", "",
             "## Targets", "", to_markdown(t), ""]
    missed = t[t["met"] != "yes"] if len(t) else t
    if len(missed):
        lines += ["Missed targets and what bounds them:", ""]
        lines += [f"- **{r.target}**: {r.measured} against {r.limit}. Bounded by {r.bound}." for r in
                  missed.itertuples()]
        lines.append("")
    lines += ["## Conversion", "",
              "Every step ran in its own process; memory is the process tree's, sampled every 50 ms. "
              "`peak_anon` is memory the kernel cannot drop (the number that decides whether a board swaps or "
              "kills the process); `peak_file` is pages of files read or memory-mapped, reclaimable under pressure. "
              "`written` is what the tree wrote (page cache included); `flush_s` is the untimed `sync` right after "
              "the step: how long the disk still needed for what the step left dirty.", "",
              to_markdown(conversion), "", "Totals:", "", to_markdown(totals), ""]
    if "conversion" in plots:
        lines += ["![conversion](conversion.png)", ""]
    if "memory" in plots:
        lines += ["![memory over time](memory.png)", ""]
    lines += ["Quantized files (the project's and the legacy recipe's should hold the same tensor types):", "",
              to_markdown(files_table), ""]
    if len(inference):
        lines += ["## Inference", "",
                  f"llama-bench, tokens per second (mean of {run.params.bench.repetitions} repetition(s) "
                  "\u00b1 standard deviation). Prompt processing bounds how long an image prompt (2,880 image "
                  "tokens for LLaVA 1.6 at 336 px) takes; generation bounds how fast the answer streams.", "",
                  to_markdown(inference), ""]
        for test, g in inference.groupby("test", sort=False):
            best = g.loc[g["tokens_per_s"].idxmax()]
            lines.append(f"- fastest {test}: {best['quant']} at {best['threads']} threads, "
                         f"{best['tokens_per_s']:.2f} tokens/s")
        lines.append("")
        if "inference" in plots:
            lines += ["![inference](inference.png)", ""]
    if len(mtmd):
        lines += ["llama-mtmd-cli, one image per type:", "", to_markdown(mtmd), ""]
    text = "\n".join(lines)
    md = run.dir / "report.md"
    with atomic_path(md) as tmp:
        tmp.write_text(text)
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(text)
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>llava-gguf benchmark</title><style>"
            "body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px}"
            "th{background:#f3f3f3}img{max-width:100%}</style></head><body>" + body + "</body></html>")
    out = run.dir / "report.html"
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out


def _cores(info: dict) -> int:
    # Records written before machine.machine_info was shared call the usable cores "cores".
    return info.get("usable_cores") or info["cores"]
