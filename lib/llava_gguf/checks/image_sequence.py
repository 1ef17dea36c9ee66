"""The whole-image check run against llama.cpp: its sequence dump, the comparison with LLaVA 1.6's
(`image_sequence`), the report, the run entry point and evaluate's token columns."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from .numeric import nmse
from .vision import TOOL, encode_limit, read_dump, write_placeholder_text_model
from ..llama_cpp import toolchain
from ..model.anyres import AnyresRule, anyres_layout, flat_token_count, llava_image_token_count
from ..model.checkpoint import Checkpoint
from ..model.gguf_io import open_gguf, read_gguf
from ..reference.clip import ReferenceModel, VisionCheckError
from ..reference.image_sequence import (ARRANGEMENTS, FIX_HINT, NMSE_TOL, TEST_IMAGE, ReferenceSequence,
                                        checkpoint_rule, reference_sequence)
from ..run.topology import usable_cores
from ..run.workspace import Run, params_vision_config, write_json

log = logging.getLogger(__name__)


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
               "-n", "1", "-t", str(threads or usable_cores()), "-c", "256", "--no-warmup",
               "--no-mmproj-offload"]
        log.info("llama.cpp: %s", " ".join(cmd))
        try:
            toolchain.run_tool(cmd, log_file, encode_limit(mmproj, whole_image=True),
                               env={"MTMD_DEBUG_EMBEDDINGS": str(dump)})
        except toolchain.ToolFailed as err:
            dump.unlink(missing_ok=True)  # a killed tool's dump is half-written
            # The error line may not reach the log (llama.cpp logs from a thread), so the binary's
            # usage text tells too.
            if "Invalid mode" in log_file.read_text(errors="replace") or not has_sequence_mode(tool):
                raise SequenceModeMissing(f"{tool} has no `-p sequence` mode: a llama.cpp build without "
                                          f"patch 0002 (log {log_file})") from None
            raise VisionCheckError(str(err)) from None
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
                       f"{res.worst_token_cos:.4f})")
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


def applies(rule: AnyresRule, written: dict, mmproj: Path) -> tuple[str, str]:
    """("run", "") when the whole-image check applies; else ("skipped" | "failed", why), judged from the
    checkpoint's rule and what the mmproj file actually holds (what llama.cpp will read)."""
    in_file = (f"{mmproj.name} holds clip.vision.mm_patch_merge_type {written['merge']!r} and "
               f"{len(written['pinpoints'])} grid pinpoints")
    if not rule.is_llava_16 and not (written["pinpoints"] and written["merge"] == "spatial_unpad"):
        return "skipped", (f"image sequence check skipped: not LLaVA 1.6 ({in_file}; the checkpoint: "
                           f"{rule.describe()}); one 576-token view, covered by the per-slice check")
    if not rule.is_llava_16 or not (written["pinpoints"] and written["merge"] == "spatial_unpad"):
        return "failed", (f"image sequence check failed: {in_file}, but the checkpoint has {rule.describe()}; the "
                          "mmproj does not describe this checkpoint (re-export it)")
    wrote = [tuple(p) for p in written["pinpoints"]]
    if wrote != list(rule.pinpoints):
        hint = (" (the same pairs transposed: (height, width) and (width, height) confused)"
                if wrote == [(b, a) for a, b in rule.pinpoints] else "")
        return "failed", (f"image sequence check failed: {mmproj.name} holds the grid pinpoints {wrote} (width, height),"
                          f" the checkpoint means {list(rule.pinpoints)} ({rule.describe()}){hint}; re-export the mmproj")
    return "run", ""


def check_image_sequence(checkpoint: str | Path | Checkpoint, mmproj: Path, images: dict[str, Path],
                         tool: Path | None = None, workdir: Path | None = None, threads: int | None = None,
                         tolerance: float = NMSE_TOL, vision_config_file: Path | None = None) -> list[SequenceCheck]:
    """The whole-image check of one mmproj on several image files, outside any run."""
    try:
        tool = tool or toolchain.find_tool(TOOL)
    except toolchain.ToolNotFound as err:
        return [SequenceCheck("skipped", f"image sequence check skipped, not passed: {err}", name)
                for name in images]
    out = []
    with ReferenceModel(checkpoint, vision_config_file) as ref:
        rule = checkpoint_rule(ref)
        status, msg = applies(rule, mmproj_anyres(Path(mmproj)), Path(mmproj))
        if status != "run":
            (log.info if status == "skipped" else log.warning)("%s", msg)
            return [SequenceCheck(status, msg, name) for name in images]
        for name, path in images.items():
            refseq = reference_sequence(ref, path)
            lay = refseq.layout
            try:
                emb = mtmd_sequence(mmproj, path, tool=tool, workdir=workdir, threads=threads)
            except SequenceModeMissing as err:
                n_flat = flat_token_count(lay.width, lay.height, rule.pinpoints, ref.spec.patch_size,
                                          ref.spec.image_size)
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
                                  threads=run.params.convert.threads,
                                  vision_config_file=params_vision_config(run.params))
    recorded = {c.image: write_json(workdir / f"{c.image}.json", c.to_json()) for c in checks}
    run.record("image_sequence_check", recorded)
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
