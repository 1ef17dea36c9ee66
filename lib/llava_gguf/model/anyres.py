"""LLaVA 1.6's anyres rule, the one definition every part of the project uses: which grid pinpoint an
image of a given size takes, the tiles, the unpadded box, the image token count, and how each layout
writes its pinpoints in config.json.

The mmproj always holds the pinpoints as (width, height), llama.cpp's order, whatever the layout;
`anyres_rule` reads a checkpoint's config.json into that order. The whole-image check
(`image_sequence`, `checks/image_sequence.py`), evaluate's token columns and the export all go
through here.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass

# ----------------------------------------------------------------------------- the rule, per layout
# How each layout's own code reads config.json's `image_grid_pinpoints` and rounds the unpadded side:
# - llava (liuhaotian): llava/mm_utils.py select_best_resolution and get_anyres_image_grid_shape
#   unpack each pinpoint as (width, height); llava_arch.py unpad_image truncates (int(x)).
# - llava-hf: transformers' image_processing_utils.select_best_resolution and modeling_llava_next's
#   get_anyres_image_grid_shape unpack (height, width); its unpad_image and the processor's
#   _get_unpadded_features take int(round(x, 7)).
# llama.cpp's clip.cpp reads clip.vision.image_grid_pinpoints as (width, height) (clip_image_size
# {pinpoints[i], pinpoints[i+1]}), so the mmproj always holds (width, height); llama.cpp's own
# converter flips a transformers list the same way (conversion/granite.py). Patch 0002's unpad
# truncates, as LLaVA does.
PINPOINT_ORDER = {"llava": "width, height", "llava-hf": "height, width"}
UNPAD_ROUNDING = {"llava": "int(x)", "llava-hf": "int(round(x, 7))"}


def _unpad_side(x: float, rounding: str) -> int:
    if rounding not in UNPAD_ROUNDING.values():
        raise ValueError(f"rounding must be one of {sorted(UNPAD_ROUNDING.values())}, not {rounding!r}")
    return int(round(x, 7)) if rounding == UNPAD_ROUNDING["llava-hf"] else int(x)


def parse_pinpoints(value, where: str = "config.json image_grid_pinpoints") -> list[tuple[int, int]]:
    """A pinpoint list as config.json holds it (a list of pairs, or LLaVA's string form of one, which
    llava/mm_utils.py ast.literal_eval()s), as int pairs in the order given; refused when malformed."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{where}: {value!r} is not a list of [a, b] pairs") from None
    if value is None:
        return []
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                             for v in p) for p in value)
    if not ok:
        raise ValueError(f"{where}: {value!r} is not a list of [a, b] pairs of positive pixel counts")
    return [(int(a), int(b)) for a, b in value]


def transpose(pinpoints) -> list[tuple[int, int]]:
    """(a, b) -> (b, a) for every pinpoint: between transformers' (height, width) and (width, height)."""
    return [(int(b), int(a)) for a, b in pinpoints]


# LlavaNextConfig's default (transformers' configuration_llava_next.py), in its (height, width) order.
HF_DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def hf_grid_pinpoints(config: dict) -> tuple[list[tuple[int, int]], bool]:
    """A llava-hf config's pinpoints as (width, height) pairs (transformers reads config.json's as
    (height, width)), and whether they are LlavaNextConfig's default (config.json has none)."""
    given = config.get("image_grid_pinpoints")
    default = given is None
    hw = parse_pinpoints(HF_DEFAULT_PINPOINTS if default else given,
                         "config.json: image_grid_pinpoints ((height, width) in the llava-hf layout)")
    if not hw:
        raise ValueError("config.json: image_grid_pinpoints is empty; LlavaNext tiles every image and needs at "
                         "least one [height, width] pinpoint")
    return transpose(hw), default


def missing_pinpoints_warning(config: dict, where: str = "config.json") -> str | None:
    """The warning for a llava-hf config.json without image_grid_pinpoints (None when it has them)."""
    if config.get("image_grid_pinpoints") is not None:
        return None
    return (f"{where} has no image_grid_pinpoints; using LlavaNextConfig's default {HF_DEFAULT_PINPOINTS} "
            f"((height, width), as transformers reads it), written to the mmproj as (width, height) "
            f"{[list(p) for p in hf_grid_pinpoints(config)[0]]}. Add the key to config.json if the model was "
            "trained with other pinpoints")


