"""The Llama text model of a LLaVA checkpoint, planned for llama.cpp: hyper-parameters, vocabulary,
and every tensor's llama.cpp name, shape and type, from the surgery manifest (headers only).

The tensor name map is a data table (TENSOR_MAP); unknown, missing or misshapen tensors and
vocabulary mismatches fail here, before anything is written (steps/text_export.py writes).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pandas as pd
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from .hf_layout import HFLayoutError, extend_vocab, is_hf_config, text_config
from .layout import TEXT, SplitTensor
from .quant_types import TEXT_OUTTYPES
from .manifest import parameter_count, source_folder, split_part
from .tokenizer import token_arrays

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType

# convert.outtype -> (type of 2-D tensors, general.file_type, file name suffix). 1-D tensors (the
# norms) are always F32, as in convert_legacy_llama.py: llama.cpp's kernels for them expect F32.
OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType, str]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32, "F32"),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16, "F16"),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16, "BF16"),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0, "Q8_0"),
}

assert set(OUTTYPES) == set(TEXT_OUTTYPES), "quant_types.TEXT_OUTTYPES and text_model.OUTTYPES must list the same types"

# Canonical (Hugging Face Llama) name -> llama.cpp name, the rotary permutation it needs (the
# hyper-parameter giving its head count) and its expected shape in hyper-parameter names.
# "{bid}" is the block index.
TENSOR_MAP: tuple[tuple[str, str, str | None, tuple[str, ...]], ...] = (
    ("model.embed_tokens.weight", "token_embd.weight", None, ("n_vocab", "n_embd")),
    ("model.layers.{bid}.self_attn.q_proj.weight", "blk.{bid}.attn_q.weight", "n_head", ("n_embd", "n_embd")),
    ("model.layers.{bid}.self_attn.k_proj.weight", "blk.{bid}.attn_k.weight", "n_head_kv", ("n_embd_kv", "n_embd")),
    ("model.layers.{bid}.self_attn.v_proj.weight", "blk.{bid}.attn_v.weight", None, ("n_embd_kv", "n_embd")),
    ("model.layers.{bid}.self_attn.o_proj.weight", "blk.{bid}.attn_output.weight", None, ("n_embd", "n_embd")),
    ("model.layers.{bid}.mlp.gate_proj.weight", "blk.{bid}.ffn_gate.weight", None, ("n_ff", "n_embd")),
    ("model.layers.{bid}.mlp.up_proj.weight", "blk.{bid}.ffn_up.weight", None, ("n_ff", "n_embd")),
    ("model.layers.{bid}.mlp.down_proj.weight", "blk.{bid}.ffn_down.weight", None, ("n_embd", "n_ff")),
    ("model.layers.{bid}.input_layernorm.weight", "blk.{bid}.attn_norm.weight", None, ("n_embd",)),
    ("model.layers.{bid}.post_attention_layernorm.weight", "blk.{bid}.ffn_norm.weight", None, ("n_embd",)),
    ("model.norm.weight", "output_norm.weight", None, ("n_embd",)),
    ("lm_head.weight", "output.weight", None, ("n_vocab", "n_embd")),
)

# Vicuna v1.1 as llama.cpp formats it (src/llama-chat.cpp, LLM_CHAT_TEMPLATE_VICUNA): a system
# message then a blank line, "USER: ...\n", "ASSISTANT: ...</s>\n", and "ASSISTANT:" to answer.
# llama-mtmd-cli (no --jinja) picks the built-in "vicuna" formatter from the literal "USER: " and
# "ASSISTANT: " in the template (and no "SYSTEM: ", which would select vicuna-orca); with --jinja the
# template itself renders the same text. No bos_token: llama.cpp adds BOS when tokenizing.
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

SUPPORTED_SOURCE_DTYPES = ("BF16", "F16", "F32")


class TextExportError(ValueError):
    """The checkpoint's text model cannot be exported; the message names the file or key and the fix."""


# ---------------------------------------------------------------------------- hyper-parameters
@dataclass(frozen=True)
class TextHParams:
    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ctx: int
    norm_eps: float
    rope_theta: float | None
    rope_scale: float | None  # linear RoPE scaling factor, None when unscaled
    tie_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_embd_kv(self) -> int:
        return self.head_dim * self.n_head_kv

    def dims(self) -> dict[str, int]:
        return {"n_vocab": self.n_vocab, "n_embd": self.n_embd, "n_ff": self.n_ff, "n_embd_kv": self.n_embd_kv,
                "n_head": self.n_head, "n_head_kv": self.n_head_kv}


