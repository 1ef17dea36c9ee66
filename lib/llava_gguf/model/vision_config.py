"""The vision tower's CLIPVisionConfig: given, carried by the checkpoint, or known by name; never guessed.

An original LLaVA checkpoint names its tower (`mm_vision_tower` in config.json) instead of
describing it. The weights fix the sizes (width, MLP width, layers, patch and image size) but
not the head count, the activation or the layer-norm epsilon, and a wrong head count gives a
GGUF that loads and computes the wrong attention. `resolve_vision_config` takes them, in order:

1. from params `convert.vision_config`: a CLIPVisionConfig JSON such as the recipe's
   `config_vit.json` (or a CLIP config.json with a nested `vision_config`);
2. from the checkpoint's own config.json, when it carries a `vision_config` object (the
   transformers LLaVA layout does; so do the project's synthetic tiny checkpoints);
3. from `KNOWN_TOWERS` when `mm_vision_tower` names a tower listed there and the tensor shapes
   are that tower's.

Keys a config omits take CLIPVisionConfig's defaults (as transformers reads such a file). Every
size is checked against the tensor shapes and the head count must divide the width; anything
else is refused before a file is written, naming `convert.vision_config` and the fix.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

# CLIP's pixel normalisation (openai/clip-vit-*, as the CLIP image processor applies it).
CLIP_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

PARAMS_KEY = "convert.vision_config"
# transformers' CLIPVisionConfig defaults: what a key left out of a config file means.
CLIP_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 512, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
# The CLIP towers LLaVA releases name in mm_vision_tower, from their config.json on the Hub
# (vision_config): LLaVA 1.5 / 1.6 use the 336 px one, LLaVA 1.0 and some fine-tunes the 224 px one.
_VIT_L14 = {"hidden_size": 1024, "intermediate_size": 4096, "projection_dim": 768, "num_hidden_layers": 24,
            "num_attention_heads": 16, "num_channels": 3, "patch_size": 14, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5}
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": {**_VIT_L14, "image_size": 336},
    "openai/clip-vit-large-patch14": {**_VIT_L14, "image_size": 224},
}
# What llama.cpp's CLIP graph computes (`clip.use_gelu` picks between the two).
SUPPORTED_ACTS = ("quick_gelu", "gelu")
# The sizes that must equal the tensor shapes.
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_channels", "patch_size", "image_size")

FIX = (f"set params {PARAMS_KEY} to the tower's CLIPVisionConfig JSON (the recipe's config_vit.json, or the "
       "config.json of the tower's repo); paths are relative to the repo root")


class VisionConfigError(ValueError):
    """The tower's config is missing, unreadable or contradicts the weights; names the file and the fix."""


def tower_shapes(shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, int]:
    """The sizes the tensors fix, from canonical vision tensor names -> shapes."""
    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise VisionConfigError(f"{where}: vision tower tensor {name} is missing; re-download the checkpoint")
        return tuple(shapes[name])

    hidden = shape("vision_model.embeddings.class_embedding")[0]
    _, channels, patch, patch_w = shape("vision_model.embeddings.patch_embedding.weight")
    n_pos = shape("vision_model.embeddings.position_embedding.weight")[0]
    grid = math.isqrt(max(n_pos - 1, 0))
    if patch != patch_w or grid * grid != n_pos - 1:
        raise VisionConfigError(f"{where}: a square ViT expected (patch {patch}x{patch_w}, {n_pos} positions)")
    layers = {int(name.split(".")[3]) for name in shapes if name.startswith("vision_model.encoder.layers.")}
    return {"hidden_size": hidden, "intermediate_size": shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0],
            "num_hidden_layers": len(layers), "num_channels": channels, "patch_size": patch, "image_size": grid * patch}


def read_vision_config(path: str | Path) -> dict:
    """A CLIPVisionConfig JSON file (a nested `vision_config` object is used when present)."""
    path = Path(path)
    if not path.is_file():
        raise VisionConfigError(f"{path}: vision config not found (params {PARAMS_KEY}; absolute, or relative to "
                                "the repo root)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VisionConfigError(f"{path}: not valid JSON ({err}); {PARAMS_KEY} must name a CLIPVisionConfig "
                                "JSON file") from None
    if isinstance(data, dict) and isinstance(data.get("vision_config"), dict):
        data = data["vision_config"]
    if not isinstance(data, dict):
        raise VisionConfigError(f"{path}: expected a JSON object (a CLIPVisionConfig), got {type(data).__name__}")
    return data


