"""The llava-hf layout (llava-hf/llava-v1.6-vicuna-7b-hf, LlavaNextForConditionalGeneration).

One synthetic model in both layouts (the same seed): the conversions must agree tensor by tensor,
and the llava-hf one must match transformers' own LlavaNext within the original layout's bounds.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from llava_gguf.model import hf_layout, text_model
from llava_gguf.reference import text as text_reference
from llava_gguf.run import workspace
from llava_gguf.checks import hf as hf_check
from llava_gguf.model.checkpoint import Checkpoint
from llava_gguf.checks import text as text_check, vision as vision_check
from llava_gguf.checks.numeric import nmse
from llava_gguf.model.gguf_io import read_gguf
from llava_gguf.model.layout import LayoutError
from llava_gguf.steps import download, surgery, text_export as text, vision_export as vision
from llava_gguf.model.text_model import TextExportError

from conftest import make_tiny, tree_digest

# What the vocabulary additions change in the text GGUF (everything else must be identical).
VOCAB_KEYS = {"llama.vocab_size", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
              "tokenizer.ggml.padding_token_id"}  # <pad> (32001) in llava-hf, <unk> (0) in the original
VOCAB_TENSORS = {"token_embd.weight", "output.weight"}
# mmproj keys the original config.json holds and llava-hf's does not (training-time crop settings,
# not read by llama.cpp): left out rather than invented.
ORIGINAL_ONLY_MMPROJ_KEYS = {"clip.vision.image_crop_resolution", "clip.vision.image_split_resolution"}
PINPOINTS_KEY = "clip.vision.image_grid_pinpoints"


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    """`tiny_checkpoint`'s weights (same seed) in the llava-hf layout. Read-only."""
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "llava-tiny-hf", layout="hf")


@pytest.fixture(scope="session")
def both_exports(tmp_path_factory, tiny_checkpoint, tiny_hf):
    """mmproj and f16 text GGUF of the same weights in both layouts."""
    out = tmp_path_factory.mktemp("exports")
    files = {}
    for layout, folder in (("llava", tiny_checkpoint), ("hf", tiny_hf)):
        vision.export_mmproj(surgery.analyze(folder), out / f"{layout}-mmproj.gguf")
        text.write_text_gguf(folder, out / f"{layout}-text.gguf", "f16", name="llava-tiny")
        files[layout] = (out / f"{layout}-mmproj.gguf", out / f"{layout}-text.gguf")
    return files


# ----------------------------------------------------------------------------- config defaults
def test_default_tables_are_transformers_defaults():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    llama = LlamaConfig().to_dict()
    rope = llama.get("rope_parameters") or {"rope_theta": llama.get("rope_theta")}
    for key, value in hf_layout.LLAMA_DEFAULTS.items():
        expected = rope["rope_theta"] if key == "rope_theta" else llama.get(key)
        if key == "num_key_value_heads":
            expected = None if llama[key] == llama["num_attention_heads"] else llama[key]
        if key == "rope_scaling":
            expected = llama.get("rope_scaling")
        assert value == expected, key
    clip = CLIPVisionConfig().to_dict()
    assert {k: clip[k] for k in hf_layout.CLIP_VISION_DEFAULTS} == hf_layout.CLIP_VISION_DEFAULTS
    nxt = LlavaNextConfig()
    for key, value in hf_layout.LLAVA_NEXT_DEFAULTS.items():
        assert getattr(nxt, key) == value, key
    vc = nxt.vision_config.to_dict()
    assert {k: vc[k] for k in hf_layout.LLAVA_NEXT_VISION_DEFAULTS} == hf_layout.LLAVA_NEXT_VISION_DEFAULTS


# config.json of llava-hf/llava-v1.6-vicuna-7b-hf: the nested configs state only non-defaults.
REAL_HF_CONFIG = {
    "architectures": ["LlavaNextForConditionalGeneration"], "ignore_index": -100,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_token_index": 32000, "model_type": "llava_next", "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "pad_token_id": 0, "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "use_image_newline_parameter": True,
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}


