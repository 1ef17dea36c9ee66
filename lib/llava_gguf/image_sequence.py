"""Whole-image check: the image embedding sequence llama.cpp hands the language model vs LLaVA 1.6's.

`vision_check` compares one 336 px slice. LLaVA 1.6 feeds the language model more than slices
(original LLaVA code: `llava/mm_utils.py` process_anyres_image, `llava/model/llava_arch.py`
prepare_inputs_labels_for_multimodal with image_aspect_ratio "anyres" and mm_patch_merge_type
"spatial_unpad"):

- preprocessing: the best grid pinpoint for the image (select_best_resolution), the image resized
  into it keeping its aspect ratio (PIL bicubic, ceil) and centred on BLACK, cut into image_size
  tiles; the overview is the whole image squashed to image_size x image_size; CLIP normalisation;
- the sequence: the overview's features (576 at 336 px), then the tiles' features merged into one
  (grid_h*24) x (grid_w*24) grid, cropped back to the image's aspect ratio (unpad_image), with the
  learned `image_newline` vector after every row.

The pinned llama.cpp feeds a flat list (tiles then overview, 576 tokens each, mean-colour padding,
no tiles at all for images up to 336 px); `patches/llama.cpp/0002-*.patch` restores LLaVA's
sequence, and its `llama-mtmd-debug -p sequence --image FILE` dumps the whole sequence.

This module computes the reference in PyTorch from the checkpoint's own tensors (the per-slice
tower + projector of `vision_check.ReferenceModel`), gives LLaVA's token count for any image size
(`llava_image_token_count`), runs llama.cpp, and compares: token counts, NMSE, the worst token and
its cosine, and the error of each part (overview, merged grid, newlines) plus which arrangement
llama.cpp's sequence matches. A wrong arrangement (flat, not unpadded, no newline, wrong grid)
fails by its token count or by an NMSE orders of magnitude above the bound.
"""
from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from . import toolchain
from .checkpoint import Checkpoint
from .gguf_io import open_gguf, read_gguf
from .vision import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD
from .vision_check import (TOOL, ReferenceModel, VisionCheckError, nmse, read_dump,
                           write_placeholder_text_model)
from .workspace import Run, rel_to_root, write_json

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


# ----------------------------------------------------------------------------- llama.cpp side
class SequenceModeMissing(VisionCheckError):
    """The build's llama-mtmd-debug has no `-p sequence` (a llama.cpp without patch 0002)."""


def has_sequence_mode(tool: Path) -> bool:
    """Whether a llama-mtmd-debug binary knows `-p sequence` (its usage text is compiled in)."""
    try:
        return b'-p "sequence"' in Path(tool).read_bytes()
    except OSError:
        return False


def mtmd_sequence(mmproj: Path, image: Path, tool: Path | None = None, workdir: Path | None = None,
                  threads: int | None = None) -> torch.Tensor:
    """`llama-mtmd-debug -p sequence --image FILE`: llama.cpp's whole image sequence [tokens, n_embd]."""
    mmproj, image = Path(mmproj), Path(image)
    tool = tool or toolchain.find_tool(TOOL)
    g = open_gguf(mmproj, "mmproj")
    out_w = g.tensors.get("mm.2.weight") or g.tensors.get("mm.0.weight")
    if out_w is None:
        raise VisionCheckError(f"{mmproj}: no mm.0/mm.2 projector tensors; not a LLaVA mlp mmproj")
    n_embd = out_w.shape[0]
    with tempfile.TemporaryDirectory(prefix="image-sequence-") as tmp:
        workdir = Path(workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        text_model = workdir / f"placeholder-text-{n_embd}.gguf"
        if not text_model.exists():
            write_placeholder_text_model(text_model, n_embd)
        dump, log_file = workdir / f"sequence-{image.stem}.bin", workdir / f"llama-mtmd-debug-{image.stem}.log"
        dump.unlink(missing_ok=True)
        cmd = [str(tool), "-m", str(text_model), "--mmproj", str(mmproj), "-p", "sequence", "--image", str(image),
               "-n", "1", "-t", str(threads or os.cpu_count() or 2), "-c", "256", "--no-warmup",
               "--no-mmproj-offload"]
        log.info("llama.cpp: %s", " ".join(cmd))
        with open(log_file, "w") as logf:
            proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                  env={**os.environ, "MTMD_DEBUG_EMBEDDINGS": str(dump)})
        text = log_file.read_text(errors="replace")
        if proc.returncode != 0:
            # The error line may not reach the log (llama.cpp logs from a thread), so the binary's
            # usage text tells too.
            if "Invalid mode" in text or not has_sequence_mode(tool):
                raise SequenceModeMissing(f"{tool} has no `-p sequence` mode: a llama.cpp build without "
                                          f"patch 0002 (log {log_file})")
            tail = "\n".join(text.splitlines()[-15:])
            raise VisionCheckError(f"{tool.name} failed (exit {proc.returncode}); log {log_file}:\n{tail}")
        if not dump.exists():
            raise VisionCheckError(f"{tool} ran but wrote no sequence dump (log {log_file})")
        return read_dump(dump)


