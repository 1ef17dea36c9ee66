"""`make bench`: what converting the 7B costs on this machine, beside llama.cpp's legacy recipe.

One run (params/bench.yaml, results in `outputs/bench/`), on one synthetic checkpoint with the real
7B shapes (made once into the cache, `make-tiny --size 7b`; random weights cost the same to convert
and to run as real ones):

1. conversion, each step in its own process, measured by `procmon` (wall time, CPU time, peak
   anonymous memory and, apart, peak file-backed memory of the process tree, bytes written):
   - reference: a plain `cp` of the shards (the disk's own limit) and a Python that only imports
     the project's stage modules (the floor under every project step's memory);
   - project: surgery, vision export, text export (convert.outtype, f16), llama-quantize to each
     type (quantize.types[0], Q5_K_M, first: the one compared end to end);
   - legacy (bench.legacy): llava_surgery_v2.py -C, convert_image_encoder_to_gguf.py
     --clip-model-is-vision, convert_legacy_llama.py --skip-unknown (F32, its default for bf16),
     llama-quantize from that F32 file, run through `legacy.py` in its transformers<5 venv.
2. targets (issue 6) checked against those numbers; where one is missed, the report says what
   bounds it (CPU time, bytes written, the floor, the largest tensor).
3. inference (bench.inference): llama-bench pp<n_prompt> / tg<n_gen> for each bench.quant_types
   across bench.threads, and with bench.mtmd one llama-mtmd-cli image run per type. It runs
   between the project's steps and the legacy recipe, so the project's GGUF files are gone before
   the legacy F32 file is written: the disk holds one recipe's files at a time.

Before every step the page cache is flushed (`os.sync()`, not timed), so a step does not pay for
an earlier one's writeback; the flush right after a step is timed apart (`flush_s`): what the step
left in the page cache for the disk to absorb. GGUF files are deleted once measured (the legacy
F32 file alone is 27 GB) unless bench.keep_outputs. Tables, plots, logs and `report.html` stay.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from . import procmon
from .inputs import files, loadavg, prepare_source, read_through, snapshot, start_record, thread_counts
from .records import CONVERT_STEPS, LEGACY, PROJECT, REFERENCE, BenchResult, StepRecord, _gib, record_json
from .report import quant_files_table, render
from ..checks import text as text_check
from ..llama_cpp import legacy, toolchain
from ..llama_cpp.mtmd import MtmdOptions, run_mtmd
from ..run import registry
from ..run.workspace import Run, open_run, write_json
from ..steps import quantize
from ..steps.evaluate import case_inputs

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- children
# Run in a fresh interpreter by procmon.measure_call: what they allocate is the step's own cost.
def call_step(params_file: str, step: str) -> None:
    """One pipeline step's library entry point (as `python -m llava_gguf step <step>` calls it)."""
    registry.get(step).entry_point()(open_run(params_file))


def quantize_one(params_file: str, qtype: str) -> str:
    """`quantize.quantize_file` for one type from the run's text GGUF; returns the file written."""
    run = open_run(params_file)
    path, _ = quantize.quantize_file(run, run.artifact_path("text_gguf"), qtype)
    return str(path)


def check_text(params_file: str) -> dict[str, Any]:
    """Step 04's check alone (`checks.text.verify_text`: llama-debug and the streamed f32 reference),
    whatever convert.verify says: the conversion rows measure the export without it."""
    run = open_run(params_file)
    run.params.convert.verify = True
    check = text_check.verify_text(run)
    if not check.passed:
        raise RuntimeError(check.message)
    return {"nmse": check.nmse, "bound": check.bound}


def import_stages() -> None:
    """The floor: an interpreter holding the stage modules (torch, numpy, gguf) and nothing else."""
    for name in (*CONVERT_STEPS, "quantize"):
        importlib.import_module(registry.get(name).entry.partition(":")[0])


