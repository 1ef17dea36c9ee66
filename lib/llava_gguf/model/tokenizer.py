"""The Llama SentencePiece tokenizer, rebuilt offline from llama.cpp's vocabulary file.

The real `tokenizer.model` of LLaVA 1.6 Vicuna is Llama's 32000-piece BPE model. llama.cpp ships
the same vocabulary as `models/ggml-vocab-llama-spm.gguf` (tokens, scores, token types) with
test vectors beside it (`.inp`/`.out`), so the synthetic checkpoint gets the real tokenizer, and
`check_tokenizer_vectors` proves it encodes exactly as llama.cpp expects.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from .gguf_io import read_gguf

log = logging.getLogger(__name__)

VOCAB_GGUF = "models/ggml-vocab-llama-spm.gguf"
TEST_SEPARATOR = "\n__ggml_vocab_test__\n"
_VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")


def build_tokenizer_model(vocab_gguf: Path) -> bytes:
    """Serialize a SentencePiece ModelProto equal in behaviour to Llama's tokenizer.model."""
    fields = read_gguf(vocab_gguf, "llama.cpp vocabulary").fields
    missing = [k for k in _VOCAB_KEYS if k not in fields]
    if missing:
        raise KeyError(f"{vocab_gguf}: {', '.join(missing)} missing from the vocabulary file")
    tokens, scores, types = (fields[k] for k in _VOCAB_KEYS)

    proto = sp_pb2.ModelProto()
    for text, score, ttype in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece = text
        piece.score = float(score)
        # gguf's token types use SentencePiece's numbering (NORMAL=1 ... BYTE=6).
        piece.type = int(ttype)
    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    norm = proto.normalizer_spec
    # Llama's model: no NFKC, a dummy prefix space, whitespace kept as is (escaped to U+2581).
    norm.name = "identity"
    norm.add_dummy_prefix = True
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def read_test_vectors(vocab_gguf: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test cases: (text, expected ids without BOS)."""
    raw = Path(str(vocab_gguf) + ".inp").read_text(encoding="utf-8")
    outs = Path(str(vocab_gguf) + ".out").read_text(encoding="utf-8").split("\n")
    texts = raw.split(TEST_SEPARATOR)
    if texts and texts[-1].endswith("\n__ggml_vocab_test__"):
        texts[-1] = texts[-1][: -len("\n__ggml_vocab_test__")]
    outs = outs[: len(texts)]
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]


def check_tokenizer_vectors(tokenizer_model: Path, vocab_gguf: Path) -> list[str]:
    """Encode llama.cpp's test strings with SentencePiece; returns the mismatches (empty = equal)."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    bad = []
    for text, expected in read_test_vectors(vocab_gguf):
        got = sp.encode(text)
        if got != expected:
            bad.append(f"{text!r}: sentencepiece {got} != llama.cpp {expected}")
    return bad


def model_problem(tokenizer_model: Path) -> str | None:
    """Why SentencePiece cannot use this tokenizer.model, phrased to follow "<path>: " (None: it can)."""
    path = Path(tokenizer_model)
    if not path.is_file():
        return ("missing; the text GGUF's vocabulary comes from the SentencePiece tokenizer.model, which every "
                "LLaVA 1.5/1.6 checkpoint has")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as err:
        return f"not a SentencePiece model ({str(err).strip().splitlines()[-1] if str(err).strip() else err})"
    if sp.get_piece_size() == 0:
        return "not a SentencePiece model (it holds no pieces)"
    return None


def token_arrays(tokenizer_model: Path) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """Pieces (UTF-8), scores and SentencePiece piece types of a tokenizer.model, in id order."""
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer_model).read_bytes())
    pieces = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = np.array([p.score for p in proto.pieces], dtype=np.float32)
    types = np.array([p.type for p in proto.pieces], dtype=np.int32)
    return pieces, scores, types
