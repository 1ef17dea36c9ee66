"""The vision tower's CLIPVisionConfig (`vision_config`): given by params, carried by the checkpoint,
or known by name, checked against the weights; a tower the project cannot describe is refused
before anything is written."""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import tree_digest
from llava_gguf.run import workspace
from llava_gguf.checks import vision as vision_check
from llava_gguf.steps import surgery, vision_export as vision
from llava_gguf.model.layout import place
from llava_gguf.model.tiny import SIZES, llava_config, synthetic_tensors, tower_config
from llava_gguf.model.vision_config import KNOWN_TOWERS, PARAMS_KEY, VisionConfigError, resolve_vision_config
from llava_gguf.run.workspace import params_vision_config

NAMED = "openai/clip-vit-large-patch14-336"


def _shapes(size: str) -> dict[str, tuple[int, ...]]:
    """Canonical vision tensor name -> shape, for the synthetic checkpoint of that size (nothing written)."""
    out = {}
    for name, shape in synthetic_tensors(SIZES[size]):
        p = place(name, "llava")
        if p.part == "vision":
            out[p.canonical] = shape
    return out


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _run(folder: Path, write_params, name: str, **convert) -> workspace.Run:
    run = workspace.open_run(write_params({"run": name, "model": {"source": "local", "path": str(folder)},
                                           "convert": convert}, name=f"{name}.yaml"))
    run.record("checkpoint", folder)
    return run


