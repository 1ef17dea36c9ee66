"""The bound of a tuned configuration, named with a number: how close it runs to what this CPU can do.

* **Prefill** (the image tokens' decode) is matrix-matrix work: its rate is set against this CPU's
  measured ceiling, the best prompt-processing rate (`llama-bench` pp) of any candidate type at any
  thread count (tune_screen.ScreenResult.best_pp): the fastest int8 GEMM path llama.cpp has here.
  An image prefill runs over a longer context than pp512 (attention grows with it), so even the
  fastest type's image prefill sits somewhat below its own pp rate.
* **Generation** is matrix-vector work: every generated token reads every weight matrix once
  (token_embd.weight is only gathered, one row) and the KV cache up to the current position. Bytes
  per token x tokens per second is the memory traffic, set against a measured copy bandwidth
  (`copy_bandwidth`: numpy copies of buffers far larger than any cache, over as many threads as the
  configuration uses, counted as STREAM does, bytes read + bytes written).

A figure near 100 % says that more tuning of the same kind cannot help; far below says the kernels
or the threads leave room.
"""
from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..model.gguf_io import open_gguf
from ..run.machine import usable_cores

# Bytes per element of the KV cache (ggml block sizes: q8_0 34 bytes per 32, q4_0 18 per 32, ...).
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
            "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32}
GATHERED = ("token_embd.weight",)  # read one row per token, not whole


# ----------------------------------------------------------------------------- model bytes
def weight_bytes_per_token(tensors: dict[str, int]) -> int:
    """Bytes of weights one generated token reads: every tensor but the gathered embedding (which
    counts when the model has no output.weight and reuses it as the output matrix)."""
    tied = "output.weight" not in tensors
    return sum(n for name, n in tensors.items() if tied or name not in GATHERED)


def kv_bytes_per_position(n_layer: int, n_embd: int, n_head: int, n_head_kv: int, cache_type_k: str | None = None,
                          cache_type_v: str | None = None) -> float:
    """KV-cache bytes per cached position over all layers (K and V), at the cache types (None: f16)."""
    kv_dim = n_embd // n_head * n_head_kv
    return n_layer * kv_dim * (KV_BYTES.get(cache_type_k or "f16", 2.0) + KV_BYTES.get(cache_type_v or "f16", 2.0))


def model_bytes(gguf: Path | str) -> dict[str, Any]:
    """What `generation_bound` needs of a text GGUF, from its header (no tensor data is read)."""
    g = open_gguf(gguf, "text GGUF")
    arch = str(g.fields.get("general.architecture", "llama"))

    def key(name: str, default=None):
        return g.fields.get(f"{arch}.{name}", default)

    n_head = int(key("attention.head_count", 1) or 1)
    return {"weight_bytes_per_token": weight_bytes_per_token({n: t.n_bytes for n, t in g.tensors.items()}),
            "weight_bytes": sum(t.n_bytes for t in g.tensors.values()),
            "n_layer": int(key("block_count", 0) or 0), "n_embd": int(key("embedding_length", 0) or 0),
            "n_head": n_head, "n_head_kv": int(key("attention.head_count_kv", n_head) or n_head)}