def check_vision_config(cfg: dict, shapes: dict[str, int], where: str) -> dict:
    """`cfg` with CLIPVisionConfig's defaults filled in, checked against the tensor sizes."""
    model_type = cfg.get("model_type", "clip_vision_model")
    if model_type not in ("clip_vision_model", "clip"):
        raise VisionConfigError(f"{where}: model_type {model_type!r} is not a CLIP vision tower; llama.cpp's LLaVA "
                                "path runs CLIP ViTs only")
    out = {**CLIP_VISION_DEFAULTS, **{k: v for k, v in cfg.items() if k in CLIP_VISION_DEFAULTS}}
    for key, value in out.items():
        kind = str if key == "hidden_act" else float if key == "layer_norm_eps" else int
        ok = isinstance(value, str) if kind is str else (isinstance(value, (int, float)) and not isinstance(value, bool)
                                                          and (kind is float or value == int(value)))
        if not ok:
            raise VisionConfigError(f"{where}: '{key}' must be {'a string' if kind is str else 'a number'}, "
                                    f"got {value!r}")
        out[key] = kind(value)
    wrong = [f"{k} {out[k]} (weights: {shapes[k]})" for k in SHAPE_KEYS if out[k] != shapes[k]]
    if wrong:
        raise VisionConfigError(f"{where}: does not describe this checkpoint's vision tower: {', '.join(wrong)}. "
                                f"Use the config of the tower the checkpoint was trained with ({FIX})")
    heads = out["num_attention_heads"]
    if heads <= 0 or out["hidden_size"] % heads:
        raise VisionConfigError(f"{where}: num_attention_heads {heads} does not divide hidden_size "
                                f"{out['hidden_size']}")
    if out["hidden_act"] not in SUPPORTED_ACTS:
        raise VisionConfigError(f"{where}: hidden_act {out['hidden_act']!r} is not supported (llama.cpp's CLIP graph "
                                f"has {', '.join(SUPPORTED_ACTS)})")
    if not out["layer_norm_eps"] > 0:
        raise VisionConfigError(f"{where}: layer_norm_eps must be > 0, got {out['layer_norm_eps']}")
    if not out["projection_dim"] > 0:
        raise VisionConfigError(f"{where}: projection_dim must be > 0, got {out['projection_dim']}")
    return out


def resolve_vision_config(config: dict, shapes: dict[str, tuple[int, ...]], where: str,
                          override: str | Path | None = None) -> dict:
    """The tower's CLIPVisionConfig values (CLIP_VISION_DEFAULTS' keys) plus 'source': where they came from.

    `config`: the checkpoint's config.json; `shapes`: canonical vision tensor name -> shape;
    `where`: the config.json path for messages; `override`: params convert.vision_config (resolved)."""
    sizes = tower_shapes(shapes, where)
    if override is not None:
        cfg = check_vision_config(read_vision_config(override), sizes, f"{override} ({PARAMS_KEY})")
        return {**cfg, "source": str(override)}
    carried = config.get("vision_config")
    if carried is not None:
        if not isinstance(carried, dict):
            raise VisionConfigError(f"{where}: 'vision_config' must be an object (a CLIPVisionConfig), got "
                                    f"{type(carried).__name__}; fix it, or {FIX}")
        return {**check_vision_config(carried, sizes, f"{where} (vision_config)"), "source": f"{where} (vision_config)"}
    tower = config.get("mm_vision_tower")
    known = KNOWN_TOWERS.get(tower) if isinstance(tower, str) else None
    if known is None:
        named = f"mm_vision_tower {tower!r}" if tower else "no mm_vision_tower"
        raise VisionConfigError(
            f"{where}: names {named}, not a tower this project knows ({', '.join(KNOWN_TOWERS)}), and carries no "
            f"vision_config; the head count, activation and layer-norm epsilon cannot be read from the weights: {FIX}")
    wrong = [f"{k} {sizes[k]} (named tower: {known[k]})" for k in SHAPE_KEYS if sizes[k] != known[k]]
    if wrong:
        raise VisionConfigError(
            f"{where}: the vision tower's tensors are not those of {tower}, the tower mm_vision_tower names: "
            f"{', '.join(wrong)}; its head count cannot be known from the weights: {FIX}")
    return {**known, "source": f"{tower} (known tower, {where} mm_vision_tower)"}
