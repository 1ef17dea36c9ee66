"""`llama-bench`: prompt-processing and generation rates of one GGUF, and what its load repacked.

One call runs `llama-bench -m FILE -p N -n M -t T1,T2,... -r R -o jsonl -v`: the model is loaded
once (the thread counts share it), each (test, threads) pair prints one JSON line to stdout, and
`-v` lets the model loader's lines through to stderr, among them `load_tensors: CPU_REPACK model
buffer size = ...` and one `repack: repack tensor ...` per repacked matrix. Both streams go to one
log (`toolchain.run_tool`); `parse_bench_output` takes the JSON lines out of it and
`repack_log.parse_repack_log` the load. Whether the file was repacked is read from that log, never
assumed from the CPU.

The pinned build's JSON fields (tools/llama-bench/llama-bench.cpp, `test::get_fields`): among
others `n_prompt`, `n_gen`, `n_threads`, `cpu_mask`, `cpu_strict`, `model_size` (bytes of
weights), `model_n_params`, `avg_ts`, `stddev_ts`, `samples_ts`, `repack`. A test is a prompt test
(`pp<n_prompt>`) when n_gen is 0 and a generation test (`tg<n_gen>`) when n_prompt is 0.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .repack_log import RepackLog, parse_repack_log
from .toolchain import run_tool

log = logging.getLogger(__name__)


class BenchParseError(ValueError):
    """The output holds no llama-bench result line."""


@dataclass(frozen=True)
class BenchTest:
    """One llama-bench result: a (test, threads) pair."""

    test: str  # pp512, tg128 (pp<n>+tg<m> for a -pg test)
    n_prompt: int
    n_gen: int
    threads: int
    tokens_per_s: float  # avg_ts
    stddev: float | None
    samples: tuple[float, ...]
    cpu_mask: str | None = None
    cpu_strict: bool | None = None
    model_size: int | None = None  # bytes of the model's tensors, as llama.cpp counts them
    model_n_params: int | None = None
    repack_enabled: bool | None = None  # llama-bench's --repack setting (not whether anything was repacked)

    @property
    def best_tokens_per_s(self) -> float:
        """The fastest repetition's rate (avg_ts without samples): other load on the machine only ever
        slows a run down, so the best run is the screen's figure."""
        return max(self.samples) if self.samples else self.tokens_per_s

    @property
    def kind(self) -> str:
        if self.n_gen == 0:
            return "pp"
        return "tg" if self.n_prompt == 0 else "pg"


def _test_name(n_prompt: int, n_gen: int) -> str:
    if n_gen == 0:
        return f"pp{n_prompt}"
    if n_prompt == 0:
        return f"tg{n_gen}"
    return f"pp{n_prompt}+tg{n_gen}"


def _result(obj: dict[str, Any]) -> BenchTest:
    n_prompt, n_gen = int(obj.get("n_prompt") or 0), int(obj.get("n_gen") or 0)
    mask = obj.get("cpu_mask")
    return BenchTest(_test_name(n_prompt, n_gen), n_prompt, n_gen, int(obj["n_threads"]), float(obj["avg_ts"]),
                     float(obj["stddev_ts"]) if obj.get("stddev_ts") is not None else None,
                     tuple(float(x) for x in obj.get("samples_ts") or ()),
                     None if mask in (None, "0x0") else str(mask), obj.get("cpu_strict"),
                     int(obj["model_size"]) if obj.get("model_size") is not None else None,
                     int(obj["model_n_params"]) if obj.get("model_n_params") is not None else None,
                     obj.get("repack"))


_NO_RESULT = ("no llama-bench result in the output (expected `-o jsonl` lines with avg_ts): llama-bench ran no "
              "test; check the log for a model load error and that -p/-n/-t asked for at least one test")


def parse_bench_output(text: str) -> list[BenchTest]:
    """The results in llama-bench output: `-o jsonl` lines (also amid the `-v` log lines of the same
    stream) or one `-o json` array."""
    out: list[BenchTest] = []
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            out = [_result(o) for o in json.loads(stripped)]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # not a whole JSON array after all: read it line by line
        # An empty array (llama-bench ran no test) falls through to the line scan, which finds nothing either
        # and so raises: no test is as much a failure as no result line.
        if out:
            return out
    for line in text.splitlines():
        line = line.strip()
        if not (line.startswith("{") and '"avg_ts"' in line):
            continue
        try:
            out.append(_result(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            log.warning("llama-bench output line not understood (%s): %.120s", err, line)
    if not out:
        raise BenchParseError(_NO_RESULT)
    return out


@dataclass
class BenchRun:
    """One llama-bench call on one file: its results and its load log's repack verdict."""

    gguf: Path
    tests: list[BenchTest]
    load: RepackLog
    log_file: Path | None = None
    command: list[str] = field(default_factory=list)

    def best(self, kind: str) -> BenchTest | None:
        """The fastest test of a kind ('pp' or 'tg') over the thread counts (by its best repetition)."""
        tests = [t for t in self.tests if t.kind == kind]
        return max(tests, key=lambda t: t.best_tokens_per_s) if tests else None

    def rows(self) -> list[dict[str, Any]]:
        """One table row per test."""
        return [{"test": t.test, "threads": t.threads, "cpu_mask": t.cpu_mask, "tokens_per_s": t.tokens_per_s,
                 "best_tokens_per_s": t.best_tokens_per_s, "stddev": t.stddev, "repetitions": len(t.samples), "model_size": t.model_size} for t in self.tests]


def bench_command(tool: Path | str, gguf: Path | str, threads: list[int], n_prompt: int, n_gen: int,
                  repetitions: int = 1, cpu_mask: str | None = None, cpu_strict: int | None = None) -> list[str]:
    """The argv of one llama-bench call (every thread count in one call: one model load)."""
    cmd = [str(tool), "-m", str(gguf), "-p", str(n_prompt), "-n", str(n_gen),
           "-t", ",".join(str(t) for t in threads), "-r", str(repetitions), "-o", "jsonl", "-v"]
    if cpu_mask:
        cmd += ["-C", cpu_mask]
    if cpu_strict is not None:
        cmd += ["--cpu-strict", str(cpu_strict)]
    return cmd


def run_bench(tool: Path | str, gguf: Path | str, threads: list[int], n_prompt: int, n_gen: int, log_file: Path,
              repetitions: int = 1, cpu_mask: str | None = None, cpu_strict: int | None = None,
              timeout: float | None = None) -> BenchRun:
    """Run llama-bench once; raises toolchain.ToolFailed (log kept) or BenchParseError."""
    cmd = bench_command(tool, gguf, threads, n_prompt, n_gen, repetitions, cpu_mask, cpu_strict)
    text = run_tool(cmd, log_file, timeout=timeout, what=f"llama-bench on {Path(gguf).name}", expect='"avg_ts"')
    try:
        tests = parse_bench_output(text)
    except BenchParseError as err:
        raise BenchParseError(f"{log_file}: {err}") from None
    return BenchRun(Path(gguf), tests, parse_repack_log(text), Path(log_file), cmd)