def read_hparams(config: dict, config_file: Path) -> TextHParams:
    """The Llama hyper-parameters of config.json (or its `text_config`), validated."""
    # llava-hf's text_config states only what differs from LlamaConfig's defaults: filled in there.
    try:
        cfg = text_config(config) if is_hf_config(config) else (config.get("text_config") or config)
    except HFLayoutError as err:
        raise TextExportError(f"{config_file}: {str(err).removeprefix('config.json: ')}") from None
    if not isinstance(cfg, dict):
        raise TextExportError(f"{config_file}: key 'text_config' is a {type(cfg).__name__}, not an object of keys")
    where = f"{config_file}" + (" (text_config)" if cfg is not config else "")

    def need(key: str, kind: type = int):
        if key not in cfg or cfg[key] is None:
            raise TextExportError(f"{where}: key '{key}' is missing; the text model's hyper-parameters need it")
        return number(key, kind)

    def number(key: str, kind: type = int):
        value = cfg[key]
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        if not ok:
            what = "a whole number" if kind is int else "a number"
            raise TextExportError(f"{where}: key '{key}' is {value!r}, not {what}; fix config.json")
        return kind(value)

    n_embd, n_head = need("hidden_size"), need("num_attention_heads")
    n_head_kv = number("num_key_value_heads") if cfg.get("num_key_value_heads") else n_head
    if n_head <= 0 or n_embd % n_head:
        raise TextExportError(f"{where}: num_attention_heads {n_head} does not divide hidden_size {n_embd}; "
                              "the head size must be a whole number (a corrupted config.json?)")
    if (n_embd // n_head) % 2:
        raise TextExportError(f"{where}: head size hidden_size/num_attention_heads = {n_embd // n_head} is odd; "
                              "rotary embeddings need an even head size")
    if n_head_kv <= 0 or n_head % n_head_kv:
        raise TextExportError(f"{where}: num_key_value_heads {n_head_kv} does not divide num_attention_heads "
                              f"{n_head}")
    if cfg.get("head_dim") not in (None, n_embd // n_head):
        raise TextExportError(f"{where}: head_dim {cfg['head_dim']} != hidden_size/num_attention_heads "
                              f"({n_embd // n_head}); Llama layouts with a separate head size are not supported")
    n_ctx = cfg.get("max_sequence_length", cfg.get("max_position_embeddings"))
    if n_ctx is None:
        raise TextExportError(f"{where}: key 'max_position_embeddings' is missing (the training context)")
    if not isinstance(n_ctx, int) or isinstance(n_ctx, bool):
        raise TextExportError(f"{where}: key 'max_position_embeddings' is {n_ctx!r}, not a whole number")
    rope_theta = number("rope_theta", float) if cfg.get("rope_theta") is not None else None
    return TextHParams(
        n_vocab=need("vocab_size"), n_embd=n_embd, n_ff=need("intermediate_size"),
        n_layer=need("num_hidden_layers"), n_head=n_head, n_head_kv=n_head_kv, n_ctx=n_ctx,
        norm_eps=need("rms_norm_eps", float), rope_theta=rope_theta,
        rope_scale=_rope_scale(cfg.get("rope_scaling"), where),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _rope_scale(scaling, where: str) -> float | None:
    if not scaling:
        return None
    # "type" in older config.json files, "rope_type" since transformers 4.45.
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
    if kind == "default":
        return None
    if kind == "linear" and isinstance(scaling.get("factor"), (int, float)):
        return float(scaling["factor"])
    raise TextExportError(f"{where}: rope_scaling {json.dumps(scaling)} is not supported (supported: null or "
                          "{\"type\": \"linear\", \"factor\": F}); this export handles the plain Llama RoPE")


# ---------------------------------------------------------------------------- vocabulary
@dataclass
class Vocab:
    tokens: list[bytes]
    scores: np.ndarray
    types: np.ndarray
    special: gguf.SpecialVocab
    source: Path

    def __len__(self) -> int:
        return len(self.tokens)


def read_vocab(folder: Path, n_vocab: int | None = None) -> Vocab:
    """The SentencePiece vocabulary of `tokenizer.model`, and the special ids and add-BOS/EOS flags
    from the tokenizer and config files (as convert_legacy_llama.py reads them). With `n_vocab` past
    the pieces (llava-hf: 32064 rows), the added tokens and padding rows follow (hf_layout.extend_vocab)."""
    model_file = folder / "tokenizer.model"
    if not model_file.is_file():
        raise TextExportError(f"{model_file}: missing; the text GGUF's vocabulary comes from the SentencePiece "
                              "tokenizer.model, which belongs with the checkpoint's other files: copy it in")
    try:
        tokens, scores, types = token_arrays(model_file)
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(model_file.read_bytes())
    except DecodeError as err:
        raise TextExportError(f"{model_file}: not a SentencePiece model ({err}); re-download it") from None
    if not tokens:
        raise TextExportError(f"{model_file}: holds no pieces; re-download it")
    if n_vocab is not None and n_vocab > len(tokens):
        try:
            tokens, scores, types = extend_vocab(tokens, scores, types, folder, n_vocab, folder / "config.json")
        except HFLayoutError as err:
            raise TextExportError(str(err)) from None
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(tokens))
    # tokenizer.model is the authority for ids the JSON files leave out (Llama's unk is only there).
    trainer = proto.trainer_spec
    for kind, tok_id in (("unk", trainer.unk_id), ("bos", trainer.bos_id), ("eos", trainer.eos_id)):
        if 0 <= tok_id < len(tokens):
            special.special_token_ids.setdefault(kind, tok_id)
    special.add_special_token.setdefault("bos", True)
    special.add_special_token.setdefault("eos", False)
    if special.chat_template is not None:
        log.info("%s: replacing the checkpoint's chat template with the Vicuna one", folder)
    special.chat_template = VICUNA_CHAT_TEMPLATE
    return Vocab(tokens, scores, types, special, model_file)


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class TextTensor:
    name: str  # llama.cpp name
    canonical: str
    stored: str
    shard: str
    src_dtype: str
    shape: tuple[int, ...]  # PyTorch order (rows, columns), as GGUFWriter takes it
    qtype: gguf.GGMLQuantizationType
    permute_heads: int | None  # Q and K: head count for the rotary re-ordering

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype)))