@pytest.fixture(scope="module")
def narrow_checkpoint(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint (a 128-wide, 3-layer tower) whose config.json names CLIP ViT-L/14-336 and
    carries no vision_config: as a checkpoint with a narrower tower than the one it names looks."""
    folder = tmp_path_factory.mktemp("narrow") / "llava-narrow"
    shutil.copytree(tiny_checkpoint, folder, copy_function=os.link)
    config = json.loads((folder / "config.json").read_text())
    config.pop("vision_config")
    config["mm_vision_tower"] = NAMED
    (folder / "config.json").unlink()  # never write through the link into the shared checkpoint
    _write(folder / "config.json", config)
    return folder


@pytest.fixture(scope="module")
def tiny_tower_file(tmp_path_factory) -> Path:
    """The tiny tower's CLIPVisionConfig as a separate file, as convert.vision_config names one."""
    return _write(tmp_path_factory.mktemp("cfg") / "config_vit.json", tower_config(SIZES["tiny"]))


# ----------------------------------------------------------------------------- resolution
def test_a_known_tower_with_its_shapes_uses_the_table():
    cfg = resolve_vision_config({"mm_vision_tower": NAMED}, _shapes("7b"), "config.json")
    assert cfg["num_attention_heads"] == 16 and cfg["hidden_act"] == "quick_gelu" and cfg["image_size"] == 336
    assert NAMED in cfg["source"]
    assert KNOWN_TOWERS["openai/clip-vit-large-patch14"]["image_size"] == 224


def test_a_carried_config_is_used_and_checked():
    config = {"mm_vision_tower": "someone/own-tower", "vision_config": {**tower_config(SIZES["tiny"]),
                                                                        "num_attention_heads": 4}}
    assert resolve_vision_config(config, _shapes("tiny"), "config.json")["num_attention_heads"] == 4
    config["vision_config"]["intermediate_size"] = 512
    with pytest.raises(VisionConfigError, match=r"intermediate_size 512 \(weights: 256\)"):
        resolve_vision_config(config, _shapes("tiny"), "config.json")


def test_the_params_file_overrides_the_table_and_the_carried_config(tmp_path):
    given = _write(tmp_path / "vit.json", {**tower_config(SIZES["7b"]), "num_attention_heads": 8})
    config = {"mm_vision_tower": NAMED, "vision_config": tower_config(SIZES["7b"])}
    cfg = resolve_vision_config(config, _shapes("7b"), "config.json", given)
    assert cfg["num_attention_heads"] == 8 and cfg["source"] == str(given)


def test_a_clip_config_with_a_nested_vision_config_is_read(tmp_path):
    given = _write(tmp_path / "config.json", {"model_type": "clip", "text_config": {"hidden_size": 768},
                                              "vision_config": tower_config(SIZES["tiny"])})
    assert resolve_vision_config({}, _shapes("tiny"), "c", given)["num_attention_heads"] == SIZES["tiny"].v_heads


def test_omitted_keys_take_clip_vision_config_defaults(tmp_path):
    """As transformers reads the file: a missing key is CLIPVisionConfig's default, which is then
    checked against the weights like any other value."""
    given = {k: v for k, v in tower_config(SIZES["tiny"]).items() if k not in ("hidden_act", "layer_norm_eps")}
    cfg = resolve_vision_config({}, _shapes("tiny"), "c", _write(tmp_path / "v.json", given))
    assert (cfg["hidden_act"], cfg["layer_norm_eps"]) == ("quick_gelu", 1e-5)
    given.pop("patch_size")  # default 32, but the weights have 14
    with pytest.raises(VisionConfigError, match=r"patch_size 32 \(weights: 14\)"):
        resolve_vision_config({}, _shapes("tiny"), "c", _write(tmp_path / "v.json", given))


@pytest.mark.parametrize("change,words", [
    (lambda c: c.update(hidden_size=256), "hidden_size 256 (weights: 128)"),
    (lambda c: c.update(num_hidden_layers=24), "num_hidden_layers 24 (weights: 3)"),
    (lambda c: c.update(image_size=224), "image_size 224 (weights: 336)"),
    (lambda c: c.update(num_attention_heads=3), "num_attention_heads 3 does not divide hidden_size 128"),
    (lambda c: c.update(hidden_act="silu"), "hidden_act 'silu' is not supported"),
    (lambda c: c.update(num_attention_heads="2"), "'num_attention_heads' must be a number"),
    (lambda c: c.update(model_type="siglip_vision_model"), "not a CLIP vision tower"),
], ids=["width", "layers", "image-size", "heads", "act", "type", "siglip"])
def test_a_given_config_that_contradicts_the_weights_is_refused(change, words, tmp_path):
    cfg = tower_config(SIZES["tiny"])
    change(cfg)
    given = _write(tmp_path / "vit.json", cfg)
    with pytest.raises(VisionConfigError) as err:
        resolve_vision_config({}, _shapes("tiny"), "config.json", given)
    assert words in str(err.value) and str(given) in str(err.value)


@pytest.mark.parametrize("content,words", [
    (None, "not found"), (b"\x80\x81 not json", "not valid JSON"), (b"[1, 2]", "expected a JSON object"),
], ids=["missing", "bytes", "list"])
def test_an_unreadable_config_file_is_refused_naming_it(content, words, tmp_path):
    path = tmp_path / "vit.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VisionConfigError, match=words) as err:
        resolve_vision_config({}, _shapes("tiny"), "config.json", path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("config,words", [
    ({"mm_vision_tower": NAMED}, f"not those of {NAMED}"),
    ({"mm_vision_tower": "someone/unknown-tower"}, "not a tower this project knows"),
    ({}, "no mm_vision_tower"),
    ({"vision_config": [1]}, "'vision_config' must be an object"),
], ids=["narrower-than-named", "unknown-name", "no-name", "carried-not-object"])
def test_without_a_config_an_undescribed_tower_is_refused_naming_the_key(config, words):
    with pytest.raises(VisionConfigError) as err:
        resolve_vision_config(config, _shapes("tiny"), "/ckpt/config.json")
    assert words in str(err.value) and PARAMS_KEY in str(err.value) and "/ckpt/config.json" in str(err.value)


def test_params_paths_are_relative_to_the_repo_root(write_params):
    run = workspace.open_run(write_params({"run": "vc", "convert": {"vision_config": "configs/vit.json"}}))
    assert params_vision_config(run.params) == workspace.repo_root() / "configs" / "vit.json"
    run.params.convert.vision_config = None
    assert params_vision_config(run.params) is None


# ----------------------------------------------------------------------------- through the pipeline
def test_the_tiny_checkpoint_carries_its_tower_config(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["mm_vision_tower"] not in KNOWN_TOWERS
    assert config["vision_config"]["num_attention_heads"] == SIZES["tiny"].v_heads
    assert "vision_config" not in llava_config(SIZES["7b"])  # the 7B names a known tower, as the real one does


def test_a_narrower_tower_than_named_is_refused_before_anything_is_written(narrow_checkpoint, write_params):
    before = tree_digest(narrow_checkpoint)
    run = _run(narrow_checkpoint, write_params, "narrow-refused")
    with pytest.raises(VisionConfigError) as err:
        surgery.run_surgery(run)
    message = str(err.value)
    assert PARAMS_KEY in message and NAMED in message and "hidden_size 128 (named tower: 1024)" in message
    assert not (run.dir / "surgery").exists() and "surgery" not in run.artifacts()
    out = run.dir / "models" / "mmproj-model-f16.gguf"
    with pytest.raises(vision.VisionExportError, match=PARAMS_KEY):
        vision.export_mmproj(surgery.analyze(narrow_checkpoint), out)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    assert tree_digest(narrow_checkpoint) == before


def test_a_narrower_tower_converts_exactly_with_its_config(narrow_checkpoint, tiny_checkpoint, tiny_tower_file,
                                                           write_params, tmp_path):
    """With convert.vision_config the narrow checkpoint gives the same mmproj, byte for byte, as the
    same weights whose config.json carries that config."""
    run = _run(narrow_checkpoint, write_params, "narrow-given", vision_config=str(tiny_tower_file))
    surgery.run_surgery(run)
    ours = vision.run_vision(run).path
    expected = vision.export_mmproj(surgery.analyze(tiny_checkpoint), tmp_path / "expected.gguf").path
    assert ours.read_bytes() == expected.read_bytes()
    assert vision.read_metadata(ours)["clip.vision.attention.head_count"] == SIZES["tiny"].v_heads


@pytest.fixture(scope="module")
def four_heads(tmp_path_factory) -> Path:
    """The tiny tower described with 4 heads of 32 instead of 2 of 64 (same weights)."""
    return _write(tmp_path_factory.mktemp("cfg4") / "vit4.json",
                  {**tower_config(SIZES["tiny"]), "num_attention_heads": 4})


def test_the_head_count_reaches_the_gguf_and_the_pytorch_check(tiny_checkpoint, four_heads, tmp_path):
    manifest = surgery.analyze(tiny_checkpoint)
    path = vision.export_mmproj(copy.deepcopy(manifest), tmp_path / "mmproj-4.gguf", "f16", four_heads).path
    assert vision.read_metadata(path)["clip.vision.attention.head_count"] == 4
    with vision_check.ReferenceModel(tiny_checkpoint, four_heads) as ref:
        assert ref.spec.n_head == 4
        four = ref.embeddings("pattern")
    with vision_check.ReferenceModel(tiny_checkpoint) as ref:
        assert ref.spec.n_head == SIZES["tiny"].v_heads
        two = ref.embeddings("pattern")
    assert vision_check.nmse(two, four) > 1e-4  # the head count really changes the computation


@pytest.mark.llama_cpp
def test_llama_cpp_and_the_pytorch_check_agree_on_a_given_head_count(tiny_checkpoint, four_heads, llama_tool,
                                                                      tmp_path):
    tool = llama_tool(vision_check.TOOL)
    path = vision.export_mmproj(surgery.analyze(tiny_checkpoint), tmp_path / "mmproj-4.gguf", "f32", four_heads).path
    res = vision_check.check_mmproj(tiny_checkpoint, path, "pattern", tool=tool, workdir=tmp_path,
                                    vision_config_file=four_heads)
    assert res.status == "passed", res.message
    # The check is not vacuous: the same file against the checkpoint's own 2-head config fails.
    wrong = vision_check.check_mmproj(tiny_checkpoint, path, "pattern", tool=tool, workdir=tmp_path / "w")
    assert wrong.status == "failed"


def test_a_synthetic_checkpoint_from_an_older_make_tiny_is_made_again(write_params):
    """One made before the tiny model described its tower (config.json without vision_config) would
    be refused at step 02; step 01 makes it again instead of reusing it."""
    from llava_gguf.steps import download

    run = workspace.open_run(write_params({"run": "dl-old-tiny", "model": {"source": "tiny"}}))
    folder = download.run_download(run).path
    config = json.loads((folder / "config.json").read_text())
    old = {k: v for k, v in config.items() if k != "vision_config"}
    old["mm_vision_tower"] = NAMED
    _write(folder / "config.json", old)
    again = download.run_download(run).path
    assert again == folder and json.loads((folder / "config.json").read_text()) == config
    surgery.run_surgery(run)  # not refused