@dataclass(frozen=True)
class AnyresRule:
    """How a checkpoint's own code places an image: pinpoints as (width, height), merge type, the
    unpad rounding, and where the pinpoints came from."""

    layout: str  # "llava" or "llava-hf"
    pinpoints: tuple[tuple[int, int], ...]  # (width, height), llama.cpp's order
    merge: str  # mm_patch_merge_type
    default_pinpoints: bool = False  # llava-hf without image_grid_pinpoints: LlavaNextConfig's default

    @property
    def rounding(self) -> str:
        return UNPAD_ROUNDING[self.layout]

    @property
    def is_llava_16(self) -> bool:
        return bool(self.pinpoints) and self.merge == "spatial_unpad"

    def describe(self) -> str:
        src = "LlavaNextConfig's default, config.json has none" if self.default_pinpoints else "config.json"
        return (f"mm_patch_merge_type {self.merge!r}, {len(self.pinpoints)} grid pinpoints "
                f"({self.layout} layout: read as ({PINPOINT_ORDER[self.layout]}) from {src})")


def anyres_rule(config: dict, layout: str) -> AnyresRule:
    """The rule of a checkpoint's config.json in its layout (`layout.detect_layout`): the original
    layout's flat keys, or a llava-hf config (LlavaNext always tiles and unpads; (height, width) pairs)."""
    if layout not in PINPOINT_ORDER:
        raise ValueError(f"layout must be one of {sorted(PINPOINT_ORDER)}, not {layout!r}")
    if layout == "llava-hf":
        pinpoints, default = hf_grid_pinpoints(config)
        return AnyresRule(layout, tuple(pinpoints), "spatial_unpad", default)
    pinpoints = parse_pinpoints(config.get("image_grid_pinpoints"))
    # LLaVA's getattr(config, 'mm_patch_merge_type', 'flat').
    return AnyresRule(layout, tuple(pinpoints), config.get("mm_patch_merge_type", "flat"))


# ----------------------------------------------------------------------------- the arithmetic
def select_best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """llava/mm_utils.py select_best_resolution: (width, height) of the chosen (width, height) pinpoint
    (transformers' is the same with both pairs read as (height, width))."""
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


def unpad_box(cur_w: int, cur_h: int, orig_w: int, orig_h: int,
              rounding: str = UNPAD_ROUNDING["llava"]) -> tuple[int, int, int, int]:
    """unpad_image on a cur_w x cur_h feature grid: (x0, y0, width, height) kept. `rounding`: the
    layout's (UNPAD_ROUNDING); the two differ by one row or column pair for a few sizes."""
    if orig_w / orig_h > cur_w / cur_h:
        new_h = _unpad_side(orig_h * (cur_w / orig_w), rounding)
        pad = (cur_h - new_h) // 2
        return 0, pad, cur_w, cur_h - 2 * pad
    new_w = _unpad_side(orig_w * (cur_h / orig_h), rounding)
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


def anyres_layout(width: int, height: int, pinpoints, patch: int = 14, image_size: int = 336,
                  rounding: str = UNPAD_ROUNDING["llava"]) -> AnyresLayout:
    """Grid, unpadded box and count for a width x height image; `pinpoints` (width, height)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    res = select_best_resolution((width, height), pinpoints)
    if res[0] % image_size or res[1] % image_size:
        raise ValueError(f"grid pinpoint {res} is not a multiple of the tile size {image_size}")
    grid = (res[0] // image_size, res[1] // image_size)
    side = image_size // patch
    return AnyresLayout(width, height, res, grid, side,
                        unpad_box(grid[0] * side, grid[1] * side, width, height, rounding))


def llava_image_token_count(width: int, height: int, pinpoints, patch: int = 14, image_size: int = 336,
                            rounding: str = UNPAD_ROUNDING["llava"]) -> int:
    """The number of image embeddings LLaVA 1.6's own code feeds the language model for one image
    (`rounding` UNPAD_ROUNDING["llava-hf"]: transformers' LlavaNext)."""
    return anyres_layout(width, height, pinpoints, patch, image_size, rounding).n_tokens()


def flat_token_count(width: int, height: int, pinpoints, patch: int = 14, image_size: int = 336) -> int:
    """What the pinned llama.cpp without patch 0002 uses: 576 per tile plus the overview, and no
    tiles at all when the image fits in one tile (its llava-uhd slicer)."""
    side = image_size // patch
    if width <= image_size and height <= image_size:
        return side * side
    return anyres_layout(width, height, pinpoints, patch, image_size).n_tokens("flat")
