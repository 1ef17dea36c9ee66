"""The text corpora for perplexity / KL-divergence (evaluation) and the importance matrix (calibration).

Both are cut from the English documentation of the pinned llama.cpp source tree (the sdist that
`make setup` fetches from PyPI and checks by sha256), so they exist offline, are identical on every
machine and carry a clear licence: llama.cpp is MIT-licensed ("Copyright (c) 2023-2026 The ggml
authors", LICENSE at the root of the tree). The usual wikitext-2 is not used because it has to be
downloaded from outside a package registry.

Markdown is reduced to its prose: fenced code blocks, tables, HTML and bare URLs are dropped,
links keep their text. The evaluation and calibration texts come from disjoint files, so an
importance matrix is never scored on the text it was computed from.

Size: about 87 kB / 23k Llama tokens (evaluation) and 83 kB / 22k tokens (calibration), enough
for `perplexity_ctx` 512 x 44 chunks.
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from . import toolchain
from ..run.workspace import atomic_path, cache_dir

log = logging.getLogger(__name__)

LICENSE = "MIT (llama.cpp, Copyright (c) 2023-2026 The ggml authors)"
# Files of the pinned tree (paths relative to its root), in the order they are concatenated.
SOURCES: dict[str, tuple[str, ...]] = {
    "eval": (
        "tools/completion/README.md",
        "docs/build.md",
        "docs/speculative.md",
        "CONTRIBUTING.md",
        "docs/function-calling.md",
        "tools/perplexity/README.md",
        "docs/multi-gpu.md",
    ),
    "calibration": (
        "tools/server/README.md",
        "docs/autoparser.md",
        "grammars/README.md",
        "tools/quantize/README.md",
        "tools/llama-bench/README.md",
        "docs/docker.md",
        "README.md",
    ),
}

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_URL = re.compile(r"<?\b[a-z][a-z0-9+.-]*://\S*>?")
_HTML = re.compile(r"<[^>]+>")
_EMPHASIS = re.compile(r"(\*\*|__|`)")


def prose(markdown: str) -> str:
    """The prose of a Markdown document: paragraphs and headings, without code, tables or markup."""
    out: list[str] = []
    in_fence = False
    for line in markdown.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        stripped = line.strip()
        if in_fence or stripped.startswith("|") or stripped.startswith("    ") or line.startswith("\t"):
            continue
        text = _URL.sub("", _LINK.sub(r"\1", _HTML.sub("", line)))
        text = _EMPHASIS.sub("", text).lstrip("#>").strip()
        text = re.sub(r"^([-*+]|\d+\.)\s+", "", text)
        # A line that is left with almost no words (a lone link, a badge, a rule) is noise.
        if len(re.findall(r"[A-Za-z]{2,}", text)) < 3:
            if not text and out and out[-1]:
                out.append("")
            continue
        out.append(text)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def corpus_path(kind: str = "eval") -> Path:
    """The corpus file (built once into the cache from the pinned llama.cpp tree)."""
    if kind not in SOURCES:
        raise ValueError(f"unknown corpus '{kind}'; known: {', '.join(SOURCES)}")
    key = hashlib.sha256(repr(SOURCES[kind]).encode() + Path(__file__).read_bytes()).hexdigest()[:10]
    target = cache_dir() / "corpus" / f"llama.cpp-{toolchain.LLAMA_CPP_COMMIT}-docs-{kind}-{key}.txt"
    if target.exists():
        return target
    parts = [prose(toolchain.source_asset(rel).read_text(encoding="utf-8")) for rel in SOURCES[kind]]
    with atomic_path(target) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    for stale in target.parent.glob(f"llama.cpp-*-docs-{kind}-*.txt"):
        if stale != target:
            stale.unlink(missing_ok=True)
    log.info("corpus %s: %s (%d chars from %d llama.cpp docs, %s)", kind, target, target.stat().st_size,
             len(parts), LICENSE)
    return target


def corpus_info(kind: str = "eval") -> dict:
    """What a report says about a corpus: file, size, sha256, sources and licence."""
    path = corpus_path(kind)
    data = path.read_bytes()
    return {"kind": kind, "path": str(path), "chars": len(data.decode("utf-8")),
            "sha256": hashlib.sha256(data).hexdigest(),
            "sources": [f"llama.cpp@{toolchain.LLAMA_CPP_COMMIT}:{rel}" for rel in SOURCES[kind]],
            "license": LICENSE}
