"""Step 03: the vision tower and projector as llama.cpp's `mmproj-model-f16.gguf`.

Written from the checkpoint's tensors with gguf-py's `GGUFWriter`, one tensor at a time; equivalent to
what llama.cpp's recipe writes:

    llava_surgery_v2.py -C -m <model>                       # llava.clip + llava.projector
    convert_image_encoder_to_gguf.py -m vit --llava-projector vit/llava.projector \\
        --output-dir vit --clip-model-is-vision             # vit/config.json = config_vit.json

(`legacy.py` runs that recipe; the tests compare both files key by key and tensor by tensor).

Where the vision configuration comes from
-----------------------------------------
The recipe downloads `config_vit.json` (cmp-nct/llava-1.6-gguf); `config_vit.config_vit()` builds it offline:

- the tower's CLIPVisionConfig, checked against the tensors (`vision_config.py` says where it comes
  from): the head count, activation (`clip.use_gelu`), epsilon and projection_dim.
- from config.json: `mm_vision_select_layer` (-2: the penultimate layer feeds the projector, so
  later layers and post_layernorm are dropped) and the LLaVA keys present: image_aspect_ratio,
  image_crop_resolution, image_split_resolution, mm_patch_merge_type, mm_projector_type (LLaVA 1.5
  has the last three), image_grid_pinpoints, written as (width, height), llama.cpp's order: the
  original layout's as they are, llava-hf's (height, width) transposed, LlavaNextConfig's default
  with a warning when a llava-hf config.json has none (`anyres`).
- CLIP's image_mean and image_std (the script's defaults); general.name "vit-large336-custom"
  (config_vit.json's `_name_or_path`).

`num_hidden_layers` is the layers kept plus one: the script drops the last layer when the config
names no feature layer (config_vit.json names none); for select layer -2 it is the checkpoint's
layer count (24 for the 7B, 23 kept, block_count 23).

Types, as the script writes them: the patch convolution and the projector's matrices f16 (also for
`convert.mmproj_outtype: f32`, like --use-f32), the tower's 2-D `.weight` matrices the outtype, the rest f32.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from gguf import (GGUFWriter, KEY_ATTENTION_HEAD_COUNT, KEY_ATTENTION_LAYERNORM_EPS, KEY_BLOCK_COUNT,
                  KEY_EMBEDDING_LENGTH, KEY_FEED_FORWARD_LENGTH)
from tqdm.auto import tqdm

from ..checks import image_sequence as image_sequence_check, vision as vision_check
from ..checks.hf import HFCheck, verify_hf
from ..model.anyres import missing_pinpoints_warning
from ..model.config_vit import LAYER, VisionExportError, config_vit
from ..model.gguf_io import metadata_table, read_gguf, tensor_table
from ..model.hf_layout import apply_vision_config, llava_config
from ..model.layout import PROJECTOR, VISION
from ..model.manifest import load_manifest, open_checked, part_tensors
from ..model.quant_types import MMPROJ_OUTTYPES
from ..model.vision_config import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD
from ..run import diskspace
from ..run.workspace import Run, atomic_path, params_vision_config, repo_root

log = logging.getLogger(__name__)

ARCH = "clip"
VISION_PREFIX = "clip.vision"
DESCRIPTION = "image encoder for LLaVA"
PROJECTOR_TYPE = "mlp"  # the script's --projector-type default: LLaVA's 2-layer MLP
OUTTYPES = MMPROJ_OUTTYPES
FILE_TYPES = {"f32": 0, "f16": 1}  # general.file_type as the script writes it (its ftype)

# Canonical name (see layout.py) -> GGUF name, in the order the script writes them; None: dropped.
# The legacy names are the script's string replacements: mlp.fc1 (hidden -> intermediate) becomes
# `ffn_down` and fc2 `ffn_up`, the reverse of llama.cpp's usual meaning; clip.cpp knows and swaps.
TENSOR_NAMES: list[tuple[str, str | None]] = [
    (r"mm_projector\.(\d+)\.(weight|bias)", r"mm.\1.\2"),
    (r"image_newline", "model.image_newline"),
    (r"vision_model\.embeddings\.class_embedding", "v.class_embd"),
    (r"vision_model\.embeddings\.patch_embedding\.weight", "v.patch_embd.weight"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "v.position_embd.weight"),
    (r"vision_model\.pre_layrnorm\.(weight|bias)", r"v.pre_ln.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"v.blk.\1.attn_k.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"v.blk.\1.attn_v.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"v.blk.\1.attn_q.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"v.blk.\1.attn_out.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"v.blk.\1.ln1.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"v.blk.\1.ffn_down.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"v.blk.\1.ffn_up.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"v.blk.\1.ln2.\2"),
    # LLaVA feeds the projector the penultimate layer's output, never post_layernorm's.
    (r"vision_model\.post_layernorm\.(weight|bias)", None),
]
_RULES = [(re.compile(p + "$"), repl) for p, repl in TENSOR_NAMES]
@dataclass(frozen=True)
class MmprojTensor:
    stored: str  # name in the checkpoint
    canonical: str
    gguf: str
    shape: tuple[int, ...]  # numpy order, after the script's squeeze()
    dtype: str  # "float16" | "float32"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclass
class VisionResult:
    path: Path
    n_tensors: int
    size_bytes: int
    outtype: str
    config: dict = field(default_factory=dict)  # the derived config_vit.json
    plan: list = field(default_factory=list, repr=False)  # the MmprojTensor list written
    check: "vision_check.VisionReport | None" = field(default=None, repr=False)  # convert.verify
    hf_check: "HFCheck | None" = field(default=None, repr=False)  # llava-hf: transformers' LlavaNext
    sequence: "image_sequence_check.ImageSequenceReport | None" = field(default=None, repr=False)  # whole images
    warnings: list[str] = field(default_factory=list)  # e.g. llava-hf pinpoints taken from the default

    @property
    def ok(self) -> bool:
        """The export is sound: the check passed, or disagreed only by a known llama.cpp defect."""
        return ((self.check is None or self.check.export_ok)
                and (self.sequence is None or self.sequence.export_ok)
                and (self.hf_check is None or self.hf_check.status != "failed"))

    @property
    def message(self) -> str:
        parts = [self.check.message if self.check is not None else "not verified"]
        parts += [self.sequence.message] if self.sequence is not None else []
        parts += [self.hf_check.message] if self.hf_check is not None and self.hf_check.status != "skipped" else []
        return "\n".join(parts + [f"WARNING: {w}" for w in self.warnings])

    size_mib = property(lambda self: self.size_bytes / 2**20)

    def table(self) -> pd.DataFrame:
        return tensor_table(self.path)

    def metadata(self) -> pd.DataFrame:
        return metadata_table(self.path)


# ----------------------------------------------------------------------------- names
def gguf_name(canonical: str) -> str | None:
    """The GGUF name of a canonical tensor name; None when the export drops it."""
    for pattern, repl in _RULES:
        if pattern.match(canonical):
            return pattern.sub(repl, canonical) if repl else None
    raise VisionExportError(f"no GGUF name for tensor '{canonical}' (not a CLIP vision tower / LLaVA projector "
                            "tensor); extend vision.TENSOR_NAMES if llama.cpp supports it")


def _order_key(canonical: str) -> tuple:
    """The script's order: the projector as llava.projector lists it (sorted by name, as safetensors'
    keys() gives them), then image_newline, then the tower in CLIPVisionModel.state_dict() order."""
    row = next(i for i, (p, _) in enumerate(_RULES) if p.match(canonical))
    layer = LAYER.match(canonical)
    if canonical.startswith("mm_projector."):
        return (0, row, canonical)
    return (int(layer.group(1)) + 1 if layer else 0, row, "", canonical.endswith(".bias"))


def name_map_table() -> pd.DataFrame:
    """The canonical -> GGUF name rules as a table (None: dropped)."""
    return pd.DataFrame(TENSOR_NAMES, columns=["canonical (regex)", "gguf"])


# ----------------------------------------------------------------------------- configuration
def block_count(vcfg: dict) -> int:
    """The layers written: all but the last of the derived config (see the module docstring)."""
    return vcfg["num_hidden_layers"] - 1


def metadata(vcfg: dict, outtype: str = "f16") -> list[tuple[str, str, object]]:
    """(key, GGUFWriter method, value) in the script's order, after general.architecture."""
    v = VISION_PREFIX
    kv: list[tuple[str, str, object]] = [
        ("clip.has_text_encoder", "add_bool", False),
        ("clip.has_vision_encoder", "add_bool", True),
        ("clip.has_llava_projector", "add_bool", True),
        ("general.file_type", "add_uint32", FILE_TYPES[outtype]),
        ("general.name", "add_string", vcfg["_name_or_path"]),
        ("general.description", "add_string", DESCRIPTION),
        ("clip.projector_type", "add_string", PROJECTOR_TYPE),
        (f"{v}.image_size", "add_uint32", vcfg["image_size"]),
        (f"{v}.patch_size", "add_uint32", vcfg["patch_size"]),
        (KEY_EMBEDDING_LENGTH.format(arch=v), "add_uint32", vcfg["hidden_size"]),
        (KEY_FEED_FORWARD_LENGTH.format(arch=v), "add_uint32", vcfg["intermediate_size"]),
        (f"{v}.projection_dim", "add_uint32", vcfg["projection_dim"]),
        (KEY_ATTENTION_HEAD_COUNT.format(arch=v), "add_uint32", vcfg["num_attention_heads"]),
        (KEY_ATTENTION_LAYERNORM_EPS.format(arch=v), "add_float32", vcfg["layer_norm_eps"]),
        (KEY_BLOCK_COUNT.format(arch=v), "add_uint32", block_count(vcfg)),
    ]
    if "image_grid_pinpoints" in vcfg:
        kv.append((f"{v}.image_grid_pinpoints", "add_array", [p for pair in vcfg["image_grid_pinpoints"] for p in pair]))
    for key, method in (("image_crop_resolution", "add_uint32"), ("image_aspect_ratio", "add_string"),
                        ("image_split_resolution", "add_uint32"), ("mm_patch_merge_type", "add_string"),
                        ("mm_projector_type", "add_string")):
        if key in vcfg:
            kv.append((f"{v}.{key}", method, vcfg[key]))
    kv += [
        (f"{v}.image_mean", "add_array", list(CLIP_IMAGE_MEAN)),
        (f"{v}.image_std", "add_array", list(CLIP_IMAGE_STD)),
        ("clip.use_gelu", "add_bool", vcfg["hidden_act"] == "gelu"),
    ]
    return kv


