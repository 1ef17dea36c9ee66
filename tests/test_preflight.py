"""Everything a run will need is checked before step 01 does any work (issue 12, Found 8 and 9).

`preflight.check(run, steps)` lists every problem at once: params that cannot work, missing
llama.cpp tools (per step), evaluate.cases images that are missing or not images, a local
checkpoint that will not convert (headers, layout, config, tokenizer), ready GGUF files that are
truncated or swapped. The steps check what they need again at their start, before any work.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from llava_gguf.pipeline import runner as pipeline, preflight
from llava_gguf.run import partials, workspace
from llava_gguf.llama_cpp import mtmd, toolchain
from llava_gguf.steps import download, evaluate, quantize
from llava_gguf.steps import text_export as text
from llava_gguf.pipeline.preflight import PreflightError


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


@pytest.fixture
def no_tools(some_tools):
    """LLAMA_CPP_DIR pointing at a build that has none of the tools."""
    some_tools()


@pytest.fixture
def some_tools(tmp_path, monkeypatch):
    """some_tools(name, ...) -> a LLAMA_CPP_DIR with stand-ins (each records that it ran) for those tools."""
    folder = tmp_path / "fake-llama" / "bin"
    folder.mkdir(parents=True)
    monkeypatch.setenv(toolchain.ENV_DIR, str(folder.parent))

    def make(*names):
        for name in names:
            tool = folder / name
            tool.write_text(f"#!/bin/sh\ntouch {tmp_path / ('ran-' + name)}\nexit 1\n")
            tool.chmod(0o755)
        return lambda name: (tmp_path / f"ran-{name}").exists()
    return make


def _png(path: Path) -> Path:
    Image.new("RGB", (32, 24), (200, 30, 30)).save(path)
    return path


def _run(write_params, name: str, **sections):
    data = {"run": name}
    for key, value in sections.items():
        data[key] = value
    return workspace.open_run(write_params(data, name=f"{name}.yaml"))


def _nothing_ran(run) -> None:
    assert not (run.dir / "steps.json").exists()
    assert run.artifacts() == {}
    assert not (run.dir / "notebooks").exists() and not (run.dir / "models").exists()


# ----------------------------------------------------------------------------- all problems, up front
def test_every_problem_is_listed_before_step_01(tiny_checkpoint, tmp_path, write_params, no_tools):
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    (ckpt / "tokenizer.model").write_bytes(os.urandom(3000))
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    run = _run(write_params, "pre-all", model={"source": "local", "path": str(ckpt)},
               quantize={"types": []},
               evaluate={"cases": [{"image": str(tmp_path / "missing.jpg"), "prompt": "a"},
                                   {"image": str(notes), "prompt": "b"}]})
    with pytest.raises(PreflightError) as err:
        pipeline.run_steps(run, ["evaluate"])
    message = str(err.value)
    lines = message.splitlines()
    assert lines[0].startswith(f"{run.params_file}: ") and "nothing was run" in lines[0], message
    expected = [
        f"{ckpt / 'tokenizer.model'}: not a SentencePiece model",
        "quantize.types is empty",
        f"evaluate.cases[0].image: {tmp_path / 'missing.jpg'} not found",
        f"evaluate.cases[1].image: {notes} is not an image",
        "llama.cpp tools not found: llama-debug (text), llama-tokenize (text, evaluate), llama-quantize (quantize), "
        "llama-mtmd-cli (evaluate), llama-perplexity (evaluate)",
        "make llama-cpp",
    ]
    for words in expected:
        assert words in message, f"{words!r} not in:\n{message}"
    assert "ffprobe" not in message
    _nothing_ran(run)


def test_a_good_run_has_no_problems(local_run, llama_tool, tmp_path):
    llama_tool("llama-quantize")
    run = local_run(evaluate={"cases": [{"image": str(_png(tmp_path / "red.png")), "prompt": "Describe."}]})
    assert preflight.preflight(run, pipeline.plan(["evaluate"], run)) == []


def test_run_steps_sweeps_stale_partials_first(write_params, tmp_path, no_tools):
    run = _run(write_params, "pre-sweep", model={"source": "tiny"})
    stale = run.sub("models") / f".m-F16.gguf.{_dead_pid()}-1.abcdefgh.partial"
    stale.write_bytes(b"half")
    with pytest.raises(PreflightError):
        pipeline.run_steps(run, ["quantize"])
    assert not stale.exists()


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- params
def test_params_that_cannot_work(write_params, tmp_path):
    cases = [
        ({"model": {"source": "local"}}, ["download"], "model.source local needs model.path"),
        ({"model": {"source": "local", "path": str(tmp_path / "nowhere")}}, ["download"],
         f"{tmp_path / 'nowhere'}: not a folder"),
        ({"model": {"source": "tiny", "format": "gguf"}}, ["download"], "use model.format checkpoint"),
        ({"model": {"source": "local", "path": str(tmp_path), "format": "gguf", "text_file": "t.gguf"}},
         ["download"], "model.format gguf needs model.text_file and model.mmproj_file"),
        ({"model": {"source": "tiny"}, "quantize": {"types": []}}, ["quantize"], "quantize.types is empty"),
        ({"model": {"source": "tiny"}, "convert": {"outtype": "q8_0"}}, ["quantize"],
         "convert.outtype q8_0 makes a Q8_0 text GGUF"),
        ({"model": {"source": "tiny"}, "evaluate": {"cases": []}}, ["evaluate"], "evaluate.cases is empty"),
    ]
    for i, (sections, steps, words) in enumerate(cases):
        run = _run(write_params, f"pre-params-{i}", **sections)
        problems = [p for p in preflight.preflight(run, steps) if "llama.cpp tool" not in p]
        assert any(words in p for p in problems), (words, problems)


# ----------------------------------------------------------------------------- tools
def test_each_step_names_the_tools_it_needs(write_params):
    from llava_gguf.steps import tools as step_tools

    run = _run(write_params, "pre-tools", model={"source": "tiny"}, quantize={"imatrix": True})
    assert step_tools.tools_for(run.params, "download") == ([], [])  # declares none
    assert step_tools.tools_for(run.params, "text") == (["llama-debug", "llama-tokenize"], [])
    assert step_tools.tools_for(run.params, "vision") == ([], ["llama-mtmd-debug"])
    assert step_tools.tools_for(run.params, "quantize") == (["llama-quantize", "llama-imatrix"], [])
    assert step_tools.tools_for(run.params, "evaluate")[0] == ["llama-mtmd-cli", "llama-tokenize", "llama-perplexity"]
    assert step_tools.tools_for(run.params, "tune") == (["llama-mtmd-cli"], ["llama-bench", "llama-quantize",
                                                                         "llama-perplexity", "llama-mtmd-debug"])
    quiet = _run(write_params, "pre-tools-2", model={"source": "tiny"}, convert={"verify": False},
                 evaluate={"perplexity": False})
    assert step_tools.tools_for(quiet.params, "text") == ([], [])
    assert step_tools.tools_for(quiet.params, "evaluate")[0] == ["llama-mtmd-cli", "llama-tokenize"]


def test_text_step_finds_its_tools_before_writing(local_run, no_tools, tiny_checkpoint):
    run = local_run()
    run.record("checkpoint", tiny_checkpoint)
    with pytest.raises(toolchain.ToolNotFound, match="'llama-debug'"):
        text.run_text(run)
    assert not (run.dir / "models").exists() or not any((run.dir / "models").iterdir())


def test_quantize_step_finds_its_tools_before_the_importance_matrix(local_run, some_tools, tmp_path):
    ran = some_tools("llama-imatrix")
    run = local_run(quantize={"imatrix": True, "types": ["Q4_K_M"]})
    gguf = tmp_path / "t-F16.gguf"
    text.write_text_gguf(run.params.model.path, gguf)
    run.record("text_gguf", gguf)
    with pytest.raises(toolchain.ToolNotFound, match="'llama-quantize'"):
        quantize.run_quantize(run)
    assert not ran("llama-imatrix")


def test_evaluate_step_finds_its_tools_before_the_first_run(local_run, some_tools, tmp_path):
    ran = some_tools("llama-mtmd-cli", "llama-tokenize")
    run = local_run(evaluate={"cases": [{"image": str(_png(tmp_path / "red.png")), "prompt": "a"}]})
    for name in ("text_gguf", "mmproj"):
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(b"GGUF")
        run.record(name, path)
    with pytest.raises(toolchain.ToolNotFound, match="'llama-perplexity'"):
        evaluate.run_evaluate(run)
    assert not ran("llama-mtmd-cli")


# ----------------------------------------------------------------------------- images
def test_case_images_are_checked_as_images(tmp_path, write_params):
    good = _png(tmp_path / "ok.png")
    jpeg = tmp_path / "ok.jpg"
    Image.open(good).save(jpeg)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:60])
    webp = tmp_path / "photo.webp"
    Image.open(good).save(webp)
    assert mtmd.image_problem(good) is None and mtmd.image_problem(jpeg) is None
    assert "truncated" in mtmd.image_problem(cut) or "not an image" in mtmd.image_problem(cut)
    assert "WEBP" in mtmd.image_problem(webp) and "PNG or JPEG" in mtmd.image_problem(webp)
    assert mtmd.image_problem(tmp_path) == "is a folder, not an image file"

    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    run = _run(write_params, "pre-images", model={"source": "tiny"},
               evaluate={"cases": [{"image": str(good), "prompt": "a"}, {"image": str(notes), "prompt": "b"}]})
    with pytest.raises(ValueError) as err:
        evaluate.case_inputs(run)
    message = str(err.value)
    assert f"evaluate.cases[1].image: {notes} is not an image" in message and "ffprobe" not in message, message


def test_tool_that_cannot_read_the_image_says_so(tmp_path):
    """The tool's own words for an unreadable image end in "(is ffprobe in PATH?)": not what to fix."""
    tool = tmp_path / "llama-mtmd-cli"
    tool.write_text("#!/bin/sh\necho 'mtmd_helper_bitmap_init_from_buf: failed to decode buffer as either "
                    "image/audio/video' >&2\necho 'mtmd_helper_video_init_from_buf: ffprobe failed on buffer "
                    "(is ffprobe in PATH?)' >&2\nexit 1\n")
    tool.chmod(0o755)
    image = tmp_path / "odd.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    files = {n: tmp_path / n for n in ("t.gguf", "m.gguf")}
    for p in files.values():
        p.write_bytes(b"GGUF")
    with pytest.raises(mtmd.EvaluationError) as err:
        mtmd.run_mtmd(tool, files["t.gguf"], files["m.gguf"], image, "hi", log_path=tmp_path / "run.log")
    message = str(err.value)
    assert f"could not read {image} as an image" in message and "ffprobe" not in message, message


