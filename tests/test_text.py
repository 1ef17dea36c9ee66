"""Step 04: the text GGUF, against llama.cpp's legacy converter, the PyTorch model and llama.cpp itself.

The legacy converter (`examples/convert_legacy_llama.py --skip-unknown`) runs on the same tiny
checkpoint, placed under the real model's folder name so that both derive `general.*` from the
same name. Its metadata must be ours minus our two additions; its tensors equal ours byte for byte
(f32, f16; bf16 after casting its F32 to BF16). Its Q8_0 comes from a Python shortcut that rounds
differently from ggml: there the block scales must be identical and the quants within one step,
and our Q8_0 must be byte-identical to llama-quantize's.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import pytest
import torch
import yaml

from conftest import tree_digest
from llava_gguf.llama_cpp import legacy
from llava_gguf.steps import surgery, text_export as text, vision_export as vision
from llava_gguf.checks import text as text_check
from llava_gguf.checks.numeric import nmse
from llava_gguf.reference import text as text_reference
from llava_gguf.run import workspace
from llava_gguf.model.manifest import load_manifest
from llava_gguf.model.gguf_io import read_gguf
from llava_gguf.model.layout import place
from llava_gguf.run.params import ConvertParams
from llava_gguf.model import text_model
from llava_gguf.model.text_model import TextExportError
from llava_gguf.model.tiny import SIZES, llava_config, synthetic_tensors

OUTTYPES = ["f32", "f16", "bf16", "q8_0"]
# What the export adds to the legacy script's keys.
ADDED_KEYS = {"tokenizer.chat_template", "tokenizer.ggml.unknown_token_id"}
# Legacy --outtype for each of ours (it has no bf16: compared with its F32, cast).
LEGACY_OUTTYPE = {"f32": "f32", "f16": "f16", "bf16": "f32", "q8_0": "q8_0"}
REAL_NAME = "llava-v1.6-vicuna-7b"


def _run(folder: Path, params_dir: Path, name: str, **convert) -> workspace.Run:
    params_dir.mkdir(parents=True, exist_ok=True)
    params = params_dir / f"{name}.yaml"
    params.write_text(yaml.safe_dump({"run": name, "model": {"source": "local", "path": str(folder)},
                                      "convert": convert}))
    run = workspace.open_run(params)
    run.record("checkpoint", folder)
    if (folder / "config.json").is_file():
        try:
            surgery.run_surgery(run)
        except Exception:  # noqa: BLE001 (a broken checkpoint: the test expects the step to refuse it)
            pass
    return run


def _variant(src: Path, dst: Path, files: dict[str, bytes | None] | None = None) -> Path:
    """A hard-linked copy of a checkpoint folder, some files replaced (bytes) or removed (None)."""
    shutil.copytree(src, dst, copy_function=os.link)
    for name, data in (files or {}).items():
        (dst / name).unlink(missing_ok=True)  # never write through a link into the shared source
        if data is not None:
            (dst / name).write_bytes(data)
    return dst


@pytest.fixture(scope="module")
def vicuna_ckpt(tmp_path_factory, tiny_checkpoint) -> Path:
    return _variant(tiny_checkpoint, tmp_path_factory.mktemp("named") / REAL_NAME)


@pytest.fixture(scope="module")
def source_digest(vicuna_ckpt) -> dict[str, str]:
    return tree_digest(vicuna_ckpt)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, vicuna_ckpt, source_digest):
    """exports(outtype) -> (run, TextResult), written once per module."""
    done = {}

    def _get(outtype: str):
        if outtype not in done:
            run = _run(vicuna_ckpt, tmp_path_factory.mktemp("params"), f"text-{outtype}", outtype=outtype)
            done[outtype] = (run, text.run_text(run))
        return done[outtype]
    return _get


@pytest.fixture(scope="module")
def legacy_files(tmp_path_factory, vicuna_ckpt):
    """legacy_files(outtype) -> the legacy script's GGUF, converted once per module."""
    done = {}
    def _get(outtype: str) -> Path:
        if outtype not in done:
            done[outtype] = legacy.legacy_text_export(vicuna_ckpt, tmp_path_factory.mktemp("legacy"), outtype)
        return done[outtype]
    return _get


@pytest.fixture(scope="module")
def reference(vicuna_ckpt):
    """(token ids, F32 last-token logits of the streamed reference) of the verify prompt."""
    prompt = ConvertParams().verify_prompt
    ids = text_check.reference_tokens(vicuna_ckpt / "tokenizer.model", prompt)
    return prompt, ids, text_reference.reference_logits(vicuna_ckpt, ids)


