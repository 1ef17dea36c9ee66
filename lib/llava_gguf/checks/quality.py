"""Quality of the quantized text models against the unquantized one.

1. `kld_table`: `llama-perplexity` over the evaluation corpus (corpus.py). The reference model's
   log-probabilities are saved once (`--kl-divergence-base`, reused while the model, corpus and
   context are unchanged); each variant is then scored against them (`--kl-divergence`): its
   perplexity, the mean KL divergence of its next-token distribution from the reference's, and how
   often both put the same token on top.
2. `answer_agreement`: per image prompt, is each variant's greedy answer the reference's, and for
   how many generated tokens do they agree from the start.

The reference is the unquantized text GGUF when the run has one; otherwise (ready-made GGUF files)
the most precise variant available (`reference_variant`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..llama_cpp import limits, toolchain
from ..model import quant_types
from ..model.gguf_io import open_gguf
from ..run.workspace import Run, atomic_path, write_json

log = logging.getLogger(__name__)

_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf|-inf)"
_PM = r"\s*(?:±|\+/-)\s*"
# llama-perplexity's summary after --kl-divergence (tools/perplexity/perplexity.cpp).
_KLD_PATTERNS = {
    "ppl": rf"Mean PPL\(Q\)\s*:\s*{_NUM}{_PM}{_NUM}",
    "ppl_base": rf"Mean PPL\(base\)\s*:\s*{_NUM}{_PM}{_NUM}",
    "ln_ppl_ratio": rf"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*{_NUM}{_PM}{_NUM}",
    "kld": rf"Mean\s+KLD:\s*{_NUM}{_PM}{_NUM}",
    "kld_median": rf"Median\s+KLD:\s*{_NUM}",
    "kld_p99": rf"99\.0%\s+KLD:\s*{_NUM}",
    "kld_max": rf"Maximum KLD:\s*{_NUM}",
    "rms_dp_pct": rf"RMS Δp\s*:\s*{_NUM}{_PM}{_NUM}\s*%",
    "same_top_pct": rf"Same top p:\s*{_NUM}{_PM}{_NUM}\s*%",
}
_FINAL_PPL = re.compile(rf"Final estimate: PPL = {_NUM}{_PM}{_NUM}")


class QualityError(RuntimeError):
    pass


def reference_variant(names) -> str | None:
    """The most precise of the variant names (unquantized first, by quant_types' bits per weight),
    None when there are none."""
    names = list(names)
    return max(names, key=lambda n: quant_types.bits_per_weight(n, 0.0)) if names else None


# ----------------------------------------------------------------------------- parsing
def parse_perplexity_log(text: str) -> dict:
    """PPL of a plain perplexity run (also the run that saves the reference logits)."""
    m = _FINAL_PPL.search(text)
    if not m:
        raise QualityError("the llama-perplexity log has no 'Final estimate: PPL' line (too little text for "
                           "perplexity_ctx? see the log)")
    return {"ppl": float(m[1]), "ppl_err": float(m[2])}


def parse_kld_log(text: str) -> dict:
    """The statistics a `--kl-divergence` run prints at its end."""
    out: dict = {}
    for key, pattern in _KLD_PATTERNS.items():
        m = re.search(pattern, text)
        if m:
            out[key] = float(m[1])
            if m.lastindex and m.lastindex > 1:
                out[f"{key}_err"] = float(m[2])
    if "kld" not in out:
        raise QualityError("the llama-perplexity log has no 'Mean KLD' line")
    return out


# ----------------------------------------------------------------------------- KL divergence
def _perplexity_args(run: Run) -> list:
    e = run.params.evaluate
    return ["-c", e.perplexity_ctx, "--chunks", e.perplexity_chunks, *(["-t", e.threads] if e.threads else [])]


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def base_logits(run: Run, base_gguf: Path, corpus: Path) -> tuple[Path, dict]:
    """The reference model's saved log-probabilities over the corpus (made once, then reused)."""
    e = run.params.evaluate
    key = hashlib.sha256("|".join([_file_key(base_gguf), _file_key(corpus), str(e.perplexity_ctx),
                                   str(e.perplexity_chunks)]).encode()).hexdigest()[:12]
    out = run.sub("quality") / f"kld-base-{base_gguf.stem}-c{e.perplexity_ctx}x{e.perplexity_chunks}.bin"
    meta_file = out.with_suffix(".json")
    if out.exists() and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("key") == key:
            log.info("reusing reference logits %s", out)
            return out, meta
    tool = toolchain.find_tool("llama-perplexity", run.params.llama_cpp.dir)
    log_file = run.sub("logs") / f"perplexity-base-{base_gguf.stem}.log"
    with atomic_path(out, suffix=".bin") as tmp:
        text = toolchain.run_tool([tool, "-m", base_gguf, "-f", corpus, "--kl-divergence-base", tmp,
                                   *_perplexity_args(run)], log_file, timeout=e.timeout_s,
                                  what="llama-perplexity (reference logits)", expect="Final estimate")
        meta = {"key": key, "base": str(base_gguf), "corpus": str(corpus), "log": str(log_file),
                **parse_perplexity_log(text)}
    write_json(meta_file, meta)
    return out, meta


def kld_table(base_gguf: Path | str, variants: dict[str, Path | str], corpus: Path | str, run: Run,
              base_name: str | None = None) -> pd.DataFrame:
    """PPL, mean KLD and same-top-token % of each variant against `base_gguf` on `corpus`.

    One row per variant; the reference itself (a variant whose path is `base_gguf`, or an added
    row named `base_name`) has KLD 0 and 100 % agreement by definition.
    """
    base_gguf, corpus = Path(base_gguf), Path(corpus)
    for path, what in [(base_gguf, "reference GGUF"), (corpus, "corpus")] + \
            [(Path(p), f"GGUF of variant '{n}'") for n, p in variants.items()]:
        if not path.is_file():
            raise FileNotFoundError(f"{what} not found: {path}")
    for name, path in variants.items():
        open_gguf(path, f"GGUF of variant '{name}'")
    base_file, meta = base_logits(run, base_gguf, corpus)
    tool = toolchain.find_tool("llama-perplexity", run.params.llama_cpp.dir)
    base_key = base_gguf.resolve()
    if not any(Path(p).resolve() == base_key for p in variants.values()):
        variants = {base_name or base_gguf.stem: base_gguf, **variants}
    rows = []
    for name, path in tqdm(list(variants.items()), desc="KL divergence", unit="variant"):
        path = Path(path)
        row = {"variant": name, "file": path.name}
        if path.resolve() == base_key:
            row.update(ppl=meta["ppl"], ppl_err=meta["ppl_err"], ppl_base=meta["ppl"], kld=0.0, kld_err=0.0,
                       kld_median=0.0, kld_p99=0.0, kld_max=0.0, same_top_pct=100.0, same_top_pct_err=0.0,
                       reference=True, log=meta["log"])
        else:
            log_file = run.sub("logs") / f"kld-{_safe(name)}.log"
            text = toolchain.run_tool([tool, "-m", path, "--kl-divergence-base", base_file, "--kl-divergence",
                                       *_perplexity_args(run)], log_file, timeout=run.params.evaluate.timeout_s,
                                      what=f"llama-perplexity --kl-divergence ({name})", expect="Mean KLD")
            try:
                row.update(parse_kld_log(text), reference=False, log=str(log_file))
            except QualityError as err:
                raise QualityError(f"{log_file}: {err}") from None
            log.info("%s: PPL %.4g, mean KLD %.5f, same top %.1f %%", name, row.get("ppl", float("nan")),
                     row["kld"], row.get("same_top_pct", float("nan")))
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs.update(reference=str(base_gguf), corpus=str(corpus), ctx=run.params.evaluate.perplexity_ctx,
                       chunks=run.params.evaluate.perplexity_chunks)
    return table


# ----------------------------------------------------------------------------- answers
def _safe(name: str) -> str:
    return re.sub(r"[^\w.+-]", "_", name)


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def llama_tokenizer(gguf_path: Path | str, run: Run | None = None):
    """str -> token ids with the vocabulary of `gguf_path` (llama-tokenize, vocab only: fast on a 7B)."""

    tool = toolchain.find_tool("llama-tokenize", run.params.llama_cpp.dir if run else None)
    limit = limits.seconds("llama-tokenize", limits.gib([gguf_path]))
    cache: dict[str, list[int]] = {}

    def tokenize(text: str) -> list[int]:
        if text not in cache:
            try:
                proc = toolchain.run_tool([tool, "-m", gguf_path, "-p", text, "--ids", "--no-bos", "--log-disable",
                                           "--no-escape"], timeout=limit, capture=True)
            except toolchain.ToolFailed as err:
                raise QualityError(f"llama-tokenize failed on {gguf_path}: {err}") from None
            ids = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "[]"
            cache[text] = json.loads(ids)
        return cache[text]

    return tokenize


def answer_agreement(eval_df: pd.DataFrame, tokenize=None, baseline: str | None = None) -> pd.DataFrame:
    """Per case and variant: same greedy answer as the baseline? length of the agreeing prefix.

    `tokenize` (str -> list of tokens, e.g. `llama_tokenizer(gguf)`) splits the answers for the
    prefix length; without it answers are compared word by word. The streamed pieces are not
    used: one read may hold several tokens. The baseline defaults to the most precise variant
    (`reference_variant`).
    """
    columns = ["case", "prompt", "variant", "baseline", "same_answer", "prefix_tokens", "tokens",
               "baseline_tokens", "unit"]
    if eval_df.empty:
        return pd.DataFrame(columns=columns)
    first = eval_df.drop_duplicates(["variant", "case"]).set_index(["variant", "case"])
    baseline = baseline or reference_variant(first.index.get_level_values(0).unique())
    split, unit = (tokenize, "token") if tokenize else (str.split, "word")
    rows = []
    for (variant, case), r in first.iterrows():
        if (baseline, case) not in first.index:
            continue
        answer, ref = str(r["answer"]), str(first.loc[(baseline, case)]["answer"])
        toks, ref_toks = split(answer), split(ref)
        rows.append({"case": case, "prompt": r.get("prompt"), "variant": variant, "baseline": baseline,
                     "same_answer": answer == ref, "prefix_tokens": _common_prefix(toks, ref_toks),
                     "tokens": len(toks), "baseline_tokens": len(ref_toks), "unit": unit})
    return pd.DataFrame(rows, columns=columns).sort_values(["case", "variant"], ignore_index=True)