@pytest.mark.parametrize("source", ["real", "tiny"])
def test_resolved_config_equals_transformers(source, tiny_hf):
    from transformers import LlavaNextConfig

    cfg = REAL_HF_CONFIG if source == "real" else json.loads((tiny_hf / "config.json").read_text())
    theirs = LlavaNextConfig(**cfg)
    flat = hf_layout.llava_config(cfg)
    tc = theirs.text_config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "rms_norm_eps", "vocab_size", "tie_word_embeddings"):
        assert flat[key] == getattr(tc, key), key
    assert flat["rope_theta"] == tc.rope_parameters["rope_theta"]
    vc = theirs.vision_config
    for key in hf_layout.CLIP_VISION_DEFAULTS:
        assert flat["vision_config"][key] == getattr(vc, key), key
    assert flat["mm_vision_select_layer"] == theirs.vision_feature_layer
    assert flat["mm_hidden_size"] == vc.hidden_size
    # transformers' (height, width) pairs, as (width, height): the original layout's and llama.cpp's order.
    assert flat["image_grid_pinpoints"] == [[w, h] for h, w in theirs.image_grid_pinpoints]
    assert (flat["mm_projector_type"], flat["mm_patch_merge_type"], flat["mm_vision_select_feature"]) == \
        ("mlp2x_gelu", "spatial_unpad", "patch")
    hp = text_model.read_hparams(cfg, Path("config.json"))
    assert (hp.n_vocab, hp.n_ctx, hp.norm_eps, hp.rope_theta) == (tc.vocab_size, tc.max_position_embeddings,
                                                                  tc.rms_norm_eps, 10000.0)


