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

import contextlib
import importlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import procmon
from .procmon import GiB, Measurement
from .tiny import is_current
from .workspace import Run, atomic_path, cache_dir, open_run, resolve, write_json

log = logging.getLogger(__name__)

MiB = 2**20
# Issue 6's targets for the project's conversion (surgery + vision + text) of the 7B to f16.
TARGET_PEAK_ANON = 1.5 * GiB
TARGET_LEFT_FACTOR = 1.1  # of the f16 size of the model (2 bytes per parameter)
TARGET_VS_LEGACY = 0.5  # of the legacy recipe's time for the same steps
TARGET_VS_COPY = 2.0  # of the plain copy's time for the same bytes
CONVERT_STEPS = ("surgery", "vision", "text")

PROJECT, LEGACY, REFERENCE = "project", "legacy", "reference"


class BenchError(RuntimeError):
    """The benchmark cannot start or go on; the message names the cause and the fix."""


@dataclass
class StepRecord:
    recipe: str
    step: str
    m: Measurement
    outputs: dict[str, int] = field(default_factory=dict)  # file -> bytes left by the step
    flush_s: float = 0.0
    note: str = ""

    @property
    def output_bytes(self) -> int:
        return sum(self.outputs.values())

    def row(self) -> dict[str, Any]:
        m = self.m
        return {"recipe": self.recipe, "step": self.step, "wall_s": round(m.wall_s, 2),
                "cpu_s": round(m.cpu_s, 2), "cores_busy": round(m.cpu_s / m.wall_s, 2) if m.wall_s else None,
                "peak_anon_GiB": _gib(m.peak_anon), "peak_file_GiB": _gib(m.peak_file),
                "written_GiB": _gib(m.write_bytes), "output_GiB": _gib(self.output_bytes),
                "write_MiB_s": round(m.write_bytes / MiB / m.wall_s, 1) if m.wall_s else None,
                "flush_s": round(self.flush_s, 2), "note": self.note}


@dataclass
class BenchResult:
    dir: Path
    conversion: pd.DataFrame
    totals: pd.DataFrame
    targets: pd.DataFrame
    inference: pd.DataFrame
    mtmd: pd.DataFrame
    quant_files: pd.DataFrame
    report: Path
    plots: dict[str, Path]


def _gib(n: float) -> float:
    return round(n / GiB, 3)


# ----------------------------------------------------------------------------- children
# Run in a fresh interpreter by procmon.measure_call: what they allocate is the step's own cost.
def call_step(params_file: str, step: str) -> None:
    """One pipeline step's library function (as `python -m llava_gguf step <step>` calls it)."""
    from .cli import STEP_FUNCTIONS

    module, func = STEP_FUNCTIONS[step]
    getattr(importlib.import_module(f"llava_gguf.{module}"), func)(open_run(params_file))


def quantize_one(params_file: str, qtype: str) -> str:
    """`quantize.quantize_file` for one type from the run's text GGUF; returns the file written."""
    from . import quantize

    run = open_run(params_file)
    path, _ = quantize.quantize_file(run, run.artifact_path("text_gguf"), qtype)
    return str(path)


def check_text(params_file: str) -> dict[str, Any]:
    """Step 04's check (`text_check.verify_text`: llama-debug and the streamed f32 reference)."""
    from . import text_check

    check = text_check.verify_text(open_run(params_file))
    if not check.passed:
        raise RuntimeError(check.message)
    return {"nmse": check.nmse, "bound": check.bound}


def import_stages() -> None:
    """The floor: an interpreter holding the stage modules (torch, numpy, gguf) and nothing else."""
    for name in ("surgery", "vision", "text", "quantize"):
        importlib.import_module(f"llava_gguf.{name}")