# ----------------------------------------------------------------------------- the checkpoint
def test_local_checkpoint_checked_up_front(tiny_checkpoint, tmp_path, write_params):
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    cfg = (ckpt / "config.json").read_text().replace('"hidden_size": 256', '"hidden_size": 250')
    (ckpt / "config.json").write_text(cfg)
    run = _run(write_params, "pre-ckpt", model={"source": "local", "path": str(ckpt)})
    problems = preflight.preflight(run, ["download", "surgery", "vision", "text"])
    assert any(p.startswith(f"{ckpt / 'config.json'}: ") and "hidden_size 250" in p for p in problems), problems
    assert preflight.preflight(run, ["download", "surgery"]) == []  # the text config is not needed there


def test_broken_tokenizer_is_refused_by_the_download_step(tiny_checkpoint, tmp_path, write_params):
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    model = ckpt / "tokenizer.model"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 3])
    run = _run(write_params, "pre-tok", model={"source": "local", "path": str(ckpt)})
    with pytest.raises(download.DownloadError) as err:
        download.run_download(run)
    message = str(err.value)
    assert f"{model}: not a SentencePiece model" in message and "model.path" in message, message
    assert "checkpoint" not in run.artifacts()


def test_missing_tokenizer_is_refused_by_the_download_step(tiny_checkpoint, tmp_path, write_params):
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    (ckpt / "tokenizer.model").unlink()
    run = _run(write_params, "pre-notok", model={"source": "local", "path": str(ckpt)})
    with pytest.raises(download.DownloadError, match=rf"{ckpt / 'tokenizer.model'}: missing"):
        download.run_download(run)


