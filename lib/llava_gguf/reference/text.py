"""The text model's logits in float32 PyTorch, one decoder layer at a time from the checkpoint.

The reference side of `checks.text`: a plain Llama forward pass (token embedding, per layer
RMSNorm -> rotary self-attention with grouped K/V heads -> residual, RMSNorm -> SiLU-gated MLP ->
residual, final RMSNorm, lm_head) over the checkpoint's own tensors, written from the Llama
definition that transformers' `LlamaForCausalLM` implements (the tests hold the two to ~1e-13).

Each weight is read from its shard when the pass needs it (safetensors memory-mapped; `.bin`
through `torch.load(weights_only=True, mmap=True)`; both via `Checkpoint.load`), converted to the
compute dtype, used and dropped, so the whole model is never in memory: at 7B shapes the largest
tensor (lm_head, 32000 x 4096) is 0.5 GB in f32 and the activations of a short prompt are
negligible. Weights stay in the page cache, which the kernel can reclaim.

Float32 at every size: a bf16 reference rounds its own activations and is the noisier side of the
comparison (it measured NMSE ~2.6e-3 against an f16 GGUF at 7B; this pass 4e-5).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..model.checkpoint import Checkpoint
from ..model.layout import TEXT, split_checkpoint
from ..model.text_model import TextHParams, read_hparams

log = logging.getLogger(__name__)


class StreamedLlama:
    """The checkpoint's text model, weights read on use (see the module docstring)."""

    def __init__(self, checkpoint: str | Path | Checkpoint, dtype: torch.dtype = torch.float32):
        self._own = not isinstance(checkpoint, Checkpoint)
        self.ckpt = Checkpoint.open(checkpoint) if self._own else checkpoint
        self.hp: TextHParams = read_hparams(self.ckpt.config, self.ckpt.path / "config.json")
        self.text = split_checkpoint(self.ckpt).part(TEXT)
        self.dtype = dtype

    def close(self) -> None:
        if self._own:
            self.ckpt.close()

    def __enter__(self) -> "StreamedLlama":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _w(self, name: str) -> torch.Tensor:
        return self.ckpt.load(self.text[name].stored).to(self.dtype)

    def _rms_norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.hp.norm_eps) * self._w(name)

    def _rotary(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [tokens, head_dim] for the rotate-half layout of Hugging Face Q/K weights."""
        hp = self.hp
        head_dim = hp.n_embd // hp.n_head
        theta = hp.rope_theta or 10000.0
        # The angles in float64, rounded once: positions (divided by a linear rope_scaling factor)
        # times theta^(-2i/d).
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        pos = torch.arange(n_tokens, dtype=torch.float64) / (hp.rope_scale or 1.0)
        angles = torch.outer(pos, inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(self.dtype), angles.sin().to(self.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _attention(self, x: torch.Tensor, p: str, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        hp = self.hp
        n, head_dim = x.shape[0], hp.n_embd // hp.n_head
        q = F.linear(x, self._w(p + "q_proj.weight")).view(n, hp.n_head, head_dim).transpose(0, 1)
        k = F.linear(x, self._w(p + "k_proj.weight")).view(n, hp.n_head_kv, head_dim).transpose(0, 1)
        v = F.linear(x, self._w(p + "v_proj.weight")).view(n, hp.n_head_kv, head_dim).transpose(0, 1)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        if hp.n_head_kv != hp.n_head:  # grouped-query attention: query head h reads K/V head h // group
            group = hp.n_head // hp.n_head_kv
            k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
        scores = (q @ k.transpose(1, 2)) * head_dim ** -0.5
        causal = torch.ones(n, n, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        return F.linear(out.transpose(0, 1).reshape(n, hp.n_embd), self._w(p + "o_proj.weight"))

    def _mlp(self, x: torch.Tensor, p: str) -> torch.Tensor:
        gate = F.silu(F.linear(x, self._w(p + "gate_proj.weight")))
        return F.linear(gate * F.linear(x, self._w(p + "up_proj.weight")), self._w(p + "down_proj.weight"))

    @torch.no_grad()
    def logits(self, ids: list[int], all_positions: bool = False) -> np.ndarray:
        """The logits after the last token [vocab], or after every token [tokens, vocab]."""
        hp = self.hp
        if not ids or min(ids) < 0 or max(ids) >= hp.n_vocab:
            raise ValueError(f"token ids must be in [0, {hp.n_vocab}), got {ids}")
        embed = self.ckpt.load(self.text["model.embed_tokens.weight"].stored)
        x = embed[torch.tensor(ids)].to(self.dtype)
        del embed
        cos, sin = self._rotary(len(ids))
        for i in tqdm(range(hp.n_layer), desc="f32 reference" if self.dtype == torch.float32 else "reference",
                      unit="layer", leave=False):
            p = f"model.layers.{i}."
            x = x + self._attention(self._rms_norm(x, p + "input_layernorm.weight"), p + "self_attn.", cos, sin)
            x = x + self._mlp(self._rms_norm(x, p + "post_attention_layernorm.weight"), p + "mlp.")
        x = self._rms_norm(x if all_positions else x[-1:], "model.norm.weight")
        head = "lm_head.weight" if "lm_head.weight" in self.text or not hp.tie_embeddings \
            else "model.embed_tokens.weight"
        out = F.linear(x, self._w(head))
        return (out if all_positions else out[0]).numpy()


def reference_logits(checkpoint: str | Path | Checkpoint, ids: list[int], dtype: torch.dtype = torch.float32,
                     all_positions: bool = False) -> np.ndarray:
    """The text model's logits for `ids` (last token, or every position), streamed from the checkpoint."""
    with StreamedLlama(checkpoint, dtype) as model:
        log.info("streamed %s reference: %d layers, %d tokens", str(dtype).removeprefix("torch."),
                 model.hp.n_layer, len(ids))
        return model.logits(ids, all_positions)
