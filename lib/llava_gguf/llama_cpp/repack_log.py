"""What llama.cpp actually repacked at load time, read from a tool's log (llama-mtmd-cli, llama-cli,
llama-bench -v, llama-perplexity: they share the model loader).

The lines, as the pinned source (0c1e570) prints them:

* `llama_model_loader: loaded meta data with N key-value pairs and T tensors from PATH (...)`:
  a model load begins. llama-mtmd-cli loads twice: a dry run that sizes memory (`common_fit`, every
  buffer 0.00 MiB) and the real load.
* `llama_model_loader: - type q4_0:   14 tensors` and `print_info: file type   = Q4_0`.
* `load_tensors:   CPU_REPACK model buffer size =    12.00 MiB` (INFO, llama-model.cpp): one line
  per weight buffer. `CPU_REPACK` holds the repacked matrices (`CPU_AARCH64` in builds before
  mid-2025); `CPU_Mapped`/`CPU` the rest; `CPU_KLEIDIAI` and `AMX` are the other extra buffers.
* `repack: repack tensor blk.0.attn_q.weight with q4_0_8x8` (DEBUG, ggml-cpu/repack.cpp
  `"%s: repack tensor %s with %s_%dx%d"`): one per repacked matrix, with `-v` (llama-bench `-v`).
  An AMX build's matrices: `ggml_backend_amx_buffer_set_tensor: amx repack tensor blk.0.attn_q.weight
  of type q5_K` (DEBUG, ggml-cpu/amx/amx.cpp), read as the layout `q5_K_amx`.
* `done_getting_tensors: tensor 'token_embd.weight' (q4_0) (and 6 others) cannot be used with
  preferred buffer type CPU_REPACK, using CPU instead` (DEBUG, llama-model-loader.cpp).

Repacked or not is decided from the buffer line (always printed at INFO), never from the CPU.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .timings import NUM, strip_line
from ..model.quant_types import from_loader_name

# The CPU backend's extra buffer types: each holds weights converted at load time to its kernels'
# layout (CPU_AARCH64 is CPU_REPACK's name before mid-2025; KleidiAI and AMX builds add theirs).
REPACK_BUFFERS = ("CPU_REPACK", "CPU_AARCH64", "CPU_KLEIDIAI", "AMX")

_LOAD = re.compile(r"llama_model_loader: loaded meta data with \d+ key-value pairs and (?P<n>\d+) tensors from "
                   r"(?P<path>.+?)(?: \(version [^)]*\))?$")
_TYPE = re.compile(r"llama_model_loader: - type\s+(?P<type>\w+):\s*(?P<n>\d+) tensors$")
_FTYPE = re.compile(r"print_info: file type\s*=\s*(?P<ftype>.+?)$")
_BUFFER = re.compile(rf"(?:load_tensors|llm_load_tensors):\s+(?P<buf>\S+) model buffer size =\s*(?P<mib>{NUM}) MiB$",
                     re.I)
_REPACK = re.compile(r"repack: repack tensor (?P<tensor>\S+) with (?P<layout>(?P<type>\w+?)_\d+x\d+)$")
# The AMX buffer's own line (DEBUG, ggml-cpu/amx/amx.cpp): the type, no layout; its layout is `<type>_amx`.
_AMX = re.compile(r"amx repack tensor (?P<tensor>\S+) of type (?P<type>\w+)$")
_LAYOUT_SUFFIX = re.compile(r"_(?:\d+x\d+|amx)$")
_MOVED = re.compile(r"done_getting_tensors: tensor '(?P<tensor>[^']+)' \((?P<type>\w+)\) \(and (?P<others>\d+) others\) "
                    r"cannot be used with preferred buffer type (?P<preferred>\S+), using (?P<used>\S+) instead$")


@dataclass
class ModelLoad:
    """One model load in a log."""

    path: str | None = None
    n_tensors: int | None = None
    file_type: str | None = None  # print_info's spelling: "Q4_0", "Q4_K - Medium", ...
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type -> tensors in the file
    buffers: dict[str, float] = field(default_factory=dict)  # weight buffer -> MiB
    repacked: dict[str, str] = field(default_factory=dict)  # tensor -> layout (only with -v)
    # The first tensor kept out of the preferred (repack) buffer, its type, and how many in all (-v).
    not_repacked: dict | None = None

    @property
    def dry_run(self) -> bool:
        """Every buffer at 0 MiB: the memory-sizing pass before the real load."""
        return bool(self.buffers) and not any(self.buffers.values())

    @property
    def repack_mib(self) -> float | None:
        """MiB in the repack buffer: 0.0 when the load had none, None when the log shows no buffers."""
        if not self.buffers:
            return None
        return sum((v for k, v in self.buffers.items() if k in REPACK_BUFFERS), 0.0)

    @property
    def repack_buffer(self) -> bool | None:
        """Whether a repack buffer was made at all (True even at 0 MiB in a dry run)."""
        if not self.buffers:
            return None
        return any(k in REPACK_BUFFERS for k in self.buffers)

    def layouts(self) -> dict[str, int]:
        """layout -> repacked tensors (from the -v lines)."""
        return dict(Counter(self.repacked.values()))

    def repacked_types(self) -> list[str]:
        """The ggml types repacked: from the -v lines' layouts (q4_K_8x8 -> q4_K)."""
        return sorted({_LAYOUT_SUFFIX.sub("", layout) for layout in self.repacked.values()})


