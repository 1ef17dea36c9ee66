"""mmproj copies for 07_tune: an image-token budget or a q8_0 weight type, everything else unchanged.

Budget: only `clip.vision.image_grid_pinpoints` differs. With pinpoints the pinned llama.cpp tiles an
image into an overview plus the best-fitting grid of image_size views (LLaVA 1.6 anyres); without the
key it uses one image_size view (576 tokens for the 336-px tower). The token count of each budget is
read from llama-mtmd-cli's log, never assumed (builds arrange the tiles differently).

q8_0: the pinned llama-quantize only takes language models and this llama.cpp has no mmproj quantizer,
so gguf-py writes it: 2-D f16/f32 `.weight` matrices (attention, feed-forward, projector) become Q8_0,
convolution kernels and embedding tables stay as they are.
"""
from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np

from ..checks import vision as vision_check
from ..checks.numeric import nmse
from ..llama_cpp import toolchain
from ..model.gguf_io import read_gguf
from ..run.workspace import Run, atomic_path

log = logging.getLogger(__name__)

PINPOINTS_KEY = "clip.vision.image_grid_pinpoints"
# Tensors kept as they are in a q8_0 mmproj: convolution kernels and embedding tables (the
# encoder adds or gathers them), and anything that is not a 2-D f16/f32 weight matrix.
_KEEP_IN_Q8 = ("patch_embd", "position_embd", "class_embd", "token_embd")


class MmprojVariantError(ValueError):
    """The mmproj cannot be copied (names the file)."""


def mmproj_variant(src: Path, dst: Path, pinpoints: list[list[int]] | None = None, qtype: str = "f16") -> Path:
    """Copy an mmproj GGUF changing only the image budget and/or the weight type.

    pinpoints: None keeps the file's own, [] removes the key (one view), else the [w, h] list.
    qtype "q8_0": 2-D f16/f32 `.weight` matrices become Q8_0 (rows a multiple of 32), the rest is copied.
    """
    src, dst = Path(src), Path(dst)
    g = read_gguf(src, "mmproj")
    arch = g.fields.get("general.architecture")
    if not isinstance(arch, str):
        raise MmprojVariantError(f"{src}: no general.architecture; not an mmproj written by llama.cpp's tools or step 03")
    with atomic_path(dst, suffix=".gguf") as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        for key, value in g.fields.items():
            if key in ("general.architecture", "general.alignment") or (key == PINPOINTS_KEY and pinpoints is not None):
                continue
            if key == "general.file_type" and qtype == "q8_0":
                w.add_uint32(key, int(gguf.LlamaFileType.MOSTLY_Q8_0))
                continue
            types = g.types[key]
            w.add_key_value(key, value, types[0], sub_type=types[1] if len(types) > 1 else None)
        if pinpoints:
            w.add_array(PINPOINTS_KEY, [int(v) for pair in pinpoints for v in pair])
        for t in g.tensors.values():
            if qtype == "q8_0" and _to_q8(t):
                q = gguf.quants.quantize(t.values().astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(t.name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(t.name, np.asarray(t.data).reshape(gguf.quant_shape_to_byte_shape(t.shape, t.qtype)),
                             raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return dst


def _to_q8(t) -> bool:
    return (len(t.shape) == 2 and t.name.endswith(".weight") and t.shape[-1] % 32 == 0
            and t.qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)
            and not any(k in t.name for k in _KEEP_IN_Q8))


def make_mmproj_files(run: Run, mmproj: Path, types: list[str], budgets: dict[str, list | None]) -> dict[tuple[str, str], Path]:
    """(mmproj type, budget) -> file; the run's own mmproj for (f16, a budget that keeps its pinpoints)."""
    folder = run.sub("tune") / "mmproj"
    stamp = f"{mmproj.stat().st_size}-{mmproj.stat().st_mtime_ns}"
    out: dict[tuple[str, str], Path] = {}
    base: dict[str, Path] = {"f16": mmproj}
    for qtype in types:
        if qtype != "f16":
            path = folder / f"mmproj-{qtype}.gguf"
            if not _fresh(path, stamp):
                log.info("writing the %s mmproj %s", qtype, path)
                mmproj_variant(mmproj, path, None, qtype)
                path.with_suffix(".src").write_text(stamp)
            base[qtype] = path
        for name, pins in budgets.items():
            if pins is None:
                out[(qtype, name)] = base[qtype]
                continue
            path = folder / f"mmproj-{qtype}-{name}.gguf"
            if not _fresh(path, stamp + repr(pins)):
                mmproj_variant(base[qtype], path, pins)
                path.with_suffix(".src").write_text(stamp + repr(pins))
            out[(qtype, name)] = path
    return out


def _fresh(path: Path, stamp: str) -> bool:
    src = path.with_suffix(".src")
    return path.exists() and src.exists() and src.read_text() == stamp


def mmproj_nmse(run: Run, files: dict[tuple[str, str], Path], full: str) -> dict[str, float | None]:
    """Image-embedding NMSE of each non-f16 mmproj against the f16 one (llama-mtmd-debug dumps)."""
    out: dict[str, float | None] = {}
    others = [t for (t, b) in files if t != "f16" and b == full]
    if not others:
        return out
    try:
        tool = toolchain.find_tool(vision_check.TOOL, run.params.llama_cpp.dir)
    except toolchain.ToolNotFound as err:
        log.warning("no image-embedding NMSE: %s", err)
        return {t: None for t in others}
    work = run.sub("tune") / "nmse"
    ref = vision_check.mtmd_embeddings(files[("f16", full)], "pattern", tool, work / "f16")
    for t in others:
        emb = vision_check.mtmd_embeddings(files[(t, full)], "pattern", tool, work / t)
        out[t] = nmse(emb, ref)
    return out
