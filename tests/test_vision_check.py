"""The numeric mmproj check: PyTorch reference vs llama-mtmd-debug, patched and unpatched builds."""
from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from llava_gguf.steps import download, surgery, vision_export as vision
from llava_gguf.llama_cpp import toolchain
from llava_gguf.checks import vision as vision_check
from llava_gguf.checks.numeric import nmse
from llava_gguf.run import workspace
from llava_gguf.model.checkpoint import Checkpoint
from llava_gguf.model.layout import split_checkpoint

UNPATCHED_ENV = "LLAMA_CPP_UNPATCHED_DIR"


# ----------------------------------------------------------------------------- the reference alone
def test_reference_is_llava_computation(tiny_checkpoint):
    """Same numbers as transformers' CLIPVisionModel -> hidden_states[-2][:, 1:] -> LLaVA's projector."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with Checkpoint.open(tiny_checkpoint) as ckpt:
        split = split_checkpoint(ckpt)
        heads = ckpt.config["vision_config"]["num_attention_heads"]  # the tower config the checkpoint carries
        vis = {k.removeprefix("vision_model."): ckpt.load(t.stored).float() for k, t in split.part("vision").items()}
        proj = {k.removeprefix("mm_projector."): ckpt.load(t.stored).float()
                for k, t in split.part("projector").items() if k.startswith("mm_projector.")}
    hidden, inter = vis["embeddings.class_embedding"].shape[0], vis["encoder.layers.0.mlp.fc1.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[2]) for k in vis if k.startswith("encoder.layers."))
    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=336, patch_size=14,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5)
    tower = CLIPVisionModel(cfg).eval()
    tower.load_state_dict(vis, strict=True)
    out_w = proj["0.weight"].shape[0]
    projector = torch.nn.Sequential(torch.nn.Linear(hidden, out_w), torch.nn.GELU(), torch.nn.Linear(out_w, out_w))
    projector.load_state_dict(proj)
    with vision_check.ReferenceModel(tiny_checkpoint) as ref:
        for image in vision_check.IMAGES:
            pixels = vision_check.synthetic_image(image, 336)
            with torch.no_grad():
                expected = projector(tower(pixels[None], output_hidden_states=True).hidden_states[-2][0, 1:])
            sims = ref.variants(image, vision_check.HYPOTHESES)
            got = sims.pop("LLaVA (expected)")
            assert got.shape == (576, out_w)
            assert nmse(got, expected) < 1e-10, image
            # The defect simulations really differ from LLaVA (else the diagnosis would be vacuous).
            for name, sim in sims.items():
                assert nmse(sim, got) > 1e-4, (image, name)
    assert nmse(vision_check.reference_embeddings(tiny_checkpoint, "pattern"), expected) < 1e-10


def test_synthetic_images():
    uniform, pattern = vision_check.synthetic_image("uniform", 336), vision_check.synthetic_image("pattern", 336)
    assert uniform.shape == pattern.shape == (3, 336, 336) and bool((uniform == 0.5).all())
    assert 0.0 <= float(pattern.min()) and float(pattern.max()) <= 1.0 and float(pattern.std()) > 0.1
    # mtmd-debug.cpp's rainbow: pixel (y=0, x=168) is straight above the centre: hue 0.75 -> blue-magenta.
    sat = 168 / (168 * 2 ** 0.5)
    assert pattern[:, 0, 168].tolist() == pytest.approx([1 - sat / 2, 1 - sat, 1.0], abs=1e-5)
    with pytest.raises(ValueError, match="uniform"):
        vision_check.synthetic_image("noise", 336)


# ----------------------------------------------------------------------------- the llama.cpp patch
def test_llava_graph_patch_applies_to_the_pinned_source(tmp_path):
    patches = [p for p in toolchain.patch_files() if "llava-graph" in p.name]
    assert patches, "patches/llama.cpp/*llava-graph*.patch is missing"
    rel = Path("tools/mtmd/models/llava.cpp")
    (tmp_path / rel.parent).mkdir(parents=True)
    (tmp_path / rel).write_bytes((toolchain.source_dir() / rel).read_bytes())
    for patch in patches:
        subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(patch)], cwd=tmp_path, check=True,
                       capture_output=True)
    graph = (tmp_path / rel).read_text()
    assert "ggml_concat(ctx0, model.class_embedding, inp, 1)" in graph  # #25814: class token first
    assert "int il_last = hparams.n_layer;" in graph  # #25817: all stored blocks


# ----------------------------------------------------------------------------- with llama.cpp
@pytest.fixture(scope="module")
def mmprojs(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The project's own mmproj export of the tiny checkpoint, f16 and f32."""
    manifest = surgery.analyze(tiny_checkpoint)
    out = tmp_path_factory.mktemp("mmproj")
    return {t: vision.export_mmproj(manifest, out / vision.mmproj_name(t), t).path for t in ("f16", "f32")}