@dataclass
class RepackLog:
    loads: list[ModelLoad] = field(default_factory=list)

    @property
    def final(self) -> ModelLoad | None:
        """The load that ran: the last one that is not a dry run (else the last one)."""
        real = [ld for ld in self.loads if ld.buffers and not ld.dry_run]
        return real[-1] if real else (self.loads[-1] if self.loads else None)

    @property
    def repacked(self) -> bool | None:
        """Whether llama.cpp repacked weights in the load that ran; None when the log cannot say
        (no model buffer line: llama-bench without -v, or a log cut before the load)."""
        final = self.final
        if final is None or final.repack_buffer is None:
            return None
        if final.dry_run:  # only the sizing pass was logged: a repack buffer there means one later
            return final.repack_buffer
        return bool(final.repack_mib) or bool(final.repacked)

    def summary(self) -> dict:
        """The flat figures a table row carries."""
        f = self.final or ModelLoad()
        moved = f.not_repacked or {}
        row = from_loader_name(f.file_type) if f.file_type else None
        return {"repacked": self.repacked, "repack_MiB": f.repack_mib,
                "other_weights_MiB": (sum(v for k, v in f.buffers.items() if k not in REPACK_BUFFERS)
                                      if f.buffers else None),
                "repacked_tensors": len(f.repacked) or None,
                "layouts": ", ".join(f"{k} x{v}" for k, v in sorted(f.layouts().items())) or None,
                "not_repacked_tensors": moved["others"] + 1 if moved else None,
                "file_type": f.file_type, "quant": row.name if row else None}

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "loads": [asdict(ld) for ld in self.loads]}


def parse_repack_log(text: str) -> RepackLog:
    out = RepackLog()

    def current() -> ModelLoad:
        if not out.loads:
            out.loads.append(ModelLoad())  # a log trimmed above the loader's first line
        return out.loads[-1]

    for raw in text.splitlines():
        line = strip_line(raw)
        if m := _LOAD.search(line):
            out.loads.append(ModelLoad(path=m["path"], n_tensors=int(m["n"])))
        elif m := _TYPE.search(line):
            current().tensor_types[m["type"]] = int(m["n"])
        elif m := _FTYPE.search(line):
            current().file_type = m["ftype"].strip()
        elif m := _BUFFER.search(line):
            load = current()
            load.buffers[m["buf"]] = load.buffers.get(m["buf"], 0.0) + float(m["mib"])
        elif m := _REPACK.search(line):
            current().repacked[m["tensor"]] = m["layout"]
        elif m := _AMX.search(line):
            current().repacked[m["tensor"]] = f"{m['type']}_amx"
        elif m := _MOVED.search(line):
            current().not_repacked = {"tensor": m["tensor"], "type": m["type"], "others": int(m["others"]),
                                      "preferred": m["preferred"], "used": m["used"]}
    return out


def parse_repack_file(path: str | Path) -> RepackLog:
    return parse_repack_log(Path(path).read_text(errors="replace"))
