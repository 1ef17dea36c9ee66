"""07_tune's configurations and the statistics it decides with (pure: no tools, no files).

A `Config` is one llama-mtmd-cli configuration (None: the tool's default). The seed's command is
`baseline_config`. `compare` is the significance rule of winner.py (the one rule): A is faster than
B only when both have at least two runs and every run of A beat every run of B (their min-max
ranges do not overlap).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable

from ..run.machine import usable_cores
from ..run.topology import core_sets, read_topology
from ..run.winner import Sample, significance

SEED_TYPE = "Q5_K_M"
SEED_TEMPLATE = "vicuna"


class TuneError(RuntimeError):
    """The step cannot run (missing inputs, no configuration worked)."""


# ----------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    """One llama-mtmd-cli configuration; None means the tool's default.

    The runtime fields are named after the rows of the flag table (llama_cpp/flags.py), except
    `cache_type` (K and V alike); `threads_batch` None follows `threads`, as tune measures them together.
    """

    quant: str
    mmproj: str = "f16"
    budget: str = "full"
    threads: int | None = None
    threads_batch: int | None = None
    cpu_mask: str | None = None
    cpu_mask_batch: str | None = None
    cpu_strict: int | None = None
    # The core set's name when the threads were placed by cluster ("big", "big+medium", "all").
    cores: str | None = None
    flash_attn: str | None = None
    cache_type: str | None = None
    batch_size: int | None = None
    ubatch_size: int | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        parts = [self.quant, f"mmproj {self.mmproj}", f"budget {self.budget}"]
        parts += [f"{k} {v}" for k, v in (("cores", self.cores), ("t", self.threads), ("tb", self.threads_batch), ("C", self.cpu_mask),
                                          ("Cb", self.cpu_mask_batch), ("strict", self.cpu_strict),
                                          ("fa", self.flash_attn), ("kv", self.cache_type), ("b", self.batch_size),
                                          ("ub", self.ubatch_size)) if v is not None]
        return ", ".join(parts + list(self.extra_args))

    def settings(self) -> dict[str, Any]:
        """The flag-table settings this configuration decides (every one, None: the tool's default);
        all of them are `evaluate` params keys too (MtmdOptions, the params snippet)."""
        return {"threads": self.threads,
                "threads_batch": self.threads if self.threads_batch is None else self.threads_batch,
                "cpu_mask": self.cpu_mask, "cpu_mask_batch": self.cpu_mask_batch, "cpu_strict": self.cpu_strict,
                # Given with -tb, the batch pool's strictness is no longer copied from -C's.
                "cpu_strict_batch": self.cpu_strict,
                "batch_size": self.batch_size, "ubatch_size": self.ubatch_size, "flash_attn": self.flash_attn,
                "cache_type_k": self.cache_type, "cache_type_v": self.cache_type}


def baseline_config(quant_types: Iterable[str]) -> Config:
    """The seed's command: Q5_K_M when the run has it, f16 mmproj, full budget, tool defaults."""
    types = list(quant_types)
    if not types:
        raise TuneError("no quantized text GGUF to tune (run `make quantize` first)")
    return Config(quant=SEED_TYPE if SEED_TYPE in types else types[0])


def default_threads(cores: int | None = None) -> list[int]:
    """1 ... cores, powers of two above 8 (and the core count itself)."""
    if cores is None:
        cores = usable_cores()
    cores = max(1, cores)
    if cores <= 8:
        return list(range(1, cores + 1))
    return sorted({*(2 ** i for i in range(int(math.log2(cores)) + 1)), cores})


def thread_candidates(base: Config, threads: list[int] | None = None, topology=None) -> list[Config]:
    """Stage 1's candidates: the thread counts the user listed (tune.threads, unplaced), else one
    configuration per core set when the CPU has clusters (big, big+medium, all: each set's threads
    pinned to its CPUs), else 1 ... the usable cores."""
    if threads:
        return [replace(base, threads=t) for t in threads]
    topology = topology or read_topology()
    if len(topology.clusters) < 2:
        return [replace(base, threads=t) for t in default_threads(len(topology.usable))]
    out = []
    for cs in core_sets(topology):
        strict = 1 if cs.cpu_strict else None
        mask = cs.cpu_mask if cs.cpu_strict else None
        out.append(replace(base, cores=cs.label, threads=cs.threads, threads_batch=cs.threads, cpu_mask=mask,
                           cpu_mask_batch=mask, cpu_strict=strict))
    return out


def runtime_grid(base: Config, flash_attn: list[str], cache_types: list[str],
                 ubatch_sizes: list[int | None]) -> tuple[list[Config], list[tuple[Config, str]]]:
    """Stage 3's candidates, and the pairs skipped without running (with why)."""
    out, skipped = [], []
    for fa in flash_attn:
        for ct in cache_types:
            for ub in ubatch_sizes:
                cfg = replace(base, flash_attn=fa, cache_type=ct, ubatch_size=ub)
                if fa == "off" and ct not in ("f16", "f32", "bf16"):
                    skipped.append((cfg, "a quantized V cache needs flash attention"))
                else:
                    out.append(cfg)
    return out, skipped


# ----------------------------------------------------------------------------- statistics
def spread(values: list[float]) -> dict[str, float | None]:
    """Median, min, max and the relative range of repeated measurements."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"median": None, "min": None, "max": None, "rel_range": None, "n": 0}
    med = statistics.median(vals)
    return {"median": med, "min": min(vals), "max": max(vals),
            "rel_range": (max(vals) - min(vals)) / med if med else None, "n": len(vals)}


def compare(a: list[float], b: list[float]) -> str:
    """'faster' / 'slower' beyond the spread, 'same' within it, 'no claim' with fewer than two runs
    on either side: winner.significance on the two lists of repetitions."""
    return significance(Sample.of(a), Sample.of(b))


def answer_seconds(row: dict[str, Any], n_predict: int) -> float | None:
    """Start to a full-length answer: time to first token + (n_predict - 1) x generation time per token."""
    ttft, per_token = row.get("ttft_ms"), row.get("eval_ms_per_token")
    if ttft is None or not math.isfinite(ttft):
        return None
    if per_token is None or not math.isfinite(per_token):
        per_token = row.get("itl_median_ms")
    if per_token is None or not math.isfinite(per_token):
        return None if n_predict > 1 else ttft / 1000.0
    return (ttft + per_token * max(n_predict - 1, 0)) / 1000.0


def config_row(cfg: Config) -> dict[str, Any]:
    """The columns of a table row that name its configuration: the label and every field."""
    return {"config": cfg.label, **asdict(cfg)}


def config_from_row(row: dict) -> Config:
    """The Config of a table row (pandas turns None into NaN and ints into floats in mixed columns)."""
    def clean(key: str, value: Any) -> Any:
        if key == "extra_args":
            return tuple(value) if isinstance(value, (list, tuple)) else ()
        if isinstance(value, float):
            return None if math.isnan(value) else int(value)
        return value
    return Config(**{k: clean(k, v) for k, v in row.items() if k in Config.__dataclass_fields__})