# ----------------------------------------------------------------------------- bandwidth probe
def copy_bandwidth(threads: int = 1, mib: int = 256, repeats: int = 5) -> dict[str, Any]:
    """The best of `repeats` copies of a `mib` MiB buffer split over `threads` threads (numpy releases
    the GIL while it copies), in GB/s counting read + write bytes (STREAM's copy)."""
    threads = max(1, int(threads))
    n = mib * 2**20
    src = np.ones(n, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page before timing
    bounds = np.linspace(0, n, threads + 1, dtype=np.int64)

    def part(i: int) -> None:
        np.copyto(dst[bounds[i]:bounds[i + 1]], src[bounds[i]:bounds[i + 1]])

    best = math.inf
    for _ in range(repeats):
        workers = [threading.Thread(target=part, args=(i,)) for i in range(threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return {"GB_per_s": 2 * n / best / 1e9, "threads": threads, "MiB": mib, "repeats": repeats,
            "method": f"numpy copy of {mib} MiB over {threads} thread(s), best of {repeats}, read + write bytes"}


# ----------------------------------------------------------------------------- the arithmetic
def percent(value: float | None, ceiling: float | None) -> float | None:
    if value is None or not ceiling or not math.isfinite(value) or not math.isfinite(ceiling):
        return None
    return 100.0 * value / ceiling


def prefill_bound(prefill_tokens_per_s: float | None, ceiling: dict[str, Any] | None) -> dict[str, Any]:
    """The configuration's prefill rate as a share of the best pp rate measured on this CPU."""
    c = ceiling or {}
    pct = percent(prefill_tokens_per_s, c.get("tokens_per_s"))
    text = (f"prefill at {pct:.0f}% of this CPU's ceiling ({prefill_tokens_per_s:.1f} of {c['tokens_per_s']:.1f} "
            f"tokens/s, the best {c.get('test')} of any candidate: {c.get('quant')} at {c.get('threads')} threads)"
            if pct is not None else "prefill ceiling not measured (no llama-bench prompt rate)")
    return {"tokens_per_s": prefill_tokens_per_s, "ceiling_tokens_per_s": c.get("tokens_per_s"),
            "ceiling": c or None, "percent": pct, "text": text}


def generation_bound(tokens_per_s: float | None, weight_bytes: float, bandwidth_gbps: float | None,
                     kv_bytes_per_position: float = 0.0, positions: float = 0.0) -> dict[str, Any]:
    """Weights + KV cache read per token x tokens/s, as a share of the measured copy bandwidth."""
    per_token = weight_bytes + kv_bytes_per_position * positions
    traffic = per_token * tokens_per_s / 1e9 if tokens_per_s else None
    pct = percent(traffic, bandwidth_gbps)
    text = (f"generation at {pct:.0f}% of memory bandwidth ({tokens_per_s:.2f} tokens/s x "
            f"{per_token / 1e9:.3g} GB per token = {traffic:.3g} GB/s of {bandwidth_gbps:.3g} GB/s measured)"
            if pct is not None else "generation bound not measured (no generation rate or bandwidth)")
    return {"tokens_per_s": tokens_per_s, "bytes_per_token": per_token, "weight_bytes_per_token": weight_bytes,
            "kv_bytes_per_token": kv_bytes_per_position * positions, "kv_positions": positions,
            "GB_per_s": traffic, "bandwidth_GB_per_s": bandwidth_gbps, "percent": pct, "text": text}


def configuration_bound(stages: dict[str, Any], model: dict[str, Any], ceiling: dict[str, Any] | None,
                        bandwidth: dict[str, Any] | None, cache_type: str | None = None,
                        n_predict: int = 1) -> dict[str, Any]:
    """Both bounds of one confirmed configuration, from its median stages (image_tokens,
    image_decode_ms, prompt_tokens, prompt_eval_ms, eval_ms_per_token)."""
    def num(key: str) -> float | None:
        v = stages.get(key)
        return float(v) if v is not None and math.isfinite(float(v)) else None

    tokens, decode_ms = num("image_tokens"), num("image_decode_ms")
    prefill = 1000.0 * tokens / decode_ms if tokens and decode_ms else None
    if prefill is None and num("prompt_tokens") and num("prompt_eval_ms"):
        prefill = 1000.0 * num("prompt_tokens") / num("prompt_eval_ms")
    per_token_ms = num("eval_ms_per_token")
    gen = 1000.0 / per_token_ms if per_token_ms else None
    # The mean position over the answer: the prompt plus half the generated tokens.
    positions = (num("prompt_tokens") or tokens or 0.0) + n_predict / 2
    kv = kv_bytes_per_position(model["n_layer"], model["n_embd"], model["n_head"], model["n_head_kv"],
                               cache_type, cache_type) if model.get("n_layer") and model.get("n_embd") else 0.0
    return {"prefill": prefill_bound(prefill, ceiling),
            "generation": generation_bound(gen, model["weight_bytes_per_token"],
                                           (bandwidth or {}).get("GB_per_s"), kv, positions),
            "bandwidth": bandwidth}


def _int(value) -> int:
    """A table cell as an int (None and NaN: 0)."""
    try:
        return 0 if value is None or math.isnan(float(value)) else int(value)
    except (TypeError, ValueError):
        return 0


def memory_bandwidth(threads: int, mib: int = 256, repeats: int = 5) -> dict[str, Any]:
    """The better of the copy bandwidth on one thread and on `threads`."""
    runs = [copy_bandwidth(t, mib, repeats) for t in sorted({1, max(1, int(threads))})]
    return max(runs, key=lambda r: r["GB_per_s"])


def bounds(chosen: dict[str, dict], text: dict[str, Path], ceiling: dict[str, Any] | None, n_predict: int,
           bandwidth: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per image budget, both bounds of its recommended configuration (`chosen`: tune.choose's rows);
    the copy bandwidth is probed once, at the most threads any of them uses."""
    if not chosen:
        return {}
    if bandwidth is None:
        threads = max(_int(r.get("threads")) or usable_cores() for r in chosen.values())
        bandwidth = memory_bandwidth(threads)
    out: dict[str, Any] = {}
    models: dict[str, dict] = {}
    for budget, row in chosen.items():
        quant = row["quant"]
        if quant not in models:
            models[quant] = model_bytes(text[quant])
        b = configuration_bound(row, models[quant], ceiling, bandwidth, row.get("cache_type"), n_predict)
        out[budget] = {"config": row.get("config"), "quant": quant, **b}
    return out
