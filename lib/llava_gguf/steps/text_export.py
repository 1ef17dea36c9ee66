"""Step 04: the Llama text model of a LLaVA checkpoint as a llama.cpp GGUF, written natively.

llama.cpp's manual recipe (`examples/convert_legacy_llama.py <model> --skip-unknown`) writes a
27 GB F32 file for the 7B and leaves the chat template out. Here the text part of the split
(planned from the surgery manifest by `text_model.plan_from_manifest`) is written with gguf-py's `GGUFWriter` in the
requested precision (`convert.outtype`), one tensor at a time: the header and the tensor table
are written first (`add_tensor_info`), then each tensor is read from its shard, converted in row
chunks and appended, so peak memory is one source tensor plus a chunk, whatever the model size.

What is written matches the legacy script (tensor names, shapes, types and values, the `llama.*`,
`general.*` and `tokenizer.*` keys; see `text_check.compare_ggufs`), plus
`tokenizer.ggml.unknown_token_id` and the Vicuna chat template, which llama.cpp recognises as its
built-in "vicuna" template, so `llama-mtmd-cli` needs no `--chat-template`. One deliberate
difference: Q8_0 blocks come from gguf-py's port of ggml's reference quantizer (byte-identical to
`llama-quantize`), where the legacy script's own numpy shortcut rounds about 0.1% of the quants one
step the other way (same block scales). Everything is checked before a byte is written.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import jinja2
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import tools as step_tools
from ..run import diskspace
from ..checks import text as text_check
from ..model.gguf_io import metadata_table  # noqa: F401  (notebook 04 shows the export's metadata)
from ..checks.hf import HFCheck, verify_hf
from ..model.manifest import load_manifest, open_checked
from ..model.text_model import OUTTYPES, VICUNA_CHAT_TEMPLATE, Q, TextPlan, TextTensor, plan_from_manifest
from ..run.workspace import Run, atomic_path, repo_root
from . import surgery

log = logging.getLogger(__name__)

# Rows converted at once: bounds the F32 working copies (16 MiB) for any tensor size.
CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------- metadata
def model_name(run: Run) -> str:
    """The model's name: the repo's for hub downloads, else the checkpoint folder's."""
    p = run.params.model
    if p.source in ("huggingface", "modelscope"):
        return p.repo.rstrip("/").rsplit("/", 1)[-1]
    if p.source == "tiny":
        return f"llava-synthetic-{p.tiny.size}"
    # The folder as named in the params (the recorded artifact may be a resolved symlink).
    return Path(p.path).name if p.path else run.artifact_path("checkpoint").name


def general_metadata(checkpoint: Path, name: str, total_params: tuple[int, int, int]) -> gguf.Metadata:
    """`general.*` as convert_legacy_llama.py derives it (model card front matter, config.json,
    then a name heuristic), with `name` standing in for the folder name: a hub snapshot's folder is
    a commit hash."""
    meta = gguf.Metadata.load(None, checkpoint, None, 0)
    card = gguf.Metadata.load_model_card(checkpoint)
    hf = gguf.Metadata.load_hf_parameters(checkpoint)
    named = gguf.Metadata.apply_metadata_heuristic(gguf.Metadata(), card, hf, Path(name), 0)
    for key in ("name", "organization", "basename", "finetune", "version"):
        setattr(meta, key, getattr(named, key))
    meta.name = meta.name or name
    meta.size_label = gguf.size_label(*total_params, expert_count=0)
    return meta


def _add_metadata(writer: gguf.GGUFWriter, plan: TextPlan, name: str) -> None:
    hp = plan.hparams
    general_metadata(plan.checkpoint, name, plan.total_params).set_gguf_meta_model(writer)
    writer.add_vocab_size(hp.n_vocab)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_layer_norm_rms_eps(hp.norm_eps)
    if hp.rope_theta is not None:
        writer.add_rope_freq_base(hp.rope_theta)
    if hp.rope_scale is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hp.rope_scale)
    writer.add_file_type(OUTTYPES[plan.outtype][1])
    writer.add_tokenizer_model("llama")
    writer.add_token_list(plan.vocab.tokens)
    writer.add_token_scores(plan.vocab.scores.tolist())
    writer.add_token_types(plan.vocab.types.tolist())
    plan.vocab.special.add_to_gguf(writer, quiet=True)


