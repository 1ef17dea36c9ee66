"""Which part of a LLaVA checkpoint a tensor belongs to, per checkpoint layout.

Layouts are data tables: a prefix rule maps a stored tensor name to (part, canonical name).
Canonical names are what the exporters consume: the text model in Hugging Face Llama names
(`model.layers.N...`, `lm_head.weight`), the vision tower in `CLIPVisionModel` names
(`vision_model.*`), the projector as `mm_projector.{0,2}.*` and `image_newline`.

Two layouts are converted: the original LLaVA layout ('llava': liuhaotian/llava-v1.5-*, llava-v1.6-*)
and the transformers layout of LLaVA 1.6 ('llava-hf': llava-hf/llava-v1.6-*-hf,
LlavaNextForConditionalGeneration; its config and vocabulary are read by `hf_layout`). The transformers
layout of LLaVA 1.5 (LlavaForConditionalGeneration) is refused with a precise message
(UNSUPPORTED_ARCHITECTURES).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .hf_layout import HFLayoutError, llava_config

TEXT, VISION, PROJECTOR, IGNORED = "text", "vision", "projector", "ignored"

# (regex on the stored name, part, replacement producing the canonical name)
Rule = tuple[str, str, str]

LAYOUTS: dict[str, list[Rule]] = {
    # liuhaotian/llava-v1.5-*, llava-v1.6-* (LlavaLlamaForCausalLM), safetensors or .bin
    "llava": [
        (r"^model\.vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids$", IGNORED, ""),
        (r"^model\.vision_tower\.vision_tower\.(vision_model\..+)$", VISION, r"\1"),
        (r"^model\.mm_projector\.(\d+\.(?:weight|bias))$", PROJECTOR, r"mm_projector.\1"),
        (r"^model\.image_newline$", PROJECTOR, "image_newline"),
        (r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$", IGNORED, ""),
        (r"^(model\.(?:embed_tokens|norm|layers\.\d+\.[\w.]+)\.weight)$", TEXT, r"\1"),
        (r"^(lm_head\.weight)$", TEXT, r"\1"),
    ],
    # llava-hf/llava-v1.6-*-hf (LlavaNextForConditionalGeneration), before and after the
    # transformers 4.52 renaming (language_model.model.* -> model.language_model.*); transformers 5
    # saves the tower without its `vision_model.` level (vision_tower.embeddings.*).
    "llava-hf": [
        (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?embeddings\.position_ids$", IGNORED, ""),
        (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?((?:embeddings|pre_layrnorm|encoder|post_layernorm)\..+)$",
         VISION, r"vision_model.\1"),
        (r"^(?:model\.)?multi_modal_projector\.linear_1\.(weight|bias)$", PROJECTOR, r"mm_projector.0.\1"),
        (r"^(?:model\.)?multi_modal_projector\.linear_2\.(weight|bias)$", PROJECTOR, r"mm_projector.2.\1"),
        (r"^(?:model\.)?image_newline$", PROJECTOR, "image_newline"),
        (r"^language_model\.model\.(.+)$", TEXT, r"model.\1"),
        (r"^model\.language_model\.(.+)$", TEXT, r"model.\1"),
        (r"^(?:language_model\.)?(lm_head\.weight)$", TEXT, r"\1"),
    ],
}

_COMPILED = {name: [(re.compile(p), part, repl) for p, part, repl in rules] for name, rules in LAYOUTS.items()}


@dataclass(frozen=True)
class Placement:
    stored: str
    part: str  # TEXT, VISION, PROJECTOR, IGNORED, or "unknown"
    canonical: str


def detect_layout(config: dict, tensor_names: list[str] | set[str]) -> str:
    """'llava' or 'llava-hf', from config.json's architectures and the tensor names."""
    archs = config.get("architectures") or []
    if any(a.startswith(("LlavaNext", "LlavaForConditional")) for a in archs) or \
            any(n.startswith(("multi_modal_projector.", "model.multi_modal_projector.")) for n in tensor_names):
        return "llava-hf"
    return "llava"


def place(name: str, layout: str) -> Placement:
    for pattern, part, repl in _COMPILED[layout]:
        if pattern.match(name):
            return Placement(name, part, pattern.sub(repl, name) if repl else "")
    return Placement(name, "unknown", "")


# ---------------------------------------------------------------------------- the split
SUPPORTED_PROJECTORS = ("mlp2x_gelu",)
# The canonical tensors each projector type must have (image_newline comes on top in LLaVA 1.6).
PROJECTOR_TENSORS = {
    "mlp2x_gelu": ("mm_projector.0.weight", "mm_projector.0.bias", "mm_projector.2.weight", "mm_projector.2.bias"),
}