# ----------------------------------------------------------------------------- tensors
def out_dtype(part: str, ndim: int, gguf: str, outtype: str) -> str:
    if ndim == 4:
        return "float16"  # the patch convolution: ggml's conv wants an f16 kernel
    if part == PROJECTOR:
        return "float16" if ndim == 2 else "float32"  # as the script: f16 matrices even with --use-f32
    if outtype == "f16" and ndim == 2 and gguf.endswith(".weight"):
        return "float16"
    return "float32"


def mmproj_tensors(manifest: dict, vcfg: dict, outtype: str = "f16") -> list[MmprojTensor]:
    """Every tensor of the mmproj file, in writing order, from the manifest (no tensor read)."""
    keep = block_count(vcfg)
    plan = []
    for part in (PROJECTOR, VISION):
        for canonical, t in part_tensors(manifest, part).items():
            layer = LAYER.match(canonical)
            name = gguf_name(canonical)
            if name is None or (layer and int(layer.group(1)) >= keep):
                continue
            shape = tuple(d for d in t["shape"] if d != 1)  # the script squeeze()s every tensor
            plan.append(MmprojTensor(t["stored"], canonical, name, shape, out_dtype(part, len(shape), name, outtype)))
    return sorted(plan, key=lambda p: _order_key(p.canonical))