# ---------------------------------------------------------------------------- the plan
def test_7b_shapes_give_291_tensors():
    """The real LLaVA 1.6 Vicuna 7B planned from its shapes (nothing read): llama.cpp's names as
    gguf-py's own Llama table gives them, Q/K permuted, norms F32."""
    s = SIZES["7b"]
    split = {}
    for name, shape in synthetic_tensors(s):
        p = place(name, "llava")
        if p.part == "text":
            split[p.canonical] = text_model.SplitTensor(name, p.canonical, "text", "-", "BF16", shape)
    hp = text_model.read_hparams(llava_config(s), Path("config.json"))
    plan = text_model.plan_tensors(split, hp, "f16", Path("7b"))
    assert len(plan) == 291
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, hp.n_layer)
    for t in plan:
        assert names.get_name(t.canonical, try_suffixes=(".weight",)) == t.name
        assert t.qtype == (gguf.GGMLQuantizationType.F16 if len(t.shape) == 2 else gguf.GGMLQuantizationType.F32)
        assert (t.permute_heads == 32) == t.name.endswith(("attn_q.weight", "attn_k.weight"))
    assert 13.47e9 < sum(t.nbytes for t in plan) < 13.49e9  # 6.74 B parameters at 2 bytes
    q8 = text_model.plan_tensors(split, hp, "q8_0", Path("7b"))
    assert {t.qtype.name for t in q8 if len(t.shape) == 2} == {"Q8_0"}


def test_plan_table_shows_types(exports):
    run, _ = exports("q8_0")
    table = text.plan_text(load_manifest(run.artifact_path("surgery"), workspace.repo_root()), run.params.convert.outtype).table()
    assert len(table) == 21 and list(table.columns[:5]) == ["gguf name", "source", "source dtype", "type", "shape"]
    row = table.set_index("gguf name").loc["blk.0.attn_q.weight"]
    assert (row["source dtype"], row["type"], row["shape"], row["rotary permute"]) == ("BF16", "Q8_0", "256x256", "yes")
    assert table.set_index("gguf name").loc["output_norm.weight", "type"] == "F32"


# ---------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("outtype", OUTTYPES)
def test_export_equals_legacy_converter(outtype, exports, legacy_files, vicuna_ckpt):
    run, result = exports(outtype)
    suffix = text_model.OUTTYPES[outtype][2]
    assert result.path.name == f"{REAL_NAME}-{suffix}.gguf" and result.n_tensors == 21
    assert run.artifact_path("text_gguf") == result.path
    cmp = text_check.compare_ggufs(result.path, legacy_files(LEGACY_OUTTYPE[outtype]))
    assert cmp.missing_keys == []
    assert set(cmp.added_keys) == ADDED_KEYS
    assert cmp.different_keys == ([] if outtype != "bf16" else ["general.file_type"])
    meta = cmp.metadata.set_index("key")
    assert meta.loc["general.name", "ours"] == "'Llava v1.6 Vicuna 7b'"
    tensors = cmp.tensors.set_index("name")
    assert set(tensors.index) == set(read_gguf(legacy_files(LEGACY_OUTTYPE[outtype])).tensors)
    assert tensors.ours.notna().all() and tensors.reference.notna().all()
    assert (tensors["shape ours"] == tensors["shape reference"]).all()
    if outtype == "q8_0":
        # The legacy script's Python Q8_0 divides where ggml multiplies by the reciprocal and rounds
        # half to even where ggml rounds half away from zero.
        q8 = tensors[tensors.ours == "Q8_0"]
        assert len(q8) == 16 and q8["scales equal"].all() and (q8["max quant diff"] <= 1).all()
        assert (q8["differing"] < 0.005).all()
        assert tensors[tensors.ours == "F32"]["exact"].all()
    else:
        assert tensors["exact"].all(), tensors[~tensors["exact"]]


@pytest.mark.llama_cpp
def test_q8_0_equals_llama_quantize(exports, llama_tool, tmp_path):
    """Our Q8_0 is ggml's reference quantizer, byte for byte."""
    import subprocess

    f32 = exports("f32")[1].path
    out = tmp_path / "q8_0.gguf"
    subprocess.run([str(llama_tool("llama-quantize")), "--pure", str(f32), str(out), "Q8_0", "2"],
                   check=True, capture_output=True)
    cmp = text_check.compare_ggufs(exports("q8_0")[1].path, out)
    assert cmp.tensors["exact"].all(), cmp.tensors[~cmp.tensors["exact"]]


