"""The llama.cpp recipe's `config_vit.json`, derived offline from a LLaVA checkpoint.

The recipe downloads it (cmp-nct/llava-1.6-gguf); `config_vit` builds it from config.json, the
vision tower's tensor shapes and the tower's CLIPVisionConfig (`vision_config.resolve_vision_config`),
checking the tower is whole (`tower_layers`). Step 03 (steps/vision_export.py) writes the mmproj's
metadata from it, and llama_cpp/legacy.py hands it to the recipe's own image-encoder script.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from .anyres import parse_pinpoints
from .vision_config import VisionConfigError, resolve_vision_config

log = logging.getLogger(__name__)

VIT_NAME = "vit-large336-custom"  # config_vit.json's `_name_or_path`, the mmproj's general.name
# The LLaVA keys of config.json the recipe's config_vit.json carries over (LLaVA 1.5 has the last three).
LLAVA_KEYS = ("image_grid_pinpoints", "image_crop_resolution", "image_aspect_ratio", "image_split_resolution",
              "mm_patch_merge_type", "mm_projector_type")
# The tower's layer index in a canonical tensor name.
LAYER = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.")
# What each layer of the tower must hold (canonical suffixes after encoder.layers.N.).
LAYER_TENSORS = tuple(f"{m}.{wb}" for m in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj",
                                            "self_attn.out_proj", "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")
                      for wb in ("weight", "bias"))
EMBEDDING_TENSORS = ("vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
                     "vision_model.embeddings.position_embedding.weight", "vision_model.pre_layrnorm.weight",
                     "vision_model.pre_layrnorm.bias")


class VisionExportError(ValueError):
    """The checkpoint's vision tower or config cannot be exported; names the file and the fix."""


def tower_layers(vision: dict[str, dict], where: str) -> int:
    """The tower's layer count, after checking every layer 0..N-1 and the embeddings are there."""
    found = {int(m.group(1)) for name in vision if (m := LAYER.match(name))}
    if not found or found != set(range(len(found))):
        raise VisionExportError(f"{where}: vision tower layers {sorted(found)} are not 0..N-1; incomplete checkpoint")
    missing = [n for n in EMBEDDING_TENSORS if n not in vision]
    missing += [f"vision_model.encoder.layers.{i}.{s}" for i in range(len(found)) for s in LAYER_TENSORS
                if f"vision_model.encoder.layers.{i}.{s}" not in vision]
    if missing:
        raise VisionExportError(f"{where}: vision tower tensors missing: {missing[:4]}{' ...' if len(missing) > 4 else ''}"
                                "; re-download the checkpoint")
    return len(found)


def config_vit(config: dict, vision: dict[str, dict], where: str = "config.json",
               override: str | Path | None = None) -> dict:
    """The config_vit.json of the recipe, from config.json, the tower's shapes and its CLIPVisionConfig
    (`vision_config.resolve_vision_config`: params convert.vision_config = `override`, the one
    config.json carries, or a known tower's).

    `vision`: canonical name -> anything with a "shape" (manifest entries)."""
    n_layers = tower_layers(vision, where)
    shape = {name: tuple(t["shape"]) for name, t in vision.items()}
    try:
        tower = resolve_vision_config(config, shape, where, override)
    except VisionConfigError as err:
        raise VisionExportError(str(err)) from None
    hidden = tower["hidden_size"]
    feature = config.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise VisionExportError(f"{where}: mm_vision_select_feature {feature!r} is not supported; llama.cpp's llava "
                                "graph feeds the projector the patch tokens only ('patch')")
    select = config.get("mm_vision_select_layer", -2)
    keep = (n_layers + select + 1 if select < 0 else select) if isinstance(select, int) else 0
    if not 1 <= keep <= n_layers:
        raise VisionExportError(f"{where}: mm_vision_select_layer {select!r} is outside the tower's {n_layers} layers")
    if config.get("mm_hidden_size", hidden) != hidden:
        raise VisionExportError(f"{where}: mm_hidden_size {config['mm_hidden_size']} != vision width {hidden} "
                                "of the tower's tensors; config.json and weights disagree")
    if config.get("mm_patch_merge_type") == "spatial_unpad" and "image_newline" not in vision:
        raise VisionExportError(f"{where}: mm_patch_merge_type spatial_unpad (LLaVA 1.6) needs the image_newline "
                                "tensor, which the checkpoint lacks; incomplete download?")
    log.info("vision tower config from %s: %d heads", tower["source"], tower["num_attention_heads"])
    cfg = {
        "_name_or_path": VIT_NAME,
        "architectures": ["CLIPVisionModel"],
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "hidden_act": tower["hidden_act"],
        "hidden_size": hidden,
        "image_size": tower["image_size"],
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": tower["intermediate_size"],
        "layer_norm_eps": tower["layer_norm_eps"],
        "model_type": "clip_vision_model",
        "num_attention_heads": tower["num_attention_heads"],
        "num_channels": tower["num_channels"],
        "num_hidden_layers": keep + 1,
        "patch_size": tower["patch_size"],
        "projection_dim": tower["projection_dim"],
        "torch_dtype": "float32",
    }
    cfg.update({k: config[k] for k in LLAVA_KEYS if k in config})
    if "image_grid_pinpoints" in cfg:
        try:
            cfg["image_grid_pinpoints"] = [list(p) for p in parse_pinpoints(cfg["image_grid_pinpoints"])]
        except ValueError as err:
            raise VisionExportError(f"{where}: {err}") from None
    return cfg
