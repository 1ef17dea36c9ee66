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

from .checks.clip_reference import ReferenceModel, VisionCheckError
from .vision_config import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD

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


# ----------------------------------------------------------------------------- LLaVA's arithmetic
def select_best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """llava/mm_utils.py select_best_resolution: (width, height) of the chosen pinpoint."""
    ow, oh = size
    best, max_eff, min_waste = None, 0, float("inf")
    for w, h in pinpoints:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > max_eff or (eff == max_eff and waste < min_waste):
            best, max_eff, min_waste = (int(w), int(h)), eff, waste
    if best is None:
        raise ValueError(f"no grid pinpoints to choose from: {pinpoints!r}")
    return best


def unpad_box(cur_w: int, cur_h: int, orig_w: int, orig_h: int) -> tuple[int, int, int, int]:
    """llava_arch.py unpad_image on a cur_w x cur_h feature grid: (x0, y0, width, height) kept."""
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(orig_h * (cur_w / orig_w))
        pad = (cur_h - new_h) // 2
        return 0, pad, cur_w, cur_h - 2 * pad
    new_w = int(orig_w * (cur_h / orig_h))
    pad = (cur_w - new_w) // 2
    return pad, 0, cur_w - 2 * pad, cur_h


@dataclass(frozen=True)
class AnyresLayout:
    """Where LLaVA 1.6 puts an image of a given size: grid, unpadded box and token count."""

    width: int
    height: int
    resolution: tuple[int, int]  # the chosen pinpoint (width, height)
    grid: tuple[int, int]  # tiles (across, down)
    side: int  # features per tile edge (image_size / patch)
    box: tuple[int, int, int, int]  # unpadded (x0, y0, w, h) on the merged feature grid

    @property
    def n_tiles(self) -> int:
        return self.grid[0] * self.grid[1]

    def n_tokens(self, arrangement: str = "llava") -> int:
        ov, (_, _, w, h) = self.side ** 2, self.box
        gw, gh = self.grid[0] * self.side, self.grid[1] * self.side
        return {"llava": ov + h * (w + 1), "no_newline": ov + h * w, "no_unpad": ov + gh * (gw + 1),
                "wrong_grid": ov + h * (w + 1), "flat": ov * (1 + self.n_tiles),
                "flat_tiles_first": ov * (1 + self.n_tiles)}[arrangement]


def anyres_layout(width: int, height: int, pinpoints, patch: int = 14, image_size: int = 336) -> AnyresLayout:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    res = select_best_resolution((width, height), pinpoints)
    if res[0] % image_size or res[1] % image_size:
        raise ValueError(f"grid pinpoint {res} is not a multiple of the tile size {image_size}")
    grid = (res[0] // image_size, res[1] // image_size)
    side = image_size // patch
    return AnyresLayout(width, height, res, grid, side, unpad_box(grid[0] * side, grid[1] * side, width, height))


def llava_image_token_count(width: int, height: int, pinpoints, patch: int = 14, image_size: int = 336) -> int:
    """The number of image embeddings LLaVA 1.6's own code feeds the language model for one image."""
    return anyres_layout(width, height, pinpoints, patch, image_size).n_tokens()


def flat_token_count(width: int, height: int, pinpoints, patch: int = 14, image_size: int = 336) -> int:
    """What the pinned llama.cpp without patch 0002 uses: 576 per tile plus the overview, and no
    tiles at all when the image fits in one tile (its llava-uhd slicer)."""
    side = image_size // patch
    if width <= image_size and height <= image_size:
        return side * side
    return anyres_layout(width, height, pinpoints, patch, image_size).n_tokens("flat")


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


def anyres_config(config: dict) -> tuple[list, str]:
    """(pinpoints, merge type) from config.json (original LLaVA keys; llava-hf implies spatial_unpad)."""
    pinpoints = config.get("image_grid_pinpoints")
    if isinstance(pinpoints, str):
        import ast
        pinpoints = ast.literal_eval(pinpoints)
    merge = config.get("mm_patch_merge_type", "spatial_unpad" if "vision_config" in config and pinpoints else "flat")
    return pinpoints or [], merge


def reference_sequence(ref: ReferenceModel, image: str | Path | Image.Image) -> ReferenceSequence:
    """LLaVA 1.6's image embeddings for one image file, from the checkpoint's tensors in f32."""
    pinpoints, merge = anyres_config(ref.ckpt.config)
    if not pinpoints or merge != "spatial_unpad" or "image_newline" not in ref._projector:
        raise VisionCheckError("the checkpoint is not LLaVA 1.6 (needs image_grid_pinpoints, mm_patch_merge_type "
                               "spatial_unpad and image_newline in config.json / the weights); the whole-image "
                               "check covers LLaVA 1.6 only")
    img = image if isinstance(image, Image.Image) else Image.open(image)
    img = img.convert("RGB")
    s = ref.spec
    layout = anyres_layout(*img.size, pinpoints, s.patch_size, s.image_size)
    feats = [ref.embeddings(_clip_normalize(v)) for v in anyres_views(img, layout, s.image_size)]
    newline = ref.ckpt.load(ref._projector["image_newline"].stored).to(torch.float32)
    return ReferenceSequence(layout, feats[0], torch.stack(feats[1:]), newline)
