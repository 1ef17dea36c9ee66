"""The Hugging Face transformers layout of LLaVA 1.6 (`llava-hf/llava-v1.6-vicuna-7b-hf`), as data.

`llava-hf` repackages the weights of `liuhaotian/llava-v1.6-*` for transformers'
`LlavaNextForConditionalGeneration`. What differs from the original layout, and where it is handled:

- tensor names (`layout.LAYOUTS["llava-hf"]`): `language_model.model.*` / `language_model.lm_head.weight`,
  `vision_tower.vision_model.*`, `multi_modal_projector.linear_{1,2}.*`, `image_newline`; transformers 5
  saves the tower without `vision_model.` (`vision_tower.embeddings.*`) and holds everything under
  `model.` in memory (`model.language_model.*`, `lm_head.weight`); all of these are accepted.
- config.json is nested (`text_config`, `vision_config`) and, as transformers writes it, states only
  what differs from the config classes' defaults. `text_config` / `vision_config` / `llava_config` fill in
  those defaults (the tables below, which the tests compare with transformers' own classes) and give
  the flat keys of the original layout that the exporters read (`mm_vision_select_layer`, ...).
- `image_grid_pinpoints`: transformers reads each pair as (height, width) (image_processing_utils
  select_best_resolution, modeling_llava_next get_anyres_image_grid_shape), the original LLaVA code and
  llama.cpp as (width, height). `anyres.hf_grid_pinpoints` transposes them, so the flat config and the mmproj hold
  (width, height) and llama.cpp tiles as transformers does; a config without the key gets
  LlavaNextConfig's default list, as transformers does, with a warning naming it
  (`anyres.missing_pinpoints_warning`).
- the vocabulary: `tokenizer.model` holds Llama's 32000 pieces; `<image>` (32000) and `<pad>` (32001)
  are added tokens (added_tokens.json, tokenizer_config.json, tokenizer.json), and the embedding and
  output matrices have 32064 rows (`vocab_size`), padded to a multiple of 64. The text GGUF keeps all
  32064 rows and so lists 32064 tokens, as `convert_hf_to_gguf.py` does for padded vocabularies: the
  32000 pieces, the added tokens (CONTROL when special, else USER_DEFINED; score -1000), and
  `[PAD{id}]` for the rest (UNUSED, score -10000). See `extend_vocab`.
- `make-tiny --layout hf` (`tiny_source`, `hf_config`): the synthetic checkpoint of the same seed, renamed and
  laid out as llava-hf, in F16 as the llava-hf repos are, with 64 more embedding/output rows.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path

import numpy as np

from .anyres import HF_DEFAULT_PINPOINTS, hf_grid_pinpoints, parse_pinpoints, transpose

log = logging.getLogger(__name__)

LAYOUT = "llava-hf"
ARCHITECTURES = ("LlavaNextForConditionalGeneration",)

# transformers' LlamaConfig defaults, for the keys the text export reads (llava-hf's text_config states
# only max_position_embeddings, rms_norm_eps, vocab_size and pad_token_id; the rest are these).
LLAMA_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None,  # None: num_attention_heads
    "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 1, "eos_token_id": 2,
}
# transformers' CLIPVisionConfig defaults (CLIP ViT-B/32), for a vision_config that states only part.
CLIP_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 512, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
# LlavaNextConfig's own defaults; with no vision_config at all it builds CLIP ViT-L/14-336.
LLAVA_NEXT_DEFAULTS = {
    "image_token_index": 32000, "projector_hidden_act": "gelu", "vision_feature_select_strategy": "default",
    "vision_feature_layer": -2, "image_grid_pinpoints": HF_DEFAULT_PINPOINTS,
    "multimodal_projector_bias": True,
}
LLAVA_NEXT_VISION_DEFAULTS = {**CLIP_VISION_DEFAULTS, "intermediate_size": 4096, "hidden_size": 1024, "patch_size": 14,
                              "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16,
                              "projection_dim": 768}

# vision_feature_select_strategy -> the original layout's mm_vision_select_feature.
SELECT_FEATURE = {"default": "patch", "full": "cls_patch"}
# projector_hidden_act -> the original layout's mm_projector_type (LLaVA's 2-layer MLP with GELU).
PROJECTOR_TYPES = {"gelu": "mlp2x_gelu"}

# Text GGUF token entries for ids past tokenizer.model's pieces (convert_hf_to_gguf.py's choices).
ADDED_TOKEN_SCORE = -1000.0
PAD_TOKEN_SCORE = -10000.0
PAD_TOKEN_TEXT = "[PAD{id}]"
# SentencePiece / gguf token types.
TOKEN_USER_DEFINED, TOKEN_CONTROL, TOKEN_UNUSED = 4, 3, 5

# llava-hf's added tokens and the row padding of its vocabulary.
HF_ADDED_TOKENS = {"<image>": 32000, "<pad>": 32001}
HF_VOCAB_MULTIPLE = 64


class HFLayoutError(ValueError):
    """A llava-hf config or tokenizer that cannot be read; names the file and key."""


def is_hf_config(config: dict) -> bool:
    """A transformers LLaVA config: LlavaNext architecture, model_type llava_next, or nested configs."""
    archs = config.get("architectures") or []
    return (any(a in ARCHITECTURES for a in archs) or config.get("model_type") == "llava_next"
            or ("text_config" in config and "vision_config" in config))


# ---------------------------------------------------------------------------- configuration
def _rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either spelling: transformers 4 (`rope_theta`, `rope_scaling`)
    or transformers 5 (`rope_parameters`: {"rope_theta", "rope_type", "factor", ...})."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", cfg.get("rope_theta", LLAMA_DEFAULTS["rope_theta"]))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        return float(theta), (None if scaling.get("rope_type", "default") == "default" else scaling)
    return float(cfg.get("rope_theta") or LLAMA_DEFAULTS["rope_theta"]), cfg.get("rope_scaling")


def text_config(config: dict) -> dict:
    """The Llama config of a llava-hf config.json, transformers' defaults filled in (flat keys
    `rope_theta` / `rope_scaling`). `vocab_size` falls back to the top level's, which llava-hf repeats."""
    given = config.get("text_config")
    if given is not None and not isinstance(given, dict):
        raise HFLayoutError(f"config.json: text_config is {type(given).__name__}, not an object")
    given = given or {}
    cfg = {**LLAMA_DEFAULTS, **{k: v for k, v in given.items() if v is not None or k not in LLAMA_DEFAULTS}}
    if "vocab_size" not in given and "vocab_size" in config:
        cfg["vocab_size"] = config["vocab_size"]
    if cfg.get("num_key_value_heads") is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    cfg["rope_theta"], cfg["rope_scaling"] = _rope(given)
    cfg.pop("rope_parameters", None)
    if "tie_word_embeddings" not in given and "tie_word_embeddings" in config:
        cfg["tie_word_embeddings"] = config["tie_word_embeddings"]
    return cfg