# ----------------------------------------------------------------------------- ready GGUF files
@pytest.fixture(scope="module")
def ready_ggufs(tiny_checkpoint, tmp_path_factory):
    from llava_gguf.steps import surgery, vision_export as vision

    folder = tmp_path_factory.mktemp("ready")
    text.write_text_gguf(tiny_checkpoint, folder / "model-F16.gguf")
    vision.export_mmproj(surgery.analyze(tiny_checkpoint), folder / "mmproj-model-f16.gguf")
    return folder


def _gguf_run(write_params, folder: Path, name: str, text_file="model-F16.gguf", mmproj_file="mmproj-model-f16.gguf"):
    return _run(write_params, name, model={"source": "local", "path": str(folder), "format": "gguf",
                                           "text_file": text_file, "mmproj_file": mmproj_file})


def test_truncated_user_gguf_is_refused_up_front_and_by_the_download_step(ready_ggufs, tmp_path, write_params):
    folder = _copy(ready_ggufs, tmp_path / "mine")
    cut = folder / "model-F16.gguf"
    os.truncate(cut, cut.stat().st_size // 2)
    run = _gguf_run(write_params, folder, "pre-gguf-cut")
    problems = preflight.preflight(run, ["download", "evaluate"])
    problem = next(p for p in problems if str(cut) in p)
    assert "truncated" in problem and "model.text_file" in problem and "FORCE" not in problem, problem
    with pytest.raises(download.DownloadError) as err:
        download.run_download(run)
    assert "truncated" in str(err.value) and "FORCE" not in str(err.value) and "complete copy" in str(err.value)
    assert run.artifacts() == {}


def test_swapped_gguf_files_are_named(ready_ggufs, write_params):
    run = _gguf_run(write_params, ready_ggufs, "pre-gguf-swap", text_file="mmproj-model-f16.gguf",
                    mmproj_file="model-F16.gguf")
    problems = [p for p in preflight.preflight(run, ["download"])]
    assert any("model.text_file" in p and "mmproj (clip)" in p for p in problems), problems
    assert any("model.mmproj_file" in p and "'llama'" in p for p in problems), problems


def test_truncated_user_gguf_at_evaluate_does_not_say_force(ready_ggufs, tmp_path, write_params):
    folder = _copy(ready_ggufs, tmp_path / "mine")
    run = _gguf_run(write_params, folder, "pre-gguf-late")
    download.run_download(run)
    cut = folder / "model-F16.gguf"
    os.truncate(cut, cut.stat().st_size // 2)  # damaged after the download step
    with pytest.raises(ValueError) as err:
        evaluate.variants_for_run(run)
    assert str(cut) in str(err.value) and "FORCE" not in str(err.value), str(err.value)


@pytest.mark.parametrize("defect", ["missing shard", "truncated shard", "missing tokenizer"])
def test_local_checkpoint_problems_never_say_make_download(defect, tiny_checkpoint, tmp_path, write_params):
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    shard = ckpt / "model-00002-of-00002.safetensors"
    if defect == "missing shard":
        shard.unlink()
    elif defect == "truncated shard":
        os.truncate(shard, shard.stat().st_size // 2)
    else:
        (ckpt / "tokenizer.model").unlink()
    run = _run(write_params, f"pre-local-{defect.replace(' ', '-')}", model={"source": "local", "path": str(ckpt)})
    problems = preflight.preflight(run, ["download", "surgery", "vision", "text"])
    assert problems and all(str(ckpt) in p for p in problems), problems
    assert not any("make download" in p or "resume" in p for p in problems), problems


def test_cli_step_runs_the_preflight_of_that_step(write_params, caplog):
    from llava_gguf import cli

    path = write_params({"run": "pre-cli", "model": {"source": "tiny"}, "quantize": {"types": []}}, "cli.yaml")
    assert cli.main(["step", "quantize", "--params", str(path)]) == 2
    assert "quantize.types is empty" in caplog.text and "nothing was run" in caplog.text


def test_a_tower_narrower_than_it_names_is_refused_up_front(tiny_checkpoint, tmp_path, write_params):
    """Its head count cannot be known: convert.vision_config is asked for before step 01, not at step 03."""
    import json

    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config.pop("vision_config", None)
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (ckpt / "config.json").write_text(json.dumps(config))
    run = _run(write_params, "pre-narrow", model={"source": "local", "path": str(ckpt)})
    problems = preflight.preflight(run, ["download", "surgery", "vision"])
    assert any("convert.vision_config" in p for p in problems), problems

    from llava_gguf.model.tiny import SIZES, tower_config

    given = tmp_path / "config_vit.json"
    given.write_text(json.dumps(tower_config(SIZES["tiny"])))
    run = _run(write_params, "pre-narrow-given", model={"source": "local", "path": str(ckpt)},
               convert={"vision_config": str(given)})
    assert preflight.preflight(run, ["download", "surgery", "vision"]) == []