def test_transformers5_rope_parameters_are_read():
    cfg = json.loads(json.dumps(REAL_HF_CONFIG))
    cfg["text_config"]["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "linear", "factor": 2.0}
    hp = text_model.read_hparams(cfg, Path("config.json"))
    assert (hp.rope_theta, hp.rope_scale) == (500000.0, 2.0)


def test_7b_plans_equal_from_the_real_hf_config():
    """llava-hf/llava-v1.6-vicuna-7b-hf's config.json (defaults left out) and the 7B's shapes give the
    original layout's mmproj plan and metadata, and its text hyper-parameters (nothing is read)."""
    from llava_gguf.model.layout import place
    from llava_gguf.model.tiny import SIZES, llava_config, synthetic_tensors

    s = SIZES["7b"]
    plans = {}
    for layout, config in (("llava", llava_config(s)), ("llava-hf", REAL_HF_CONFIG)):
        tensors = {}
        for name, shape in synthetic_tensors(s):
            stored = hf_layout.hf_name(name) if layout == "llava-hf" else name
            p = place(stored, layout)
            tensors[stored] = {"shard": "-", "dtype": "F16", "shape": list(shape), "part": p.part,
                               "canonical": p.canonical}
        vcfg, plan = vision.plan_mmproj({"source": "7b", "layout": layout, "config": config, "tensors": tensors})
        plans[layout] = ([(t.gguf, t.shape, t.dtype) for t in plan], vision.metadata(vcfg))
    assert plans["llava-hf"][0] == plans["llava"][0] and len(plans["llava"][0]) == 378
    dropped = {k for k, _, _ in plans["llava"][1]} - {k for k, _, _ in plans["llava-hf"][1]}
    assert dropped == ORIGINAL_ONLY_MMPROJ_KEYS
    # Both configs hold the same literal list; transformers reads llava-hf's as (height, width), so
    # the mmproj holds it transposed, and the pinpoints are the one key that differs.
    pins = {lay: dict((k, v) for k, _, v in kv)[PINPOINTS_KEY] for lay, (_, kv) in plans.items()}
    assert pins["llava"] == [v for w, h in REAL_HF_CONFIG["image_grid_pinpoints"] for v in (w, h)]
    assert pins["llava-hf"] == [v for h, w in REAL_HF_CONFIG["image_grid_pinpoints"] for v in (w, h)]
    assert [kv for kv in plans["llava"][1] if kv[0] not in dropped | {PINPOINTS_KEY}] == \
        [kv for kv in plans["llava-hf"][1] if kv[0] != PINPOINTS_KEY]
    a = text_model.read_hparams(llava_config(s), Path("config.json"))
    b = text_model.read_hparams(REAL_HF_CONFIG, Path("config.json"))
    assert b == a.__class__(**{**a.__dict__, "n_vocab": 32064})


# ----------------------------------------------------------------------------- the synthetic checkpoint
def test_tiny_hf_is_the_same_weights_renamed(tiny_checkpoint, tiny_hf):
    cfg = json.loads((tiny_hf / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaNextForConditionalGeneration"] and cfg["vocab_size"] == 32064
    assert {"text_config", "vision_config", "image_grid_pinpoints", "vision_feature_layer",
            "vision_feature_select_strategy", "image_token_index"} <= set(cfg)
    assert json.loads((tiny_hf / "added_tokens.json").read_text()) == {"<image>": 32000, "<pad>": 32001}
    added = json.loads((tiny_hf / "tokenizer.json").read_text())["added_tokens"]
    assert {a["content"]: a["id"] for a in added if a["id"] >= 32000} == {"<image>": 32000, "<pad>": 32001}
    with Checkpoint.open(tiny_checkpoint) as o, Checkpoint.open(tiny_hf) as h:
        assert len(o.tensors) == len(h.tensors)
        assert {t.dtype for t in h} == {"F16"}
        for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
                     "vision_tower.vision_model.embeddings.class_embedding", "multi_modal_projector.linear_1.weight",
                     "multi_modal_projector.linear_2.bias", "image_newline"):
            assert name in h.tensors, name
        for info in o:
            ours = h.load(hf_layout.hf_name(info.name))
            orig = o.load(info.name)
            assert torch.equal(ours[: orig.shape[0]].float(), orig.float()), info.name
            if info.name in hf_layout.VOCAB_ROWS:
                assert ours.shape[0] == 32064 and bool(ours[32000:].abs().sum() > 0)


def test_make_tiny_cli_layout_hf(tmp_path):
    from llava_gguf.cli import main

    assert main(["make-tiny", str(tmp_path / "hf"), "--layout", "hf", "--shards", "1"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llava_next"
    with pytest.raises(ValueError, match="LLaVA 1.6 only"):
        make_tiny(tmp_path / "v15", layout="hf", variant="1.5")


# ----------------------------------------------------------------------------- surgery
def _canonical(folder: Path) -> dict[str, tuple]:
    m = surgery.analyze(folder)
    return {t["canonical"]: (t["part"], tuple(t["shape"])) for t in m["tensors"].values() if t["part"] != "ignored"}


def _vocab_rows_equalized(c: dict) -> dict:
    return {k: (p, (32000, *s[1:]) if k in ("model.embed_tokens.weight", "lm_head.weight") else s)
            for k, (p, s) in c.items()}


def test_surgery_maps_hf_names_to_the_original(tiny_checkpoint, tiny_hf):
    m = surgery.analyze(tiny_hf)
    assert (m["layout"], m["llava_version"]) == ("llava-hf", "1.6")
    hf, orig = _canonical(tiny_hf), _canonical(tiny_checkpoint)
    assert hf["model.embed_tokens.weight"][1][0] == 32064
    assert _vocab_rows_equalized(hf) == orig


def test_transformers_naming_is_accepted(tiny_checkpoint, tiny_hf, tmp_path):
    """What transformers 5 writes with save_pretrained, and its in-memory names (model.language_model.*)."""
    from transformers import LlavaNextForConditionalGeneration

    loaded = LlavaNextForConditionalGeneration.from_pretrained(tiny_hf, dtype=torch.float16)
    # A model built by transformers 5 itself (not loaded from the llava-hf names, which it would keep).
    model = LlavaNextForConditionalGeneration(loaded.config).to(torch.float16)
    model.load_state_dict(loaded.state_dict())
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    with Checkpoint.open(saved) as ckpt:
        assert any(n.startswith("vision_tower.embeddings.") for n in ckpt.tensors), "transformers 5 naming changed?"
    memory = tmp_path / "memory"
    memory.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.language_model.embed_tokens.weight" in state and "lm_head.weight" in state
    save_file(state, memory / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json"):
        shutil.copy(tiny_hf / name, memory / name)
        if not (saved / name).exists():
            shutil.copy(tiny_hf / name, saved / name)
    orig = _canonical(tiny_checkpoint)
    for folder in (saved, memory):
        assert _vocab_rows_equalized(_canonical(folder)) == orig, folder.name
        vision.plan_mmproj(surgery.analyze(folder))  # the exporter's checks pass too


def test_llava15_transformers_layout_is_refused(tiny_hf, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_hf, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(architectures=["LlavaForConditionalGeneration"], model_type="llava")
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LayoutError, match="LLaVA 1.5.*liuhaotian/llava-v1.5-7b"):
        surgery.analyze(folder)


def test_unsupported_projector_act_names_the_key(tiny_hf, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_hf, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["projector_hidden_act"] = "relu"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LayoutError, match=r"config.json: projector_hidden_act 'relu'"):
        surgery.analyze(folder)


# ----------------------------------------------------------------------------- both layouts, one model
def test_same_mmproj_from_both_layouts(both_exports):
    ours, ref = both_exports["hf"][0], both_exports["llava"][0]
    cmp = text_check.compare_ggufs(ours, ref)
    assert cmp.tensors["exact"].astype(bool).all(), cmp.tensors[~cmp.tensors["exact"].astype(bool)]
    assert len(cmp.tensors) == len(read_gguf(ref, "mmproj").tensors)
    assert set(cmp.missing_keys) == ORIGINAL_ONLY_MMPROJ_KEYS
    assert cmp.different_keys == [] and cmp.added_keys == []


def test_same_text_gguf_but_the_vocabulary(both_exports):
    ours_path, ref_path = both_exports["hf"][1], both_exports["llava"][1]
    cmp = text_check.compare_ggufs(ours_path, ref_path)
    # tokenizer.json's post-processor (BOS only) gives gguf-py's SpecialVocab an explicit add_sep false.
    assert set(cmp.different_keys) == VOCAB_KEYS and cmp.missing_keys == []
    assert cmp.added_keys == ["tokenizer.ggml.add_sep_token"]
    t = cmp.tensors.set_index("name")
    assert t.drop(index=list(VOCAB_TENSORS))["exact"].astype(bool).all()
    ours, ref = read_gguf(ours_path, "hf"), read_gguf(ref_path, "llava")
    for name in VOCAB_TENSORS:
        a, b = ours.tensors[name], ref.tensors[name]
        assert a.shape[0] == 32064 and b.shape[0] == 32000 and a.qtype == b.qtype
        assert np.array_equal(np.asarray(a.data).reshape(32064, -1)[:32000], np.asarray(b.data).reshape(32000, -1))
    f, g = ours.fields, ref.fields
    assert f["tokenizer.ggml.tokens"][:32000] == g["tokenizer.ggml.tokens"]
    assert list(f["tokenizer.ggml.scores"][:32000]) == list(g["tokenizer.ggml.scores"])
    assert list(f["tokenizer.ggml.token_type"][:32000]) == list(g["tokenizer.ggml.token_type"])
    T = gguf.TokenType
    assert f["tokenizer.ggml.tokens"][32000:32003] == ["<image>", "<pad>", "[PAD32002]"]
    assert f["tokenizer.ggml.tokens"][-1] == "[PAD32063]" and len(f["tokenizer.ggml.tokens"]) == 32064
    assert list(f["tokenizer.ggml.token_type"][32000:32003]) == [T.CONTROL, T.CONTROL, T.UNUSED]
    assert list(f["tokenizer.ggml.scores"][32000:32003]) == [-1000.0, -1000.0, -10000.0]
    assert f["llama.vocab_size"] == 32064
    assert (f["tokenizer.ggml.padding_token_id"], g["tokenizer.ggml.padding_token_id"]) == (32001, 0)
    assert f["tokenizer.ggml.add_sep_token"] is False


def test_added_token_past_the_embedding_rows_is_refused(tiny_hf, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_hf, folder)
    (folder / "added_tokens.json").write_text(json.dumps({"<image>": 32000, "<pad>": 32001, "<x>": 32070}))
    before = tree_digest(folder)
    with pytest.raises(TextExportError, match=r"added_tokens.json|'<x>' has id 32070, past vocab_size 32064"):
        text.write_text_gguf(folder, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists() and tree_digest(folder) == before


@pytest.mark.parametrize("case", ["short-tokenizer", "nothing-added"])
def test_vocabulary_that_does_not_fit_is_refused(case, tiny_hf, tmp_path):
    """A tokenizer.model of fewer pieces is not padded over: added tokens follow the pieces directly
    and the padding stays under 64 rows."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_hf, folder)
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString((folder / "tokenizer.model").read_bytes())
    if case == "short-tokenizer":  # 31990 pieces + 2 added + 72 rows: the added ids don't follow
        del proto.pieces[31990:]
        words = "added tokens follow the pieces"
    else:  # a vocabulary that names nothing past the pieces: 64 unnamed rows
        for f in ("added_tokens.json", "tokenizer_config.json", "tokenizer.json"):
            (folder / f).unlink()
        words = "leaves 64 rows unnamed"
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(TextExportError, match=words):
        text.plan_text(folder)


def test_tokenizer_files_that_disagree_are_refused(tiny_hf, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_hf, folder)
    (folder / "added_tokens.json").write_text(json.dumps({"<img>": 32000, "<pad>": 32001}))
    with pytest.raises(TextExportError, match=r"tokenizer_config.json: token 32000 is '<image>'.*'<img>'"):
        text.plan_text(folder)


def test_vision_config_that_contradicts_the_tensors_is_refused(tiny_hf, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_hf, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vision_config"]["intermediate_size"] = 999
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"vision_config.*intermediate_size 999"):
        vision.plan_mmproj(surgery.analyze(folder))


# ----------------------------------------------------------------------------- transformers' LlavaNext
def test_transformers_reference_equals_the_original_layouts(tiny_checkpoint, tiny_hf):
    """transformers' LlavaNext on the hf layout == the project's references on the original layout."""
    model = hf_check.reference_model(tiny_hf, torch.float32)
    for image in vision_check.IMAGES:
        ours = hf_check.slice_features(model, vision_check.synthetic_image(image, 336))
        assert nmse(ours, vision_check.reference_embeddings(tiny_checkpoint, image)) < 1e-10
    ids = text_check.reference_tokens(tiny_checkpoint / "tokenizer.model", "The capital of France is")
    logits = hf_check.text_logits(model, ids)
    ref = text_reference.reference_logits(tiny_checkpoint, ids)
    assert logits.shape == (32064,) and nmse(logits[:32000], ref) < 1e-10


@pytest.mark.llama_cpp
@pytest.mark.slow
def test_hf_run_passes_every_check(write_params, llama_tool):
    """make-tiny --layout hf through download, surgery, vision and text export, and all three checks."""
    for tool in ("llama-mtmd-debug", "llama-debug", "llama-tokenize"):
        llama_tool(tool)
    run = workspace.open_run(write_params({"run": "hf-layout", "model": {"source": "tiny", "tiny": {"layout": "hf"}}}))
    download.run_download(run)
    surgery.run_surgery(run)
    vres, tres = vision.run_vision(run), text.run_text(run)
    assert vres.check.passed and tres.check.passed, (vres.message, tres.message)
    vis, txt = vres.hf_check, tres.hf_check  # run by the step entry points
    assert vis.ok and txt.ok and vres.ok and tres.ok, (vis.message, txt.message)
    assert set(vis.vision) == set(vision_check.IMAGES) and txt.vision == {}
    assert txt.n_vocab == 32064 and txt.llama_tokens == txt.reference_tokens
    recorded = {k: json.loads(run.resolve(v).read_text()) for k, v in run.artifacts()["hf_check"].items()}
    assert set(recorded) == {"vision", "text"} and {r["status"] for r in recorded.values()} == {"passed"}
    assert recorded["text"]["text_nmse"] <= recorded["text"]["text_bound"]
    assert max(recorded["vision"]["vision_nmse"].values()) <= vision_check.NMSE_TOL


@pytest.mark.llama_cpp
def test_a_wrong_mmproj_fails_the_transformers_check(tiny_checkpoint, tiny_hf, tmp_path, llama_tool):
    """The check is not vacuous: an mmproj of other weights (seed 1) is caught."""
    llama_tool("llama-mtmd-debug")
    other = make_tiny(tmp_path / "other", seed=1, shards=1)
    mmproj = vision.export_mmproj(surgery.analyze(other), tmp_path / "other-mmproj.gguf").path
    res = hf_check.check_hf(tiny_hf, mmproj, None, "", images=("pattern",), workdir=tmp_path / "w")
    assert res.status == "failed" and res.vision["pattern"] > 0.1 and "image features (pattern)" in res.message


@pytest.mark.parametrize("gib_free, dtype", [(64, torch.float32), (24, torch.bfloat16), (8, None)])
def test_reference_dtype_for_a_7b(gib_free, dtype):
    assert hf_check.reference_dtype(7_063_000_000, available=gib_free << 30) == dtype


def test_cross_check_that_does_not_fit_is_skipped_with_the_sizes(tiny_hf, monkeypatch):
    """On a board's RAM the LlavaNext cross-check is skipped, named as such, before any tool runs."""
    monkeypatch.setattr(hf_check, "available_memory", lambda: 1 << 20)
    monkeypatch.setattr(hf_check.toolchain, "find_tool", lambda *a, **k: pytest.fail("no tool should run"))
    res = hf_check.check_hf(tiny_hf, Path("unused-mmproj.gguf"), Path("unused.gguf"), "")
    assert res.status == "skipped" and "not passed" in res.message and "GiB in bf16" in res.message
    assert "streamed float32 text check" in res.message


# ----------------------------------------------------------------------------- grid pinpoints
def _hf_copy(tiny_hf: Path, folder: Path, **config) -> Path:
    """tiny_hf with config.json changed (None removes a key); the weights linked, not copied."""
    folder.mkdir(parents=True)
    for f in tiny_hf.iterdir():
        (folder / f.name).symlink_to(f)
    cfg = json.loads((tiny_hf / "config.json").read_text())
    for key, value in config.items():
        cfg.pop(key) if value is None else cfg.__setitem__(key, value)
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_tiny_hf_pinpoints_are_transformers_order(tiny_checkpoint, tiny_hf, both_exports):
    from transformers import LlavaNextConfig

    orig = json.loads((tiny_checkpoint / "config.json").read_text())["image_grid_pinpoints"]
    theirs = LlavaNextConfig.from_pretrained(tiny_hf).image_grid_pinpoints
    assert theirs == [[h, w] for w, h in orig] != orig  # (height, width): transformers tiles as LLaVA does
    for layout in ("llava", "hf"):
        assert vision.read_metadata(both_exports[layout][0])[PINPOINTS_KEY] == [v for p in orig for v in p]


def test_missing_pinpoints_warn_and_write_transformers_default(tiny_hf, tmp_path, caplog):
    from transformers import LlavaNextConfig

    folder = _hf_copy(tiny_hf, tmp_path / "ckpt", image_grid_pinpoints=None)
    default = LlavaNextConfig().image_grid_pinpoints
    with caplog.at_level("WARNING"):
        res = vision.export_mmproj(surgery.analyze(folder), tmp_path / "mmproj.gguf")
    assert len(res.warnings) == 1 and "has no image_grid_pinpoints" in res.warnings[0]
    assert str(default) in res.warnings[0] and f"WARNING: {res.warnings[0]}" in res.message
    assert any(r.levelname == "WARNING" and res.warnings[0] in r.getMessage() for r in caplog.records)
    meta = vision.read_metadata(res.path)
    assert meta[PINPOINTS_KEY] == [v for h, w in default for v in (w, h)]
    assert meta["clip.vision.mm_patch_merge_type"] == "spatial_unpad"
    assert vision.export_mmproj(surgery.analyze(tiny_hf), tmp_path / "given.gguf").warnings == []


def test_whole_image_check_follows_the_written_mmproj(tiny_hf, tmp_path):
    """The check decides from the mmproj the run wrote: default pinpoints run it (no skip saying 'flat,
    0 pinpoints' beside an mmproj with 5); an mmproj holding the list transposed fails it."""
    from llava_gguf.checks import image_sequence as seq
    from llava_gguf.reference.image_sequence import checkpoint_rule
    from llava_gguf.reference.clip import ReferenceModel
    from llava_gguf.tune.mmproj_variants import mmproj_variant

    folder = _hf_copy(tiny_hf, tmp_path / "ckpt", image_grid_pinpoints=None)
    mm = vision.export_mmproj(surgery.analyze(folder), tmp_path / "mmproj.gguf").path
    with ReferenceModel(folder) as ref:
        rule = checkpoint_rule(ref)
    assert rule.default_pinpoints and seq.applies(rule, seq.mmproj_anyres(mm), mm) == ("run", "")
    swapped = mmproj_variant(mm, tmp_path / "swapped.gguf", [[w, h] for h, w in rule.pinpoints])
    status, why = seq.applies(rule, seq.mmproj_anyres(swapped), swapped)
    assert status == "failed" and "transposed" in why and "swapped.gguf" in why
    flat = mmproj_variant(mm, tmp_path / "flat.gguf", [])
    status, why = seq.applies(rule, seq.mmproj_anyres(flat), flat)
    assert status == "failed" and "flat.gguf holds clip.vision.mm_patch_merge_type 'spatial_unpad' and 0 grid" in why
    images = {"x": tmp_path / "x.png"}
    checks = seq.check_image_sequence(folder, swapped, images, tool=tmp_path / "no-tool-needed")
    assert [c.status for c in checks] == ["failed"] and not seq.ImageSequenceReport(checks).export_ok


@pytest.mark.llama_cpp
@pytest.mark.parametrize("pinpoints", ["given", "missing"])
def test_hf_whole_image_check_passes(pinpoints, tiny_hf, llama_tool, tmp_path):
    """llama.cpp on the mmproj tiles as transformers does: with the tiny's (height, width) list, and with
    none (LlavaNextConfig's default, whose small-image grid differs from the original layout's)."""
    from llava_gguf.checks import image_sequence as seq

    tool = llama_tool("llama-mtmd-debug")
    folder = tiny_hf if pinpoints == "given" else _hf_copy(tiny_hf, tmp_path / "ckpt", image_grid_pinpoints=None)
    mm = vision.export_mmproj(surgery.analyze(folder), tmp_path / "mmproj.gguf").path
    images = seq.sample_images(tmp_path / "images")
    report = seq.ImageSequenceReport(seq.check_image_sequence(folder, mm, images, tool=tool, workdir=tmp_path))
    assert report.ok, report.message
    grids = report.table()["grid"].to_dict()
    assert grids == {"test-1": "2x2", "wide": "2x1", "tall": "1x2", "small": "1x2" if pinpoints == "given" else "2x1"}
