"""07_tune's second baseline: the published recipe, i.e. the seed's command on the *unpatched* pinned llama.cpp.

The first baseline is the seed's command on the project's build (every patch): the same
files and flags, with LLaVA 1.6's faithful image sequence (2,340 tokens on test-1.jpeg). What a user
of the recipe as published waits for is the same command on upstream llama.cpp at the pinned commit,
which feeds the flat 2,880-token sequence. That build (llama-mtmd-cli only, with the build fixes
alone: 0005, without which it crashes on an AMX CPU) is made once and cached beside the patched one
(`toolchain.build_llama_cpp(unpatched=True)`, `~/.cache/llava-gguf/llama.cpp-0c1e570-unpatched-<hash>`).

Whether tune measures it: `tune.published_baseline` (or the environment's
`LLAVA_GGUF_PUBLISHED_BASELINE`, which wins):

* `build` (the default): use the cached unpatched build, building it first when absent (once;
  ~7 min on 2 idle cores, 15-30 min under load);
* `if-built`: use it only when it is already cached;
* `off`: do not measure it.

When it is not measured, or its runs fail, the report says so, and why; no ratio is invented.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from ..llama_cpp import toolchain
from .config import spread

log = logging.getLogger(__name__)

ENV = "LLAVA_GGUF_PUBLISHED_BASELINE"
MODES = ("build", "if-built", "off")
NAME = "the published recipe"
# The build fixes (`Build fix:` patches) the published recipe's build carries, by number: it says so.
_FIXES = [p.name.split("-", 1)[0] for p in toolchain.patch_files(unpatched=True)]
DESCRIPTION = (f"the seed's command on llama.cpp {toolchain.LLAMA_CPP_COMMIT} as published, without this "
               "project's patches" + (f" but its build fix{'es' if len(_FIXES) > 1 else ''} {', '.join(_FIXES)}"
                                      if _FIXES else ""))
PHASES = {"warmup": "published-warmup", "confirm": "published"}


def mode(configured: str | None) -> tuple[str, str]:
    """(mode, where it was set): the environment's value wins over the params key."""
    env = os.environ.get(ENV, "").strip()
    if env:
        if env not in MODES:
            raise ValueError(f"${ENV}={env!r}: one of {', '.join(MODES)}")
        return env, f"${ENV}"
    return configured or "build", "tune.published_baseline"


def unpatched_cli() -> Path:
    return toolchain.default_build_dir(unpatched=True) / "bin" / "llama-mtmd-cli"


def find_or_build(configured: str | None, build: Callable[..., Path] | None = None) -> tuple[Path | None, str | None]:
    """(the unpatched llama-mtmd-cli, None) or (None, why it is not measured)."""
    how, where = mode(configured)
    path = unpatched_cli()
    if how == "off":
        return None, f"not measured: {where} is off"
    if path.is_file() and os.access(path, os.X_OK):
        return path, None
    if how == "if-built":
        return None, (f"not measured: the unpatched llama.cpp build is absent ({path}) and {where} is if-built; "
                      "`make llama-cpp-unpatched` builds it once")
    build = build or toolchain.build_llama_cpp
    log.info("building the unpatched llama.cpp %s (llama-mtmd-cli only, once) for the published recipe",
             toolchain.LLAMA_CPP_COMMIT)
    try:
        bin_dir = build(unpatched=True)
    except (RuntimeError, OSError) as err:  # a failed tool (ToolFailed), a check, the disk: not measured, and why
        log.warning("the unpatched llama.cpp build failed: %s", err)
        return None, (f"not measured: the unpatched llama.cpp build failed ({str(err).splitlines()[0]}; log: "
                      f"{toolchain.default_build_dir(unpatched=True) / 'build.log'})")
    return Path(bin_dir) / "llama-mtmd-cli", None


def label(base_label: str) -> str:
    return f"{NAME}: {base_label}, unpatched llama.cpp {toolchain.LLAMA_CPP_COMMIT}"


def measure(m, cli: Path, base, repetitions: int, n_predict: int, confirm: Callable) -> tuple[dict[str, Any], list[dict]]:
    """Time the seed's command on `cli` as the other baseline is timed (`confirm`: a warm-up and
    `repetitions` full runs); (its confirmed row, its runs relabeled for the runs table)."""
    pm = replace(m, cli=cli, logs=m.logs / "published", rows=[], failed={})
    pm.logs.mkdir(parents=True, exist_ok=True)
    for stale in pm.logs.glob("*.log"):
        stale.unlink()
    table = confirm(pm, [base], repetitions, n_predict)
    row = table.iloc[0].to_dict() if len(table) else {"status": "failed"}
    runs = []
    for r in pm.rows:
        runs.append({**r, "config": label(base.label), "phase": PHASES.get(r["phase"], r["phase"]),
                     "build": "unpatched"})
    row["config"] = label(base.label)
    return row, runs


def ratio(slow: list[float], fast: list[float]) -> dict[str, Any] | None:
    """slow / fast: the ratio of the medians, and the spread from the two ranges (the least and the
    most it can be given every measured run)."""
    a, b = spread(slow), spread(fast)
    if not a["median"] or not b["median"]:
        return None
    return {"ratio": a["median"] / b["median"], "min": a["min"] / b["max"], "max": a["max"] / b["min"]}


def summary(row: dict | None, why_not: str | None, cli: Path | None, recommended: dict[str, dict],
            same_build: dict | None) -> dict[str, Any]:
    """recommended.json's `published`: the measurement (or why there is none) and, per budget, the
    recommendation's ratio to it and to the seed's command on this build."""
    out: dict[str, Any] = {"name": NAME, "description": DESCRIPTION, "cli": str(cli) if cli else None,
                           "measured": False, "why_not": why_not}
    ok = row is not None and row.get("status") == "ok"
    if row is not None and not ok:
        out["why_not"] = f"not measured: its runs failed ({str(row.get('error') or 'see tune/logs/published/').splitlines()[0]})"
    if ok:
        out.update(measured=True, why_not=None, config=row["config"], answer_s=row["answer_s"],
                   answer_min_s=row["answer_min_s"], answer_max_s=row["answer_max_s"], runs=row["runs"],
                   answer_s_all=list(row["answer_s_all"]), image_tokens=row.get("image_tokens"),
                   stages={k: row.get(k) for k in ("load_ms", "image_encode_ms", "image_decode_ms", "prompt_eval_ms",
                                                   "eval_ms_per_token")})
    base_runs = list((same_build or {}).get("answer_s_all") or [])
    ratios = {}
    for budget, rec in recommended.items():
        runs = list(rec.get("answer_s_all") or [])
        ratios[budget] = {"vs_published": ratio(out["answer_s_all"], runs) if ok else None,
                          "vs_same_build": ratio(base_runs, runs) if base_runs else None}
    out["ratios"] = ratios
    out["same_build_vs_published"] = ratio(out["answer_s_all"], base_runs) if ok and base_runs else None
    return out

