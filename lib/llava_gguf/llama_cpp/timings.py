"""Every timing figure `llama-mtmd-cli` prints, parsed from its log.

Two families of logs are read:

* **current** -- the pinned build (0c1e570). `mtmd-cli` encodes media in batches and prints
  `encoding mtmd batch, n_chunks = K (done = i, total = T)` / `mtmd batch encoding done in N ms`.
  Lines carry a `M.SS.mmm.uuu L ` prefix (time since start, level letter). Library INFO lines
  (image batch decode times, the final `llama_perf_context_print` block) are at verbosity 4
  ("trace"): they appear with `-lv 4` or `-v`, not with the default `-lv 3`. `--perf` changes
  nothing in the text (perf counters are on by default in this build).
* **legacy** -- late-2025 upstream builds that boards still run (e.g. build 7110), and older:
  `encoding image slice...` / `image slice encoded in N ms` (mid-2025 builds:
  `image/slice encoded in N ms`), no prefix unless `--log-prefix/--log-timestamps`; the old
  `llava-cli` line `encode_image_with_clip: image encoded in N ms by CLIP (...)` and the
  pre-Sept-2024 perf prefix `llama_print_timings:` are read too.

Common to both: `decoding image batch i/n, n_tokens_batch = N` followed by
`image decoded (batch i/n) in N ms` (one series per image chunk), and the perf block
(`load time`, `prompt eval time = ms / N tokens (...)`, `eval time = ms / N runs (...)`,
`total time = ms / N tokens`, `graphs reused`, and with `common_perf_print` also
`sampling time`, `samplers time`, `unaccounted time`).

Other "X took N ms|seconds" lines go to `other`. A line that looks like a timing (a number
followed by `ms`, `time =`, `tokens per second`, `encoded in`/`decoded ... in`) but matches
none of the patterns is kept in `unparsed` with its line number, never dropped.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..run.workspace import json_safe

# A printf %f / %d figure, including what printf writes for a division by zero.
NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:inf|nan)"

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# current builds: "0.00.123.456 I " (minutes.seconds.ms.us, level); legacy with --log-prefix alike.
_PREFIX = re.compile(r"^\s*(?:\d+\.\d{2}\.\d{3}\.\d{3}\s+)?(?:[IWEDT]\s+(?=\S))?")

_PERF = re.compile(
    rf"(?:(?P<src>\w+):\s*)?(?P<what>load|sample|sampling|samplers|prompt eval|eval|total) time\s*=\s*"
    rf"(?P<ms>{NUM})\s*ms"
    rf"(?:\s*/\s*(?P<n>\d+)\s*(?P<unit>tokens|runs))?"
    rf"(?:\s*\(\s*(?P<mspt>{NUM})\s*ms per token,\s*(?P<tps>{NUM})\s*tokens per second\s*\))?\s*$",
    re.I)
_UNACCOUNTED = re.compile(rf"unaccounted time\s*=\s*(?P<ms>{NUM})\s*ms\s*/\s*(?P<pct>{NUM})\s*%")
_GRAPHS = re.compile(r"graphs reused\s*=\s*(?P<n>\d+)\s*$")
_SLICE = re.compile(rf"\b(?P<media>image|audio)(?:/| )slice encoded in\s+(?P<ms>{NUM})\s*ms\s*$")
_CLIP_OLD = re.compile(rf"image encoded in\s+(?P<ms>{NUM})\s*ms by CLIP(?:\s*\(\s*(?P<per>{NUM})\s*ms per image patch\))?")
_BATCH_START = re.compile(r"encoding mtmd batch, n_chunks = (?P<n>\d+) \(done = (?P<done>\d+), total = (?P<total>\d+)\)")
_BATCH_DONE = re.compile(rf"mtmd batch encoding done in\s+(?P<ms>{NUM})\s*ms\s*$")
_DECODING = re.compile(r"decoding (?P<media>image|audio) batch (?P<i>\d+)/(?P<n>\d+), n_tokens_batch = (?P<tok>\d+)")
_DECODED = re.compile(rf"(?P<media>image|audio) decoded \(batch (?P<i>\d+)/(?P<n>\d+)\) in\s+(?P<ms>{NUM})\s*ms\s*$")
_PROCESSED = re.compile(rf"(?P<what>(?:image|audio|media) processed) in\s+(?P<ms>{NUM})\s*ms\s*$")
_TOOK = re.compile(rf"(?:(?P<src>\w+):\s*)?(?P<what>[\w .-]*?)\s+took\s+(?P<v>{NUM})\s*(?P<unit>ms|s|seconds)\b")
_BUILD = re.compile(r"\b(?:build|version):?\s*=?\s*(?P<n>\d+)\s*\((?P<commit>[0-9a-f]{6,40})\)")

# Lines worth a second look when no pattern matched.
_LOOKS_LIKE_TIMING = re.compile(
    r"\d\s*ms\b|\btime\s*=|tokens per second|\b(?:encoded|decoded|processed)\b.*\bin\s+\S+\s*ms", re.I)
# Lines with "ms"-like text that carry no timing (so are not reported as unparsed).
_NOT_TIMING = re.compile(r"^(?:llama_model_loader: - kv|print_info:|load_hparams:)")


def _num(text: str | None) -> float | None:
    if text is None:
        return None
    return float(text)


@dataclass
class Timings:
    """What one `llama-mtmd-cli` log says about time; None where the log does not say."""

    format: str = "unknown"  # "current" | "legacy" | "unknown" (no media-encode line seen)
    build: int | None = None
    commit: str | None = None
    load_ms: float | None = None
    # One entry per encode: legacy = per image slice (chunk); current = per mtmd batch,
    # with n_chunks = how many media chunks that batch encoded together.
    image_slices: list[dict[str, Any]] = field(default_factory=list)
    # One entry per llama_decode of image embeddings: index/total as printed (1-based, per
    # chunk), chunk = running number of the image chunk, n_tokens from the "decoding" line.
    image_batches: list[dict[str, Any]] = field(default_factory=list)
    prompt_eval: dict[str, Any] | None = None  # ms, tokens, ms_per_token, tokens_per_s
    eval: dict[str, Any] | None = None         # ms, runs, ms_per_token, tokens_per_s
    sampling: dict[str, Any] | None = None     # ms (+ runs, samplers_ms where printed)
    total_ms: float | None = None
    total_tokens: int | None = None
    graphs_reused: int | None = None
    perf_source: str | None = None  # llama_perf_context_print | common_perf_print | llama_print_timings
    other: list[dict[str, Any]] = field(default_factory=list)     # {line, name, ms}
    unparsed: list[dict[str, Any]] = field(default_factory=list)  # {line, text}
    notes: list[str] = field(default_factory=list)

    # derived ------------------------------------------------------------------------------
    @property
    def image_encode_ms(self) -> float | None:
        return sum(s["encode_ms"] for s in self.image_slices) if self.image_slices else None

    @property
    def image_decode_ms(self) -> float | None:
        return sum(b["decode_ms"] for b in self.image_batches) if self.image_batches else None

    @property
    def image_tokens(self) -> int | None:
        toks = [b["n_tokens"] for b in self.image_batches]
        return sum(toks) if toks and None not in toks else None

    @property
    def has_perf(self) -> bool:
        return self.prompt_eval is not None or self.eval is not None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["image_encode_ms"] = self.image_encode_ms
        data["image_decode_ms"] = self.image_decode_ms
        data["image_tokens"] = self.image_tokens
        return json_safe(data)

    def summary(self) -> dict[str, Any]:
        """A flat row for tables."""
        pe, ev = self.prompt_eval or {}, self.eval or {}
        return json_safe({
            "load_ms": self.load_ms,
            "image_encode_ms": self.image_encode_ms,
            "image_decode_ms": self.image_decode_ms,
            "image_tokens": self.image_tokens,
            "prompt_eval_ms": pe.get("ms"), "prompt_tokens": pe.get("tokens"),
            "prompt_tokens_per_s": pe.get("tokens_per_s"),
            "eval_ms": ev.get("ms"), "eval_runs": ev.get("runs"),
            "eval_ms_per_token": ev.get("ms_per_token"), "eval_tokens_per_s": ev.get("tokens_per_s"),
            "total_ms": self.total_ms,
            "unparsed_lines": len(self.unparsed),
        })


def to_json(timings: Timings, indent: int | None = 2) -> str:
    return json.dumps(timings.to_dict(), indent=indent)


def strip_line(line: str) -> str:
    """A log line without colour codes, line end and the current builds' time-and-level prefix."""
    line = _ANSI.sub("", line).rstrip("\r\n ")
    return _PREFIX.sub("", line, count=1)


