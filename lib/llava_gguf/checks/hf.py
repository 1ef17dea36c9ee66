"""Cross-check of a llava-hf conversion against transformers' own `LlavaNextForConditionalGeneration`.

For a checkpoint in the llava-hf layout (see hf_layout.py) the reference is not rebuilt from tensors
(as checks.clip_reference.ReferenceModel and text_reference do) but is transformers' model class,
loaded from the checkpoint folder with `from_pretrained`: its own name mapping, config defaults,
feature-layer selection and projector. Both GGUF files are compared with it:

- image features, per 336 px slice: the synthetic images of checks.vision (`gray` / `rainbow`, already in
  the model's input space) through `model.model.vision_tower` (hidden state at
  `vision_feature_layer`, the class token dropped for strategy "default") and
  `model.model.multi_modal_projector`, as `LlavaNextModel.get_image_features` does for each tile before
  packing; against `llama-mtmd-debug -p encode` on the mmproj (checks.vision.mtmd_embeddings). Bound:
  checks.vision.NMSE_TOL.
- text: the last-token logits of `convert.verify_prompt` from `model(input_ids)` (no image, so the
  language model alone, all 32064 vocabulary rows) against `llama-debug --save-logits` on the text GGUF
  (checks.text.llama_logits); token ids identical, NMSE within checks.text's bound for the outtype.

Cost: the whole model in memory in F32 when it fits in half the available RAM, else BF16 (the 7B: ~14 GB)
when that fits in 70 % of it, else the check is skipped with the sizes named (a board's 8 GB).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import torch

from .numeric import nmse
from .text import NMSE_BOUNDS, llama_logits, outtype_of, reference_tokens
from .vision import IMAGES, NMSE_TOL, gguf_info, mtmd_embeddings, synthetic_image
from ..llama_cpp import toolchain
from ..model.checkpoint import Checkpoint
from ..model.manifest import load_manifest
from ..run.workspace import Run, repo_root, write_json

log = logging.getLogger(__name__)


class HFCheckError(RuntimeError):
    """The checkpoint cannot be cross-checked with transformers (not the llava-hf layout, or a mismatch)."""


# ---------------------------------------------------------------------------- the reference
# transformers' model holds the whole checkpoint: in bf16 when f32 does not fit (the 7B), and a
# bf16 reference is itself this far from f32 logits, so the bound widens to it.
NMSE_BOUND_BF16_REFERENCE = 1e-3


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (psutil; an OSError when it cannot be read)."""
    return psutil.virtual_memory().available


def reference_dtype(n_params: int, available: int | None = None) -> torch.dtype | None:
    """F32 when the model fits in half the available memory, else BF16 when that fits in 70 % of it
    (the 7B: ~14 GB), else None: no room for transformers' model on this machine."""
    available = available_memory() if available is None else available
    if 4 * n_params < available / 2:
        return torch.float32
    return torch.bfloat16 if 2 * n_params < 0.7 * available else None


def checkpoint_params(checkpoint: str | Path) -> int:
    with Checkpoint.open(Path(checkpoint)) as ckpt:
        return sum(t.numel for t in ckpt)


def reference_model(checkpoint: str | Path, dtype: torch.dtype | None = None):
    """transformers' LlavaNextForConditionalGeneration, loaded from the checkpoint folder."""
    from transformers import LlavaNextForConditionalGeneration

    checkpoint = Path(checkpoint)
    dtype = dtype or reference_dtype(checkpoint_params(checkpoint)) or torch.bfloat16
    log.info("transformers LlavaNextForConditionalGeneration from %s (%s)", checkpoint, dtype)
    model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype)
    return model.eval()


@torch.no_grad()
def slice_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """Projected features [tokens, n_embd] (f32) of one image slice [3, S, S], as get_image_features
    computes each tile: tower, hidden state at vision_feature_layer, strategy, projector."""
    cfg, inner = model.config, model.model
    layer, strategy = cfg.vision_feature_layer, cfg.vision_feature_select_strategy
    if not isinstance(layer, int):
        raise HFCheckError(f"vision_feature_layer {layer} (several layers) is not supported by llama.cpp's llava graph")
    dtype = next(inner.vision_tower.parameters()).dtype
    out = inner.vision_tower(pixels[None].to(dtype), output_hidden_states=True, return_dict=True)
    h = out.hidden_states[layer]
    if strategy == "default":
        h = h[:, 1:]
    return inner.multi_modal_projector(h)[0].float()


@torch.no_grad()
def text_logits(model, ids: list[int]) -> np.ndarray:
    """Last-token logits of the language model (no image in the prompt)."""
    return model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy()