def mmproj_name(outtype: str) -> str:
    return f"mmproj-model-{outtype}.gguf"


def plan_mmproj(manifest: dict, outtype: str = "f16",
                vision_config_file: str | Path | None = None) -> tuple[dict, list[MmprojTensor]]:
    """The derived vision config and the tensors to write; every check, nothing read or written.
    `vision_config_file`: params convert.vision_config (see `config_vit.config_vit`)."""
    if outtype not in OUTTYPES:
        raise VisionExportError(f"convert.mmproj_outtype must be one of {OUTTYPES}, not {outtype!r}")
    where = str(Path(manifest["source"]) / "config.json")
    tensors = {**part_tensors(manifest, VISION), **part_tensors(manifest, PROJECTOR)}
    if manifest.get("layout") == "llava-hf":  # nested config.json: see hf_layout
        vcfg = apply_vision_config(config_vit(llava_config(manifest["config"]), tensors, where, vision_config_file),
                                   manifest["config"], where)
    else:
        vcfg = config_vit(manifest["config"], tensors, where, vision_config_file)
    proj_in = tuple(tensors["mm_projector.0.weight"]["shape"])[1]
    if proj_in != vcfg["hidden_size"]:
        raise VisionExportError(f"{where}: mm_projector.0 takes width {proj_in}, the tower gives "
                                f"{vcfg['hidden_size']}; the projector belongs to another tower")
    return vcfg, mmproj_tensors(manifest, vcfg, outtype)


