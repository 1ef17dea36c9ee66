"""The process-tree monitor and the benchmark harness (on the tiny checkpoint; `make bench` runs the 7B).

No assertion here depends on how fast this machine is: only on what was allocated, mapped and
written, and on the tables having every row.
"""
from __future__ import annotations

import json
import mmap
import os
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from llava_gguf.bench import inputs, measure as bench, procmon, records, report
from llava_gguf.bench.records import MiB

# measure_call's child imports this module by name to find the functions below.
TESTS_DIR = str(Path(__file__).resolve().parent)


def allocate(n_bytes: int) -> int:
    """Touch n_bytes of anonymous memory, hold it a moment (several samples), return a checksum."""
    block = bytearray(n_bytes)
    for i in range(0, n_bytes, 4096):
        block[i] = 1
    time.sleep(0.4)
    return sum(block[::4096])


def map_file(path: str) -> int:
    """Read every page of a file through a read-only mapping: file-backed, not anonymous, memory."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        total = sum(m[i] for i in range(0, len(m), 4096))
        time.sleep(0.4)
    return total


def fail() -> None:
    raise RuntimeError("deliberate failure in the child")


@pytest.fixture
def child_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")])))


SIZE = 200 * MiB


def test_call_measures_anonymous_allocation(child_path):
    floor = procmon.measure_call(allocate, 4096)
    m = procmon.measure_call(allocate, SIZE)
    assert m.ok and m.result == SIZE // 4096
    grown = m.peak_anon - floor.peak_anon
    assert 0.9 * SIZE <= grown <= 1.25 * SIZE, (floor.peak_anon, m.peak_anon)
    # Allocating is not writing, and the heap is not file-backed.
    assert m.write_bytes < 4 * MiB
    assert m.peak_file - floor.peak_file < 0.2 * SIZE
    assert m.wall_s > 0.4 and m.samples >= 5 and m.cpu_s > 0


def test_mapped_file_is_file_backed_not_anonymous(child_path, tmp_path):
    data = tmp_path / "weights.bin"
    data.write_bytes(b"\x01" * SIZE)
    floor = procmon.measure_call(allocate, 4096)
    m = procmon.measure_call(map_file, str(data))
    assert m.result == SIZE // 4096
    assert m.peak_file - floor.peak_file >= 0.9 * SIZE
    assert m.peak_anon - floor.peak_anon < 0.15 * SIZE


def test_command_tree_memory_and_bytes_written(tmp_path):
    """A grandchild's memory and writes count: the tree is sampled, exited children's I/O is kept."""
    out = tmp_path / "out.bin"
    hold = f"x = bytearray({SIZE}); import time; time.sleep(0.5)"
    write = f"open({str(out)!r}, 'wb').write(bytes({SIZE // 2}))"
    code = (f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {hold!r}], check=True)\n"
            f"subprocess.run([sys.executable, '-c', {write!r}], check=True)\n")
    m = procmon.measure_command([sys.executable, "-c", code], log_file=tmp_path / "log.txt")
    assert m.ok and m.max_processes >= 2
    assert m.peak_anon >= 0.9 * SIZE
    assert out.stat().st_size == SIZE // 2
    assert SIZE // 2 <= m.write_bytes <= SIZE // 2 + 8 * MiB
    assert (tmp_path / "log.txt").read_text().startswith("$ ")


def test_failures_name_the_cause(child_path, tmp_path):
    with pytest.raises(procmon.MeasuredFailure, match="deliberate failure"):
        procmon.measure_call(fail)
    with pytest.raises(procmon.MeasuredFailure, match="exited with status 3") as info:
        procmon.measure_command([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                                log_file=tmp_path / "log.txt")
    assert "boom" in str(info.value) and info.value.measurement.returncode == 3


def _record(recipe, step, wall, cpu, anon, written):
    m = procmon.Measurement(label=step, wall_s=wall, peak_anon=anon, peak_file=0, peak_rss=anon,
                            write_bytes=written, read_bytes=0, cpu_s=cpu, returncode=0, samples=10,
                            max_processes=1)
    return records.StepRecord(recipe, step, m)


def test_targets_met_and_missed_say_why():
    G = procmon.GiB
    records = [_record("reference", "cp shards", 10, 2, 0, 13 * G),
               _record("reference", "python + imports", 2, 2, int(0.3 * G), 0),
               _record("project", "surgery", 3, 3, int(0.3 * G), 0),
               _record("project", "vision", 4, 4, int(0.4 * G), int(0.6 * G)),
               _record("project", "text", 30, 29, int(2.0 * G), 13 * G),
               _record("project", "quantize Q5_K_M", 100, 190, int(0.5 * G), int(4.5 * G)),
               _record("legacy", "surgery", 25, 24, int(9 * G), int(0.6 * G)),
               _record("legacy", "vision", 7, 7, int(2 * G), int(0.6 * G)),
               _record("legacy", "text", 17, 16, int(1 * G), 27 * G),
               _record("legacy", "quantize Q5_K_M", 195, 380, int(0.5 * G), int(4.5 * G))]
    totals = report.totals_table(records, legacy=True)
    assert list(totals["total"]) == ["conversion", "end to end"] * 2
    assert totals.loc[0, "wall_s"] == 37 and totals.loc[2, "wall_s"] == 49
    largest = {"name": "model.embed_tokens.weight", "shape": [32000, 4096], "elements": 32000 * 4096}
    left = {"models/x-F16.gguf": int(13.5 * G), "models/mmproj-model-f16.gguf": int(0.6 * G)}
    t = report.targets_table(records, totals, left, {"legacy/ggml-model-f32.gguf": 27 * G}, 7_060_000_000,
                            largest, cores=2).set_index("target")
    assert len(t) == 5
    mem = t.loc["peak anonymous memory, surgery + vision + text"]
    assert not mem["met"] and "text" in mem["measured"] and "model.embed_tokens.weight" in mem["bound"]
    assert t.loc["left behind after the conversion", "met"]
    vs_legacy = t.loc["conversion time vs the legacy recipe"]
    assert not vs_legacy["met"] and vs_legacy["bound"].startswith("CPU: text used 29.0 s of CPU")
    # 13.6 GiB at the copy's 1.3 GiB/s is ~10.5 s; 37 s is more than twice that.
    assert not t.loc["conversion time vs a plain copy of the same bytes", "met"]
    assert t.loc["end to end to Q5_K_M vs the legacy recipe", "met"]  # 137 s < 244 s


def test_markdown_table():
    md = report.to_markdown(pd.DataFrame([{"a": 1.5, "b": "x|y"}, {"a": float("nan"), "b": "z"}]))
    assert md.splitlines() == ["| a | b |", "| --- | --- |", "| 1.5 | x\\|y |", "|  | z |"]


def test_synthetic_checkpoint_made_once_and_reused(tmp_path, monkeypatch, write_params):
    from llava_gguf.run import workspace

    monkeypatch.setattr(inputs, "cache_dir", lambda: tmp_path / "cache")
    run = workspace.open_run(write_params({"run": "bench-ckpt", "model": {"source": "tiny"}}))
    first = inputs.benchmark_checkpoint(run)
    assert first.parent == tmp_path / "cache" and (first / "config.json").exists()
    stamp = (first / "config.json").stat().st_mtime_ns
    assert inputs.benchmark_checkpoint(run) == first and (first / "config.json").stat().st_mtime_ns == stamp


@pytest.mark.llama_cpp
def test_bench_end_to_end_on_tiny(tiny_checkpoint, write_params, llama_tool):
    """The whole harness, legacy recipe included, on the tiny checkpoint: every row, file and check."""
    llama_tool("llama-bench")
    params = write_params({
        "run": "bench-tiny", "model": {"source": "local", "path": str(tiny_checkpoint)},
        "convert": {"outtype": "f16", "verify": False}, "quantize": {"types": ["Q5_K_M"]},
        "bench": {"quant_types": ["Q4_K_M"], "threads": [1, 2], "repetitions": 1, "n_prompt": 16,
                  "n_gen": 4, "mtmd": True, "legacy": True},
        "evaluate": {"cases": [{"prompt": "Describe this image."}], "n_predict": 4, "threads": 2}})
    before = {p.name: p.stat().st_mtime_ns for p in tiny_checkpoint.iterdir()}
    result = bench.run_bench(params)

    steps = list(zip(result.conversion["recipe"], result.conversion["step"]))
    assert steps == [("reference", "cp shards"), ("reference", "python + imports"),
                     ("project", "surgery"), ("project", "vision"), ("project", "text"),
                     ("project", "text check"), ("project", "quantize Q5_K_M"), ("project", "quantize Q4_K_M"),
                     ("legacy", "surgery"), ("legacy", "vision"), ("legacy", "text"),
                     ("legacy", "quantize Q5_K_M")]
    conv = result.conversion.set_index(["recipe", "step"])
    assert (conv["wall_s"] > 0).all()
    # Every project step is a Python holding torch: never zero, and it is measured in the child.
    assert (conv.loc["project", "peak_anon_GiB"] > 0.02).all()
    assert "NMSE" in conv.loc[("project", "text check"), "note"]  # step 04's check, measured and passed
    # The text export writes what it leaves (no temporary copies); the legacy F32 file is ~2x the f16 one.
    text, legacy_text = conv.loc[("project", "text")], conv.loc[("legacy", "text")]
    assert 0.95 * text["output_GiB"] <= text["written_GiB"] <= 1.1 * text["output_GiB"] + 0.002
    assert 1.8 < legacy_text["output_GiB"] / text["output_GiB"] < 2.2
    assert conv.loc[("reference", "cp shards"), "written_GiB"] >= 0.95 * sum(
        p.stat().st_size for p in tiny_checkpoint.glob("*.safetensors")) / procmon.GiB

    assert len(result.targets) == 5 and set(result.targets["met"]) <= {True, False}
    assert result.targets.set_index("target").loc["left behind after the conversion", "met"]
    assert set(result.totals["recipe"]) == {"project", "legacy"}

    # The project's and the legacy recipe's Q5_K_M hold the same tensors in the same types.
    files = result.quant_files.set_index("file")
    assert files.loc["project Q5_K_M", "tensor_types"] == files.loc["legacy Q5_K_M", "tensor_types"]

    inf = result.inference
    # quantize.types[0] (Q5_K_M) is made for the end-to-end comparison; only bench.quant_types are timed.
    assert sorted(zip(inf["quant"], inf["threads"], inf["test"])) == [
        ("Q4_K_M", 1, "pp16"), ("Q4_K_M", 1, "tg4"), ("Q4_K_M", 2, "pp16"), ("Q4_K_M", 2, "tg4")]
    assert (inf["tokens_per_s"] > 0).all()
    assert list(result.mtmd["quant"]) == ["Q4_K_M"] and (result.mtmd["image_tokens"] > 0).all()

    out = result.dir
    for name in ("conversion", "totals", "targets", "inference", "mtmd", "quant_files"):
        assert (out / f"{name}.csv").stat().st_size > 0 and (out / f"{name}.md").read_text().startswith("|")
    for name in ("conversion", "memory", "inference"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.html").read_text()
    assert "<table>" in report and "conversion time vs the legacy recipe" in report
    # GGUF files are gone once measured; the source was only read.
    assert not list(out.rglob("*.gguf")) and not list(out.rglob("*.partial"))
    assert {p.name: p.stat().st_mtime_ns for p in tiny_checkpoint.iterdir()} == before
    assert json.loads((out / "bench.json").read_text())["machine"]["source_untouched"] is True
    # The report can be re-made from bench.json alone.
    again = bench.render(params)
    pd.testing.assert_frame_equal(again.conversion, result.conversion)