def vision_config(config: dict) -> dict:
    """The CLIPVisionConfig of a llava-hf config.json, defaults filled in (LlavaNextConfig's ViT-L/14-336
    when vision_config is absent, CLIPVisionConfig's for the keys a given vision_config leaves out)."""
    given = config.get("vision_config")
    if given is None:
        return dict(LLAVA_NEXT_VISION_DEFAULTS)
    if not isinstance(given, dict):
        raise HFLayoutError(f"config.json: vision_config is {type(given).__name__}, not an object")
    if given.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise HFLayoutError(f"config.json: vision_config.model_type {given['model_type']!r} is not supported; "
                            "llama.cpp's LLaVA graph is a CLIP ViT (clip_vision_model)")
    return {**CLIP_VISION_DEFAULTS, **given}


def llava_config(config: dict) -> dict:
    """A llava-hf config.json as the original layout's flat config.json: the Llama keys at the top, the
    LLaVA keys the exporters read (mm_vision_select_layer, mm_vision_select_feature, mm_hidden_size,
    mm_projector_type, image_aspect_ratio, mm_patch_merge_type, image_grid_pinpoints as (width, height)), and
    `vision_config` resolved. Keys the checkpoint does not hold (image_crop_resolution,
    image_split_resolution, mm_vision_tower: training-time settings) are not invented."""
    if not is_hf_config(config):
        return config
    top = {**LLAVA_NEXT_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    vision = vision_config(config)
    try:
        pinpoints, _ = hf_grid_pinpoints(config)
    except ValueError as err:
        raise HFLayoutError(str(err)) from None
    strategy = top["vision_feature_select_strategy"]
    if strategy not in SELECT_FEATURE:
        raise HFLayoutError(f"config.json: vision_feature_select_strategy {strategy!r} is not one of "
                            f"{sorted(SELECT_FEATURE)}")
    act = top["projector_hidden_act"]
    if act not in PROJECTOR_TYPES or not top["multimodal_projector_bias"]:
        raise HFLayoutError(f"config.json: projector_hidden_act {act!r} (bias {top['multimodal_projector_bias']}) "
                            "is not LLaVA's mlp2x_gelu projector, the only one llama.cpp's llava graph has")
    # Written by the llava-hf conversion script; transformers' model always has image_newline.
    if not top.get("use_image_newline_parameter", True):
        raise HFLayoutError("config.json: use_image_newline_parameter false is not LLaVA 1.6 (spatial_unpad with "
                            "image_newline); not supported")
    flat = {
        "architectures": config.get("architectures") or list(ARCHITECTURES),
        "model_type": config.get("model_type", "llava_next"),
        **{k: v for k, v in text_config(config).items() if k not in ("architectures", "model_type", "_name_or_path")},
        "mm_vision_select_layer": top["vision_feature_layer"],
        "mm_vision_select_feature": SELECT_FEATURE[strategy],
        "mm_hidden_size": vision["hidden_size"],
        "mm_projector_type": PROJECTOR_TYPES[act],
        # LlavaNext always tiles (anyres) and unpads with image_newline (spatial_unpad).
        "image_aspect_ratio": "anyres",
        "mm_patch_merge_type": "spatial_unpad",
        # (width, height), the original layout's order.
        "image_grid_pinpoints": [list(p) for p in pinpoints],
        "image_token_index": top["image_token_index"],
        "vision_config": vision,
    }
    return flat


# The vision_config keys that override the original layout's CLIP constants in the mmproj config, and
# those that must agree with the tensors' shapes (already derived from them).
VISION_OVERRIDES = ("num_attention_heads", "hidden_act", "layer_norm_eps", "projection_dim")
VISION_SHAPE_KEYS = ("hidden_size", "intermediate_size", "image_size", "patch_size", "num_channels")


def apply_vision_config(vcfg: dict, config: dict, where: str) -> dict:
    """The mmproj's derived config_vit.json with the checkpoint's own vision_config values in place of
    CLIP ViT-L's constants; a vision_config that contradicts the tensors is refused."""
    vision = vision_config(config)
    bad = [f"{k} {vision[k]} (tensors: {vcfg[k]})" for k in VISION_SHAPE_KEYS if vision[k] != vcfg[k]]
    if bad:
        raise HFLayoutError(f"{where}: vision_config disagrees with the vision tower's tensors: {', '.join(bad)}; "
                            "config.json does not belong to these weights")
    if vision["hidden_size"] % vision["num_attention_heads"]:
        raise HFLayoutError(f"{where}: vision_config.num_attention_heads {vision['num_attention_heads']} does not "
                            f"divide hidden_size {vision['hidden_size']}")
    if vision["hidden_act"] not in ("quick_gelu", "gelu"):
        raise HFLayoutError(f"{where}: vision_config.hidden_act {vision['hidden_act']!r} is not supported by "
                            "llama.cpp's CLIP graph (quick_gelu or gelu)")
    return {**vcfg, **{k: vision[k] for k in VISION_OVERRIDES}}


# ---------------------------------------------------------------------------- vocabulary
def added_tokens(folder: Path) -> dict[int, tuple[str, bool]]:
    """id -> (text, special) of the tokens added on top of tokenizer.model, from added_tokens.json,
    tokenizer_config.json's added_tokens_decoder and tokenizer.json's added_tokens (later files
    decide `special`; a file that names another text for the same id is refused)."""
    found: dict[int, tuple[str, bool]] = {}
    sources: dict[int, str] = {}

    def add(tok_id, text, special, file):
        tok_id = int(tok_id)
        if tok_id in found and found[tok_id][0] != text:
            raise HFLayoutError(f"{folder / file}: token {tok_id} is {text!r}, {sources[tok_id]} says "
                                f"{found[tok_id][0]!r}; the tokenizer files are from different downloads")
        found[tok_id], sources[tok_id] = (text, bool(special) or found.get(tok_id, ("", False))[1]), file

    for file in ("added_tokens.json", "tokenizer_config.json", "tokenizer.json"):
        path = folder / file
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise HFLayoutError(f"{path}: not valid JSON ({err}); re-download it") from None
        if file == "added_tokens.json":
            for text, tok_id in data.items():
                add(tok_id, text, False, file)
        elif file == "tokenizer_config.json":
            for tok_id, entry in (data.get("added_tokens_decoder") or {}).items():
                add(tok_id, entry["content"], entry.get("special", False), file)
        else:
            for entry in data.get("added_tokens") or []:
                add(entry["id"], entry["content"], entry.get("special", False), file)
    return found


def extend_vocab(tokens: list[bytes], scores: np.ndarray, types: np.ndarray, folder: Path, n_vocab: int,
                 config_file: Path) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """tokenizer.model's pieces extended to the model's `n_vocab` embedding rows: added tokens at their
    ids, `[PAD{id}]` for rows no tokenizer file names. The pieces themselves are kept as they are (an
    added token re-stating a piece must name the same text)."""
    n_pieces = len(tokens)
    if n_vocab < n_pieces:
        raise HFLayoutError(f"{config_file}: vocab_size {n_vocab} is smaller than tokenizer.model's {n_pieces} "
                            "pieces; config.json and the tokenizer do not belong together")
    tokens, scores, types = list(tokens), scores.astype(np.float32).tolist(), types.astype(np.int32).tolist()
    extra = {i: (PAD_TOKEN_TEXT.format(id=i), PAD_TOKEN_SCORE, TOKEN_UNUSED) for i in range(n_pieces, n_vocab)}
    for tok_id, (text, special) in sorted(added_tokens(folder).items()):
        if tok_id < n_pieces:
            if tokens[tok_id] != text.encode("utf-8"):
                raise HFLayoutError(f"{folder}: added token {tok_id} {text!r} replaces tokenizer.model's piece "
                                    f"{tokens[tok_id].decode('utf-8', 'replace')!r}; not supported")
            continue
        if tok_id >= n_vocab:
            raise HFLayoutError(f"{folder}: added token {text!r} has id {tok_id}, past vocab_size {n_vocab} of "
                                f"{config_file}; the model has no embedding row for it")
        extra[tok_id] = (text, ADDED_TOKEN_SCORE, TOKEN_CONTROL if special else TOKEN_USER_DEFINED)
    added = sorted(i for i in extra if extra[i][2] != TOKEN_UNUSED)
    if added != list(range(n_pieces, n_pieces + len(added))):
        raise HFLayoutError(f"{folder}: the added tokens have ids {added}, tokenizer.model {n_pieces} pieces; added "
                            f"tokens follow the pieces (ids {n_pieces}...), so tokenizer.model is not this model's")
    if n_vocab - n_pieces - len(added) >= HF_VOCAB_MULTIPLE:
        raise HFLayoutError(f"{config_file}: vocab_size {n_vocab} leaves {n_vocab - n_pieces - len(added)} rows "
                            f"unnamed after tokenizer.model's {n_pieces} pieces and {len(added)} added token(s); "
                            f"padding is under {HF_VOCAB_MULTIPLE} rows, so the tokenizer files are not this model's")
    for i in range(n_pieces, n_vocab):
        text, score, ttype = extra[i]
        tokens.append(text.encode("utf-8"))
        scores.append(score)
        types.append(ttype)
    log.info("vocabulary: %d pieces + %d added token(s) + %d padding row(s) = %d", n_pieces, len(added),
             n_vocab - n_pieces - len(added), n_vocab)
    return tokens, np.array(scores, dtype=np.float32), np.array(types, dtype=np.int32)


# ---------------------------------------------------------------------------- synthetic checkpoint
# Original name -> llava-hf name (as llava-hf/llava-v1.6-vicuna-7b-hf stores them), first match wins.
HF_NAMES = (
    ("model.vision_tower.vision_tower.", "vision_tower."),
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.image_newline", "image_newline"),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
# Tensors with one row per token: padded to the llava-hf vocabulary.
VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")
HF_DTYPE = "F16"  # llava-hf/llava-v1.6-vicuna-7b-hf's torch_dtype


def hf_name(name: str) -> str:
    return next(new + name[len(old):] for old, new in HF_NAMES if name.startswith(old))


def hf_vocab_size(n_pieces: int) -> int:
    """The llava-hf vocabulary: the pieces, the added tokens, rounded up to a multiple of 64."""
    return math.ceil((n_pieces + len(HF_ADDED_TOKENS)) / HF_VOCAB_MULTIPLE) * HF_VOCAB_MULTIPLE


def tiny_source(plan: list[tuple[str, tuple[int, ...]]], vocab: int, seed: int, make):
    """The llava-hf plan [(name, shape)] of an original-layout plan and the function giving each tensor:
    the original's (`make(name, shape, seed)`, tiny.random_tensor) under its llava-hf name, in F16 (the
    values are f16-exact); the added vocabulary rows are drawn under their own name, so the first rows
    are the original's."""
    import torch

    source = {hf_name(name): (name, shape) for name, shape in plan}
    padded = hf_vocab_size(vocab)

    def values(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        original, orig_shape = source[name]
        t = make(original, orig_shape, seed)
        if original in VOCAB_ROWS:
            t = torch.cat([t, make(original + ".added_rows", (shape[0] - orig_shape[0], *shape[1:]), seed)])
        return t.to(torch.float16)

    hf_plan = [(hf_name(n), (padded, *shp[1:]) if n in VOCAB_ROWS else shp) for n, shp in plan]
    return hf_plan, values


def hf_config(flat: dict, vocab: int, vision: dict, dtype: str = "float16") -> dict:
    """config.json as llava-hf writes it for the flat original config `flat` (tiny.llava_config): nested
    configs that state only what differs from transformers' defaults, pinpoints as (height, width) so
    that transformers tiles as the original does."""
    text = {
        "_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": flat["hidden_size"], "intermediate_size": flat["intermediate_size"],
        "num_hidden_layers": flat["num_hidden_layers"], "num_attention_heads": flat["num_attention_heads"],
        "num_key_value_heads": flat["num_key_value_heads"], "max_position_embeddings": flat["max_position_embeddings"],
        "rms_norm_eps": flat["rms_norm_eps"], "pad_token_id": 0, "torch_dtype": dtype, "vocab_size": vocab,
    }
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if text[key] == LLAMA_DEFAULTS[key]:
            del text[key]
    if text["num_key_value_heads"] == flat["num_attention_heads"]:
        del text["num_key_value_heads"]
    return {
        "architectures": list(ARCHITECTURES),
        "ignore_index": -100,
        "image_grid_pinpoints": [list(p) for p in transpose(parse_pinpoints(flat["image_grid_pinpoints"]))],
        "image_token_index": HF_ADDED_TOKENS["<image>"],
        "model_type": "llava_next",
        "projector_hidden_act": "gelu",
        "text_config": text,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "transformers_version": "4.39.0.dev0",
        "use_image_newline_parameter": True,
        "vision_config": vision,
        "vision_feature_layer": flat["mm_vision_select_layer"],
        "vision_feature_select_strategy": "default",
        "vocab_size": vocab,
    }


def hf_vision_config(hidden: int, intermediate: int, layers: int, image: int, patch: int) -> dict:
    """vision_config as llava-hf writes it: the CLIPVisionConfig keys that differ from the defaults
    (and a stray vocab_size, as in the real file)."""
    cfg = {"hidden_size": hidden, "image_size": image, "intermediate_size": intermediate,
           "model_type": "clip_vision_model", "num_attention_heads": hidden // 64, "num_hidden_layers": layers,
           "patch_size": patch, "projection_dim": 768, "vocab_size": 32000}
    return {k: v for k, v in cfg.items() if k in ("model_type", "vocab_size") or CLIP_VISION_DEFAULTS.get(k) != v}


def write_hf_tokenizer_files(folder: Path) -> None:
    """The added-token files of llava-hf beside tokenizer.model (written by tiny._write_tokenizer_files),
    and tokenizer.json as transformers converts them (the llava-hf repos ship it too)."""
    (folder / "added_tokens.json").write_text(json.dumps(HF_ADDED_TOKENS, indent=2) + "\n")
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    for text, tok_id in HF_ADDED_TOKENS.items():
        cfg["added_tokens_decoder"][str(tok_id)] = {"content": text, "lstrip": False, "normalized": False,
                                                    "rstrip": False, "single_word": False, "special": True}
    cfg["pad_token"] = "<pad>"
    cfg["padding_side"] = "left"
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    special_file = folder / "special_tokens_map.json"
    special = json.loads(special_file.read_text())
    special["pad_token"] = {"content": "<pad>", "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False}
    special_file.write_text(json.dumps(special, indent=2) + "\n")

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="tokenizer-") as tmp:
        AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
        (folder / "tokenizer.json").write_bytes((Path(tmp) / "tokenizer.json").read_bytes())
