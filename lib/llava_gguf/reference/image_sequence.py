"""Whole-image check: the image embedding sequence llama.cpp hands the language model vs LLaVA 1.6's.

LLaVA 1.6 (llava/mm_utils.py process_anyres_image, llava/model/llava_arch.py with "anyres" and
"spatial_unpad") feeds the overview's features, then the tiles' features merged into one grid,
unpadded to the image's aspect ratio, with `image_newline` after every row. The pinned llama.cpp
feeds a flat list; patch 0002 restores LLaVA's sequence and adds `llama-mtmd-debug -p sequence`.
Here: the PyTorch reference from the checkpoint (per-slice tower + projector of ReferenceModel),
LLaVA's token count for any size, llama.cpp's dump, and the comparison (counts, NMSE, worst token,
error per part, the arrangement matched). A wrong arrangement fails by its count or its NMSE.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..model.anyres import AnyresLayout, AnyresRule, anyres_layout, anyres_rule
from ..model.layout import detect_layout
from ..model.vision_config import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD
from .clip import ReferenceModel, VisionCheckError

log = logging.getLogger(__name__)

# Measured on the tiny and 7B-shaped synthetic checkpoints with patch 0002 (see the README):
# lossless (PNG) images agree to ~1e-7..1e-6 and JPEGs add the decoder difference (stb_image vs
# libjpeg); the worst wrong arrangement of the same length is above 1e-1.
NMSE_TOL = 1e-3
# The arrangements a sequence is matched against (name -> what it means).
ARRANGEMENTS = {
    "llava": "LLaVA 1.6: overview, merged grid unpadded, image_newline after each row",
    "no_newline": "overview, merged grid unpadded, no image_newline",
    "no_unpad": "overview, merged grid with its padding rows/columns, image_newline after each row",
    "wrong_grid": "overview, tiles merged column-major (grid transposed), unpadded, newlines",
    "flat": "overview then each tile, 576 tokens each (LLaVA's mm_patch_merge_type 'flat')",
    "flat_tiles_first": "each tile then the overview (the pinned llama.cpp without patch 0002)",
}
TEST_IMAGE = "tools/mtmd/test-1.jpeg"
FIX_HINT = ("Use the project's patched build (`make llama-cpp`, LLAMA_CPP_DIR unset), or apply "
            "patches/llama.cpp/*.patch to your llama.cpp and rebuild it.")


# ----------------------------------------------------------------------------- LLaVA's preprocessing
def _clip_normalize(img: Image.Image) -> torch.Tensor:
    """CLIPImageProcessor's rescale (float64 * 1/255 -> float32) and normalize, as [3, H, W]."""
    arr = (np.asarray(img.convert("RGB"), dtype=np.float64) * (1 / 255)).astype(np.float32)
    arr = (arr - np.array(CLIP_IMAGE_MEAN, np.float32)) / np.array(CLIP_IMAGE_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def anyres_views(img: Image.Image, layout: AnyresLayout, image_size: int = 336) -> list[Image.Image]:
    """process_anyres_image before the processor: the overview (squashed), then the tiles row by row.

    The CLIP processor's resize (shortest edge) and centre crop are identities on image_size
    squares, so only its normalisation remains (`_clip_normalize`)."""
    ow, oh = img.size
    tw, th = layout.resolution
    sw, sh = tw / ow, th / oh
    if sw < sh:
        nw, nh = tw, min(int(np.ceil(oh * sw)), th)
    else:
        nw, nh = min(int(np.ceil(ow * sh)), tw), th
    padded = Image.new("RGB", (tw, th), (0, 0, 0))
    padded.paste(img.resize((nw, nh), Image.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
    tiles = [padded.crop((x, y, x + image_size, y + image_size))
             for y in range(0, th, image_size) for x in range(0, tw, image_size)]
    return [img.resize((image_size, image_size), Image.BICUBIC)] + tiles


# ----------------------------------------------------------------------------- arrangement
def arrange(overview: torch.Tensor, tiles: torch.Tensor, newline: torch.Tensor, layout: AnyresLayout,
            arrangement: str = "llava") -> torch.Tensor:
    """The sequence [tokens, n_embd] from per-view features: overview [side^2, C], tiles [n, side^2, C]."""
    if arrangement not in ARRANGEMENTS:
        raise ValueError(f"arrangement must be one of {sorted(ARRANGEMENTS)}, not {arrangement!r}")
    if arrangement == "flat":
        return torch.cat([overview, *tiles])
    if arrangement == "flat_tiles_first":
        return torch.cat([*tiles, overview])
    gx, gy, s, c = *layout.grid, layout.side, overview.shape[1]
    t = tiles.view(gy, gx, s, s, c)
    if arrangement == "wrong_grid":
        t = tiles.view(gx, gy, s, s, c).transpose(0, 1)  # tiles taken column-major
    grid = t.permute(0, 2, 1, 3, 4).reshape(gy * s, gx * s, c)  # as llava_arch's permute(4, 0, 2, 1, 3)
    if arrangement != "no_unpad":
        x0, y0, w, h = layout.box
        grid = grid[y0:y0 + h, x0:x0 + w]
    if arrangement != "no_newline":
        grid = torch.cat([grid, newline.expand(grid.shape[0], 1, c)], dim=1)
    return torch.cat([overview, grid.reshape(-1, c)])


@dataclass
class ReferenceSequence:
    """LLaVA 1.6's sequence for one image plus its parts (features per view, the newline)."""

    layout: AnyresLayout
    overview: torch.Tensor
    tiles: torch.Tensor
    newline: torch.Tensor

    def sequence(self, arrangement: str = "llava") -> torch.Tensor:
        return arrange(self.overview, self.tiles, self.newline, self.layout, arrangement)


def checkpoint_rule(ref: ReferenceModel) -> AnyresRule:
    """The anyres rule of the checkpoint `ref` reads, in its layout."""
    return anyres_rule(ref.ckpt.config, detect_layout(ref.ckpt.config, set(ref.ckpt.tensors)))


def reference_sequence(ref: ReferenceModel, image: str | Path | Image.Image) -> ReferenceSequence:
    """LLaVA 1.6's image embeddings for one image file, from the checkpoint's tensors in f32, placed by
    the checkpoint's own rule (`anyres_rule`)."""
    rule = checkpoint_rule(ref)
    if not rule.is_llava_16 or "image_newline" not in ref._projector:
        raise VisionCheckError(f"the checkpoint is not LLaVA 1.6 ({rule.describe()}; image_newline "
                               f"{'present' if 'image_newline' in ref._projector else 'absent'}); the whole-image "
                               "check covers LLaVA 1.6 only")
    img = image if isinstance(image, Image.Image) else Image.open(image)
    img = img.convert("RGB")
    s = ref.spec
    layout = anyres_layout(*img.size, rule.pinpoints, s.patch_size, s.image_size, rule.rounding)
    feats = [ref.embeddings(_clip_normalize(v)) for v in anyres_views(img, layout, s.image_size)]
    newline = ref.ckpt.load(ref._projector["image_newline"].stored).to(torch.float32)
    return ReferenceSequence(layout, feats[0], torch.stack(feats[1:]), newline)