# Architectures that are detected (so the error is precise) but not converted, and what to use instead.
UNSUPPORTED_ARCHITECTURES = {
    "LlavaForConditionalGeneration": (
        "the Hugging Face transformers layout of LLaVA 1.5 (llava-hf/llava-1.5-*-hf) is detected but not "
        "converted (only LLaVA 1.6's LlavaNextForConditionalGeneration is). Use the original release of the "
        "same weights instead: set model.repo to liuhaotian/llava-v1.5-7b, or point model.path at such a folder"),
}


class LayoutError(ValueError):
    """The checkpoint is not a LLaVA checkpoint this project can split; names the file and why."""


@dataclass(frozen=True)
class SplitTensor:
    stored: str
    canonical: str
    part: str
    shard: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class Split:
    """Every tensor of a checkpoint assigned to text / vision / projector (or ignored)."""

    layout: str
    parts: dict[str, list[SplitTensor]]

    def part(self, name: str) -> dict[str, SplitTensor]:
        """canonical name -> tensor, for one part."""
        return {t.canonical: t for t in self.parts.get(name, [])}

    @property
    def llava_version(self) -> str:
        """'1.6' when the checkpoint has image_newline (anyres + spatial_unpad), else '1.5'."""
        return "1.6" if "image_newline" in self.part(PROJECTOR) else "1.5"


def split_checkpoint(ckpt) -> Split:
    """Classify every tensor of a `Checkpoint`; refuse what cannot be converted, before any write."""
    config_file = ckpt.path / "config.json"
    archs = ckpt.config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise LayoutError(f"{config_file}: key 'architectures' is {archs!r}, not a list of class names "
                          "(e.g. [\"LlavaLlamaForCausalLM\"]); fix or replace config.json")
    lay = detect_layout(ckpt.config, set(ckpt.tensors))
    parts: dict[str, list[SplitTensor]] = {TEXT: [], VISION: [], PROJECTOR: [], IGNORED: []}
    unknown, seen = [], {}
    for info in ckpt:
        p = place(info.name, lay)
        if p.part == "unknown":
            unknown.append(f"{info.name} ({info.shard})")
            continue
        if p.part != IGNORED:
            if p.canonical in seen:
                raise LayoutError(f"{ckpt.path / info.shard}: '{info.name}' and '{seen[p.canonical]}' are both "
                                  f"{p.canonical}; the checkpoint mixes two layouts")
            seen[p.canonical] = info.name
        parts[p.part].append(SplitTensor(info.name, p.canonical, p.part, info.shard, info.dtype, info.shape))
    refused = [a for a in ckpt.config.get("architectures") or [] if a in UNSUPPORTED_ARCHITECTURES]
    if refused:
        raise LayoutError(f"{config_file}: layout '{lay}' ({refused[0]}): {UNSUPPORTED_ARCHITECTURES[refused[0]]}.")
    config = ckpt.config
    if lay == "llava-hf":
        try:
            config = llava_config(config)
        except HFLayoutError as err:
            raise LayoutError(f"{config_file}: {str(err).removeprefix('config.json: ')}") from None
    if unknown:
        raise LayoutError(f"{ckpt.path}: {len(unknown)} tensor(s) of no known part in layout '{lay}': "
                          f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    if not parts[PROJECTOR]:
        raise LayoutError(f"{ckpt.path}: no mm_projector tensors: not a LLaVA checkpoint (a plain language "
                          "model?). Point model.path / model.repo at a LLaVA checkpoint.")
    proj_type = config.get("mm_projector_type")
    if proj_type is None:
        # LLaVA's own builder then makes a 'linear' projector; LLaVA 1.5 and 1.6 always name theirs.
        raise LayoutError(f"{config_file}: key 'mm_projector_type' is missing; LLaVA 1.5 and 1.6 checkpoints set it "
                          f"to one of: {', '.join(SUPPORTED_PROJECTORS)} (mm_projector.0 and .2 tensors, as this "
                          "checkpoint should have). Use the checkpoint's original config.json")
    if proj_type not in SUPPORTED_PROJECTORS:
        raise LayoutError(f"{config_file}: mm_projector_type {proj_type!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_PROJECTORS)}, the projector of LLaVA 1.5 and 1.6); "
                          "llama.cpp's legacy llava path has no graph for other LLaVA projectors")
    have = {t.canonical: t for t in parts[PROJECTOR]}
    missing = [n for n in PROJECTOR_TENSORS[proj_type] if n not in have]
    extra = sorted(set(have) - set(PROJECTOR_TENSORS[proj_type]) - {"image_newline"})
    if missing or extra:
        raise LayoutError(f"{ckpt.path}: projector tensors do not match mm_projector_type {proj_type!r} in "
                          f"{config_file.name}: missing {missing}, unexpected {[have[n].stored for n in extra]}; "
                          "an incomplete download or a different projector type")
    if not parts[VISION]:
        raise LayoutError(f"{ckpt.path}: no vision tower tensors (model.vision_tower.*); this checkpoint "
                          "relies on a separate CLIP download, which is not supported offline")
    return Split(layout=lay, parts=parts)