# ----------------------------------------------------------------------------- inputs
def benchmark_checkpoint(run: Run) -> Path:
    """model.source tiny: the synthetic checkpoint in the cache (made once); local: model.path."""
    p = run.params.model
    if p.format != "checkpoint":
        raise BenchError(f"{run.params_file}: the benchmark converts a checkpoint; set model.format: checkpoint")
    if p.source == "local":
        if not p.path or not resolve(p.path).is_dir():
            raise BenchError(f"{run.params_file}: model.path {p.path!r} is not a folder")
        return resolve(p.path)
    if p.source != "tiny":
        raise BenchError(f"{run.params_file}: model.source {p.source} is not benchmarked directly; download it "
                         "(`make download`) and point model.source: local / model.path at the folder")
    t = p.tiny
    folder = synthetic_dir(t.size, t.format, t.shards, t.seed)
    from .tiny import make_tiny

    if is_current(folder, t.size):
        log.info("reusing the synthetic checkpoint %s", folder)
        return folder
    if folder.exists():  # made by an older version of make-tiny: our own product, made again
        log.info("remaking the synthetic checkpoint %s (its config.json is not the current one)", folder)
        shutil.rmtree(folder)

    log.info("making a synthetic %s checkpoint in %s (once; reused by later runs)", t.size, folder)
    return make_tiny(folder, size=t.size, fmt=t.format, shards=t.shards, seed=t.seed)


def synthetic_dir(size: str, fmt: str, shards: int, seed: int) -> Path:
    return cache_dir() / f"bench-{size}-{fmt}-{shards}shards-seed{seed}"