# ---------------------------------------------------------------------------- the check
@dataclass
class HFCheck:
    status: str  # passed, failed, skipped
    message: str = ""
    vision: dict[str, float] = field(default_factory=dict)  # image -> NMSE
    vision_tokens: dict[str, tuple[int, int]] = field(default_factory=dict)  # image -> (llama.cpp, reference)
    vision_bound: float = NMSE_TOL
    text_nmse: float = float("nan")
    text_bound: float = float("nan")
    llama_tokens: list[int] = field(default_factory=list)
    reference_tokens: list[int] = field(default_factory=list)
    top1: tuple[int, int] = (-1, -1)  # llama.cpp, reference
    n_vocab: int = 0
    reference_dtype: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "passed"

    def table(self) -> pd.DataFrame:
        rows = [("status", self.status), ("reference", f"transformers LlavaNextForConditionalGeneration "
                                                      f"({self.reference_dtype})")]
        for image, value in self.vision.items():
            rows.append((f"image features NMSE ({image}, {self.vision_tokens[image][0]} tokens)",
                         f"{value:.3e} (bound {self.vision_bound:.0e})"))
        rows += [("token ids identical", self.llama_tokens == self.reference_tokens),
                 ("logits NMSE", f"{self.text_nmse:.3e} (bound {self.text_bound:.0e})"),
                 ("logits compared", self.n_vocab),
                 ("top-1 token (llama.cpp / reference)", f"{self.top1[0]} / {self.top1[1]}")]
        return pd.DataFrame(rows, columns=["check", "value"]).set_index("check")

    def to_json(self) -> dict:
        def num(x: float) -> float | None:  # JSON has no NaN: a half not checked is null
            return None if x != x else x

        return {"status": self.status, "message": self.message, "vision_nmse": self.vision,
                "vision_tokens": self.vision_tokens, "vision_bound": self.vision_bound,
                "text_nmse": num(self.text_nmse),
                "text_bound": num(self.text_bound), "llama_tokens": self.llama_tokens,
                "reference_tokens": self.reference_tokens, "top1": list(self.top1), "n_vocab": self.n_vocab,
                "reference_dtype": self.reference_dtype}


