"""LLaVA's image features in PyTorch, from the checkpoint's own tensors (f32): the reference every
vision check compares llama.cpp with.

CLIP vision tower (class token first, pre-layernorm, encoder), the hidden state at
`mm_vision_select_layer`, patch tokens only, then the 2-layer GELU projector. `variants` also
computes the two upstream llava-graph defects (class token last, one layer short), so a failing
check can name the one that fits.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..model.checkpoint import Checkpoint
from ..model.layout import PROJECTOR, VISION, split_checkpoint
from ..model.vision_config import resolve_vision_config

# Our image names -> the synthetic inputs llama-mtmd-debug generates itself (mtmd-debug.cpp).
IMAGES = {"uniform": "gray", "pattern": "rainbow"}



class VisionCheckError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- the inputs
def synthetic_image(kind: str, size: int) -> torch.Tensor:
    """[3, size, size] f32 pixels, exactly what `llama-mtmd-debug --image gray|rainbow` builds."""
    if kind not in IMAGES:
        raise ValueError(f"image must be one of {sorted(IMAGES)}, not {kind!r}")
    if kind == "uniform":
        return torch.full((3, size, size), 0.5, dtype=torch.float32)
    # mtmd-debug.cpp's "rainbow": hue from the angle around the centre, saturation from the
    # distance, HSV -> RGB with value 1; computed in f32 as the C++ code does.
    f32 = np.float32
    y, x = np.meshgrid(np.arange(size, dtype=f32), np.arange(size, dtype=f32), indexing="ij")
    c = f32(size / 2.0)
    dx, dy = x - c, y - c
    max_dist = np.sqrt(c * c + c * c, dtype=f32)
    hue = np.arctan2(dy, dx).astype(f32) / (f32(2.0) * f32(3.14159265))
    hue = np.where(hue < 0, hue + f32(1.0), hue).astype(f32)
    sat = np.minimum(np.sqrt(dx * dx + dy * dy, dtype=f32) / max_dist, f32(1.0)).astype(f32)
    h6 = hue * f32(6.0)
    i6 = h6.astype(np.int32)
    fr = h6 - i6.astype(f32)
    p, q, t, one = f32(1.0) - sat, f32(1.0) - sat * fr, f32(1.0) - sat * (f32(1.0) - fr), np.ones_like(sat)
    sector = i6 % 6
    table = [(one, t, p), (q, one, p), (p, one, t), (p, q, one), (t, p, one), (one, p, q)]
    rgb = [np.select([sector == k for k in range(6)], [table[k][ch] for k in range(6)]) for ch in range(3)]
    return torch.from_numpy(np.stack(rgb).astype(f32))


# ----------------------------------------------------------------------------- PyTorch reference
@dataclass(frozen=True)
class TowerSpec:
    """How LLaVA runs its vision tower, from config.json (hyperparameters the GGUF also stores)."""

    n_layer: int
    n_head: int
    eps: float
    act: str
    select_layer: int  # index into hidden_states: [embeddings, layer 1 out, ..., layer n out]
    select_feature: str  # "patch" (drop the class token) or "cls_patch"
    patch_size: int
    image_size: int

    @property
    def feature_index(self) -> int:
        return self.select_layer if self.select_layer >= 0 else self.n_layer + 1 + self.select_layer


def tower_spec(config: dict, layout: str, vision: dict[str, tuple[int, ...]], where: str = "config.json",
               vision_config_file: str | Path | None = None) -> TowerSpec:
    """The spec for a checkpoint; `vision` maps canonical vision tensor names to shapes. The head
    count, activation and epsilon come from the config the export uses (`resolve_vision_config`,
    `vision_config_file` = params convert.vision_config)."""
    tower = resolve_vision_config(config, vision, where, vision_config_file)
    if layout == "llava-hf":
        select_layer = config.get("vision_feature_layer", -2)
        feature = "cls_patch" if config.get("vision_feature_select_strategy", "default") == "full" else "patch"
    else:
        select_layer = config.get("mm_vision_select_layer", -2)
        feature = config.get("mm_vision_select_feature", "patch")
    if isinstance(select_layer, list):
        raise VisionCheckError(f"config.json: several vision feature layers {select_layer} are not supported")
    return TowerSpec(tower["num_hidden_layers"], tower["num_attention_heads"], tower["layer_norm_eps"],
                     tower["hidden_act"], int(select_layer), feature, tower["patch_size"], tower["image_size"])


class ReferenceModel:
    """LLaVA's image path in f32 PyTorch, from a checkpoint's tensors (loaded one at a time)."""

    def __init__(self, checkpoint: str | Path | Checkpoint, vision_config_file: str | Path | None = None):
        self._own = not isinstance(checkpoint, Checkpoint)
        self.ckpt = Checkpoint.open(checkpoint) if self._own else checkpoint
        split = split_checkpoint(self.ckpt)
        self._vision, self._projector = split.part(VISION), split.part(PROJECTOR)
        self.spec = tower_spec(self.ckpt.config, split.layout, {k: t.shape for k, t in self._vision.items()},
                               str(self.ckpt.path / "config.json"), vision_config_file)

    def close(self) -> None:
        if self._own:
            self.ckpt.close()

    def __enter__(self) -> "ReferenceModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _w(self, name: str) -> torch.Tensor:
        table = self._projector if name.startswith("mm_projector.") else self._vision
        return self.ckpt.load(table[name].stored).to(torch.float32)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.act == "quick_gelu":
            return x * torch.sigmoid(1.702 * x)
        if self.spec.act == "gelu":
            return F.gelu(x)
        raise VisionCheckError(f"vision hidden_act {self.spec.act!r} is not supported by the reference")

    @torch.no_grad()
    def hidden_states(self, pixels: torch.Tensor, n_layers: int, class_last: bool = False) -> list[torch.Tensor]:
        """[embeddings after pre-layernorm, output of layer 1, ..., of layer n_layers], each [tokens, hidden]."""
        s, v = self.spec, "vision_model."
        x = F.conv2d(pixels[None], self._w(v + "embeddings.patch_embedding.weight"), stride=s.patch_size)
        x = x.flatten(2)[0].T  # [patches, hidden], row-major over the patch grid
        cls = self._w(v + "embeddings.class_embedding")[None]
        x = torch.cat([x, cls] if class_last else [cls, x])
        x = x + self._w(v + "embeddings.position_embedding.weight")[: x.shape[0]]
        hidden = x.shape[1]
        x = F.layer_norm(x, (hidden,), self._w(v + "pre_layrnorm.weight"), self._w(v + "pre_layrnorm.bias"), s.eps)
        states = [x]
        head_dim = hidden // s.n_head
        for i in range(n_layers):
            p = f"{v}encoder.layers.{i}."
            lin = lambda y, name: F.linear(y, self._w(p + name + ".weight"), self._w(p + name + ".bias"))  # noqa: E731
            y = F.layer_norm(x, (hidden,), self._w(p + "layer_norm1.weight"), self._w(p + "layer_norm1.bias"), s.eps)
            q, k, vv = (lin(y, f"self_attn.{n}_proj").view(-1, s.n_head, head_dim).transpose(0, 1) for n in "qkv")
            att = torch.softmax((q @ k.transpose(1, 2)) * head_dim ** -0.5, dim=-1) @ vv
            x = x + lin(att.transpose(0, 1).reshape(-1, hidden), "self_attn.out_proj")
            y = F.layer_norm(x, (hidden,), self._w(p + "layer_norm2.weight"), self._w(p + "layer_norm2.bias"), s.eps)
            x = x + lin(self._act(lin(y, "mlp.fc1")), "mlp.fc2")
            states.append(x)
        return states

    @torch.no_grad()
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """LLaVA's mlp2x_gelu projector (nn.GELU: the exact erf form)."""
        x = F.linear(features, self._w("mm_projector.0.weight"), self._w("mm_projector.0.bias"))
        return F.linear(F.gelu(x), self._w("mm_projector.2.weight"), self._w("mm_projector.2.bias"))

    def pixels(self, image: str | torch.Tensor) -> torch.Tensor:
        if isinstance(image, str):
            return synthetic_image(image, self.spec.image_size)
        if tuple(image.shape) != (3, self.spec.image_size, self.spec.image_size):
            raise ValueError(f"pixels must be [3, {self.spec.image_size}, {self.spec.image_size}], "
                             f"got {list(image.shape)}")
        return image.to(torch.float32)

    def embeddings(self, image: str | torch.Tensor, class_last: bool = False, layers_short: int = 0) -> torch.Tensor:
        """[tokens, n_embd]; class_last / layers_short simulate llama.cpp's defective graph instead."""
        return self.variants(image, {"": (class_last, layers_short)})[""]

    def variants(self, image: str | torch.Tensor, which: dict[str, tuple[bool, int]]) -> dict[str, torch.Tensor]:
        """Several (class_last, layers_short) variants, sharing the tower passes they can share."""
        s, pixels, out = self.spec, self.pixels(image), {}
        for class_last in sorted({c for c, _ in which.values()}):
            depth = s.feature_index
            states = self.hidden_states(pixels, depth, class_last)
            for name, (c, short) in which.items():
                if c != class_last:
                    continue
                h = states[depth - short]
                # With the class token last, llama.cpp's rows 1..n are patches 1.. and the class
                # token: patch 0 is dropped.
                if class_last or s.select_feature == "patch":
                    h = h[1:]
                out[name] = self.project(h)
        return out


def reference_embeddings(checkpoint: str | Path | Checkpoint, image: str | torch.Tensor = "uniform",
                         vision_config_file: str | Path | None = None) -> torch.Tensor:
    """LLaVA's projected image embeddings [tokens, n_embd] in f32 for one preprocessed image."""
    with ReferenceModel(checkpoint, vision_config_file) as ref:
        return ref.embeddings(image)