def _synthetic_bytes(size: str) -> int:
    from .tiny import SIZES, tensor_plan

    return sum(2 * math.prod(shape) for _, shape in tensor_plan(SIZES[size], "1.6"))


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _files(folder: Path) -> dict[str, int]:
    """Regular files (not symlinks) below a folder -> bytes."""
    if not folder.exists():
        return {}
    return {str(p): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def _loadavg() -> str:
    """The 1/5/15-minute load averages: other work on the machine slows every step measured."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _read_through(files: list[Path], chunk: int = 16 * MiB) -> float:
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(chunk):
                pass
    took = time.perf_counter() - t0
    log.info("read the source once (untimed): %.1f s, %.0f MiB/s", took,
             sum(f.stat().st_size for f in files) / MiB / took if took else 0)
    return took


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_counts(run: Run) -> list[int]:
    if run.params.bench.threads:
        return sorted(set(run.params.bench.threads))
    cores, out, n = _cores(), [], 1
    while n < cores:
        out.append(n)
        n *= 2
    return out + [cores]


def machine_info(run: Run) -> dict[str, Any]:
    info: dict[str, Any] = {"machine": platform.machine(), "kernel": platform.release(), "cores": _cores(),
                            "python": sys.version.split()[0]}
    with contextlib.suppress(OSError):
        cpuinfo: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            cpuinfo.setdefault(key.strip().lower(), value.strip())
        # x86 names the CPU in "model name" ("model" is a number there); ARM boards name the board in "Model".
        for key in ("model name", "hardware", "model"):
            if cpuinfo.get(key) and not cpuinfo[key].isdigit():
                info["cpu"] = cpuinfo[key]
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_GiB"] = round(int(line.split()[1]) * 1024 / GiB, 1)
    usage = shutil.disk_usage(run.dir)
    info["disk_free_GiB"] = round(usage.free / GiB, 1)
    with contextlib.suppress(Exception):
        from . import toolchain

        info["llama_cpp"] = toolchain.llama_cpp_info(run.params.llama_cpp.dir)
    return info


# Approximate bits per weight of llama-quantize's output for the 7B (to size the disk check).
_BPW = {"Q8_0": 8.5, "Q6_K": 6.6, "Q5_K_M": 5.7, "Q5_K_S": 5.5, "Q5_0": 5.5, "Q5_1": 6.0, "Q4_K_M": 4.9,
        "Q4_K_S": 4.6, "Q4_0": 4.5, "Q4_1": 5.0, "Q3_K_L": 4.3, "Q3_K_M": 3.9, "Q3_K_S": 3.5, "Q2_K": 3.0,
        "IQ4_NL": 4.5, "IQ4_XS": 4.3, "F16": 0.0, "BF16": 16.0}


def disk_needed(run: Run, ckpt_bytes: int) -> int:
    """Bytes the benchmark holds on disk at its fullest moment, besides the checkpoint."""
    b = run.params.bench
    text = ckpt_bytes  # an f16 file is about the bf16 checkpoint's size
    types = set(b.quant_types) | {run.params.quantize.types[0]}
    project = text + sum(text * _BPW.get(t, 8.5) / 16 for t in types)
    legacy = 2 * text + text * _BPW.get(run.params.quantize.types[0], 8.5) / 16 + 0.1 * text if b.legacy else 0
    if b.keep_outputs:
        return int(project + legacy)
    return int(max(ckpt_bytes, project, legacy))  # the plain copy, the project's files, the legacy recipe's


def _check_disk(run: Run, need: int) -> None:
    """Fail before anything is written when the disk cannot hold the benchmark's fullest moment."""
    free = shutil.disk_usage(run.dir).free
    if free < 1.05 * need:
        raise BenchError(f"{run.dir}: {free / GiB:.1f} GiB free, the benchmark needs about {need / GiB:.1f} GiB "
                         f"at its peak; free space, or set bench.legacy: false / fewer bench.quant_types in "
                         f"{run.params_file}")


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
        write_json(self.run.dir / "bench.json", {**self.state, "records": [_record_json(r) for r in self.records]})


def _record_json(r: StepRecord) -> dict[str, Any]:
    return {"recipe": r.recipe, "step": r.step, "measurement": {**r.m.row(), "timeline": r.m.timeline},
            "outputs": r.outputs, "flush_s": r.flush_s, "note": r.note}


def _record_from_json(d: dict[str, Any]) -> StepRecord:
    m = dict(d["measurement"])
    m["timeline"] = [tuple(x) for x in m.get("timeline", [])]
    return StepRecord(d["recipe"], d["step"], Measurement(**m), d.get("outputs", {}), d.get("flush_s", 0.0),
                      d.get("note", ""))


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
    from . import toolchain

    # Every tool is looked up before anything runs, so a missing one fails in seconds, not after an hour.
    quantize_tool = toolchain.find_tool("llama-quantize", run.params.llama_cpp.dir)
    bench_tool = toolchain.find_tool("llama-bench", run.params.llama_cpp.dir) if b.inference else None
    mtmd_tool = toolchain.find_tool("llama-mtmd-cli", run.params.llama_cpp.dir) if b.inference and b.mtmd else None
    p = run.params.model
    make_ckpt = p.source == "tiny" and not is_current(synthetic_dir(p.tiny.size, p.tiny.format, p.tiny.shards,
                                                                    p.tiny.seed), p.tiny.size)
    if make_ckpt:
        size = _synthetic_bytes(p.tiny.size)
        _check_disk(run, size + disk_needed(run, size))
    ckpt = benchmark_checkpoint(run)
    from .checkpoint import Checkpoint

    with Checkpoint.open(ckpt) as c:
        shards = [ckpt / s for s in c.shards]
        n_params = sum(t.numel for t in c)
        largest = max(c, key=lambda t: t.numel)
        largest_info = {"name": largest.name, "dtype": largest.dtype, "shape": list(largest.shape),
                        "elements": largest.numel}
    ckpt_bytes = sum(s.stat().st_size for s in shards)
    _check_disk(run, disk_needed(run, ckpt_bytes))
    _clean_products(run)
    run.record("checkpoint", ckpt)
    before = _snapshot(ckpt)
    info = machine_info(run)
    info["load_average_start"] = _loadavg()
    info.update(checkpoint=str(ckpt), checkpoint_GiB=_gib(ckpt_bytes), parameters=n_params,
                largest_tensor=largest_info, quant_main=main_type, started=time.strftime("%Y-%m-%d %H:%M:%S"))
    log.info("benchmark of %s (%.2f GiB, %d shards) on %s cores, %s GiB RAM", ckpt, ckpt_bytes / GiB, len(shards),
             info["cores"], info.get("memory_GiB"))

    bench = _Bench(run)
    bench.state["machine"] = info
    bench.total = 2 + 3 + int(run.params.convert.verify) + len(quant_types) + (4 if b.legacy else 0) + (
        len(bench_types) * (1 + int(b.mtmd)) if b.inference else 0)
    t_start = time.perf_counter()

    # -- references --------------------------------------------------------------------------
    # One untimed read first, so the copy and the conversions find the source equally cached
    # (all of it where RAM allows, as on a machine that just downloaded it).
    info["source_read_s"] = round(_read_through(shards), 1)
    copy_dir = run.sub("copy")
    bench.command(REFERENCE, "cp shards", ["cp", "--", *shards, copy_dir], "copy.log",
                  outputs=lambda: copy_dir.iterdir(), note="the disk's own limit: the same bytes, no conversion")
    shutil.rmtree(copy_dir)
    bench.call(REFERENCE, "python + imports", import_stages,
               note="the floor under every project step: interpreter, torch, numpy, gguf, pandas")

    project_left, quant_files, mmproj = _project(bench, quant_types, main_type)
    files_table = _quant_files_table({f"project {k}": v for k, v in quant_files.items()})
    text_gguf = run.artifact_path("text_gguf")
    if not b.keep_outputs and "F16" not in bench_types:
        text_gguf.unlink()

    # Inference runs before the legacy recipe: its 27 GB F32 file then finds the project's files gone.
    inference = mtmd = pd.DataFrame()
    if b.inference:
        files = {t: text_gguf if t == "F16" else quant_files[t] for t in bench_types}
        threads = thread_counts(run)
        inference = _llama_bench(bench, bench_tool, files, threads)
        if b.mtmd:
            mtmd = _mtmd_runs(bench, mtmd_tool, files, mmproj, max(threads))
    if not b.keep_outputs:
        shutil.rmtree(run.dir / "models", ignore_errors=True)
        run.forget("mmproj", "text_gguf", "surgery")

    # -- the legacy recipe --------------------------------------------------------------------
    legacy_left: dict[str, int] = {}
    if b.legacy:
        legacy_left, legacy_quant = _legacy(bench, ckpt, quantize_tool, main_type)
        files_table = pd.concat([files_table, _quant_files_table({f"legacy {main_type}": legacy_quant})],
                                ignore_index=True)
        if not b.keep_outputs:
            shutil.rmtree(run.dir / "legacy")
    after = _snapshot(ckpt)
    info["source_untouched"] = before == after
    if before != after:
        log.error("the checkpoint folder %s changed during the benchmark", ckpt)

    info["total_s"] = round(time.perf_counter() - t_start, 1)
    info["load_average_end"] = _loadavg()
    bench.state.update(machine=info, project_left=project_left, legacy_left=legacy_left,
                       inference=inference.to_dict("records"), mtmd=mtmd.to_dict("records"),
                       quant_files=files_table.to_dict("records"))
    bench.save_raw()
    result = render(run)
    log.info("benchmark done in %.0f s: %s", info["total_s"], result.report)
    return result


def render(run: Run | str | Path) -> BenchResult:
    """Tables, plots and report of a run's bench.json (`run_bench` ends with this; rerun it after an edit)."""
    run = run if isinstance(run, Run) else open_run(run)
    data = json.loads((run.dir / "bench.json").read_text())
    records = [_record_from_json(d) for d in data["records"]]
    info = data["machine"]
    inference, mtmd = pd.DataFrame(data.get("inference", [])), pd.DataFrame(data.get("mtmd", []))
    files_table = pd.DataFrame(data.get("quant_files", []))
    legacy_left = data.get("legacy_left", {})
    totals = totals_table(records, any(r.recipe == LEGACY for r in records))
    targets = targets_table(records, totals, data.get("project_left", {}), legacy_left, info["parameters"],
                            info["largest_tensor"], info["cores"])
    conversion = _write_tables(run, records, totals, targets, files_table, inference, mtmd)
    plots = make_plots(run, records, inference)
    report = write_report(run, info, conversion, totals, targets, files_table, inference, mtmd, plots)
    return BenchResult(run.dir, conversion, totals, targets, inference, mtmd, files_table, report, plots)


def _project(bench: _Bench, quant_types: list[str], main_type: str) -> tuple[dict[str, int], dict[str, Path], Path]:
    """Surgery, vision and text export, then llama-quantize per type, each as the pipeline calls it.

    Returns (the files the conversion left -> bytes, quant type -> file, the mmproj)."""
    run = bench.run
    for step in CONVERT_STEPS:
        artifact = {"surgery": "surgery", "vision": "mmproj", "text": "text_gguf"}[step]
        bench.call(PROJECT, step, call_step, bench.params_file, step,
                   outputs=lambda a=artifact: [run.artifact_path(a)])
    if run.params.convert.verify:
        rec = bench.call(PROJECT, "text check", check_text, bench.params_file,
                         note="llama-debug + the streamed f32 reference; not in the conversion total")
        rec.note += f" (NMSE {rec.m.result['nmse']:.1e} <= {rec.m.result['bound']:.0e})"
        bench.save_raw()
    left = {**_files(run.dir / "models"), **_files(run.dir / "surgery")}
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
    from . import legacy

    def measured(cmd: list[str], log_file: Path, cwd: Path) -> None:
        step = steps.get(Path(cmd[1]).name, Path(cmd[1]).name)
        bench.measure(LEGACY, step, procmon.measure_command, cmd, log_file=log_file, cwd=cwd,
                      env=legacy._script_env(), note=Path(cmd[1]).name)

    return measured


def _legacy(bench: _Bench, ckpt: Path, quantize_tool: Path, qtype: str) -> tuple[dict[str, int], Path]:
    """The recipe's four steps; returns (files left after the text export -> bytes, the quantized file)."""
    from . import legacy, quantize

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
    left = _files(work)
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
    from .evaluate import MtmdOptions, case_inputs, run_mtmd

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
                     "peak_rss_GiB": round((r.peak_rss_mib or 0) / 1024, 3)})
    return pd.DataFrame(rows)


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