def check_hf(checkpoint: str | Path, mmproj: Path | None, text_gguf: Path | None, prompt: str,
             outtype: str | None = None, images: tuple[str, ...] = tuple(IMAGES), configured: str | None = None,
             workdir: Path | None = None, threads: int | None = None, dtype: torch.dtype | None = None) -> HFCheck:
    """The mmproj and/or the text GGUF of a llava-hf checkpoint against transformers' LlavaNext (see the
    module doc); None skips that half."""
    if mmproj is None and text_gguf is None:
        raise ValueError("check_hf needs an mmproj, a text GGUF or both")
    checkpoint = Path(checkpoint)
    if dtype is None:  # decided here, so that a model that cannot fit is skipped before any tool runs
        n_params = checkpoint_params(checkpoint)
        still_ran = ("The streamed float32 text check (step 04) and the per-slice vision check (step 03) do not "
                     "need it and still ran.")
        try:
            available = available_memory()
        except OSError as err:
            return HFCheck("skipped", f"transformers cross-check skipped, not passed: LlavaNext holds the whole "
                           f"model, {2 * n_params / 2**30:.1f} GiB in bf16, and this machine's available memory "
                           f"cannot be read ({err}), so whether it fits is unknown. {still_ran}")
        dtype = reference_dtype(n_params, available)
        if dtype is None:
            return HFCheck("skipped", f"transformers cross-check skipped, not passed: LlavaNext holds the whole "
                           f"model, {2 * n_params / 2**30:.1f} GiB in bf16, and this machine has "
                           f"{available / 2**30:.1f} GiB available. {still_ran}")
    try:
        mtmd_debug = toolchain.find_tool("llama-mtmd-debug", configured) if mmproj else None
        llama_debug = toolchain.find_tool("llama-debug", configured) if text_gguf else None
    except toolchain.ToolNotFound as err:
        return HFCheck("skipped", f"transformers cross-check skipped, not passed: {err}")
    emb, llama, llama_ids = {}, None, []
    if mmproj is not None:
        mmproj = Path(mmproj)
        size = gguf_info(mmproj)["image_size"]
        emb = {image: mtmd_embeddings(mmproj, image, tool=mtmd_debug, workdir=workdir, threads=threads)
               for image in images}
    if text_gguf is not None:
        text_gguf = Path(text_gguf)
        outtype = outtype or outtype_of(text_gguf)
        llama, llama_ids = llama_logits(text_gguf, prompt, llama_debug, threads)

    model = reference_model(checkpoint, dtype)
    ref_dtype = next(model.parameters()).dtype
    res = HFCheck("failed", reference_dtype=str(ref_dtype).removeprefix("torch."))
    problems = []
    for image, got in emb.items():
        ref = slice_features(model, synthetic_image(image, size))
        res.vision_tokens[image] = (got.shape[0], ref.shape[0])
        res.vision[image] = nmse(got, ref) if got.shape == ref.shape else float("inf")
        if not res.vision[image] <= NMSE_TOL:
            problems.append(f"image features ({image}) NMSE {res.vision[image]:.2e} > {NMSE_TOL:.0e}"
                            + ("" if got.shape == ref.shape else f", {got.shape[0]} vs {ref.shape[0]} tokens"))
    if llama is not None:
        ids = reference_tokens(checkpoint / "tokenizer.model", prompt)
        ref_logits = text_logits(model, ids)
        res.llama_tokens, res.reference_tokens = llama_ids, ids
        res.n_vocab = int(ref_logits.shape[0])
        res.text_bound = NMSE_BOUNDS[outtype] if ref_dtype == torch.float32 else max(NMSE_BOUNDS[outtype],
                                                                                       NMSE_BOUND_BF16_REFERENCE)
        if llama.shape != ref_logits.shape:
            problems.append(f"llama.cpp returned {llama.shape[0]} logits, transformers {ref_logits.shape[0]}; "
                            "the vocabularies differ")
        else:
            res.text_nmse = nmse(llama, ref_logits)
            res.top1 = (int(llama.argmax()), int(ref_logits.argmax()))
            if not res.text_nmse <= res.text_bound:
                problems.append(f"logits NMSE {res.text_nmse:.2e} > {res.text_bound:.0e} ({outtype})")
        if llama_ids != ids:
            problems.append(f"token ids differ: llama.cpp {llama_ids} vs reference {ids}")
    del model
    files = " / ".join(p.name for p in (mmproj, text_gguf) if p is not None)
    if problems:
        res.message = f"{files} vs transformers LlavaNext: " + "; ".join(problems)
    else:
        res.status = "passed"
        done = []
        if res.vision:
            done.append("image features NMSE " + ", ".join(f"{k} {v:.1e}" for k, v in res.vision.items())
                        + f" <= {NMSE_TOL:.0e}")
        if llama is not None:
            done.append(f"logits NMSE {res.text_nmse:.1e} <= {res.text_bound:.0e} over {res.n_vocab} tokens "
                        f"({outtype} vs {res.reference_dtype})")
        res.message = f"{files}: transformers LlavaNext agrees: " + "; ".join(done)
    (log.info if res.ok else log.warning)("%s", res.message)
    return res


PARTS = {"vision": "mmproj", "text": "text_gguf"}  # part -> the run artifact it checks


def verify_hf(run: Run, part: str | None = None) -> HFCheck:
    """`check_hf` on a run's checkpoint and its mmproj (`part="vision"`, notebook 03), text GGUF
    (`part="text"`, notebook 04) or both (None), when the checkpoint is in the llava-hf layout; skipped
    otherwise, or with `convert.verify: false`. Writes `outputs/<run>/hf_check/<part>.json` and records
    artifact `hf_check` (part -> that file)."""
    if part not in (None, *PARTS):
        raise ValueError(f"part must be one of {sorted(PARTS)} or None, not {part!r}")
    layout = load_manifest(run.artifact_path("surgery"), repo_root())["layout"]
    if layout != "llava-hf":
        res = HFCheck("skipped", f"transformers LlavaNext cross-check: layout {layout!r} is not llava-hf")
    elif not run.params.convert.verify:
        res = HFCheck("skipped", "transformers cross-check skipped, not passed: params convert.verify is false")
    else:
        files = {p: run.artifact_path(a) if part in (None, p) else None for p, a in PARTS.items()}
        res = check_hf(run.artifact_path("checkpoint"), files["vision"], files["text"],
                       run.params.convert.verify_prompt, configured=run.params.llama_cpp.dir,
                       workdir=run.sub("hf_check"), threads=run.params.convert.threads)
    if res.status == "skipped":
        log.info("%s", res.message)
    key = part or "all"
    path = write_json(run.sub("hf_check") / f"{key}.json", res.to_json())
    run.record("hf_check", {**(run.artifacts().get("hf_check") or {}), key: path})
    return res