# ---------------------------------------------------------------------------- tensors
def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face stores Q/K rows rotate-half ordered per head; llama.cpp's RoPE wants the two
    halves interleaved (the inverse of transformers' convert_llama_weights_to_hf permutation)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_TORCH_CASTS = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


class _StreamedTensor:
    """Stands in for an ndarray in `GGUFWriter.write_tensor_data`, which only asks for `nbytes`
    and calls `tofile(fout)` (as gguf-py's chunked lazy tensors do): the tensor is read when its
    turn comes and converted a few rows at a time, so no whole F32 copy ever exists."""

    def __init__(self, ckpt, t: TextTensor):
        self.ckpt, self.t = ckpt, t
        self.nbytes = t.nbytes

    def tofile(self, fout) -> None:
        t = self.t
        w = self.ckpt.load(t.stored)
        if t.permute_heads:
            w = permute_rotary(w, t.permute_heads)
        row = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        step = max(1, CHUNK_ELEMENTS // row)
        written = 0
        torch_dtype = _TORCH_CASTS.get(t.qtype)
        for start in range(0, t.shape[0], step):
            if torch_dtype is not None:
                # torch casts round to nearest even like gguf-py's numpy code, in several threads;
                # from bf16/f16 the result is the same single rounding as going through F32.
                out = w[start:start + step].to(torch_dtype).contiguous().view(torch.uint8).numpy()
            else:
                # Through F32 as the legacy script does: bf16/f16 -> f32 is exact, then one rounding.
                out = gguf.quants.quantize(w[start:start + step].to(torch.float32).numpy(), t.qtype)
            out.tofile(fout)
            written += out.nbytes
        del w
        if written != self.nbytes:
            raise RuntimeError(f"{t.name}: wrote {written} bytes, expected {self.nbytes}")


@dataclass
class TextResult:
    path: Path
    n_tensors: int
    size: int  # bytes
    outtype: str
    seconds: float = 0.0
    plan: TextPlan | None = field(default=None, repr=False)
    check: text_check.TextCheck | None = field(default=None, repr=False)  # convert.verify
    hf_check: HFCheck | None = field(default=None, repr=False)  # llava-hf: transformers' LlavaNext

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([{"file": self.path.name, "tensors": self.n_tensors, "outtype": self.outtype,
                              "GiB": round(self.size / 2**30, 3), "seconds": round(self.seconds, 1)}])

    @property
    def ok(self) -> bool:
        return (self.check is None or self.check.ok) and (self.hf_check is None or self.hf_check.status != "failed")

    @property
    def message(self) -> str:
        hf = f"\n{self.hf_check.message}" if self.hf_check is not None and self.hf_check.status != "skipped" else ""
        return (self.check.message if self.check is not None else "not verified (convert.verify: false)") + hf


def plan_text(source: dict | Path | str, outtype: str = "f16") -> TextPlan:
    """The plan from a surgery manifest (the pipeline) or a checkpoint folder (analyzed in memory)."""
    manifest = source if isinstance(source, dict) else surgery.analyze(source)
    return plan_from_manifest(manifest, outtype)


def write_text_gguf(source: dict | Path | str, out_path: Path | str, outtype: str = "f16",
                    name: str | None = None, plan: TextPlan | None = None) -> TextResult:
    """Write the text GGUF of a manifest's (or a folder's) checkpoint to `out_path` (atomically);
    the checkpoint is only read, and refused if it changed since it was planned."""
    t0 = time.monotonic()
    out_path = Path(out_path)
    manifest = source if isinstance(source, dict) else surgery.analyze(source)
    plan = plan or plan_from_manifest(manifest, outtype)
    name = name or plan.checkpoint.name
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_metadata(writer, plan, name)
    for t in plan.tensors:
        writer.add_tensor_info(t.name, gguf.quant_shape_to_byte_shape(t.shape, t.qtype), np.dtype(np.uint8),
                               t.nbytes, raw_dtype=t.qtype)
    log.info("writing %s: %d tensors, %.2f GiB (%s)", out_path.name, len(plan.tensors), plan.nbytes / 2**30,
             plan.outtype)
    diskspace.ensure_space(out_path, plan.nbytes, "the text GGUF")
    with open_checked(manifest) as ckpt, atomic_path(out_path) as tmp, \
            diskspace.disk_errors(out_path, plan.nbytes, "the text GGUF", tmp):
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with tqdm(total=plan.nbytes, unit="B", unit_scale=True, desc=f"text {plan.outtype}") as bar:
                for t in plan.tensors:
                    writer.write_tensor_data(_StreamedTensor(ckpt, t))
                    bar.update(t.nbytes)
        finally:
            writer.close()
    size = out_path.stat().st_size
    log.info("wrote %s (%.2f GiB) in %.1f s", out_path, size / 2**30, time.monotonic() - t0)
    return TextResult(out_path, len(plan.tensors), size, plan.outtype, time.monotonic() - t0, plan)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = True, eos_token: str = "</s>") -> str:
    """The Vicuna template rendered as Jinja (what llama.cpp's --jinja mode and transformers do)."""
    return jinja2.Environment().from_string(VICUNA_CHAT_TEMPLATE).render(
        messages=messages, add_generation_prompt=add_generation_prompt, eos_token=eos_token)


def output_path(run: Run) -> Path:
    suffix = OUTTYPES[run.params.convert.outtype][2]
    return run.dir / "models" / f"{model_name(run)}-{suffix}.gguf"


def run_text(run: Run) -> TextResult:
    """Step 04: plan from the surgery manifest, write `outputs/<run>/models/<name>-<OUTTYPE>.gguf`
    (artifact `text_gguf`), then check it against PyTorch (`convert.verify`)."""
    step_tools.require(run.params, "text")  # the check's tools, before minutes of writing
    manifest = load_manifest(run.artifact_path("surgery"), repo_root())
    plan = plan_from_manifest(manifest, run.params.convert.outtype)
    result = write_text_gguf(manifest, output_path(run), plan.outtype, model_name(run), plan)
    run.record("text_gguf", result.path)
    result.check = text_check.verify_text(run)
    result.hf_check = verify_hf(run, "text")  # skipped unless the checkpoint is in the llava-hf layout
    return result


def llama_cpp_tools(params) -> tuple[list[str], list[str]]:
    """(required, optional): the check's tools."""
    return (["llama-debug", "llama-tokenize"] if params.convert.verify and params.model.format != "gguf" else []), []
