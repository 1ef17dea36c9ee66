"""Synthetic LLaVA checkpoints laid out exactly like `liuhaotian/llava-v1.6-vicuna-7b`.

Real weights cannot be fetched where this project is tested, so every test runs on a checkpoint
made here: the same config keys, tensor names, dtype (bf16), index and tokenizer files, with
random weights. `size="tiny"` is small enough for tests (text width 256 so K-quants apply);
`size="7b"` has the real shapes (~13.5 GB) for benchmarks and is written tensor by tensor.

Each tensor's values depend only on the seed and its name, so differently sharded or `.bin`
copies hold identical tensors. Values are bf16 and exactly representable in f16, so a bf16 -> f16
conversion is lossless and conversion checks can demand f32-level agreement.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import struct
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import hf_layout
from .tokenizer import build_tokenizer_model
from .vision_config import KNOWN_TOWERS

log = logging.getLogger(__name__)

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    v_hidden: int
    v_intermediate: int
    v_layers: int
    v_heads: int
    image: int = 336
    patch: int = 14
    # mm_vision_tower; a tower vision_config.KNOWN_TOWERS does not list is described in config.json.
    tower: str = "openai/clip-vit-large-patch14-336"


SIZES = {
    "tiny": Shapes(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=4, vocab=32000,
                   v_hidden=128, v_intermediate=256, v_layers=3, v_heads=2, tower="llava-gguf/tiny-clip-vit"),
    # The real LLaVA 1.6 Vicuna 7B: Llama-2 7B text model + CLIP ViT-L/14 at 336 px.
    "7b": Shapes(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000,
                 v_hidden=1024, v_intermediate=4096, v_layers=24, v_heads=16),
}


def tower_config(s: Shapes) -> dict:
    """The CLIPVisionConfig of the synthetic tower (CLIP's activation, epsilon and projection width)."""
    return {"model_type": "clip_vision_model", "hidden_size": s.v_hidden, "intermediate_size": s.v_intermediate,
            "num_hidden_layers": s.v_layers, "num_attention_heads": s.v_heads, "num_channels": 3,
            "image_size": s.image, "patch_size": s.patch, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "projection_dim": 768}


def llava_config(s: Shapes, variant: str = "1.6") -> dict:
    """config.json as the original LLaVA repo writes it. It names the tower; a synthetic tower no
    one can look up (tiny) is also described, in a `vision_config` object as transformers' LLaVA
    configs carry it (see vision_config.py)."""
    cfg = {
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "freeze_mm_vision_resampler": False,
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "image_aspect_ratio": "anyres",
        "image_crop_resolution": 224,
        "image_grid_pinpoints": GRID_PINPOINTS,
        "image_split_resolution": 224,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate,
        "max_position_embeddings": 4096,
        "mm_hidden_size": s.v_hidden,
        "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": s.tower,
        "mm_vision_tower_lr": 2e-06,
        "model_type": "llava",
        "num_attention_heads": s.heads,
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": 4096,
        "tokenizer_padding_side": "right",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.2",
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": True,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": s.vocab,
    }
    if s.tower not in KNOWN_TOWERS:
        cfg["vision_config"] = tower_config(s)
    if variant == "1.5":
        # LLaVA 1.5: one 336 px view padded to a square, no anyres grid and no image_newline.
        cfg.update(image_aspect_ratio="pad", mm_patch_merge_type="flat")
        for key in ("image_grid_pinpoints", "image_crop_resolution", "image_split_resolution",
                    "mm_vision_tower_lr", "unfreeze_mm_vision_tower", "mm_projector_lr"):
            cfg.pop(key)
    return cfg


def synthetic_tensors(s: Shapes, variant: str = "1.6") -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes in the order LlavaLlamaForCausalLM.state_dict() yields them."""
    plan: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (s.vocab, s.hidden))]
    head_dim = s.hidden // s.heads
    for i in range(s.layers):
        p = f"model.layers.{i}."
        plan += [
            (p + "self_attn.q_proj.weight", (s.hidden, s.hidden)),
            (p + "self_attn.k_proj.weight", (s.kv_heads * head_dim, s.hidden)),
            (p + "self_attn.v_proj.weight", (s.kv_heads * head_dim, s.hidden)),
            (p + "self_attn.o_proj.weight", (s.hidden, s.hidden)),
            (p + "mlp.gate_proj.weight", (s.intermediate, s.hidden)),
            (p + "mlp.up_proj.weight", (s.intermediate, s.hidden)),
            (p + "mlp.down_proj.weight", (s.hidden, s.intermediate)),
            (p + "input_layernorm.weight", (s.hidden,)),
            (p + "post_attention_layernorm.weight", (s.hidden,)),
        ]
    plan.append(("model.norm.weight", (s.hidden,)))
    v, n_pos = VISION_PREFIX, (s.image // s.patch) ** 2 + 1
    plan += [
        (v + "embeddings.class_embedding", (s.v_hidden,)),
        (v + "embeddings.patch_embedding.weight", (s.v_hidden, 3, s.patch, s.patch)),
        (v + "embeddings.position_embedding.weight", (n_pos, s.v_hidden)),
        (v + "pre_layrnorm.weight", (s.v_hidden,)),
        (v + "pre_layrnorm.bias", (s.v_hidden,)),
    ]
    for i in range(s.v_layers):
        p = f"{v}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            plan += [(p + f"self_attn.{proj}.weight", (s.v_hidden, s.v_hidden)),
                     (p + f"self_attn.{proj}.bias", (s.v_hidden,))]
        plan += [
            (p + "layer_norm1.weight", (s.v_hidden,)), (p + "layer_norm1.bias", (s.v_hidden,)),
            (p + "mlp.fc1.weight", (s.v_intermediate, s.v_hidden)), (p + "mlp.fc1.bias", (s.v_intermediate,)),
            (p + "mlp.fc2.weight", (s.v_hidden, s.v_intermediate)), (p + "mlp.fc2.bias", (s.v_hidden,)),
            (p + "layer_norm2.weight", (s.v_hidden,)), (p + "layer_norm2.bias", (s.v_hidden,)),
        ]
    plan += [(v + "post_layernorm.weight", (s.v_hidden,)), (v + "post_layernorm.bias", (s.v_hidden,))]
    plan += [
        ("model.mm_projector.0.weight", (s.hidden, s.v_hidden)), ("model.mm_projector.0.bias", (s.hidden,)),
        ("model.mm_projector.2.weight", (s.hidden, s.hidden)), ("model.mm_projector.2.bias", (s.hidden,)),
    ]
    if variant == "1.6":
        plan.append(("model.image_newline", (s.hidden,)))
    plan.append(("lm_head.weight", (s.vocab, s.hidden)))
    return plan


def is_current(folder: Path, size: str, variant: str = "1.6") -> bool:
    """Whether `folder` holds a synthetic checkpoint whose config.json is what this version writes
    (one made by an older version, e.g. without its tower's vision_config, is made again)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()) == llava_config(SIZES[size], variant)
    except (OSError, ValueError):
        return False


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic bf16 values for one tensor, scaled so activations stay O(1) through the net."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name.endswith(("norm.weight", "layernorm.weight", "layrnorm.weight", "layer_norm1.weight",
                      "layer_norm2.weight", "post_layernorm.weight")):
        x = 1.0 + 0.1 * x
    elif name.endswith("bias"):
        x = 0.02 * x
    elif len(shape) >= 2 and "embed" not in name:
        x = x / math.sqrt(math.prod(shape[1:]))
    else:  # token, class and position embeddings, image_newline
        x = 0.5 * x
    # Keep every value a normal f16 number, so bf16 -> f16 is exact.
    x = torch.where(x.abs() < 2.0 ** -14, torch.zeros_like(x), x)
    return x.to(torch.bfloat16)