class _Parser:
    def __init__(self) -> None:
        self.t = Timings()
        self.pending_batch: dict[str, Any] | None = None  # current format: encoding header seen
        self.pending_decode: dict[tuple[str, int, int], int] = {}
        self.chunk = -1
        self.seen_perf: set[str] = set()
        self.kinds: set[str] = set()

    def _set_perf(self, key: str, lineno: int) -> bool:
        if key in self.seen_perf:
            self.t.notes.append(f"line {lineno}: a second '{key}' figure; the last one is kept "
                                "(more than one run in this log?)")
        self.seen_perf.add(key)
        return True

    def line(self, lineno: int, raw: str) -> None:
        text = strip_line(raw)
        if not text:
            return
        t = self.t
        if t.build is None and (m := _BUILD.search(text)):
            t.build, t.commit = int(m["n"]), m["commit"]
            return
        if m := _PERF.search(text):
            self._perf(m, lineno, text)
            return
        if m := _UNACCOUNTED.search(text):
            t.other.append({"line": lineno, "name": "unaccounted time", "ms": _num(m["ms"]),
                            "percent": _num(m["pct"])})
            return
        if m := _GRAPHS.search(text):
            self._set_perf("graphs reused", lineno)
            t.graphs_reused = int(m["n"])
            return
        if m := _SLICE.search(text):
            self.kinds.add("legacy")
            t.image_slices.append({"index": len(t.image_slices), "encode_ms": _num(m["ms"]),
                                   "media": m["media"], "n_chunks": 1})
            return
        if m := _CLIP_OLD.search(text):
            self.kinds.add("legacy")
            t.image_slices.append({"index": len(t.image_slices), "encode_ms": _num(m["ms"]),
                                   "media": "image", "n_chunks": 1})
            return
        if m := _BATCH_START.search(text):
            self.kinds.add("current")
            self.pending_batch = {"n_chunks": int(m["n"]), "first_chunk": int(m["done"]),
                                  "total_chunks": int(m["total"])}
            return
        if m := _BATCH_DONE.search(text):
            self.kinds.add("current")
            entry = {"index": len(t.image_slices), "encode_ms": _num(m["ms"]), "media": "media",
                     "n_chunks": None}
            if self.pending_batch:
                entry.update(n_chunks=self.pending_batch["n_chunks"],
                             first_chunk=self.pending_batch["first_chunk"])
            self.pending_batch = None
            t.image_slices.append(entry)
            return
        if m := _DECODING.search(text):
            self.pending_decode[(m["media"], int(m["i"]), int(m["n"]))] = int(m["tok"])
            return
        if m := _DECODED.search(text):
            i, n = int(m["i"]), int(m["n"])
            if i == 1 or self.chunk < 0:
                self.chunk += 1
            t.image_batches.append({
                "index": i, "total": n, "decode_ms": _num(m["ms"]), "media": m["media"],
                "n_tokens": self.pending_decode.pop((m["media"], i, n), None), "chunk": self.chunk})
            return
        if m := _PROCESSED.search(text):
            t.other.append({"line": lineno, "name": m["what"], "ms": _num(m["ms"])})
            return
        if m := _TOOK.search(text):
            v = _num(m["v"])
            ms = v if m["unit"] == "ms" else v * 1000.0
            name = " ".join(filter(None, [m["src"], m["what"].strip()])) or "took"
            t.other.append({"line": lineno, "name": name, "ms": ms})
            return
        if _LOOKS_LIKE_TIMING.search(text) and not _NOT_TIMING.search(text):
            t.unparsed.append({"line": lineno, "text": raw.rstrip("\r\n")})

    def _perf(self, m: re.Match, lineno: int, text: str) -> None:
        t = self.t
        what, ms, n = m["what"].lower(), _num(m["ms"]), m["n"]
        per = {"ms_per_token": _num(m["mspt"]), "tokens_per_s": _num(m["tps"])}
        if m["src"]:
            t.perf_source = t.perf_source or m["src"]
        if what in ("prompt eval", "eval"):
            if n is None:  # these always carry a count; without one the line is cut or garbled
                t.unparsed.append({"line": lineno, "text": text})
                return
            self._set_perf(what, lineno)
            if what == "prompt eval":
                t.prompt_eval = {"ms": ms, "tokens": int(n), **per}
            else:
                t.eval = {"ms": ms, "runs": int(n), **per}
        elif what == "load":
            self._set_perf(what, lineno)
            t.load_ms = ms
        elif what == "total":
            self._set_perf(what, lineno)
            t.total_ms = ms
            t.total_tokens = int(n) if n is not None else None
        elif what in ("sample", "sampling"):
            t.sampling = {**(t.sampling or {}), "ms": ms, "runs": int(n) if n else None,
                          **({k: v for k, v in per.items() if v is not None})}
        else:  # samplers: the sampler chain alone (common_perf_print prints both)
            t.sampling = {**(t.sampling or {}), "samplers_ms": ms,
                          "samplers_runs": int(n) if n else None}

    def finish(self) -> Timings:
        t = self.t
        if "current" in self.kinds:
            t.format = "current"
        elif "legacy" in self.kinds:
            t.format = "legacy"
        elif t.perf_source == "llama_print_timings":
            t.format = "legacy"
        if self.pending_decode:
            for (media, i, n), tok in self.pending_decode.items():
                t.notes.append(f"{media} batch {i}/{n} ({tok} tokens) started decoding but has no "
                               "'decoded' line (the run stopped there?)")
        if self.pending_batch:
            t.notes.append("an mtmd batch encode started but has no 'done' line (the run stopped there?)")
        for s in t.image_slices:  # current format names no media; mtmd-cli here only gets images
            if s["media"] == "media":
                s["media"] = "image"
        return t


def parse_timings(text: str) -> Timings:
    """Parse a `llama-mtmd-cli` log (stderr, or stdout and stderr merged) of any supported build."""
    parser = _Parser()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        parser.line(lineno, raw)
    return parser.finish()


def parse_timings_file(path: str | Path) -> Timings:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: log file not found (logs are kept under outputs/<run>/logs/)")
    return parse_timings(path.read_text(encoding="utf-8", errors="replace"))


def timings_command(logfile: str | Path) -> str:
    """`python -m llava_gguf timings LOGFILE`: the parsed timings as JSON."""
    return to_json(parse_timings_file(logfile))
