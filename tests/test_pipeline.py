"""Orchestration: step order, skip when up to date, FORCE, failures leave the notebook behind."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from llava_gguf import cli
from llava_gguf.pipeline import runner as pipeline
from llava_gguf.run import registry, workspace
from llava_gguf.pipeline.runner import StepFailed


def _in_package(module) -> str:
    """A module's dotted name inside the package, as the fingerprint's import graph names it."""
    return module.__name__.partition(".")[2]


def test_plan_orders_dependencies_and_skips_checkpoint_steps_for_gguf(write_params):
    run = workspace.open_run(write_params({"run": "plan", "model": {"source": "tiny"}}))
    assert [s.name for s in pipeline.plan(["evaluate"], run)] == \
        ["download", "surgery", "vision", "text", "quantize", "evaluate"]
    assert [s.name for s in pipeline.plan(["text"], run)] == ["download", "surgery", "text"]
    gguf_run = workspace.open_run(write_params({"run": "plan-g", "model": {
        "source": "local", "path": "/x", "format": "gguf", "text_file": "a", "mmproj_file": "b"}}, "g.yaml"))
    assert [s.name for s in pipeline.plan(["evaluate"], gguf_run)] == ["download", "evaluate"]
    with pytest.raises(KeyError, match="unknown step 'nope'"):
        pipeline.plan(["nope"], run)


def test_code_closure_follows_package_imports():
    from llava_gguf.run import fingerprint

    closure = fingerprint.code_closure({"steps.download"})
    assert {"download.py", "checkpoint.py", "workspace.py", "params.py", "tiny.py"} <= {p.name for p in closure}
    assert Path(pipeline.__file__).resolve() not in {p.resolve() for p in closure}
    assert fingerprint.notebook_imports(registry.get("vision").source) >= {"steps.vision_export", _in_package(workspace)}


def test_download_step_runs_then_skips_then_reruns_on_change(write_params):
    data = {"run": "pm-download", "model": {"source": "tiny"}}
    run = workspace.open_run(write_params(data))
    assert pipeline.run_steps(run, ["download"]) == [("download", "ran")]
    executed = run.dir / "notebooks" / "01_download.ipynb"
    nb = nbformat.read(executed, as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    assert (run.dir / "reports" / "01_download.html").exists()
    index = (run.dir / "reports" / "index.html").read_text()
    assert "01_download.html" in index and "checkpoint" in index
    assert pipeline.run_steps(run, ["download"]) == [("download", "skipped")]
    assert pipeline.run_steps(run, ["download"], force=True) == [("download", "ran")]
    data["model"]["tiny"] = {"seed": 1}
    run2 = workspace.open_run(write_params(data))
    assert pipeline.run_steps(run2, ["download"]) == [("download", "ran")]
    assert "seed1" in run2.artifacts()["checkpoint"]
    # The source notebook was not executed in place.
    src = nbformat.read(registry.get("download").source, as_version=4)
    assert all(not c.get("outputs") for c in src.cells if c.cell_type == "code")


def test_failing_cell_keeps_partial_notebook_and_exits_nonzero(declare_step, write_params):
    declare_step("boom", "x = 41 + 1", "raise RuntimeError('boom in cell')", "y = 1", number=99)
    path = write_params({"run": "pm-boom", "model": {"source": "tiny"}})
    run = workspace.open_run(path)
    with pytest.raises(StepFailed, match="boom in cell"):
        pipeline.run_steps(run, ["boom"])
    kept = nbformat.read(run.dir / "notebooks" / "99_boom.ipynb", as_version=4)
    errors = [o for c in kept.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors and errors[0]["evalue"] == "boom in cell"
    assert (run.dir / "reports" / "99_boom.html").exists()
    assert "boom" not in json.loads((run.dir / "steps.json").read_text())
    assert cli.main(["run", "boom", "--params", str(path)]) == 1


def test_headless_progress_bars_refresh_rarely(declare_step, write_params):
    declare_step("bars", "import time\nfrom tqdm.auto import tqdm\nfor _ in tqdm(range(60)): time.sleep(0.05)",
                 "from llava_gguf.run import workspace\nworkspace.open_run(params_file).record('thing', 'x')", number=97)
    run = workspace.open_run(write_params({"run": "pm-bars", "model": {"source": "tiny"}}))
    assert pipeline.run_steps(run, ["bars"]) == [("bars", "ran")]
    nb = nbformat.read(run.dir / "notebooks" / "97_bars.ipynb", as_version=4)
    text = "".join(o.get("text", "") for o in nb.cells[2].outputs)  # cells: parameters, injected, bars
    # 3 s of work: the first and the final refresh, not one per 0.1 s (tqdm's default).
    assert "60/60" in text and text.count("it/s]") <= 3, text


def test_step_that_records_nothing_fails(declare_step, write_params):
    declare_step("quiet", "print('did nothing')", number=98)
    run = workspace.open_run(write_params({"run": "pm-quiet", "model": {"source": "tiny"}}))
    with pytest.raises(StepFailed, match="without recording \\['thing'\\]"):
        pipeline.run_steps(run, ["quiet"])


def test_unknown_params_key_stops_the_cli(write_params, caplog):
    path = write_params({"run": "x", "modle": {"source": "tiny"}})
    assert cli.main(["run", "download", "--params", str(path)]) == 2
    assert "unknown key 'modle'" in caplog.text


def test_dead_kernel_is_a_step_failure_with_the_notebook_kept(declare_step, write_params):
    declare_step("dies", "import os", "os._exit(9)", number=97)
    run = workspace.open_run(write_params({"run": "pm-dies", "model": {"source": "tiny"}}))
    with pytest.raises(StepFailed, match="step 'dies' stopped"):
        pipeline.run_steps(run, ["dies"])
    assert (run.dir / "notebooks" / "97_dies.ipynb").exists()
    assert (run.dir / "reports" / "97_dies.html").exists()
