"""Numeric check of the mmproj: llama.cpp's image embeddings against LLaVA's, computed in PyTorch.

One fixed synthetic image, already in the model's input space (no resize, no normalization: the
same f32 pixels on both sides), goes through

- llama.cpp: `llama-mtmd-debug -p encode --image gray|rainbow -n <image size>` with
  `MTMD_DEBUG_EMBEDDINGS=<file>`, which dumps the projected embeddings as
  `[int32 n_tokens][int32 n_embd][f32 n_tokens * n_embd]`;
- PyTorch: the checkpoint's own tensors in f32, computed as LLaVA does: CLIP vision tower
  (class token first, pre-layernorm, encoder), the hidden state at `mm_vision_select_layer`,
  patch tokens only, then the 2-layer GELU projector.

The score is the normalized MSE (checks/numeric.py: mean squared difference over the reference's
variance). A correct export with a
correct graph agrees to about 1e-7 (f32 or f16 weights: the checkpoint is bf16, so f16 is
lossless; what remains is ggml's f16-table GELU). The pinned llama.cpp has two defects in its
llava graph (upstream issues #25814 and #25817) that `make llama-cpp` patches; a build without
that patch (e.g. a board's own, via LLAMA_CPP_DIR) disagrees, and the check then compares with
PyTorch simulations of the defects to name the cause.

`llama-mtmd-debug` needs a language model whose width matches the projector's output; the
encode pass never runs it, so a placeholder with zero weights is written next to the results.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..llama_cpp import limits, toolchain
from ..model.checkpoint import Checkpoint
from ..model.gguf_io import open_gguf, read_gguf
from ..run.topology import usable_cores
from ..run.workspace import Run, atomic_path, params_vision_config, rel_to_root, write_json
from ..reference.clip import IMAGES, ReferenceModel, VisionCheckError, reference_embeddings, synthetic_image  # (reference_embeddings, synthetic_image: the check's API)
from .numeric import nmse

log = logging.getLogger(__name__)

TOOL = "llama-mtmd-debug"
NMSE_TOL = 1e-6
UPSTREAM_ISSUES = {
    "class_last": "llama.cpp #25814 (class embedding concatenated after the patches)",
    "layer_short": "llama.cpp #25817 (penultimate ViT layer skipped twice: one layer short)",
}
# Defect simulations compared when the check fails: name -> (class token last, layers short).
HYPOTHESES = {
    "LLaVA (expected)": (False, 0),
    "class token last (#25814)": (True, 0),
    "one layer short (#25817)": (False, 1),
    "both defects (#25814 + #25817)": (True, 1),
}
# ----------------------------------------------------------------------------- llama.cpp side
def gguf_info(mmproj: Path) -> dict:
    """What the check needs from an mmproj: the image size and the projector's output width."""
    g = open_gguf(mmproj, "mmproj")
    out_w = g.tensors.get("mm.2.weight") or g.tensors.get("mm.0.weight")
    if out_w is None:
        raise VisionCheckError(f"{mmproj}: no mm.0/mm.2 projector tensors; not a LLaVA mlp mmproj")
    if g.fields.get("clip.projector_type") != "mlp":
        raise VisionCheckError(f"{mmproj}: projector type {g.fields.get('clip.projector_type')!r}; the check "
                               "covers LLaVA's 'mlp' projector only")
    size, patch = int(g.fields.get("clip.vision.image_size")), int(g.fields.get("clip.vision.patch_size") or 14)
    # numpy order: [output width, input width].
    return {"image_size": size, "n_embd": out_w.shape[0], "n_patches": (size // patch) ** 2}


def encode_limit(mmproj: Path, whole_image: bool = False) -> float:
    """The time limit of a llama-mtmd-debug run with `mmproj`: one slice, or (`whole_image`) the
    overview plus the tiles of its largest grid pinpoint."""
    info, views = gguf_info(mmproj), 1
    if whole_image:
        pins = read_gguf(mmproj, "mmproj").fields.get("clip.vision.image_grid_pinpoints") or []
        views += max((w * h for w, h in zip(pins[::2], pins[1::2])), default=0) // info["image_size"] ** 2
    return limits.seconds(TOOL, limits.gib([mmproj]), views * info["n_patches"])


# The placeholder's tensors (numpy order [rows = ne1, cols = ne0]); "E" is the width, 32 the head size.
_PLACEHOLDER_ZEROS = {
    "token_embd.weight": (8, "E"),
    "blk.0.attn_q.weight": (32, "E"), "blk.0.attn_k.weight": (32, "E"), "blk.0.attn_v.weight": (32, "E"),
    "blk.0.attn_output.weight": ("E", 32),
    "blk.0.ffn_gate.weight": (32, "E"), "blk.0.ffn_up.weight": (32, "E"), "blk.0.ffn_down.weight": ("E", 32),
}
_PLACEHOLDER_NORMS = ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight")


def write_placeholder_text_model(path: Path, n_embd: int) -> Path:
    """A one-layer llama GGUF of zeros, `n_embd` wide, with no vocabulary (8 dummy tokens).

    llama-mtmd-debug loads a language model only to check that its width matches the projector's
    output; the encode pass never evaluates it. One 32-wide head and 8 tokens keep it under 4 MB
    at the 7B's width (4096).
    """
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="llama")
        w.add_name("placeholder for llama-mtmd-debug")
        w.add_context_length(256)
        w.add_embedding_length(n_embd)
        w.add_block_count(1)
        w.add_feed_forward_length(32)
        w.add_head_count(1)
        w.add_head_count_kv(1)
        w.add_key_length(32)
        w.add_value_length(32)
        w.add_rope_dimension_count(32)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_vocab_size(8)
        w.add_tokenizer_model("none")
        for name in _PLACEHOLDER_NORMS:
            w.add_tensor(name, np.ones(n_embd, np.float32))
        for name, shape in _PLACEHOLDER_ZEROS.items():
            w.add_tensor(name, np.zeros([n_embd if d == "E" else d for d in shape], np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def read_dump(path: Path) -> torch.Tensor:
    """MTMD_DEBUG_EMBEDDINGS file -> [n_tokens, n_embd] f32."""
    raw = path.read_bytes()
    if len(raw) < 8:
        raise VisionCheckError(f"{path}: embeddings dump truncated ({len(raw)} bytes)")
    n_tokens, n_embd = np.frombuffer(raw[:8], dtype="<i4")
    data = np.frombuffer(raw[8:], dtype="<f4")
    if data.size != int(n_tokens) * int(n_embd):
        raise VisionCheckError(f"{path}: header says {n_tokens} x {n_embd} floats, file holds {data.size}")
    return torch.from_numpy(data.reshape(int(n_tokens), int(n_embd)).copy())


class DumpMissing(VisionCheckError):
    """The tool ran but wrote no embeddings dump (a build without MTMD_DEBUG_EMBEDDINGS support)."""


def mtmd_embeddings(mmproj: Path, image: str = "uniform", tool: Path | None = None, workdir: Path | None = None,
                    threads: int | None = None, text_model: Path | None = None) -> torch.Tensor:
    """Run `llama-mtmd-debug -p encode` on a synthetic image; llama.cpp's embeddings [tokens, n_embd].

    `workdir` receives the dump, the tool's log and (unless `text_model` is given) the placeholder
    language model. Raises ToolNotFound when the build has no llama-mtmd-debug.
    """
    mmproj = Path(mmproj)
    tool = tool or toolchain.find_tool(TOOL)
    info = gguf_info(mmproj)
    with tempfile.TemporaryDirectory(prefix="vision-check-") as tmp:
        workdir = Path(workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if text_model is None:
            text_model = workdir / f"placeholder-text-{info['n_embd']}.gguf"
            if not text_model.exists():
                write_placeholder_text_model(text_model, info["n_embd"])
        dump, log_file = workdir / f"embeddings-{image}.bin", workdir / f"llama-mtmd-debug-{image}.log"
        dump.unlink(missing_ok=True)
        # No warmup pass (it would encode a second image); the encoder stays on the CPU even in a GPU
        # build, so the numbers compare with the f32 CPU reference.
        cmd = [str(tool), "-m", str(text_model), "--mmproj", str(mmproj), "-p", "encode", "--image", IMAGES[image],
               "-n", str(info["image_size"]), "-t", str(threads or usable_cores()), "-c", "256",
               "--no-warmup", "--no-mmproj-offload"]
        log.info("llama.cpp: %s", " ".join(cmd))
        try:
            toolchain.run_tool(cmd, log_file, encode_limit(mmproj), env={"MTMD_DEBUG_EMBEDDINGS": str(dump)})
        except toolchain.ToolFailed as err:
            dump.unlink(missing_ok=True)  # a killed tool's dump is half-written
            raise VisionCheckError(str(err)) from None
        if not dump.exists():
            raise DumpMissing(f"{tool} ran but wrote no embeddings dump: this build's llama-mtmd-debug does not "
                              f"support MTMD_DEBUG_EMBEDDINGS=<file> (log {log_file})")
        return read_dump(dump)


# ----------------------------------------------------------------------------- the check
@dataclass
class VisionCheck:
    """The outcome for one image: status 'passed', 'failed' or 'skipped' (never ok unless passed)."""

    status: str
    message: str
    image: str
    mmproj: Path | None = None
    tool: Path | None = None
    nmse: float | None = None
    n_tokens: int | None = None  # llama.cpp's
    n_tokens_ref: int | None = None
    n_embd: int | None = None
    max_abs_diff: float | None = None
    min_token_cos: float | None = None
    worst_token: int | None = None
    tolerance: float = NMSE_TOL
    diagnosis: dict[str, float] = field(default_factory=dict)  # defect simulation -> NMSE vs llama.cpp
    cause: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "passed"

    @property
    def skipped(self) -> bool:
        return self.status == "skipped"

    def table(self) -> pd.DataFrame:
        rows = [("status", self.status), ("image", self.image),
                ("mmproj", rel_to_root(self.mmproj) if self.mmproj else None),
                ("llama-mtmd-debug", str(self.tool) if self.tool else None),
                ("tokens (llama.cpp / reference)", f"{self.n_tokens} / {self.n_tokens_ref}"),
                ("n_embd", self.n_embd), ("NMSE", _fmt(self.nmse)), ("tolerance", _fmt(self.tolerance)),
                ("max |difference|", _fmt(self.max_abs_diff)),
                ("lowest per-token cosine", None if self.min_token_cos is None else f"{self.min_token_cos:.7f}"),
                ("at token", self.worst_token)]
        rows += [(f"NMSE vs simulation: {name}", _fmt(v)) for name, v in self.diagnosis.items()]
        return pd.DataFrame(rows, columns=["quantity", "value"]).set_index("quantity")

    def to_json(self) -> dict:
        keys = ("status", "message", "image", "nmse", "n_tokens", "n_tokens_ref", "n_embd", "max_abs_diff",
                "min_token_cos", "worst_token", "tolerance", "diagnosis", "cause")
        data = {k: getattr(self, k) for k in keys}
        data["mmproj"] = rel_to_root(self.mmproj) if self.mmproj else None
        data["tool"] = str(self.tool) if self.tool else None
        return data


def _fmt(v: float | None) -> str | None:
    return None if v is None else f"{v:.3g}"


FIX_HINT = ("Use the project's patched build: run `make llama-cpp` and unset LLAMA_CPP_DIR (and params "
            "llama_cpp.dir), or apply patches/llama.cpp/*.patch to your llama.cpp and rebuild it. "
            "The GGUF files are not at fault.")


def compare(ref: ReferenceModel, image: str, emb: torch.Tensor, tolerance: float = NMSE_TOL) -> VisionCheck:
    """Score llama.cpp's embeddings against the reference; on failure, name the likely cause."""
    expected = ref.embeddings(image)
    res = VisionCheck("failed", "", image, n_tokens=emb.shape[0], n_tokens_ref=expected.shape[0],
                      n_embd=emb.shape[1], tolerance=tolerance)
    if emb.shape != expected.shape:
        res.message = (f"llama.cpp produced {emb.shape[0]} x {emb.shape[1]} embeddings, LLaVA "
                       f"{expected.shape[0]} x {expected.shape[1]}: the mmproj's shape metadata is wrong")
        return res
    res.nmse = nmse(emb, expected)
    res.max_abs_diff = float((emb - expected).abs().max())
    cos = F.cosine_similarity(emb.double(), expected.double(), dim=1)
    res.min_token_cos, res.worst_token = float(cos.min()), int(cos.argmin())
    if res.nmse <= tolerance:
        res.status = "passed"
        res.message = f"llama.cpp matches LLaVA's PyTorch computation: NMSE {res.nmse:.2e} <= {tolerance:.0e}"
        return res
    sims = ref.variants(image, HYPOTHESES)
    res.diagnosis = {name: nmse(emb, sim) for name, sim in sims.items()}
    best = min(res.diagnosis, key=res.diagnosis.get)
    defects = [UPSTREAM_ISSUES[k] for k, on in zip(("class_last", "layer_short"), HYPOTHESES[best]) if on]
    if defects and res.diagnosis[best] <= tolerance:
        res.cause = best
        res.message = (f"llama.cpp disagrees with LLaVA (NMSE {res.nmse:.2e} > {tolerance:.0e}) and matches a "
                       f"simulation of the upstream llava-graph defect(s) {' and '.join(defects)} "
                       f"(NMSE {res.diagnosis[best]:.1e}): this llama.cpp build is unpatched. {FIX_HINT}")
    else:
        res.message = (f"llama.cpp disagrees with LLaVA: NMSE {res.nmse:.2e} > {tolerance:.0e} (worst token "
                       f"{res.worst_token}, cosine {res.min_token_cos:.4f}). Likely causes: a llama.cpp build "
                       f"without the project's patch for {UPSTREAM_ISSUES['class_last']} and "
                       f"{UPSTREAM_ISSUES['layer_short']} ({FIX_HINT}), or a wrong mmproj export "
                       f"(closest simulation: {best}, NMSE {res.diagnosis[best]:.1e}).")
    return res


def check_mmproj(checkpoint: str | Path | Checkpoint, mmproj: Path, image: str = "uniform",
                 tool: Path | None = None, workdir: Path | None = None, threads: int | None = None,
                 tolerance: float = NMSE_TOL, vision_config_file: str | Path | None = None) -> VisionCheck:
    """The whole check for one mmproj file and one synthetic image, outside any run
    (`vision_config_file`: params convert.vision_config, as the export used it)."""
    if image not in IMAGES:
        raise ValueError(f"image must be one of {sorted(IMAGES)}, not {image!r}")
    mmproj = Path(mmproj)
    try:
        tool = tool or toolchain.find_tool(TOOL)
    except toolchain.ToolNotFound as err:
        return VisionCheck("skipped", f"vision check skipped, not passed: {err}", image, mmproj)
    try:
        emb = mtmd_embeddings(mmproj, image, tool=tool, workdir=workdir, threads=threads)
    except DumpMissing as err:
        return VisionCheck("skipped", f"vision check skipped, not passed: {err}. {FIX_HINT}", image, mmproj, tool)
    with ReferenceModel(checkpoint, vision_config_file) as ref:
        res = compare(ref, image, emb, tolerance)
    res.mmproj, res.tool = mmproj, tool
    (log.info if res.ok else log.warning)("vision check (%s image): %s", image, res.message)
    return res


def _tool_for(run: Run) -> Path:
    return toolchain.find_tool(TOOL, run.params.llama_cpp.dir)


def verify_mmproj(run: Run, image: str = "uniform", mmproj: Path | None = None) -> VisionCheck:
    """Check the run's mmproj (artifact `mmproj`) against LLaVA on one synthetic image.

    Writes `outputs/<run>/vision_check/<image>.json` (plus the tool's log and dump) and records
    artifact `vision_check` (image -> that file).
    """
    if mmproj is None:
        mmproj = run.artifact_path("mmproj")
    checkpoint = run.artifact_path("checkpoint")
    workdir = run.sub("vision_check")
    try:
        tool = _tool_for(run)
    except toolchain.ToolNotFound as err:
        res = VisionCheck("skipped", f"vision check skipped, not passed: {err}", image, Path(mmproj))
        log.warning("%s", res.message)
    else:
        res = check_mmproj(checkpoint, mmproj, image, tool=tool, workdir=workdir, threads=run.params.convert.threads,
                           vision_config_file=params_vision_config(run.params))
    path = write_json(workdir / f"{image}.json", res.to_json())
    recorded = run.artifacts().get("vision_check") or {}
    run.record("vision_check", {**recorded, image: path})
    return res


@dataclass
class VisionReport:
    """The check over several images, as the notebook shows it."""

    checks: list[VisionCheck]

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def export_ok(self) -> bool:
        """No disagreement left unexplained: passed, skipped, or failed only by a known llama.cpp defect.

        A failure matching a simulation of the upstream defects is the build's fault, not the
        GGUF's, and is reported (see `message`) without stopping the workflow."""
        return all(c.status != "failed" or c.cause is not None for c in self.checks)

    @property
    def message(self) -> str:
        return "\n".join(f"[{c.image}] {c.message}" for c in self.checks)

    def table(self) -> pd.DataFrame:
        rows = [{"image": c.image, "status": c.status, "NMSE": c.nmse, "tolerance": c.tolerance,
                 "tokens": c.n_tokens, "reference tokens": c.n_tokens_ref, "lowest token cosine": c.min_token_cos,
                 "cause": c.cause} for c in self.checks]
        return pd.DataFrame(rows).set_index("image")


def verify_run(run: Run, images: tuple[str, ...] = tuple(IMAGES)) -> VisionReport:
    """`verify_mmproj` for each image, unless params convert.verify is false (then one 'skipped')."""
    if not run.params.convert.verify:
        msg = "vision check skipped, not passed: params convert.verify is false"
        log.warning(msg)
        return VisionReport([VisionCheck("skipped", msg, image) for image in images])
    return VisionReport([verify_mmproj(run, image) for image in images])
