"""Step 02: classification of every tensor into text / vision / projector, and every refusal.

Each bad input is a copy of a tiny checkpoint with one defect; the step must fail naming the file,
before writing anything (no manifest, no `surgery` artifact), and leave the source untouched.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tree_digest
from llava_gguf.steps import surgery
from llava_gguf.run import workspace
from llava_gguf.model.checkpoint import CheckpointError
from llava_gguf.model.layout import LayoutError
from llava_gguf.model.tiny import SIZES, synthetic_tensors

TINY = SIZES["tiny"]
N_TEXT = 2 + 9 * TINY.layers + 1  # embed, layers, norm, lm_head
N_VISION = 5 + 16 * TINY.v_layers + 2


def _run_on(folder: Path, write_params, name: str):
    """A run whose download step recorded `folder` (surgery's own checks, not download's)."""
    run = workspace.open_run(write_params({"run": name, "model": {"source": "local", "path": str(folder)}},
                                          name=f"{name}.yaml"))
    run.record("checkpoint", folder)
    return run


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _assert_nothing_written(run, source: Path, digest: dict) -> None:
    assert not (run.dir / "surgery").exists()
    assert "surgery" not in run.artifacts()
    assert tree_digest(source) == digest


# ----------------------------------------------------------------------------- the manifest
def test_manifest_classifies_every_tensor(tiny_checkpoint, write_params):
    before = tree_digest(tiny_checkpoint)
    run = _run_on(tiny_checkpoint, write_params, "surgery-ok")
    result = surgery.run_surgery(run)

    assert result.path == run.dir / "surgery" / "manifest.json"
    assert run.artifact_path("surgery") == result.path
    manifest = json.loads(result.path.read_text())
    assert manifest["layout"] == "llava" and manifest["format"] == "safetensors"
    assert manifest["llava_version"] == "1.6"
    assert workspace.resolve(manifest["source"]) == tiny_checkpoint
    assert manifest["config"] == json.loads((tiny_checkpoint / "config.json").read_text())
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(manifest["tensors"]) == set(index)
    shapes = dict(synthetic_tensors(TINY))
    for name, t in manifest["tensors"].items():
        assert t["shard"] == index[name] and t["dtype"] == "BF16" and tuple(t["shape"]) == shapes[name]
    parts = {p: v["tensors"] for p, v in manifest["parts"].items()}
    assert parts == {"text": N_TEXT, "vision": N_VISION, "projector": 5, "ignored": 0}
    t = manifest["tensors"]
    assert t["model.mm_projector.2.weight"]["canonical"] == "mm_projector.2.weight"
    assert t["model.image_newline"] == {**t["model.image_newline"], "part": "projector", "canonical": "image_newline"}
    assert t["model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias"]["canonical"] == \
        "vision_model.encoder.layers.1.mlp.fc1.bias"
    assert t["lm_head.weight"]["part"] == "text"

    table = result.table()
    assert table.loc["total", "tensors"] == len(index)
    assert table.loc["total", "bytes"] == sum(2 * torch.Size(s).numel() for s in shapes.values())
    assert table.loc["text", "parameters"] == sum(torch.Size(shapes[n]).numel() for n, e in t.items()
                                                  if e["part"] == "text")
    assert set(table["layout"]) == {"llava"}
    assert tree_digest(tiny_checkpoint) == before


@pytest.mark.parametrize("fmt,shards,variant", [("bin", 1, "1.5"), ("safetensors", 1, "1.5"), ("bin", 3, "1.6")])
def test_layouts_and_shardings_classify_alike(fmt, shards, variant, tiny_checkpoint, tiny_variant):
    folder = tiny_variant(fmt, shards, variant)
    manifest = surgery.analyze(folder)
    reference = surgery.analyze(tiny_checkpoint)
    assert manifest["format"] == fmt and manifest["llava_version"] == variant
    expect = {n: (t["part"], t["canonical"], t["shape"]) for n, t in reference["tensors"].items()
              if variant == "1.6" or n != "model.image_newline"}
    assert {n: (t["part"], t["canonical"], t["shape"]) for n, t in manifest["tensors"].items()} == expect
    assert len({t["shard"] for t in manifest["tensors"].values()}) == shards
    if shards == 1:
        assert manifest["index_file"] is None


# ----------------------------------------------------------------------------- refusals
def _drop_from_index(folder: Path, names) -> None:
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in names}
    index_file.write_text(json.dumps(index))


def _rewrite_shard(folder: Path, shard: str, change) -> None:
    tensors = load_file(folder / shard)
    change(tensors)
    save_file(tensors, folder / shard, metadata={"format": "pt"})


def _missing_shard(d: Path):
    (d / "model-00002-of-00002.safetensors").unlink()
    return "model-00002-of-00002.safetensors", "missing"


def _truncated_shard(d: Path):
    f = d / "model-00001-of-00002.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    return f.name, "truncated"


def _index_names_absent_tensor(d: Path):
    index_file = d / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    index_file.write_text(json.dumps(index))
    return "model.safetensors.index.json", "no shard holds it"


def _tensor_in_two_shards(d: Path):
    shard2 = load_file(d / "model-00002-of-00002.safetensors")
    _rewrite_shard(d, "model-00001-of-00002.safetensors",
                   lambda t: t.__setitem__("model.norm.weight", shard2["model.norm.weight"]))
    return "model-00002-of-00002.safetensors", "also in model-00001-of-00002.safetensors"


def _no_projector(d: Path):
    names = ["model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight",
             "model.mm_projector.2.bias", "model.image_newline"]
    _rewrite_shard(d, "model-00002-of-00002.safetensors", lambda t: [t.pop(n) for n in names])
    _drop_from_index(d, names)
    return str(d), "not a LLaVA checkpoint"


def _linear_projector(d: Path):
    cfg = json.loads((d / "config.json").read_text())
    cfg["mm_projector_type"] = "linear"
    (d / "config.json").write_text(json.dumps(cfg))
    return "config.json", "mm_projector_type 'linear' is not supported"


def _half_a_projector(d: Path):
    _rewrite_shard(d, "model-00002-of-00002.safetensors", lambda t: t.pop("model.mm_projector.2.weight"))
    _drop_from_index(d, ["model.mm_projector.2.weight"])
    return str(d), "missing ['mm_projector.2.weight']"


def _hf_layout(d: Path):
    """The tiny tensors renamed as llava-hf names them, declared as LLaVA 1.5's LlavaForConditionalGeneration
    (the llava-hf layout of LLaVA 1.6 is converted: tests/test_hf_layout.py)."""
    rename = [("model.vision_tower.vision_tower.", "vision_tower."), ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
              ("model.mm_projector.2.", "multi_modal_projector.linear_2."), ("model.image_newline", "image_newline"),
              ("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")]

    def hf(name):
        return next((new + name[len(old):] for old, new in rename if name.startswith(old)), name)

    weight_map = {}
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        tensors = {hf(k): v for k, v in load_file(d / shard).items()}
        save_file(tensors, d / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in tensors})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["LlavaForConditionalGeneration"], model_type="llava")
    (d / "config.json").write_text(json.dumps(cfg))
    return "config.json", "liuhaotian/llava-v1.5-7b"


@pytest.mark.parametrize("defect", [_missing_shard, _truncated_shard, _index_names_absent_tensor,
                                    _tensor_in_two_shards, _no_projector, _linear_projector, _half_a_projector,
                                    _hf_layout], ids=lambda f: f.__name__.strip("_"))
def test_bad_checkpoint_is_refused_before_writing(defect, tiny_checkpoint, tmp_path, write_params):
    folder = _copy(tiny_checkpoint, tmp_path / "ckpt")
    file, words = defect(folder)
    before = tree_digest(folder)
    run = _run_on(folder, write_params, f"bad-{defect.__name__.strip('_')}")
    with pytest.raises((CheckpointError, LayoutError)) as err:
        surgery.run_surgery(run)
    message = str(err.value)
    assert file in message and words in message, message
    _assert_nothing_written(run, folder, before)


def test_truncated_bin_shard_is_refused(tiny_bin_checkpoint, tmp_path, write_params):
    folder = _copy(tiny_bin_checkpoint, tmp_path / "ckpt")
    shard = folder / "pytorch_model-00002-of-00003.bin"
    os.truncate(shard, shard.stat().st_size - 4096)
    before = tree_digest(folder)
    run = _run_on(folder, write_params, "bad-bin-truncated")
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00003.bin: truncated or corrupt"):
        surgery.run_surgery(run)
    _assert_nothing_written(run, folder, before)


class _RunsCode:
    """Unpickling this calls os.system: what a malicious .bin shard would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bin_shard_with_code_is_refused_and_nothing_runs(tiny_bin_checkpoint, tmp_path, write_params):
    folder = _copy(tiny_bin_checkpoint, tmp_path / "ckpt")
    shard = folder / "pytorch_model-00003-of-00003.bin"
    marker = tmp_path / "pwned"
    state = torch.load(shard, weights_only=True)
    state["model.image_newline"] = _RunsCode(marker)
    torch.save(state, shard)
    before = tree_digest(folder)
    run = _run_on(folder, write_params, "bad-bin-pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model-00003-of-00003.bin: refused") as err:
        surgery.run_surgery(run)
    assert "nothing in it was run" in str(err.value)
    assert not marker.exists()
    _assert_nothing_written(run, folder, before)