def test_source_checkpoint_is_unchanged(exports, vicuna_ckpt, source_digest):
    for outtype in OUTTYPES:
        exports(outtype)
    assert tree_digest(vicuna_ckpt) == source_digest


def test_bin_checkpoint_gives_the_same_tensors(tiny_bin_checkpoint, exports, tmp_path):
    before = tree_digest(tiny_bin_checkpoint)
    run = _run(tiny_bin_checkpoint, tmp_path, "text-bin", outtype="f16")
    result = text.run_text(run)
    assert tree_digest(tiny_bin_checkpoint) == before
    assert result.path.name == "llava-tiny-bin-F16.gguf"
    cmp = text_check.compare_ggufs(result.path, exports("f16")[1].path)
    assert cmp.tensors["exact"].all()
    assert [k for k in cmp.different_keys if not k.startswith("general.")] == []


def test_rope_linear_is_written_as_legacy_does(tiny_checkpoint, tmp_path):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["rope_scaling"] = {"type": "linear", "factor": 2.0}
    ckpt = _variant(tiny_checkpoint, tmp_path / "rope", {"config.json": json.dumps(config).encode()})
    result = text.run_text(_run(ckpt, tmp_path, "text-rope", outtype="f16"))
    cmp = text_check.compare_ggufs(result.path, legacy.legacy_text_export(ckpt, tmp_path / "legacy", "f16"))
    assert cmp.missing_keys == [] and cmp.different_keys == []
    meta = cmp.metadata.set_index("key")
    assert meta.loc["llama.rope.scaling.factor", "ours"] == "2.0"


# ---------------------------------------------------------------------------- bad input
def _fewer_pieces(model: Path, n: int) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    del proto.pieces[n:]
    return proto.SerializeToString()


def _with_shard_change(src: Path, change) -> dict[str, bytes]:
    """Files replacing the shard that holds the embedding, after `change(state)`."""
    from safetensors.torch import load_file, save

    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.embed_tokens.weight"]
    state = load_file(src / shard)
    change(state, index)
    files = {shard: save(state)}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    return files


def _config(src: Path, **changes) -> dict[str, bytes]:
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    return {"config.json": json.dumps(config).encode()}


def _shorter_embedding(state, index):
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:31990].clone()


def _unknown_tensor(state, index):
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(64, dtype=torch.bfloat16)
    index["weight_map"]["model.layers.0.self_attn.q_norm.weight"] = index["weight_map"]["model.embed_tokens.weight"]