def _quant_files_table(files: dict[str, Path]) -> pd.DataFrame:
    from .quantize import gguf_summary

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


# ----------------------------------------------------------------------------- plots
_COLORS = {PROJECT: "tab:blue", LEGACY: "tab:orange", REFERENCE: "tab:gray"}


def make_plots(run: Run, records: list[StepRecord], inference: pd.DataFrame) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, Path] = {}
    conv = [r for r in records if r.recipe in _COLORS]
    labels = [f"{r.recipe}: {r.step}" for r in conv]
    colors = [_COLORS[r.recipe] for r in conv]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(conv) + 1.8), sharey=True)
    panels = (("wall time (s)", [r.m.wall_s for r in conv], None),
              ("peak memory (GiB): anonymous, + file-backed hatched",
               [r.m.peak_anon / GiB for r in conv], [r.m.peak_file / GiB for r in conv]),
              ("written (GiB)", [r.m.write_bytes / GiB for r in conv], None))
    y = range(len(conv))
    for ax, (title, values, extra) in zip(axes, panels):
        ax.barh(y, values, color=colors)
        if extra:
            ax.barh(y, extra, left=values, color="none", edgecolor=colors, hatch="//")
            ax.axvline(TARGET_PEAK_ANON / GiB, color="red", ls="--", lw=1)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(list(y), labels)
    axes[0].invert_yaxis()
    fig.tight_layout()
    out["conversion"] = _save(fig, run.dir / "conversion.png")

    timed = [(recipe, [r for r in conv if r.recipe == recipe and r.m.timeline]) for recipe in (PROJECT, LEGACY)]
    timed = [(k, v) for k, v in timed if v]
    if timed:
        fig, axes = plt.subplots(len(timed), 1, figsize=(12, 3.2 * len(timed)), squeeze=False, sharey=True)
        for ax, (recipe, recs) in zip(axes[:, 0], timed):
            t0 = 0.0
            for r in recs:
                ts = [t0 + s[0] for s in r.m.timeline]
                ax.fill_between(ts, [s[1] / GiB for s in r.m.timeline], color=_COLORS[recipe], alpha=0.6, lw=0)
                ax.plot(ts, [(s[1] + s[2]) / GiB for s in r.m.timeline], color="black", lw=0.6)
                ax.axvline(t0, color="gray", lw=0.5)
                ax.text(t0, ax.get_ylim()[1] * 0.02, f" {r.step}", fontsize=8, rotation=90, va="bottom")
                t0 += r.m.wall_s
            ax.axhline(TARGET_PEAK_ANON / GiB, color="red", ls="--", lw=1)
            ax.set_title(f"{recipe}: anonymous memory (filled), + file-backed (line), steps back to back", fontsize=10)
            ax.set_ylabel("GiB")
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("seconds")
        fig.tight_layout()
        out["memory"] = _save(fig, run.dir / "memory.png")

    if inference is not None and len(inference):
        tests = list(dict.fromkeys(inference["test"]))
        fig, axes = plt.subplots(1, len(tests), figsize=(6 * len(tests), 4), squeeze=False)
        for ax, test in zip(axes[0], tests):
            sel = inference[inference["test"] == test]
            for q, g in sel.groupby("quant", sort=False):
                g = g.sort_values("threads")
                ax.errorbar(g["threads"], g["tokens_per_s"], yerr=g["stddev"], marker="o", capsize=3,
                            label=f"{q} ({g['file_GiB'].iloc[0]:.2f} GiB)")
            ax.set_title(f"{test}: {'prompt processing' if test.startswith('pp') else 'generation'}", fontsize=10)
            ax.set_xlabel("threads")
            ax.set_ylabel("tokens/s")
            ax.set_xticks(sorted(set(sel["threads"])))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        out["inference"] = _save(fig, run.dir / "inference.png")
    return out


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- report
def write_report(run: Run, info: dict, conversion: pd.DataFrame, totals: pd.DataFrame, targets: pd.DataFrame,
                 files_table: pd.DataFrame, inference: pd.DataFrame, mtmd: pd.DataFrame,
                 plots: dict[str, Path]) -> Path:
    """report.md and report.html (the same text) in the run folder; returns the HTML."""
    t = targets.copy()
    if len(t):
        t["met"] = t["met"].map({True: "yes", False: "**no**"})
    lines = ["# Conversion and inference benchmark", "",
             f"{info.get('started', '')}, {info.get('cpu', info['machine'])}, {info['cores']} usable cores, "
             f"{info.get('memory_GiB', '?')} GiB RAM, {info['disk_free_GiB']} GiB free at the start; "
             f"llama.cpp {info.get('llama_cpp', {}).get('version', '?')}.", "",
             f"Checkpoint: `{info['checkpoint']}` ({info['checkpoint_GiB']} GiB, {info['parameters']:,} parameters), "
             f"read once before the first step in {info.get('source_read_s', '?')} s; "
             f"left unchanged: {'yes' if info.get('source_untouched') else '**no**'}. "
             f"The whole benchmark took {info.get('total_s', '?')} s; load average (1/5/15 min) "
             f"{info.get('load_average_start', '?')} at the start, {info.get('load_average_end', '?')} at the end "
             f"(above {info['cores']}: other work shared the cores, and every time here is longer for it).", "",
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