def export_mmproj(manifest: dict, out_path: str | Path, outtype: str = "f16",
                  vision_config_file: str | Path | None = None) -> VisionResult:
    """Write the mmproj GGUF for a surgery manifest; validates everything before the file is opened."""
    vcfg, plan = plan_mmproj(manifest, outtype, vision_config_file)
    where = str(Path(manifest["source"]) / "config.json")
    warned = missing_pinpoints_warning(manifest["config"], where) if manifest.get("layout") == "llava-hf" else None
    warnings = [warned] if warned else []
    for warning in warnings:
        log.warning("%s", warning)
    out_path = Path(out_path)
    nbytes = sum(t.nbytes for t in plan)
    diskspace.ensure_space(out_path, nbytes, "the mmproj GGUF")
    with open_checked(manifest) as ckpt, atomic_path(out_path) as tmp, \
            diskspace.disk_errors(out_path, nbytes, "the mmproj GGUF", tmp):
        writer = GGUFWriter(path=None, arch=ARCH)
        try:
            for key, method, value in metadata(vcfg, outtype):
                getattr(writer, method)(key, value)
            for t in plan:
                writer.add_tensor_info(t.gguf, t.shape, np.dtype(t.dtype), t.nbytes)
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tqdm(plan, desc="mmproj", unit="tensor"):
                # bf16 -> f32 is exact; f32 -> f16 rounds as the script's numpy astype does.
                data = ckpt.load(t.stored).float().numpy().reshape(t.shape).astype(t.dtype)
                writer.write_tensor_data(data)
        finally:
            writer.close()
    size = out_path.stat().st_size
    log.info("%s: %d tensors, %.1f MiB (%s)", out_path, len(plan), size / 2**20, outtype)
    return VisionResult(out_path, len(plan), size, outtype, vcfg, plan, warnings=warnings)


def run_vision(run: Run) -> VisionResult:
    """Step 03: export the run's vision tower + projector (artifact `mmproj`) from the surgery
    manifest, then check llama.cpp's image embeddings against PyTorch (`convert.verify`): one
    336 px slice (`checks/vision.py`) and whole images in LLaVA 1.6's sequence (`checks/image_sequence.py`)."""
    manifest = load_manifest(run.artifact_path("surgery"), repo_root())
    outtype = run.params.convert.mmproj_outtype
    result = export_mmproj(manifest, run.dir / "models" / mmproj_name(outtype), outtype,
                           params_vision_config(run.params))
    run.record("mmproj", result.path)
    result.check = vision_check.verify_run(run)
    result.sequence = image_sequence_check.verify_image_sequence(run)
    result.hf_check = verify_hf(run, "vision")  # skipped unless the checkpoint is in the llava-hf layout
    return result


# ----------------------------------------------------------------------------- reading back
def read_metadata(path: str | Path) -> dict[str, object]:  # every key/value, decoded to Python values
    return read_gguf(path, "mmproj").fields


def llama_cpp_tools(params) -> tuple[list[str], list[str]]:  # (required, optional): the checks skip without it
    return [], (["llama-mtmd-debug"] if params.convert.verify and params.model.format != "gguf" else [])