BAD_INPUTS = {
    "config-vocab": (lambda src: _config(src, vocab_size=32001), ["config.json", "vocab_size 32001", "tokenizer.model"]),
    "tokenizer-vocab": (lambda src: {"tokenizer.model": _fewer_pieces(src / "tokenizer.model", 31990)},
                        ["tokenizer.model", "31990 pieces", "vocab_size"]),
    "embedding-rows": (lambda src: _with_shard_change(src, _shorter_embedding),
                       ["model.embed_tokens.weight", "[31990, 256]", "vocab_size"]),
    "no-tokenizer": (lambda src: {"tokenizer.model": None}, ["tokenizer.model", "missing"]),
    "rope-scaling": (lambda src: _config(src, rope_scaling={"type": "dynamic", "factor": 2.0}),
                     ["config.json", "rope_scaling", "dynamic"]),
    "heads": (lambda src: _config(src, num_attention_heads=3), ["config.json", "num_attention_heads 3", "hidden_size"]),
    "kv-heads": (lambda src: _config(src, num_key_value_heads=3), ["num_key_value_heads 3"]),
    "unmapped": (lambda src: _with_shard_change(src, _unknown_tensor),
                 ["model.layers.0.self_attn.q_norm.weight", "no llama.cpp name"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_before_writing(case, tiny_checkpoint, tmp_path):
    make_files, words = BAD_INPUTS[case]
    ckpt = _variant(tiny_checkpoint, tmp_path / "ckpt", make_files(tiny_checkpoint))
    run = _run(ckpt, tmp_path / "params", f"bad-{case}")
    with pytest.raises(TextExportError) as err:
        text.run_text(run)
    for word in words:
        assert word in str(err.value), str(err.value)
    models = run.dir / "models"
    assert not models.exists() or list(models.iterdir()) == []
    assert "text_gguf" not in run.artifacts()


def test_unknown_outtype_is_refused(tiny_checkpoint):
    with pytest.raises(TextExportError, match="convert.outtype"):
        text.plan_text(tiny_checkpoint, "q4_0")


# ---------------------------------------------------------------------------- chat template
def test_chat_template_renders_llama_cpp_vicuna(exports):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Why?"}]
    # src/llama-chat.cpp, LLM_CHAT_TEMPLATE_VICUNA
    assert text.render_chat(chat) == "Be brief.\n\nUSER: Hello\nASSISTANT: Hi</s>\nUSER: Why?\nASSISTANT:"
    # llm_chat_detect_template: "USER: " and "ASSISTANT: " select vicuna; "SYSTEM: " would select vicuna-orca.
    tmpl = text_model.VICUNA_CHAT_TEMPLATE
    assert "USER: " in tmpl and "ASSISTANT: " in tmpl and "SYSTEM: " not in tmpl
    assert read_gguf(exports("f16")[1].path).fields["tokenizer.chat_template"] == tmpl


@pytest.mark.llama_cpp
def test_mtmd_cli_uses_the_template_without_flags(exports, legacy_files, llama_tool):
    run, result = exports("f16")
    surgery.run_surgery(run)
    mmproj = vision.run_vision(run).path
    cli = llama_tool("llama-mtmd-cli")
    plain = text_check.mtmd_chat_format(result.path, mmproj, cli)
    assert plain["prompt"] == "USER: Describe this image.\nASSISTANT:"
    assert plain == text_check.mtmd_chat_format(result.path, mmproj, cli, "--chat-template", "vicuna")
    assert plain == text_check.mtmd_chat_format(result.path, mmproj, cli, "--jinja")
    # The legacy file has no template: mtmd-cli stops ("Model does not have chat template", exit 1;
    # its asynchronous log may lose that last line).
    with pytest.raises(RuntimeError, match=r"exited with status 1(.|\n)*Model does not have chat template"):
        text_check.mtmd_chat_format(legacy_files("f16"), mmproj, cli)


# ---------------------------------------------------------------------------- verification
@pytest.mark.llama_cpp
def test_verify_text_passes_and_leaves_the_source_alone(exports, vicuna_ckpt, source_digest, llama_tool):
    llama_tool("llama-debug"), llama_tool("llama-tokenize")
    run, _ = exports("f16")
    check = text_check.verify_text(run)
    assert check.passed, check.message
    assert check.tokens_match and check.llama_tokens[0] == 1
    assert check.tokenizer_match and len(check.tokenizer) > 40
    assert check.nmse < text_check.NMSE_BOUNDS["f16"] and check.top1_llama == check.top1_reference
    assert check.table().set_index("check").loc["passed", "value"] is True
    recorded = json.loads((run.dir / "text_check" / f"{check.gguf.stem}.json").read_text())
    assert recorded["passed"] is True and recorded["nmse"] == check.nmse and recorded["outtype"] == "f16"
    assert tree_digest(vicuna_ckpt) == source_digest


@pytest.mark.llama_cpp
@pytest.mark.parametrize("outtype", OUTTYPES)
def test_logits_within_the_bound_of_each_precision(outtype, exports, reference, llama_tool):
    prompt, ids, ref = reference
    logits, tokens = text_check.llama_logits(exports(outtype)[1].path, prompt, llama_tool("llama-debug"), 2)
    assert tokens == ids
    value = nmse(logits, ref)
    assert value < text_check.NMSE_BOUNDS[outtype], f"{outtype}: NMSE {value:.3e}"
    assert logits.argmax() == ref.argmax()


@pytest.mark.llama_cpp
def test_verification_catches_a_missing_rotary_permutation(vicuna_ckpt, reference, llama_tool, tmp_path,
                                                           monkeypatch):
    monkeypatch.setattr(text, "permute_rotary", lambda w, n_head: w)
    path = text.write_text_gguf(vicuna_ckpt, tmp_path / "unpermuted.gguf", "f32").path
    prompt, _, ref = reference
    logits, _ = text_check.llama_logits(path, prompt, llama_tool("llama-debug"), 2)
    assert nmse(logits, ref) > 1000 * text_check.NMSE_BOUNDS["f32"]


def test_verification_can_be_switched_off(exports, vicuna_ckpt, tmp_path):
    _, result = exports("f16")
    run = _run(vicuna_ckpt, tmp_path, "no-verify", verify=False)
    run.record("text_gguf", result.path)
    check = text_check.verify_text(run)
    assert check.skipped and check.ok and not check.passed
    assert "convert.verify" in check.message