@pytest.mark.llama_cpp
@pytest.mark.parametrize("outtype", ["f16", "f32"])
@pytest.mark.parametrize("image", ["uniform", "pattern"])
def test_patched_build_matches_llava(tiny_checkpoint, mmprojs, llama_tool, outtype, image, tmp_path):
    tool = llama_tool(vision_check.TOOL)
    res = vision_check.check_mmproj(tiny_checkpoint, mmprojs[outtype], image, tool=tool, workdir=tmp_path)
    assert res.status == "passed", res.message
    assert res.ok and res.nmse <= 1e-6 and res.n_tokens == res.n_tokens_ref == 576
    assert res.min_token_cos > 0.9999
    table = res.table()
    assert table.loc["status", "value"] == "passed"
    assert float(table.loc["NMSE", "value"]) == pytest.approx(res.nmse, rel=1e-2)
    # The dump really came from llama.cpp (header + 576 x 256 floats).
    assert (tmp_path / f"embeddings-{image}.bin").stat().st_size == 8 + 4 * 576 * 256


@pytest.mark.llama_cpp
@pytest.mark.skipif(not os.environ.get(UNPATCHED_ENV), reason=f"{UNPATCHED_ENV} (an unpatched llama.cpp build) not set")
@pytest.mark.parametrize("image", ["uniform", "pattern"])
def test_unpatched_build_reports_the_upstream_defects(tiny_checkpoint, mmprojs, image, tmp_path, monkeypatch):
    monkeypatch.setenv(toolchain.ENV_DIR, os.environ[UNPATCHED_ENV])
    tool = toolchain.find_tool(vision_check.TOOL)
    res = vision_check.check_mmproj(tiny_checkpoint, mmprojs["f16"], image, tool=tool, workdir=tmp_path)
    assert res.status == "failed" and not res.ok
    assert res.nmse > 1e-3
    assert res.cause == "both defects (#25814 + #25817)"
    assert res.diagnosis[res.cause] <= 1e-6
    for text in ("#25814", "#25817", "make llama-cpp", "LLAMA_CPP_DIR"):
        assert text in res.message
    assert "NMSE vs simulation: both defects (#25814 + #25817)" in res.table().index


# ----------------------------------------------------------------------------- no usable tool
@pytest.fixture
def vision_run(local_run, mmprojs):
    run = local_run()
    download.run_download(run)
    run.record("mmproj", mmprojs["f16"])
    return run


def test_missing_tool_is_skipped_not_passed(vision_run, tmp_path, monkeypatch):
    monkeypatch.setenv(toolchain.ENV_DIR, str(tmp_path / "empty-build"))
    res = vision_check.verify_mmproj(vision_run, "uniform")
    assert res.status == "skipped" and not res.ok and res.nmse is None
    assert "skipped, not passed" in res.message and "llama-mtmd-debug" in res.message
    assert res.table().loc["status", "value"] == "skipped"
    recorded = json.loads(vision_run.resolve(vision_run.artifacts()["vision_check"]["uniform"]).read_text())
    assert recorded["status"] == "skipped" and recorded["nmse"] is None


def test_tool_without_embeddings_dump_is_skipped(vision_run, tmp_path, monkeypatch):
    """A build whose llama-mtmd-debug predates MTMD_DEBUG_EMBEDDINGS=<file> runs fine but dumps nothing."""
    bin_dir = tmp_path / "old-build" / "bin"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / vision_check.TOOL
    fake.write_text("#!/bin/sh\necho encoded\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv(toolchain.ENV_DIR, str(tmp_path / "old-build"))
    res = vision_check.verify_mmproj(vision_run, "pattern")
    assert res.status == "skipped" and not res.ok
    assert "MTMD_DEBUG_EMBEDDINGS" in res.message and "make llama-cpp" in res.message


@pytest.mark.llama_cpp
def test_verify_run_records_the_results(vision_run, llama_tool):
    llama_tool(vision_check.TOOL)
    report = vision_check.verify_run(vision_run)
    assert report.passed and report.export_ok, report.message
    assert list(report.table().index) == ["uniform", "pattern"]
    assert (report.table()["NMSE"] <= 1e-6).all()
    recorded = vision_run.artifacts()["vision_check"]
    assert set(recorded) == {"uniform", "pattern"}
    assert json.loads(vision_run.resolve(recorded["pattern"]).read_text())["status"] == "passed"


def test_verify_false_skips_without_passing(local_run):
    report = vision_check.verify_run(local_run(convert={"verify": False}))
    assert not report.passed and report.export_ok
    assert set(report.table()["status"]) == {"skipped"} and "convert.verify" in report.message