# ----------------------------------------------------------------------------- the comparison
@dataclass
class SequenceCheck:
    """The outcome for one image: status 'passed', 'failed' or 'skipped'."""

    status: str
    message: str
    image: str
    size: tuple[int, int] | None = None
    grid: tuple[int, int] | None = None
    n_tokens: int | None = None  # llama.cpp's
    n_tokens_llava: int | None = None
    arrangement: str | None = None  # the arrangement llama.cpp's sequence matches
    nmse: float | None = None
    worst_token: int | None = None
    worst_token_cos: float | None = None
    parts: dict[str, float] = field(default_factory=dict)  # part -> NMSE (or max |diff| for newlines)
    diagnosis: dict[str, float] = field(default_factory=dict)  # arrangement -> NMSE vs llama.cpp
    tolerance: float = NMSE_TOL
    cause: str | None = None  # a failure explained by the llama.cpp build, not the GGUF

    @property
    def ok(self) -> bool:
        return self.status == "passed"

    def to_json(self) -> dict:
        keys = ("status", "message", "image", "size", "grid", "n_tokens", "n_tokens_llava", "arrangement", "nmse",
                "worst_token", "worst_token_cos", "parts", "diagnosis", "tolerance", "cause")
        return {k: getattr(self, k) for k in keys}


def compare_sequence(ref: ReferenceSequence, emb: torch.Tensor, image: str = "image",
                     tolerance: float = NMSE_TOL) -> SequenceCheck:
    """Score llama.cpp's sequence against LLaVA's; on failure name the arrangement it matches."""
    lay = ref.layout
    expected = ref.sequence("llava")
    res = SequenceCheck("failed", "", image, (lay.width, lay.height), lay.grid, int(emb.shape[0]),
                        int(expected.shape[0]), tolerance=tolerance)
    same_len = {a: ref.sequence(a) for a in ARRANGEMENTS if lay.n_tokens(a) == emb.shape[0]}
    res.diagnosis = {a: nmse(emb, seq) for a, seq in same_len.items() if seq.shape == emb.shape}
    if res.diagnosis:
        res.arrangement = min(res.diagnosis, key=res.diagnosis.get)
    if emb.shape != expected.shape:
        what = f"matches {res.arrangement!r} ({ARRANGEMENTS[res.arrangement]})" if res.arrangement else \
            "matches no known arrangement"
        res.message = (f"llama.cpp hands the language model {emb.shape[0]} x {emb.shape[1]} image embeddings, "
                       f"LLaVA 1.6 {expected.shape[0]} x {expected.shape[1]} (grid {lay.grid[0]}x{lay.grid[1]}); "
                       f"the sequence {what}. {FIX_HINT}")
        return res
    res.nmse = res.diagnosis["llava"]
    cos = F.cosine_similarity(emb.double(), expected.double(), dim=1)
    res.worst_token, res.worst_token_cos = int(cos.argmin()), float(cos.min())
    ov = lay.side ** 2
    rows = expected[ov:].view(lay.box[3], lay.box[2] + 1, -1)
    got = emb[ov:].view(lay.box[3], lay.box[2] + 1, -1)
    res.parts = {"overview NMSE": nmse(emb[:ov], expected[:ov]),
                 "grid NMSE": nmse(got[:, :-1], rows[:, :-1]),
                 "newline max |diff|": float((got[:, -1] - rows[:, -1]).abs().max())}
    if res.arrangement == "llava" and res.nmse <= tolerance:
        res.status = "passed"
        res.message = (f"llama.cpp's {emb.shape[0]} image embeddings match LLaVA 1.6's sequence: NMSE "
                       f"{res.nmse:.2e} <= {tolerance:.0e} (worst token {res.worst_token}, cosine "
                       f"{res.worst_token_cos:.6f})")
    elif res.arrangement != "llava":
        res.message = (f"llama.cpp's sequence has LLaVA's length ({emb.shape[0]}) but is arranged as "
                       f"{res.arrangement!r} ({ARRANGEMENTS[res.arrangement]}): NMSE vs LLaVA {res.nmse:.2e}. "
                       f"{FIX_HINT}")
    else:
        res.message = (f"llama.cpp's sequence is arranged as LLaVA's but disagrees: NMSE {res.nmse:.2e} > "
                       f"{tolerance:.0e} (overview {res.parts['overview NMSE']:.1e}, grid "
                       f"{res.parts['grid NMSE']:.1e}; worst token {res.worst_token}, cosine "
                       f"{res.worst_token_cos:.4f}): preprocessing or per-slice features differ")
    return res