@dataclass
class TextPlan:
    checkpoint: Path
    hparams: TextHParams
    vocab: Vocab
    outtype: str
    tensors: list[TextTensor]
    total_params: tuple[int, int, int]  # whole checkpoint (total, shared, expert), for general.size_label

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([{
            "gguf name": t.name, "source": t.canonical, "source dtype": t.src_dtype, "type": t.qtype.name,
            "shape": "x".join(map(str, t.shape)), "rotary permute": "yes" if t.permute_heads else "",
            "MiB": round(t.nbytes / 2**20, 2)} for t in self.tensors])


def _name_patterns() -> list[tuple[re.Pattern, str, str | None, tuple[str, ...]]]:
    out = []
    for src, dst, heads, dims in TENSOR_MAP:
        pattern = re.compile("^" + re.escape(src).replace(r"\{bid\}", r"(?P<bid>\d+)") + "$")
        out.append((pattern, dst, heads, dims))
    return out


_PATTERNS = _name_patterns()


def map_name(canonical: str) -> tuple[str, str | None, tuple[str, ...]] | None:
    """(llama.cpp name, head-count key of its rotary permutation, shape keys) of a canonical name."""
    for pattern, dst, heads, dims in _PATTERNS:
        m = pattern.match(canonical)
        if m:
            return dst.format(**m.groupdict()), heads, dims
    return None


def expected_names(hp: TextHParams) -> list[str]:
    """The canonical names of a Llama with these hyper-parameters, in llama.cpp's order."""
    head = [src for src, *_ in TENSOR_MAP if "{bid}" not in src]
    blocks = [src for src, *_ in TENSOR_MAP if "{bid}" in src]
    return [head[0]] + [b.format(bid=i) for i in range(hp.n_layer) for b in blocks] + head[1:]