def _split_shards(plan: list[tuple[str, tuple[int, ...]]], shards: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    sizes = [2 * math.prod(shape) for _, shape in plan]
    total, out, acc = sum(sizes), [[] for _ in range(shards)], 0
    for (entry, size) in zip(plan, sizes):
        # A tensor goes to the shard its midpoint falls in, so big tensors do not swallow shards.
        idx = min(shards - 1, int((acc + size / 2) * shards // total))
        out[idx].append(entry)
        acc += size
    return [group for group in out if group]


def _write_safetensors(path: Path, entries, values, bar: tqdm, dtype: str = "BF16") -> None:
    """Stream tensors to a safetensors file without holding the shard in memory."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        nbytes = 2 * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in entries:
            t = values(name, shape)
            f.write(t.view(torch.uint8).numpy().tobytes())
            bar.update(t.numel() * 2)


def _write_bin(path: Path, entries, values, bar: tqdm, dtype: str = "BF16") -> None:
    state = {}
    for name, shape in entries:
        state[name] = values(name, shape)
        bar.update(state[name].numel() * 2)
    torch.save(state, path)


def make_tiny(out_dir: str | Path, size: str = "tiny", fmt: str = "safetensors", shards: int = 2,
              seed: int = 0, variant: str = "1.6", *, vocab_gguf: Path, layout: str = "llava") -> Path:
    """Write a synthetic LLaVA checkpoint folder; returns it. Written beside, then renamed in.

    vocab_gguf: the Llama vocabulary its tokenizer is built from (tokenizer.VOCAB_GGUF in the pinned
    llama.cpp source: `toolchain.source_asset(VOCAB_GGUF)`, which the callers pass).
    layout "hf": the same weights laid out as llava-hf/llava-v1.6-vicuna-7b-hf (see hf_layout.py)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, not {size!r}")
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"format must be 'safetensors' or 'bin', not {fmt!r}")
    if variant not in ("1.6", "1.5"):
        raise ValueError(f"variant must be '1.6' or '1.5', not {variant!r}")
    if layout not in ("llava", "hf") or (layout == "hf" and variant != "1.6"):
        raise ValueError(f"layout must be 'llava' or 'hf' (LLaVA 1.6 only), not {layout!r} for variant {variant}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: exists and is not empty; choose a new folder")
    s = SIZES[size]
    plan = synthetic_tensors(s, variant)
    config, dtype = llava_config(s, variant), "BF16"
    values = partial(random_tensor, seed=seed)
    if layout == "hf":
        plan, values = hf_layout.tiny_source(plan, s.vocab, seed, random_tensor)
        vision = hf_layout.hf_vision_config(s.v_hidden, s.v_intermediate, s.v_layers, s.image, s.patch)
        config, dtype = hf_layout.hf_config(config, hf_layout.hf_vocab_size(s.vocab), vision), hf_layout.HF_DTYPE
    groups = _split_shards(plan, shards)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    ext, index_name = ("safetensors", "model.safetensors.index.json") if fmt == "safetensors" \
        else ("bin", "pytorch_model.bin.index.json")
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    writer = _write_safetensors if fmt == "safetensors" else _write_bin
    total = sum(2 * math.prod(shape) for _, shape in plan)
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"make-tiny {size}") as bar:
        for i, entries in enumerate(groups, 1):
            shard = f"{stem}-{i:05d}-of-{len(groups):05d}.{ext}" if len(groups) > 1 else f"{stem}.{ext}"
            writer(tmp / shard, entries, values, bar, dtype)
            weight_map.update({name: shard for name, _ in entries})
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / index_name).write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_tokenizer_files(tmp, vocab_gguf)
    if layout == "hf":
        hf_layout.write_hf_tokenizer_files(tmp)
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(tmp, out_dir)
    log.info("synthetic %s LLaVA %s checkpoint (%s layout, %s, %d shard(s), seed %d) at %s",
             size, variant, layout, fmt, len(groups), seed, out_dir)
    return out_dir


def _write_tokenizer_files(folder: Path, vocab_gguf: Path) -> None:
    (folder / "tokenizer.model").write_bytes(build_tokenizer_model(vocab_gguf))
    special = {
        "bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "eos_token": {"content": "</s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "pad_token": "<unk>",
        "unk_token": {"content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    tok_cfg = {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {
            "0": {**special["unk_token"], "special": True},
            "1": {**special["bos_token"], "special": True},
            "2": {**special["eos_token"], "special": True},
        },
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": False,
        "model_max_length": 4096, "pad_token": "<unk>", "padding_side": "right", "sp_model_kwargs": {},
        "spaces_between_special_tokens": False, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    gen_cfg = {"bos_token_id": 1, "eos_token_id": 2, "max_length": 4096, "pad_token_id": 0,
               "transformers_version": "4.36.2"}
    (folder / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
