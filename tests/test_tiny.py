"""The synthetic checkpoint is laid out like liuhaotian/llava-v1.6-vicuna-7b."""
import json

import torch

from conftest import make_tiny
from llava_gguf.model import tiny
from llava_gguf.llama_cpp import toolchain
from llava_gguf.model.checkpoint import Checkpoint
from llava_gguf.model.tokenizer import VOCAB_GGUF, check_tokenizer_vectors

REAL_KEYS = {"architectures", "mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature",
             "mm_hidden_size", "image_aspect_ratio", "image_grid_pinpoints", "mm_patch_merge_type",
             "mm_vision_tower", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
             "num_key_value_heads", "rms_norm_eps", "rope_theta", "vocab_size", "max_position_embeddings"}


def test_layout_and_config(tiny_checkpoint):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert REAL_KEYS <= set(cfg)
    assert cfg["architectures"] == ["LlavaLlamaForCausalLM"] and cfg["mm_projector_type"] == "mlp2x_gelu"
    assert cfg["image_grid_pinpoints"] == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert cfg["hidden_size"] % 256 == 0
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "model.safetensors.index.json"):
        assert (tiny_checkpoint / name).exists(), name
    ckpt = Checkpoint.open(tiny_checkpoint)
    names = set(ckpt.tensors)
    v = "model.vision_tower.vision_tower.vision_model."
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight",
                 "lm_head.weight", "model.mm_projector.0.weight", "model.mm_projector.2.bias",
                 "model.image_newline", v + "pre_layrnorm.weight", v + "post_layernorm.bias",
                 v + "embeddings.class_embedding", v + "embeddings.position_embedding.weight"):
        assert name in names, name
    assert {t.dtype for t in ckpt} == {"BF16"}
    assert ckpt.tensors[v + "embeddings.position_embedding.weight"].shape == (577, cfg["mm_hidden_size"])
    assert len(ckpt.shards) == 2


def test_7b_plan_has_the_real_shapes():
    plan = dict(tiny.synthetic_tensors(tiny.SIZES["7b"]))
    assert plan["model.embed_tokens.weight"] == (32000, 4096)
    assert plan["model.layers.31.mlp.gate_proj.weight"] == (11008, 4096)
    assert plan["model.mm_projector.0.weight"] == (4096, 1024)
    total = sum(2 * torch.Size(s).numel() for s in plan.values())
    assert 13.4e9 < total < 14.2e9  # ~13.5 GB of bf16 like the real checkpoint


def test_values_are_independent_of_sharding_and_f16_exact(tiny_checkpoint, tiny_bin_checkpoint):
    a, b = Checkpoint.open(tiny_checkpoint), Checkpoint.open(tiny_bin_checkpoint)
    assert len(b.shards) == 3 and b.format == "bin"
    for name in a.tensors:
        x = a.load(name)
        assert torch.equal(x, b.load(name)), name
        assert torch.equal(x.to(torch.float16).to(torch.float32), x.to(torch.float32)), name


def test_variant_15_has_no_image_newline(tmp_path):
    folder = make_tiny(tmp_path / "v15", variant="1.5", shards=1)
    ckpt = Checkpoint.open(folder)
    assert "model.image_newline" not in ckpt.tensors and ckpt.index_file is None
    assert ckpt.config["mm_patch_merge_type"] == "flat"


def test_tokenizer_matches_llama_cpp_vectors(tiny_checkpoint):
    bad = check_tokenizer_vectors(tiny_checkpoint / "tokenizer.model", toolchain.source_asset(VOCAB_GGUF))
    assert bad == []