def plan_from_manifest(manifest: dict, outtype: str = "f16") -> TextPlan:
    """Validate the text model and decide every tensor's name, shape and type, from the surgery
    manifest and the tokenizer files (no tensor read); raises `TextExportError` naming the file or key."""
    if outtype not in OUTTYPES:
        raise TextExportError(f"convert.outtype {outtype!r} is not supported (choose one of {', '.join(OUTTYPES)})")
    folder = source_folder(manifest)
    config_file = folder / "config.json"
    hp = read_hparams(manifest["config"], config_file)
    # llava-hf pads its vocabulary with added tokens and spare rows (hf_layout.extend_vocab).
    vocab = read_vocab(folder, hp.n_vocab if is_hf_config(manifest["config"]) else None)
    if len(vocab) != hp.n_vocab:
        raise TextExportError(f"{config_file}: vocab_size {hp.n_vocab} disagrees with {vocab.source} "
                              f"({len(vocab)} pieces); added tokens are not supported, the two must match")
    planned = plan_tensors(split_part(manifest, TEXT), hp, outtype, folder)
    n = parameter_count(manifest)
    return TextPlan(folder, hp, vocab, outtype, planned, (n, n, 0))


def plan_tensors(text: dict[str, SplitTensor], hp: TextHParams, outtype: str, folder: Path) -> list[TextTensor]:
    """The llama.cpp tensors for the text part of a split (canonical name -> tensor), checked against
    the hyper-parameters; errors name the tensor, its shard and the config keys."""
    config_file = folder / "config.json"
    qtype_2d, dims = OUTTYPES[outtype][0], hp.dims()
    unmapped = [f"{t.stored} ({t.shard})" for name, t in text.items() if map_name(name) is None]
    if unmapped:
        raise TextExportError(f"{folder}: {len(unmapped)} text tensor(s) have no llama.cpp name: "
                              f"{', '.join(unmapped[:5])}{' ...' if len(unmapped) > 5 else ''}. This export "
                              "handles the plain Llama architecture (no biases, no extra norms)")
    wanted = expected_names(hp)
    if hp.tie_embeddings and "lm_head.weight" not in text:
        wanted.remove("lm_head.weight")  # llama.cpp then uses token_embd as the output matrix
    missing = [n for n in wanted if n not in text]
    if missing:
        raise TextExportError(f"{folder}: text tensor(s) {', '.join(missing[:5])} missing for "
                              f"num_hidden_layers={hp.n_layer} in {config_file}; a shard is missing or "
                              "config.json does not belong to these weights")
    extra = [f"{text[n].stored} ({text[n].shard})" for n in text if n not in wanted]
    if extra:
        raise TextExportError(f"{folder}: tensor(s) {', '.join(extra[:5])} do not fit num_hidden_layers="
                              f"{hp.n_layer} / tie_word_embeddings={hp.tie_embeddings} of {config_file}")
    planned = []
    for name in wanted:
        t = text[name]
        gguf_name, heads_key, shape_keys = map_name(name)
        shape = tuple(dims[k] for k in shape_keys)
        if tuple(t.shape) != shape:
            what = "rows of the embedding/output disagree with vocab_size" if shape_keys[0] == "n_vocab" \
                else "shape disagrees with the hyper-parameters"
            raise TextExportError(f"{folder / t.shard}: '{t.stored}' has shape {list(t.shape)}, expected "
                                  f"{list(shape)} from {config_file} ({what}: "
                                  f"{', '.join(f'{k}={dims[k]}' for k in dict.fromkeys(shape_keys))})")
        if t.dtype not in SUPPORTED_SOURCE_DTYPES:
            raise TextExportError(f"{folder / t.shard}: '{t.stored}' is {t.dtype}; only "
                                  f"{', '.join(SUPPORTED_SOURCE_DTYPES)} weights can be converted")
        qtype = qtype_2d if len(shape) > 1 else Q.F32
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if shape[-1] % block:
            raise TextExportError(f"{folder / t.shard}: '{t.stored}' rows of {shape[-1]} values do not split "
                                  f"into {qtype.name} blocks of {block}; choose convert.outtype f16")
        planned.append(TextTensor(gguf_name, name, t.stored, t.shard, t.dtype, shape, qtype,
                                     dims[heads_key] if heads_key else None))
    return planned