def sample_images(out_dir: Path) -> dict[str, Path]:
    """test-1.jpeg (640x488) plus lossless crops of it: wide, tall and smaller than one tile.

    With LLaVA 1.6's pinpoints these pick grids 2x2 (test-1), 2x1 (wide), 1x2 (tall) and 1x2
    (small: every pinpoint holds it whole, the least wasteful comes first)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    src = toolchain.source_asset(TEST_IMAGE)
    img = Image.open(src).convert("RGB")
    crops = {"wide": (0, 120, 640, 320), "tall": (200, 0, 400, 488), "small": (300, 200, 540, 380)}
    out = {"test-1": src}
    for name, box in crops.items():
        path = out_dir / f"{name}.png"
        if not path.exists():
            img.crop(box).save(path)
        out[name] = path
    return out


def check_image_sequence(checkpoint: str | Path | Checkpoint, mmproj: Path, images: dict[str, Path],
                         tool: Path | None = None, workdir: Path | None = None, threads: int | None = None,
                         tolerance: float = NMSE_TOL) -> list[SequenceCheck]:
    """The whole-image check of one mmproj on several image files, outside any run."""
    try:
        tool = tool or toolchain.find_tool(TOOL)
    except toolchain.ToolNotFound as err:
        return [SequenceCheck("skipped", f"image sequence check skipped, not passed: {err}", name)
                for name in images]
    out = []
    with ReferenceModel(checkpoint) as ref:
        pinpoints, merge = anyres_config(ref.ckpt.config)
        if not pinpoints or merge != "spatial_unpad":
            msg = (f"image sequence check skipped: not a LLaVA 1.6 checkpoint (mm_patch_merge_type {merge!r}, "
                   f"{len(pinpoints)} grid pinpoints); one 576-token view, covered by the per-slice check")
            return [SequenceCheck("skipped", msg, name) for name in images]
        for name, path in images.items():
            refseq = reference_sequence(ref, path)
            lay = refseq.layout
            try:
                emb = mtmd_sequence(mmproj, path, tool=tool, workdir=workdir, threads=threads)
            except SequenceModeMissing as err:
                n_flat = flat_token_count(lay.width, lay.height, anyres_config(ref.ckpt.config)[0],
                                          ref.spec.patch_size, ref.spec.image_size)
                res = SequenceCheck("failed", "", name, (lay.width, lay.height), lay.grid, n_flat,
                                    lay.n_tokens(), arrangement="flat_tiles_first", tolerance=tolerance,
                                    cause="llama.cpp build without patch 0002")
                res.message = (f"{err}. Such a build feeds LLaVA 1.6 a flat sequence (tiles then overview, "
                               f"mean-colour padding): {n_flat} image tokens for this image, where LLaVA 1.6 uses "
                               f"{lay.n_tokens()}. {FIX_HINT}")
            else:
                res = compare_sequence(refseq, emb, name, tolerance)
            (log.info if res.ok else log.warning)("image sequence (%s): %s", name, res.message)
            out.append(res)
    return out


@dataclass
class ImageSequenceReport:
    """The check over the test images, as the notebook shows it."""

    checks: list[SequenceCheck]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def export_ok(self) -> bool:
        """No failure left unexplained: passed, skipped, or failed only because the llama.cpp build
        lacks patch 0002 (the GGUF is not at fault; `message` says so)."""
        return all(c.status != "failed" or c.cause is not None for c in self.checks)

    @property
    def message(self) -> str:
        return "\n".join(f"[{c.image}] {c.message}" for c in self.checks)

    def table(self) -> pd.DataFrame:
        rows = [{"image": c.image, "size": f"{c.size[0]}x{c.size[1]}" if c.size else None,
                 "grid": f"{c.grid[0]}x{c.grid[1]}" if c.grid else None, "status": c.status,
                 "tokens (llama.cpp)": c.n_tokens, "tokens (LLaVA 1.6)": c.n_tokens_llava,
                 "arrangement": c.arrangement, "NMSE": c.nmse, "tolerance": c.tolerance,
                 "worst token": c.worst_token, "worst token cosine": c.worst_token_cos, **c.parts}
                for c in self.checks]
        return pd.DataFrame(rows).set_index("image")


def verify_image_sequence(run: Run, mmproj: Path | None = None) -> ImageSequenceReport:
    """The whole-image check of the run's mmproj (artifact `mmproj`) on the four test images.

    Writes `outputs/<run>/image_sequence/<image>.json` (plus the tool's logs and dumps) and records
    artifact `image_sequence_check` (image -> that file). Skipped when params convert.verify is false."""
    workdir = run.sub("image_sequence")
    images = sample_images(workdir / "images")
    if not run.params.convert.verify:
        msg = "image sequence check skipped, not passed: params convert.verify is false"
        log.warning(msg)
        return ImageSequenceReport([SequenceCheck("skipped", msg, name) for name in images])
    mmproj = Path(mmproj or run.artifact_path("mmproj"))
    try:
        tool = toolchain.find_tool(TOOL, run.params.llama_cpp.dir)
    except toolchain.ToolNotFound as err:
        return ImageSequenceReport([SequenceCheck("skipped", f"image sequence check skipped, not passed: {err}", n)
                                    for n in images])
    checks = check_image_sequence(run.artifact_path("checkpoint"), mmproj, images, tool=tool, workdir=workdir,
                                  threads=run.params.convert.threads)
    recorded = {c.image: write_json(workdir / f"{c.image}.json", c.to_json()) for c in checks}
    run.record("image_sequence_check", {k: rel_to_root(v) for k, v in recorded.items()})
    return ImageSequenceReport(checks)


# ----------------------------------------------------------------------------- evaluate
def mmproj_anyres(mmproj: Path) -> dict:
    """What LLaVA's token arithmetic needs from an mmproj: pinpoints, merge type, patch and tile size."""
    f = read_gguf(mmproj, "mmproj").fields  # with arrays: the pinpoints
    flat = list(f.get("clip.vision.image_grid_pinpoints") or [])
    return {"pinpoints": [flat[i:i + 2] for i in range(0, len(flat) - 1, 2)],
            "merge": f.get("clip.vision.mm_patch_merge_type", "flat"),
            "patch": int(f.get("clip.vision.patch_size", 14)), "image_size": int(f.get("clip.vision.image_size", 336))}


def llava_tokens_for_image(image: str | Path, mmproj: str | Path) -> int | None:
    """LLaVA 1.6's image token count for an image file under an mmproj's settings (None: not LLaVA 1.6)."""
    info = mmproj_anyres(Path(mmproj))
    if not info["pinpoints"] or info["merge"] != "spatial_unpad":
        return None
    with Image.open(image) as img:
        return llava_image_token_count(*img.size, info["pinpoints"], info["patch"], info["image_size"])


def arrangement_from_count(used: int | None, image: str | Path, mmproj: str | Path) -> str | None:
    """Which arrangement a llama-mtmd-cli run used, judged by its image token count."""
    if used is None:
        return None
    info = mmproj_anyres(Path(mmproj))
    if not info["pinpoints"] or info["merge"] != "spatial_unpad":
        return None
    with Image.open(image) as img:
        w, h = img.size
    lay = anyres_layout(w, h, info["pinpoints"], info["patch"], info["image_size"])
    if used == lay.n_tokens():
        return "llava 1.6 (spatial_unpad + image_newline)"
    if used == flat_token_count(w, h, info["pinpoints"], info["patch"], info["image_size"]):
        return "flat (llama.cpp without patch 0002)"
    return "unknown"


def evaluate_fields(image: str | Path, mmproj: str | Path, used: int | None) -> dict:
    """The columns evaluate adds per llama-mtmd-cli run: LLaVA 1.6's count and the arrangement used."""
    try:
        return {"image_tokens_llava": llava_tokens_for_image(image, mmproj),
                "image_arrangement": arrangement_from_count(used, image, mmproj)}
    except (OSError, ValueError) as err:  # an unreadable image or mmproj is evaluate's own error to raise
        log.warning("LLaVA 1.6 token count unavailable for %s: %s", image, err)
        return {"image_tokens_llava": None, "image_arrangement": None}
