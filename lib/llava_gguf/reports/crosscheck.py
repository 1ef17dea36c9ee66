"""One run's numeric checks as a small JSON summary, and where two platforms' summaries must agree.

`run_summary(run_dir)` reads an ordinary run folder (x86-64 `make all`, or the arm64 rehearsal's,
copied back) and keeps what says whether the kernels computed right: the vision check per slice
image, the image-sequence check, the text logits check, the image tokens each variant used, the
KL divergence per quant type, the `system_info` line and the repacked tensor types.
`compare(arm, x86)` lists the checks whose results must agree across platforms; the rehearsal's
closing summary and tests/test_crosscheck.py both use it on the summaries in tests/data/rehearsal/.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd

from ..run.workspace import write_json

# The quant types whose kernels the rehearsal must cover (on the O6 each has its own repack layout).
REQUIRED_TYPES = ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
# A quant type's ARM KLD may exceed x86's by this factor (plus KLD_ABS): both measure the same file
# against their own F16 logits, so only rounding of the two kernels' sums differs; a wrong kernel
# gives a KLD orders of magnitude higher.
KLD_FACTOR = 2.0
KLD_ABS = 1e-3


# The run folder's files run_summary reads (recorded beside a summary, so a test can reread them).
INPUTS = ("machine.json", "repack.json", "vision_check/*.json", "image_sequence/*.json", "text_check/*.json",
          "metrics/runs.csv", "metrics/kld.csv")


def record(run_dir: Path | str, out: Path | str) -> dict:
    """Write run_summary(run_dir) to `out` and copy its inputs to `<out stem>-run/`; the summary."""
    run_dir, out = Path(run_dir), Path(out)
    inputs = out.with_name(out.stem + "-run")
    if inputs.exists():
        shutil.rmtree(inputs)
    for pattern in INPUTS:
        for f in sorted(run_dir.glob(pattern)):
            (inputs / f.relative_to(run_dir)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, inputs / f.relative_to(run_dir))
    summary = run_summary(run_dir)
    write_json(out, summary)
    return summary


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _jsons(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def _finite(x) -> float | None:
    return float(x) if x is not None and isinstance(x, (int, float)) and math.isfinite(x) else None


def run_summary(run_dir: Path | str) -> dict:
    """The summary of the run folder `run_dir` (missing parts are None or empty, never invented)."""
    d = Path(run_dir)
    machine = _json(d / "machine.json")
    m, llama = machine.get("machine") or {}, machine.get("llama_cpp") or {}
    vision = {k: {"status": v.get("status"), "nmse": _finite(v.get("nmse")), "tolerance": v.get("tolerance"),
                  "n_tokens": v.get("n_tokens")} for k, v in _jsons(d / "vision_check").items()}
    sequence = {k: {"status": v.get("status"), "nmse": _finite(v.get("nmse")), "tolerance": v.get("tolerance"),
                    "n_tokens": v.get("n_tokens"), "n_tokens_llava": v.get("n_tokens_llava")}
                for k, v in _jsons(d / "image_sequence").items()}
    text = {k: {"outtype": v.get("outtype"), "nmse": _finite(v.get("nmse")), "bound": v.get("bound"),
                "passed": v.get("passed")} for k, v in _jsons(d / "text_check").items()}
    tokens: dict[str, dict] = {}
    if (d / "metrics/runs.csv").is_file():
        runs = pd.read_csv(d / "metrics/runs.csv")
        for _, r in runs.iterrows():
            tokens[f"{r['variant']}/{int(r['case'])}"] = {
                "used": None if pd.isna(r.get("image_tokens")) else int(r["image_tokens"]),
                "llava": None if pd.isna(r.get("image_tokens_llava")) else int(r["image_tokens_llava"])}
    kld = {}
    if (d / "metrics/kld.csv").is_file():
        kld = {r["variant"]: _finite(r["kld"]) for _, r in pd.read_csv(d / "metrics/kld.csv").iterrows()}
    repack = _json(d / "repack.json")
    return {
        "arch": m.get("arch"), "emulation": m.get("emulation"), "cpu_features": m.get("features"),
        "llama_cpp": llama.get("version"), "cmake_options": llama.get("cmake_options"),
        "system_info": (llama.get("system_info") or {}).get("line"),
        "vision": vision, "image_sequence": sequence, "text": text, "image_tokens": tokens, "kld": kld,
        "repacked_types": sorted({t for v in repack.values() for t in v.get("types") or []}),
        "repack": {k: {"types": v.get("types"), "layouts": v.get("layouts"), "buffer_mib": v.get("buffer_mib")}
                   for k, v in repack.items()},
    }


def own_checks(s: dict) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) of one platform's run against the x86 bounds the checks carry."""
    out = []
    for name, v in (s.get("vision") or {}).items():
        out.append((f"vision {name}", v["status"] == "passed" and v["nmse"] is not None
                    and v["nmse"] <= v["tolerance"], f"NMSE {v['nmse']} <= {v['tolerance']}"))
    for name, v in (s.get("image_sequence") or {}).items():
        out.append((f"image sequence {name}", v["status"] == "passed", f"NMSE {v['nmse']}, {v['n_tokens']} "
                    f"tokens (LLaVA {v['n_tokens_llava']})"))
    for name, v in (s.get("text") or {}).items():
        out.append((f"text logits {name}", bool(v["passed"]) and v["nmse"] is not None and v["nmse"] <= v["bound"],
                    f"NMSE {v['nmse']} <= {v['bound']}"))
    kld = s.get("kld") or {}
    missing = [t for t in REQUIRED_TYPES if kld.get(t) is None]
    out.append(("KLD per quant type", not missing, "missing: " + ", ".join(missing) if missing else
                ", ".join(f"{t} {kld[t]:.4g}" for t in REQUIRED_TYPES)))
    for what in ("vision", "image_sequence", "text"):
        if not s.get(what):
            out.append((what.replace("_", " "), False, "not in the run folder"))
    return out


def compare(arm: dict, x86: dict) -> list[tuple[str, bool, str]]:
    """(check, passed, detail): the ARM run's own checks, then where it must agree with x86."""
    out = own_checks(arm)
    out.append(("image tokens equal", bool(arm["image_tokens"]) and arm["image_tokens"] == x86["image_tokens"],
                f"arm {arm['image_tokens']} vs x86 {x86['image_tokens']}"))
    for what in ("vision", "image_sequence"):
        same = {k: (arm[what][k]["n_tokens"], x86[what].get(k, {}).get("n_tokens")) for k in arm[what]}
        out.append((f"{what.replace('_', ' ')} token counts equal", bool(same) and all(a == b for a, b in same.values()),
                    str(same)))
    for t in REQUIRED_TYPES:
        a, b = arm["kld"].get(t), x86["kld"].get(t)
        ok = a is not None and b is not None and a <= KLD_FACTOR * b + KLD_ABS
        out.append((f"KLD {t} vs x86", ok, f"arm {a} vs x86 {b} (bound {KLD_FACTOR} x x86 + {KLD_ABS})"))
    return out


def format_checks(checks: list[tuple[str, bool, str]]) -> str:
    return "\n".join(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}" for name, ok, detail in checks)
