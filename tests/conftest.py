"""Shared fixtures: synthetic checkpoints, params files and the llama.cpp tools.

Run folders go to a temporary outputs folder ($LLAVA_GGUF_OUTPUTS), never into outputs/.
Tests that need llama.cpp tools skip when they are missing, except under CI (CI=true), where
`make test` has built them and a missing tool is a failure.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import yaml

from llava_gguf.llama_cpp import toolchain
from llava_gguf.model import tiny
from llava_gguf.run import workspace
from llava_gguf.model.tokenizer import VOCAB_GGUF


def make_tiny(out_dir, *args, **kwargs) -> Path:
    """`tiny.make_tiny` with the pinned llama.cpp source's Llama vocabulary, as the steps pass it."""
    return tiny.make_tiny(out_dir, *args, vocab_gguf=toolchain.source_asset(VOCAB_GGUF), **kwargs)


@pytest.fixture(scope="session", autouse=True)
def _outputs_in_tmp(tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    old = os.environ.get(workspace.OUTPUTS_ENV)
    os.environ[workspace.OUTPUTS_ENV] = str(outputs)
    yield outputs
    if old is None:
        os.environ.pop(workspace.OUTPUTS_ENV, None)
    else:
        os.environ[workspace.OUTPUTS_ENV] = old


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny LLaVA 1.6 checkpoint (safetensors, 2 shards). Read-only for tests."""
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "llava-tiny")


@pytest.fixture(scope="session")
def tiny_bin_checkpoint(tmp_path_factory) -> Path:
    """The same tensors as `tiny_checkpoint`, as 3 .bin shards."""
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "llava-tiny-bin", fmt="bin", shards=3)


@pytest.fixture(scope="session")
def tiny_variant(tmp_path_factory, tiny_checkpoint, tiny_bin_checkpoint):
    """tiny_variant(fmt, shards, variant) -> a tiny checkpoint, made once per session. Read-only."""
    made = {("safetensors", 2, "1.6"): tiny_checkpoint, ("bin", 3, "1.6"): tiny_bin_checkpoint}

    def _get(fmt: str = "safetensors", shards: int = 2, variant: str = "1.6") -> Path:
        key = (fmt, shards, variant)
        if key not in made:
            made[key] = make_tiny(tmp_path_factory.mktemp("ckpt") / f"llava-tiny-{fmt}-{shards}-{variant}",
                                  fmt=fmt, shards=shards, variant=variant)
        return made[key]
    return _get


@pytest.fixture(scope="session")
def tiny_ggufs(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint's f16 text GGUF and f16 mmproj, made once per session. Read-only."""
    from llava_gguf.steps import surgery, text_export, vision_export

    d = tmp_path_factory.mktemp("ggufs")
    text_export.write_text_gguf(tiny_checkpoint, d / "text-f16.gguf")
    vision_export.export_mmproj(surgery.analyze(tiny_checkpoint), d / "mmproj-f16.gguf")
    return {"text": d / "text-f16.gguf", "mmproj": d / "mmproj-f16.gguf"}


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below a folder (to prove a source was not modified)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def write_params(tmp_path):
    """Write a params YAML into tmp_path and return its path."""
    def _write(data: dict, name: str = "params.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path
    return _write


@pytest.fixture
def local_run(tiny_checkpoint, write_params, request):
    """A Run over the tiny checkpoint used in place (model.source: local), with a unique run name."""
    def _make(**sections):
        data = {"run": f"t-{request.node.name[:40]}".replace("[", "-").replace("]", ""),
                "model": {"source": "local", "path": str(tiny_checkpoint)}}
        for key, value in sections.items():
            data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
        return workspace.open_run(write_params(data))
    return _make


def _tool_or_skip(name: str) -> Path:
    try:
        return toolchain.find_tool(name)
    except toolchain.ToolNotFound as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{err}")


@pytest.fixture(scope="session")
def chromium():
    """A headless Chromium (tests/browser.py); skips locally (fails under CI) when none is installed
    (.ci/run installs Debian's `chromium`)."""
    import browser

    binary = browser.find_chromium()
    if binary is None:
        message = f"no Chromium found (tried {', '.join(browser.CHROMIUM_NAMES)}): apt-get install chromium"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    b = browser.Chromium(binary)
    yield b
    b.close()


@pytest.fixture(scope="session")
def llama_tool():
    """llama_tool('llama-mtmd-cli') -> path; skips locally (fails under CI) when not built."""
    return _tool_or_skip


TINY_RUN = {
    "run": "e2e", "model": {"source": "tiny"}, "quantize": {"types": ["Q4_K_M"]},
    "evaluate": {"n_predict": 8, "threads": 2, "cases": [{"prompt": "Describe this image."}]},
    "tune": {"threads": [2], "ubatch_size": [None], "cache_type": ["f16"], "repetitions": 1, "finalists": 1,
             "screen_n_predict": 2, "image_budgets": {"full": None, "single": []},
             "quant_types": ["Q4_K_M", "Q4_0"], "bench_prompt": 16, "bench_gen": 4, "bench_repetitions": 2,
             "published_baseline": "if-built"}}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(run, what run_steps returned): every step through papermill on the tiny model, once per
    session (~4 min on 2 cores). Read-only: tests/test_workflow.py and tests/test_report_pages.py."""
    from llava_gguf.pipeline import runner as pipeline

    _tool_or_skip("llama-mtmd-cli")
    params = tmp_path_factory.mktemp("tiny-run") / "params.yaml"
    params.write_text(yaml.safe_dump(TINY_RUN))
    run = workspace.open_run(params)
    return run, pipeline.run_steps(run, pipeline.available_steps())


@pytest.fixture
def notebooks(tmp_path, monkeypatch):
    """A notebooks folder holding the project's notebooks (linked) plus the test's own
    ($LLAVA_GGUF_NOTEBOOKS points the registry, the CLI and make at it)."""
    from llava_gguf.run import registry

    folder = tmp_path / "notebooks"
    folder.mkdir()
    for nb in registry.notebooks_dir().glob("*.ipynb"):
        (folder / nb.name).symlink_to(nb)
    monkeypatch.setenv(registry.NOTEBOOKS_ENV, str(folder))
    return folder


@pytest.fixture
def declare_step(notebooks):
    """declare_step(name, *code_cells, number=90, **declaration) -> a notebook `<number>_<name>.ipynb`
    declared as step `name` (products ['thing'], params ['model'] unless given)."""
    import nbformat
    from nbformat import v4

    from llava_gguf.run import registry

    def _declare(name: str, *sources: str, number: int = 90, **declaration) -> Path:
        nb = v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata[registry.METADATA_KEY] = {"step": name, "needs": [], "products": ["thing"], "params": ["model"],
                                              "description": f"test step {name}", **declaration}
        params = v4.new_code_cell("params_file = None\nparams = None")
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params] + [v4.new_code_cell(s) for s in sources]
        path = notebooks / f"{number}_{name}.ipynb"
        nbformat.write(nb, path)
        return path
    return _declare
