"""`make all` on the tiny model: every implemented step through papermill, then all skipped."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from llava_gguf.pipeline import runner as pipeline
from llava_gguf.run import registry, workspace
from llava_gguf.steps import serve


@pytest.mark.llama_cpp
def test_all_steps_on_tiny_model_then_nothing_to_do(tiny_run):
    run, done = tiny_run  # conftest.py: every step, run once per session
    steps = pipeline.available_steps()
    assert steps[0] == "download"
    assert [name for name, _ in done] == steps and {what for _, what in done} == {"ran"}
    artifacts = run.artifacts()
    expected = {s for name in steps for s in registry.get(name).products} | {"llama_cpp"}
    assert expected <= set(artifacts)
    for name in expected - {"llama_cpp"}:
        value = artifacts[name]
        for path in (value.values() if isinstance(value, dict) else [value]):
            assert run.resolve(path).exists(), (name, path)
    index = (run.dir / "reports" / "index.html").read_text()
    for name in steps:
        assert registry.get(name).notebook.replace(".ipynb", ".html") in index
    assert {what for _, what in pipeline.run_steps(run, steps)} == {"skipped"}


def test_the_conversation_records_the_load_of_every_turn(tiny_run):
    """Step 08's turns are timed runs like 06's and 07's: each carries its load (machine_load.py),
    the summary folds them, and the index's follow-up line says what they ran under."""
    run, _ = tiny_run
    turns = pd.read_csv(run.dir / "conversation" / "turns.csv")
    assert {"loadavg_start", "others_cores", "under_load"} <= set(turns.columns)
    summary = json.loads((run.dir / "conversation" / "summary.json").read_text())
    assert summary["load"]["runs"] == len(turns)
    judged = turns["under_load"].notna().sum()
    assert summary["load"]["runs_judged"] == judged and summary["load"]["runs_under_load"] == (turns["under_load"] == True).sum()  # noqa: E712
    follow_up = (run.dir / "reports" / "index.html").read_text().split("follow-up answer in", 1)[1]
    assert ("measured at load" if judged else "load not recorded") in follow_up.split("</p>", 1)[0]


def test_the_conversation_outlives_a_restarted_server(tiny_run):
    """Step 08's restart: the saved slot's file was measured and removed, the restored follow-up took
    the image from it (the server's own counts), and the check says so."""
    run, _ = tiny_run
    s = json.loads((run.dir / "conversation" / "summary.json").read_text())
    assert s["slot_restored_tokens"] == s["slot_saved_tokens"] >= s["restart_first_prompt_n"] > 2000
    assert s["restored_follow_up_prompt_n"] < s["restart_first_prompt_n"] / 10
    assert s["restored_follow_up_cache_n"] >= s["restart_first_prompt_n"]
    assert s["slot_file_mib"] > 0 and s["slot_restore_ms"] is not None
    assert not (run.dir / "conversation" / "slots" / serve.RESTART_FILE).exists()


@pytest.mark.llama_cpp
def test_ready_gguf_path_skips_conversion_and_evaluates(write_params, llama_tool, tmp_path):
    """model.format gguf (as params/radxa-prebuilt.yaml): download + evaluate only."""
    llama_tool("llama-mtmd-cli")
    source = workspace.open_run(write_params({"run": "gguf-src", "model": {"source": "tiny"},
                                              "quantize": {"types": ["Q4_K_M"]}}, "src.yaml"))
    pipeline.run_steps(source, ["vision", "quantize"])
    ready = tmp_path / "ready"
    ready.mkdir()
    (ready / "llava-tiny-Q4_K_M.gguf").symlink_to(source.resolve(source.artifacts()["quantized"]["Q4_K_M"]))
    (ready / "mmproj-model-f16.gguf").symlink_to(source.artifact_path("mmproj"))
    run = workspace.open_run(write_params({
        "run": "gguf-ready", "model": {"source": "local", "path": str(ready), "format": "gguf",
                                       "text_file": "llava-tiny-Q4_K_M.gguf", "mmproj_file": "mmproj-model-f16.gguf"},
        "evaluate": {"n_predict": 4, "threads": 2, "perplexity": False, "include_unquantized": False,
                     "cases": [{"prompt": "Describe this image."}]}}, "ready.yaml"))
    done = pipeline.run_steps(run, ["evaluate"])
    assert done == [("download", "ran"), ("evaluate", "ran")]
    artifacts = run.artifacts()
    assert set(artifacts["quantized"]) == {"Q4_K_M"} and "text_gguf" not in artifacts
    assert run.resolve(artifacts["metrics"]).is_dir()