# ----------------------------------------------------------------------------- the run
class _Bench:
    def __init__(self, run: Run):
        self.run = run
        self.b = run.params.bench
        self.params_file = str(run.params_file)
        self.records: list[StepRecord] = []
        self.logs = run.sub("logs")
        self.n, self.total = 0, 0
        self.state: dict[str, Any] = {}  # machine, checkpoint facts, left-behind files, inference rows

    # -- measuring -------------------------------------------------------------------------------
    def _announce(self, what: str) -> None:
        self.n += 1
        log.info("[%d/%d] %s", self.n, self.total, what)

    def measure(self, recipe: str, step: str, fn, *args, outputs=None, note: str = "", **kw) -> StepRecord:
        self._announce(f"{recipe}: {step}")
        os.sync()
        m = fn(*args, label=f"{recipe} {step}", timeout=self.b.timeout_s, **kw)
        t0 = time.perf_counter()
        os.sync()
        flush = time.perf_counter() - t0
        files = {}
        for f in outputs() if callable(outputs) else (outputs or []):
            f = Path(f)
            if f.is_file():
                files[str(f)] = f.stat().st_size
        rec = StepRecord(recipe, step, m, files, flush, note)
        self.records.append(rec)
        self.save_raw()
        return rec

    def call(self, recipe: str, step: str, func, *args, outputs=None, note: str = "") -> StepRecord:
        return self.measure(recipe, step, procmon.measure_call, func, *args, outputs=outputs, note=note)

    def command(self, recipe: str, step: str, cmd: list, log_name: str, outputs=None, note: str = "") -> StepRecord:
        return self.measure(recipe, step, procmon.measure_command, cmd, log_file=self.logs / log_name,
                            outputs=outputs, note=note)

    def record(self, recipe: str, step: str) -> StepRecord | None:
        return next((r for r in self.records if r.recipe == recipe and r.step == step), None)

    def save_raw(self) -> None:
        """Everything measured so far, in bench.json: the tables and report are re-made from it."""
        write_json(self.run.dir / "bench.json", {**self.state, "records": [record_json(r) for r in self.records]})


def _clean_products(run: Run) -> None:
    for sub in ("models", "surgery", "legacy", "copy", "inference"):
        shutil.rmtree(run.dir / sub, ignore_errors=True)
    (run.dir / "bench.json").unlink(missing_ok=True)
    run.forget("surgery", "mmproj", "text_gguf", "quantized", "checkpoint")


def run_bench(params_path: str | Path | None = "params/bench.yaml") -> BenchResult:
    """Run the benchmark the params describe; write tables, plots and report.html to outputs/<run>/."""
    run = open_run(params_path)
    b = run.params.bench
    main_type = run.params.quantize.types[0]
    bench_types = list(dict.fromkeys(b.quant_types))
    quant_types = list(dict.fromkeys([main_type, *[t for t in bench_types if t != "F16"]]))
    quantize_tool, bench_tool, mtmd_tool = _find_tools(run)
    source = prepare_source(run)
    _clean_products(run)
    run.record("checkpoint", source.path)
    before = snapshot(source.path)
    info = start_record(run, source, main_type)

    bench = _Bench(run)
    bench.state["machine"] = info
    bench.total = 2 + 3 + 1 + len(quant_types) + (4 if b.legacy else 0) + (
        len(bench_types) * (1 + int(b.mtmd)) if b.inference else 0)
    t_start = time.perf_counter()
    _references(bench, source.shards, info)

    project_left, quant_files, mmproj = _project(bench, quant_types, main_type)
    files_table = quant_files_table({f"project {k}": v for k, v in quant_files.items()})
    text_gguf = run.artifact_path("text_gguf")
    if not b.keep_outputs and "F16" not in bench_types:
        text_gguf.unlink()
    # Inference runs before the legacy recipe: its 27 GB F32 file then finds the project's files gone.
    inference, mtmd = _inference(bench, bench_types, text_gguf, quant_files, mmproj, bench_tool, mtmd_tool)
    if not b.keep_outputs:
        shutil.rmtree(run.dir / "models", ignore_errors=True)
        run.forget("mmproj", "text_gguf", "surgery")
    legacy_left, files_table = _legacy_recipe(bench, source.path, quantize_tool, main_type, files_table)
    after = snapshot(source.path)
    info["source_untouched"] = before == after
    if before != after:
        log.error("the checkpoint folder %s changed during the benchmark", source.path)

    info["total_s"] = round(time.perf_counter() - t_start, 1)
    info["load_average_end"] = loadavg()
    bench.state.update(machine=info, project_left=project_left, legacy_left=legacy_left,
                       inference=inference.to_dict("records"), mtmd=mtmd.to_dict("records"),
                       quant_files=files_table.to_dict("records"))
    bench.save_raw()
    result = render(run)
    log.info("benchmark done in %.0f s: %s", info["total_s"], result.report)
    return result


def _find_tools(run: Run) -> tuple[Path, Path | None, Path | None]:
    """(llama-quantize, llama-bench, llama-mtmd-cli), the last two only when the params use them."""
    b = run.params.bench
    # Every tool is looked up before anything runs, so a missing one fails in seconds, not after an hour.
    quantize_tool = toolchain.find_tool("llama-quantize", run.params.llama_cpp.dir)
    bench_tool = toolchain.find_tool("llama-bench", run.params.llama_cpp.dir) if b.inference else None
    mtmd_tool = toolchain.find_tool("llama-mtmd-cli", run.params.llama_cpp.dir) if b.inference and b.mtmd else None
    return quantize_tool, bench_tool, mtmd_tool


