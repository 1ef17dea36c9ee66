"""Step 05: llama-quantize per type, the size / bpw / tensor-type table, atomic outputs, clear errors."""
from __future__ import annotations

import shutil
import stat
from pathlib import Path

import gguf
import numpy as np
import pytest

from llava_gguf.model.gguf_io import IMATRIX_KEY
from llava_gguf.steps import quantize
from llava_gguf.llama_cpp import toolchain


@pytest.fixture(scope="module")
def tiny_text_gguf(tiny_checkpoint, tmp_path_factory) -> Path:
    from llava_gguf.steps import text_export as text

    path = tmp_path_factory.mktemp("text") / "llava-tiny-F16.gguf"
    text.write_text_gguf(tiny_checkpoint, path)
    return path


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".partial")]


# ----------------------------------------------------------------------------- no tools
def test_header_parser_agrees_with_gguf_reader(tmp_path):
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(3)
    w.add_embedding_length(64)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_array("tokenizer.ggml.tokens", ["a", "bc", "▁d"] * 50)
    w.add_array("tokenizer.ggml.scores", [0.5] * 150)
    w.add_string("general.name", "ünï")
    w.add_tensor("a.weight", np.ones((64, 32), dtype=np.float16))
    w.add_tensor("b.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    header = quantize.open_gguf(path)
    reader = gguf.GGUFReader(path)
    assert [(t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in reader.tensors] == \
        [(t.name, t.qtype.name, t.n_elements, t.n_bytes) for t in header.tensors.values()]
    assert header.fields["general.name"] == "ünï" and header.fields["llama.block_count"] == 3
    assert header.fields["tokenizer.ggml.tokens"] == 150  # arrays: their length
    s = quantize.gguf_summary(path)
    assert s["file_type"] == "F16" and s["params"] == 64 * 32 + 32
    assert s["tensor_types"] == {"F16": 1, "F32": 1} and s["layers"] == 3 and s["width"] == 64
    assert s["bpw"] == pytest.approx(8 * (64 * 32 * 2 + 32 * 4) / (64 * 32 + 32), abs=1e-3)


@pytest.mark.parametrize("content, message", [
    (b"<html>404</html>", "not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00\x05", "truncated"),
])
def test_unreadable_gguf_named_before_anything_is_written(local_run, content, message):
    run = local_run(quantize={"types": ["Q8_0"]})
    bad = run.sub("bad") / "text.gguf"
    bad.write_bytes(content)
    run.record("text_gguf", bad)
    with pytest.raises(quantize.GGUFError, match=rf"{bad}.*{message}"):
        quantize.run_quantize(run)
    assert not (run.dir / "models").exists() or not list((run.dir / "models").iterdir())
    assert "quantized" not in run.artifacts()


def test_truncated_tensor_data_is_detected(tmp_path, tiny_text_gguf):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_text_gguf.read_bytes()[:2_000_000])
    with pytest.raises(quantize.GGUFError, match="truncated"):
        quantize.open_gguf(cut)


def test_crashing_tool_keeps_log_and_leaves_no_output(local_run, tiny_text_gguf, tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "llama-quantize"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'llama_model_quantize: loading'\ntouch \"$2\"\nkill -SEGV $$\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv(toolchain.ENV_DIR, str(tmp_path))
    run = local_run(quantize={"types": ["Q4_K_M"]})
    run.record("text_gguf", tiny_text_gguf)
    with pytest.raises(toolchain.ToolFailed, match=r"(?s)crashed \(SIGSEGV\).*quantize-Q4_K_M\.log.*loading") as err:
        quantize.run_quantize(run)
    assert err.value.log_file.exists() and "loading" in err.value.log_file.read_text()
    assert list((run.dir / "models").iterdir()) == []
    assert "quantized" not in run.artifacts()


# ----------------------------------------------------------------------------- with llama.cpp
@pytest.mark.llama_cpp
def test_quantize_types_table_and_reuse(local_run, tiny_text_gguf, llama_tool, monkeypatch):
    llama_tool("llama-quantize")
    run = local_run(quantize={"types": ["Q8_0", "Q4_K_M"]})
    run.record("text_gguf", tiny_text_gguf)
    result = quantize.run_quantize(run)
    models = run.dir / "models"
    assert set(result.quantized) == {"Q8_0", "Q4_K_M"} and result.reused == []
    assert result.quantized["Q4_K_M"] == models / "llava-tiny-Q4_K_M.gguf"
    assert _leftovers(models) == []
    assert set(run.artifacts()["quantized"]) == {"Q8_0", "Q4_K_M"}
    assert all((run.dir / "logs" / f"quantize-{t}.log").exists() for t in result.quantized)

    table = result.table().set_index("variant")
    assert list(table.index) == ["F16", "Q8_0", "Q4_K_M"]  # source first, by bits per weight
    assert (table["params"] == table.loc["F16", "params"]).all()
    assert table.loc["F16", "bpw"] == pytest.approx(16.0, abs=0.01)
    assert table.loc["Q8_0", "bpw"] == pytest.approx(8.5, abs=0.01)  # every matrix Q8_0: 34 bytes / 32
    # Q4_K_M keeps the output matrix at Q6_K; norms stay F32 everywhere.
    assert table.loc["Q4_K_M", "n_Q6_K"] >= 1 and table.loc["Q4_K_M", "n_Q4_K"] >= 1
    assert (table["n_F32"] == 5).all()
    assert 4.5 < table.loc["Q4_K_M", "bpw"] < table.loc["Q8_0", "bpw"]
    assert table.loc["Q4_K_M", "size_bytes"] < table.loc["Q8_0", "size_bytes"] < table.loc["F16", "size_bytes"]

    mtimes = {t: p.stat().st_mtime_ns for t, p in result.quantized.items()}
    again = quantize.run_quantize(run)
    assert sorted(again.reused) == ["Q4_K_M", "Q8_0"]
    assert {t: p.stat().st_mtime_ns for t, p in again.quantized.items()} == mtimes
    assert oct(result.quantized["Q8_0"].stat().st_mode & 0o044) != "0o0"  # not owner-only

    # Another llama.cpp build (here: a copy of the tool in another folder) makes them again.
    other = run.dir / "other-build" / "bin"
    other.mkdir(parents=True)
    shutil.copy2(toolchain.find_tool("llama-quantize"), other / "llama-quantize")
    monkeypatch.setenv("LLAMA_CPP_DIR", str(other.parent))
    third = quantize.run_quantize(run)
    assert third.reused == []


def test_quantized_text_gguf_is_refused_naming_the_keys(local_run, tiny_checkpoint, tmp_path):
    from llava_gguf.steps import text_export as text

    text.write_text_gguf(tiny_checkpoint, tmp_path / "llava-tiny-Q8_0.gguf", "q8_0")
    run = local_run(quantize={"types": ["Q4_K_M"]})
    run.record("text_gguf", tmp_path / "llava-tiny-Q8_0.gguf")
    with pytest.raises(ValueError, match="convert.outtype.*quantize.types"):
        quantize.run_quantize(run)
    assert not (run.dir / "models").exists() or not list((run.dir / "models").glob("*Q4_K_M*"))


@pytest.mark.llama_cpp
def test_imatrix_is_computed_and_used(local_run, tiny_text_gguf, llama_tool):
    llama_tool("llama-imatrix")
    run = local_run(quantize={"types": ["Q4_K_M"], "imatrix": True, "imatrix_chunks": 2, "imatrix_ctx": 128})
    run.record("text_gguf", tiny_text_gguf)
    result = quantize.run_quantize(run)
    assert result.imatrix is not None and result.imatrix.exists()
    assert (run.dir / "logs" / "imatrix.log").exists()
    header = quantize.open_gguf(result.quantized["Q4_K_M"])
    assert IMATRIX_KEY in header.fields
    assert result.table().set_index("variant").loc["Q4_K_M", "imatrix"]
    # Switching the imatrix off makes the file out of date.
    run.params.quantize.imatrix = False
    plain = quantize.run_quantize(run)
    assert plain.reused == [] and IMATRIX_KEY not in quantize.open_gguf(plain.quantized["Q4_K_M"]).fields
