"""The streamed Llama reference (`text_reference`) against transformers' `LlamaForCausalLM`.

transformers is the independent cross-check: its model is built from the same checkpoint tensors
and must give the same logits, at every position, to ~1e-13 (measured: f32 2.3e-13, f64 2e-14 on
the tiny model; transformers itself rounds RMSNorm and the rotary angles to f32 even in f64).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny
from llava_gguf.model import tiny
from llava_gguf.reference import text as text_reference
from llava_gguf.checks import text as text_check
from llava_gguf.checks.numeric import nmse
from llava_gguf.model.checkpoint import Checkpoint
from llava_gguf.model.layout import TEXT, split_checkpoint
from llava_gguf.run.params import ConvertParams
from llava_gguf.model.text_model import read_hparams

AGREEMENT = 1e-12  # NMSE, every position


def transformers_model(checkpoint: Path, dtype: torch.dtype):
    """transformers' LlamaForCausalLM holding the checkpoint's text weights (canonical names)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with Checkpoint.open(checkpoint) as ckpt:
        hp = read_hparams(ckpt.config, ckpt.path / "config.json")
        text = split_checkpoint(ckpt).part(TEXT)
        rope = {"rope_type": "linear", "factor": hp.rope_scale} if hp.rope_scale else None
        config = LlamaConfig(
            vocab_size=hp.n_vocab, hidden_size=hp.n_embd, intermediate_size=hp.n_ff,
            num_hidden_layers=hp.n_layer, num_attention_heads=hp.n_head, num_key_value_heads=hp.n_head_kv,
            max_position_embeddings=hp.n_ctx, rms_norm_eps=hp.norm_eps, rope_theta=hp.rope_theta or 10000.0,
            rope_scaling=rope, tie_word_embeddings=hp.tie_embeddings, attention_bias=False, mlp_bias=False)
        config._attn_implementation = "eager"
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        state = {name: ckpt.load(t.stored).to(dtype) for name, t in text.items()}
    model.load_state_dict(state, strict=True, assign=True)
    # The rotary frequencies are a buffer computed at init, which happened on meta.
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    return model.eval()


def transformers_logits(checkpoint: Path, ids: list[int], dtype: torch.dtype) -> np.ndarray:
    with torch.no_grad():
        return transformers_model(checkpoint, dtype)(torch.tensor([ids])).logits[0].double().numpy()


def worst_nmse(reference: np.ndarray, test: np.ndarray) -> float:
    return max(nmse(t, r) for r, t in zip(reference, test))


@pytest.fixture(scope="module")
def ids(tiny_checkpoint) -> list[int]:
    return text_check.reference_tokens(tiny_checkpoint / "tokenizer.model", ConvertParams().verify_prompt)


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory, monkeypatch_module) -> Path:
    """A tiny checkpoint with grouped K/V heads (4 query heads, 2 K/V heads), rope_theta 5e5 and
    linear rope scaling 2."""
    monkeypatch_module.setitem(tiny.SIZES, "tiny-gqa", dataclasses.replace(tiny.SIZES["tiny"], kv_heads=2))
    folder = make_tiny(tmp_path_factory.mktemp("gqa") / "llava-tiny-gqa", size="tiny-gqa")
    config = json.loads((folder / "config.json").read_text())
    config.update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_agrees_with_transformers_at_every_position(dtype, tiny_checkpoint, ids):
    ours = text_reference.reference_logits(tiny_checkpoint, ids, dtype, all_positions=True)
    theirs = transformers_logits(tiny_checkpoint, ids, dtype)
    assert ours.shape == theirs.shape == (len(ids), 32000)
    assert worst_nmse(theirs, ours) < AGREEMENT
    last = text_reference.reference_logits(tiny_checkpoint, ids, dtype)
    assert last.shape == (32000,) and nmse(last, theirs[-1]) < AGREEMENT


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_grouped_kv_heads_and_rope_settings_agree_with_transformers(dtype, gqa_checkpoint, ids):
    hp = read_hparams(json.loads((gqa_checkpoint / "config.json").read_text()), Path("config.json"))
    assert (hp.n_head, hp.n_head_kv, hp.rope_theta, hp.rope_scale) == (4, 2, 500000.0, 2.0)
    ours = text_reference.reference_logits(gqa_checkpoint, ids, dtype, all_positions=True)
    theirs = transformers_logits(gqa_checkpoint, ids, dtype)
    assert worst_nmse(theirs, ours) < AGREEMENT


def test_rope_settings_change_the_logits(gqa_checkpoint, tmp_path, ids):
    """The settings are read, not assumed: without them the same weights give other logits."""
    plain = tmp_path / "plain"
    shutil.copytree(gqa_checkpoint, plain, copy_function=os.link)
    config = json.loads((plain / "config.json").read_text())
    config.update(rope_theta=10000.0, rope_scaling=None)
    (plain / "config.json").unlink()
    (plain / "config.json").write_text(json.dumps(config))
    a = text_reference.reference_logits(gqa_checkpoint, ids)
    b = text_reference.reference_logits(plain, ids)
    assert nmse(b, a) > 1e-6


def test_bin_shards_give_the_same_logits(tiny_checkpoint, tiny_bin_checkpoint, ids):
    a = text_reference.reference_logits(tiny_checkpoint, ids)
    b = text_reference.reference_logits(tiny_bin_checkpoint, ids)
    np.testing.assert_array_equal(a, b)


def test_reads_each_tensor_once_and_holds_few_at_a_time(tiny_checkpoint, ids, monkeypatch):
    """The whole model is never in memory: each text weight is read when used and dropped after."""
    live, peak, reads = set(), [0], []
    original = text_reference.StreamedLlama._w

    def tracked(self, name):
        w = original(self, name)
        reads.append(name)
        live.add(id(w))
        peak[0] = max(peak[0], len(live))
        weakref.finalize(w, live.discard, id(w))
        return w

    monkeypatch.setattr(text_reference.StreamedLlama, "_w", tracked)
    text_reference.reference_logits(tiny_checkpoint, ids)
    with Checkpoint.open(tiny_checkpoint) as ckpt:
        text = split_checkpoint(ckpt).part(TEXT)
    # Every weight but the embedding (only its rows are taken, outside _w) read exactly once.
    assert sorted(reads) == sorted(n for n in text if n != "model.embed_tokens.weight")
    assert peak[0] <= 2


def test_token_ids_outside_the_vocabulary_are_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="token ids"):
        text_reference.reference_logits(tiny_checkpoint, [1, 32000])