def _references(bench: _Bench, shards: list[Path], info: dict) -> None:
    """The floors: a plain copy of the shards and a Python that only imports the stage modules."""
    # One untimed read first, so the copy and the conversions find the source equally cached
    # (all of it where RAM allows, as on a machine that just downloaded it).
    info["source_read_s"] = round(read_through(shards), 1)
    copy_dir = bench.run.sub("copy")
    bench.command(REFERENCE, "cp shards", ["cp", "--", *shards, copy_dir], "copy.log",
                  outputs=lambda: copy_dir.iterdir(), note="the disk's own limit: the same bytes, no conversion")
    shutil.rmtree(copy_dir)
    bench.call(REFERENCE, "python + imports", import_stages,
               note="the floor under every project step: interpreter, torch, numpy, gguf, pandas")


def _inference(bench: _Bench, bench_types: list[str], text_gguf: Path, quant_files: dict[str, Path], mmproj: Path,
               bench_tool: Path | None, mtmd_tool: Path | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(llama-bench rows, llama-mtmd-cli rows); empty frames when bench.inference / bench.mtmd are off."""
    b = bench.run.params.bench
    inference = mtmd = pd.DataFrame()
    if b.inference:
        files = {t: text_gguf if t == "F16" else quant_files[t] for t in bench_types}
        threads = thread_counts(bench.run)
        inference = _llama_bench(bench, bench_tool, files, threads)
        if b.mtmd:
            mtmd = _mtmd_runs(bench, mtmd_tool, files, mmproj, max(threads))
    return inference, mtmd


def _legacy_recipe(bench: _Bench, ckpt: Path, quantize_tool: Path, main_type: str,
                   files_table: pd.DataFrame) -> tuple[dict[str, int], pd.DataFrame]:
    """With bench.legacy: llama.cpp's own recipe; (the files it left -> bytes, the files table with its row)."""
    b = bench.run.params.bench
    legacy_left: dict[str, int] = {}
    if b.legacy:
        legacy_left, legacy_quant = _legacy(bench, ckpt, quantize_tool, main_type)
        files_table = pd.concat([files_table, quant_files_table({f"legacy {main_type}": legacy_quant})],
                                ignore_index=True)
        if not b.keep_outputs:
            shutil.rmtree(bench.run.dir / "legacy")
    return legacy_left, files_table


def _project(bench: _Bench, quant_types: list[str], main_type: str) -> tuple[dict[str, int], dict[str, Path], Path]:
    """Surgery, vision and text export, then llama-quantize per type, each as the pipeline calls it.

    Returns (the files the conversion left -> bytes, quant type -> file, the mmproj)."""
    run = bench.run
    for step in CONVERT_STEPS:
        artifact = {"surgery": "surgery", "vision": "mmproj", "text": "text_gguf"}[step]
        bench.call(PROJECT, step, call_step, bench.params_file, step,
                   outputs=lambda a=artifact: [run.artifact_path(a)])
    rec = bench.call(PROJECT, "text check", check_text, bench.params_file,
                     note="llama-debug + the streamed f32 reference; not in the conversion total")
    rec.note += f" (NMSE {rec.m.result['nmse']:.1e} <= {rec.m.result['bound']:.0e})"
    bench.save_raw()
    left = {**files(run.dir / "models"), **files(run.dir / "surgery")}
    quant_files: dict[str, Path] = {}
    for qtype in quant_types:
        note = "llama-quantize from the f16 export" + (" (the end-to-end type)" if qtype == main_type else "")
        rec = bench.call(PROJECT, f"quantize {qtype}", quantize_one, bench.params_file, qtype, note=note)
        quant_files[qtype] = Path(rec.m.result)
        rec.outputs = {rec.m.result: quant_files[qtype].stat().st_size}
    return left, quant_files, run.artifact_path("mmproj")


def _measured_runner(bench: _Bench, steps: dict[str, str]):
    """A legacy.py `runner` that measures each script, and only the script.

    It times the script's own process tree, not the Python that launches it nor legacy.py's
    untimed setup around it (the venv, the symlink copy, config_vit.json derived in place of a
    download). `steps` maps the script's file name to the step name in the table.
    """
    def measured(cmd: list[str], log_file: Path, cwd: Path) -> None:
        step = steps.get(Path(cmd[1]).name, Path(cmd[1]).name)
        bench.measure(LEGACY, step, procmon.measure_command, cmd, log_file=log_file, cwd=cwd,
                      env=legacy.script_env(cmd[0]), note=Path(cmd[1]).name)

    return measured


def _legacy(bench: _Bench, ckpt: Path, quantize_tool: Path, qtype: str) -> tuple[dict[str, int], Path]:
    """The recipe's four steps; returns (files left after the text export -> bytes, the quantized file)."""
    run = bench.run
    work = run.sub("legacy")
    legacy.legacy_env()  # made once (pip); not part of the recipe's cost
    steps = {Path(legacy.SURGERY_SCRIPT).name: "surgery", Path(legacy.IMAGE_ENCODER_SCRIPT).name: "vision",
             Path(legacy.TEXT_SCRIPT).name: "text"}
    runner = _measured_runner(bench, steps)
    surgery = legacy.legacy_surgery(ckpt, work, runner=runner)
    bench.record(LEGACY, "surgery").outputs = {str(f): f.stat().st_size for f in (surgery.clip, surgery.projector)}
    mmproj = legacy.legacy_vision_export(surgery.model_dir, work, "f16", runner=runner)
    bench.record(LEGACY, "vision").outputs = {str(mmproj): mmproj.stat().st_size}
    f32 = legacy.legacy_text_export(surgery.model_dir, work, "f32", runner=runner)
    bench.record(LEGACY, "text").outputs = {str(f32): f32.stat().st_size}
    left = files(work)
    out = work / f"ggml-model-{qtype}.gguf"
    threads = str(quantize.threads(run))
    bench.command(LEGACY, f"quantize {qtype}", [quantize_tool, f32, out, qtype, threads], f"legacy-quantize-{qtype}.log",
                  outputs=[out], note="llama-quantize from the F32 export")
    if not run.params.bench.keep_outputs:
        f32.unlink()
    return left, out


# ----------------------------------------------------------------------------- inference
def _llama_bench(bench: _Bench, tool: Path, files: dict[str, Path], threads: list[int]) -> pd.DataFrame:
    b = bench.b
    out_dir = bench.run.sub("inference")
    rows = []
    for qtype, path in files.items():
        json_out = out_dir / f"llama-bench-{qtype}.json"
        cmd = [tool, "-m", path, "-p", b.n_prompt, "-n", b.n_gen, "-t", ",".join(map(str, threads)),
               "-r", b.repetitions, "-o", "json"]
        rec = bench.measure("inference", f"llama-bench {qtype}", procmon.measure_command, cmd,
                            log_file=bench.logs / f"llama-bench-{qtype}.log", stdout=json_out,
                            note=f"threads {threads}, {b.repetitions} repetition(s)")
        size = path.stat().st_size
        for r in json.loads(json_out.read_text() or "[]"):
            test = f"pp{r['n_prompt']}" if r.get("n_prompt") and not r.get("n_gen") else f"tg{r['n_gen']}"
            rows.append({"quant": qtype, "file_GiB": _gib(size), "threads": r["n_threads"], "test": test,
                         "tokens_per_s": round(r["avg_ts"], 3), "stddev": round(r.get("stddev_ts", 0.0), 3),
                         "repetitions": len(r.get("samples_ts") or []) or b.repetitions,
                         "peak_anon_GiB": _gib(rec.m.peak_anon), "peak_file_GiB": _gib(rec.m.peak_file)})
    return pd.DataFrame(rows)


def _mtmd_runs(bench: _Bench, tool: Path, files: dict[str, Path], mmproj: Path, threads: int) -> pd.DataFrame:
    run = bench.run
    image, prompt = case_inputs(run)[0]
    opts = MtmdOptions(run.params.evaluate.model_copy(update={"threads": threads}))
    rows = []
    for qtype, path in files.items():
        bench._announce(f"inference: llama-mtmd-cli {qtype} ({threads} threads)")
        r = run_mtmd(tool, path, mmproj, image, prompt, opts, bench.logs / f"mtmd-{qtype}.log")
        s = r.summary()
        rows.append({"quant": qtype, "threads": threads, "wall_s": round(r.wall_s, 1),
                     "image_encode_ms": s.get("image_encode_ms"), "image_tokens": s.get("image_tokens"),
                     "prompt_tokens": s.get("prompt_tokens"), "prompt_tokens_per_s": s.get("prompt_tokens_per_s"),
                     "eval_tokens_per_s": s.get("eval_tokens_per_s"), "ttft_after_load_ms": s.get("ttft_after_load_ms"),
                     "peak_rss_GiB": round((r.peak_rss_mib or 0) / 1024, 3),
                     "others_cores": s.get("others_cores"), "under_load": s.get("under_load")})
    return pd.DataFrame(rows)


