"""A run's GGUF files as a hub repository: the model card, and the upload (optional step).

`publish(run)` writes `outputs/<run>/publish/`: a `README.md` model card in the hub's format (YAML
front matter: license, base_model, tags, pipeline_tag) and the chosen GGUF files beside it (hard
links into the run's own files, nothing copied). Every number on the card is read from the run's
files: sizes and sha256 from the GGUFs, KL divergence and speeds from step 06's
`metrics/variants.csv` and `summary.json`, the machine from `machine.json`, the checks from the
`vision_check` / `text_check` artifacts.

`publish(run, upload=True)` then uploads that folder to `publish.repo` on Hugging Face
(`huggingface_hub`) or ModelScope (`modelscope`'s HubApi), creating the repository when it does not
exist. The token is read from the environment (HF_TOKEN, MODELSCOPE_API_TOKEN) and never written
or logged. A cut-off upload is resumed without duplicates: the hub's file list (with each file's
sha256) is read first and only GGUFs that are missing or differ are sent; within a send, the hub
stores large files by content (Hugging Face's LFS asks which sha256 it already holds, ModelScope's
uploader keeps a resume cache), so bytes that arrived before a failure are not sent again, and a
commit replaces files at their paths, never adds a second copy.
"""
from __future__ import annotations

import json
import logging
import math
import os
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pandas as pd
import yaml
from tqdm.auto import tqdm

from ..reports import headline
from ..run import machine_load as load
from ..run.machine import describe
from ..run.workspace import Run, atomic_path, sha256_file
from ..steps.download import hub_errors

log = logging.getLogger(__name__)

TOKEN_ENV = {"huggingface": ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"), "modelscope": ("MODELSCOPE_API_TOKEN",)}
TOKEN_PAGE = {"huggingface": "https://huggingface.co/settings/tokens",
              "modelscope": "https://modelscope.cn/my/myaccesstoken"}
# Licenses of the base models this project converts (their hub cards say so).
KNOWN_LICENSES = {"liuhaotian/llava-v1.6-vicuna-7b": "llama2", "llava-hf/llava-v1.6-vicuna-7b-hf": "llama2"}
TAGS = ["gguf", "llava", "llama.cpp", "vision", "image-text-to-text", "quantized"]
CARD = "README.md"


class PublishError(RuntimeError):
    """The card cannot be written or the upload failed; the message says what to do."""


@dataclass
class PublishResult:
    folder: Path
    card: Path
    files: pd.DataFrame                      # file, variant, bytes, sha256
    uploaded: list[str] | None = None        # None: not uploaded
    skipped: list[str] = field(default_factory=list)  # already on the hub with the same sha256
    url: str | None = None

    def __str__(self) -> str:
        what = ("card only (UPLOAD=1 to upload)" if self.uploaded is None else
                f"uploaded {self.uploaded or 'nothing new'}, already there {self.skipped}: {self.url}")
        return f"PublishResult({self.card}; {len(self.files)} files; {what})"


# ----------------------------------------------------------------------------- what the run holds
def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_files(run: Run) -> tuple[dict[str, Path], Path]:
    """variant -> text GGUF of every evaluated variant, and the mmproj (from artifacts.json)."""
    artifacts = run.artifacts()
    paths = [run.resolve(v) for v in (artifacts.get("quantized") or {}).values()]
    if artifacts.get("text_gguf"):
        paths.append(run.resolve(artifacts["text_gguf"]))
    by_name = {p.name: p for p in paths}
    table = _metrics(run)[1]
    variants = {str(r["variant"]): by_name[r["file"]] for _, r in table.iterrows() if r.get("file") in by_name}
    return variants, run.artifact_path("mmproj")


def _metrics(run: Run) -> tuple[dict, pd.DataFrame]:
    folder = run.resolve(run.artifacts().get("metrics") or run.dir / "metrics")
    if not (folder / "summary.json").is_file() or not (folder / "variants.csv").is_file():
        raise PublishError(f"{folder}: no evaluation metrics; the card's numbers come from step 06, run "
                           f"`make evaluate PARAMS={run.params_file}` first")
    return _read_json(folder / "summary.json"), pd.read_csv(folder / "variants.csv")


def recommended_variant(run: Run, summary: dict) -> tuple[str | None, str]:
    """(the quant type the card recommends, how it was chosen): step 07's recommendation when the
    run was tuned (the index page's one winner), else step 06's fastest type, labelled as such."""
    tuned = _read_json(run.dir / "tune" / "recommended.json")
    rec = tuned.get("recommended") or {}
    quant = (rec.get("settings") or {}).get("quant")
    if quant:
        return quant, f"07_tune's recommendation, {rec.get('config')}: {headline.tune_claim(tuned)}"
    variant = (summary.get("chosen") or {}).get("variant")
    return variant, f"{headline.EVALUATE_LABEL.lower()}, not tuned: {summary.get('chosen_how', '')}"


def chosen_files(run: Run) -> dict[str, Path]:
    """The variants `publish.files` names (default: the recommended one, `recommended_variant`) -> their files."""
    variants, _ = run_files(run)
    summary, _ = _metrics(run)
    wanted = run.params.publish.files or [recommended_variant(run, summary)[0]]
    if wanted == ["all"]:
        return variants
    unknown = [w for w in wanted if w not in variants]
    if unknown:
        raise PublishError(f"{run.params_file}: publish.files names {unknown}, which this run did not evaluate; "
                           f"evaluated: {', '.join(variants) or 'none'} (or use [all])")
    return {w: variants[w] for w in wanted}


def _checks(run: Run) -> list[dict]:
    """The conversion's checks as recorded: step 03's vision checks, step 04's text check if recorded."""
    artifacts = run.artifacts()
    out = []
    for image, path in (artifacts.get("vision_check") or {}).items():
        data = _read_json(run.resolve(path))
        out.append({"check": f"mmproj vs PyTorch CLIP + projector, image '{image}'", "status": data.get("status"),
                    "value": data.get("nmse"), "bound": data.get("tolerance"), "measure": "NMSE"})
    text = artifacts.get("text_check")
    if text:
        data = _read_json(run.resolve(text)) if isinstance(text, str) else text
        out.append({"check": "text GGUF logits vs PyTorch", "status": data.get("status"),
                    "value": data.get("nmse"), "bound": data.get("bound"), "measure": "NMSE"})
    return out


# ----------------------------------------------------------------------------- the card
def _num(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or pd.isna(value):
        return "–"
    return fmt.format(value)


def _md_table(rows: list[list[str]], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_template(name: str, values: dict[str, str]) -> str:
    """A file of `templates/` (package data) with its ${placeholders} filled; a placeholder without a
    value raises KeyError naming it."""
    text = (resources.files(__package__) / "templates" / name).read_text(encoding="utf-8")
    return string.Template(text).substitute(values)


def model_card(run: Run, files: pd.DataFrame, mmproj_name: str) -> str:
    """The README.md text (front matter + sections) from the run's own files:
    `templates/model_card.md` filled by `card_values`.

    `files`: file, variant ('mmproj' for the vision file), bytes, sha256 of what the repo holds.
    """
    return render_template("model_card.md", card_values(run, files, mmproj_name))


def card_values(run: Run, files: pd.DataFrame, mmproj_name: str) -> dict[str, str]:
    """Every placeholder of the model card, as text."""
    p = run.params
    summary, table = _metrics(run)
    recorded = _read_json(run.dir / "machine.json")
    machine, build = recorded.get("machine") or {}, recorded.get("llama_cpp") or (run.artifacts().get("llama_cpp") or {})
    base = p.model.repo if p.model.source in ("huggingface", "modelscope", "local") else None
    chosen, chosen_how = recommended_variant(run, summary)
    quant_rows, speed_rows = _variant_rows(table, chosen, set(files["variant"]))
    file_rows = [[f"`{r.file}`", str(r.variant), f"{r.bytes:,}", f"`{r.sha256}`"] for r in files.itertuples()]
    made = ("ready-made GGUF files evaluated" if p.model.format == "gguf"
            else "converted, checked against PyTorch, quantized and measured")
    synthetic = ("" if summary.get("real_model") else
                 "\n> **Synthetic model.** These files come from a test run on a synthetic checkpoint, not the real "
                 "LLaVA 1.6 weights; the numbers below describe that run only.\n")
    return {
        "front_matter": yaml.safe_dump(_front_matter(run, base), sort_keys=False).strip(),
        "title": p.publish.repo or f"{base or p.run} GGUF", "synthetic_note": synthetic,
        "base_model": f"[{base}]({_hub_url(base, p.model.source)})" if base else f"run `{p.run}`",
        "mmproj": mmproj_name, "made": made, "run": p.run, "chosen": chosen or "–",
        "chosen_how": chosen_how,
        "files_table": _md_table(file_rows, ["file", "variant", "bytes", "sha256"]),
        "kld_how": _kld_how(summary, table), "kld_budget": str(summary.get("kld_budget")),
        "quality_table": _md_table(quant_rows, ["variant", "bits/weight", "MiB", "mean KLD", "KLD p99",
                                                "same top token %", "PPL"]),
        "cases": str(summary.get("cases")), "n_predict": str(summary.get("n_predict")),
        **_machine_lines(machine, build),
        "speed_table": _md_table(speed_rows, ["variant", "image encode ms", "image decode ms", "prompt tokens/s",
                                              "generation tokens/s", "answer ms", "peak RSS MiB"]),
        "checks_table": _md_table(_check_rows(run), ["check", "status", "measured", "bound"]),
        **_run_commands(p, files[files["variant"] != "mmproj"]),
    }


def _front_matter(run: Run, base: str | None) -> dict:
    p = run.params
    license_ = p.publish.license or KNOWN_LICENSES.get(base or "", "other")
    return {"license": license_, **({"base_model": base} if base else {}),
            **({"base_model_relation": "quantized"} if base and p.model.format == "checkpoint" else {}),
            "tags": TAGS, "pipeline_tag": "image-text-to-text", "library_name": "gguf"}


def _variant_rows(table: pd.DataFrame, chosen: str | None, published: set) -> tuple[list[list[str]], list[list[str]]]:
    """(quality rows, speed rows), one each per evaluated variant."""
    quant_rows, speed_rows = [], []
    for _, r in table.iterrows():
        name = str(r["variant"]) + (" ★" if r["variant"] == chosen else "") + (" (here)" if r["variant"] in published else "")
        name = load.mark(name, load.loaded(r))
        quant_rows.append([name, _num(r.get("bpw"), "{:.2f}"), _num(r.get("size_mib"), "{:,.0f}"),
                           _num(r.get("kld"), "{:.4f}"), _num(r.get("kld_p99"), "{:.4f}"),
                           _num(r.get("same_top_pct"), "{:.1f}"), _num(r.get("ppl"), "{:.3f}")])
        speed_rows.append([name, _num(r.get("image_encode_ms"), "{:,.0f}"), _num(r.get("image_decode_ms"), "{:,.0f}"),
                           _num(r.get("prompt_tokens_per_s"), "{:.2f}"), _num(r.get("eval_tokens_per_s"), "{:.2f}"),
                           _num(r.get("answer_ms"), "{:,.0f}"), _num(r.get("peak_rss_mib"), "{:,.0f}")])
    return quant_rows, speed_rows


def _kld_how(summary: dict, table: pd.DataFrame) -> str:
    if "kld" in table and table["kld"].notna().any():
        return (f"Mean KL divergence of each variant's next-token distribution from the reference "
                f"(**{summary.get('reference')}**), over {summary.get('perplexity_chunks')} chunks of "
                f"{summary.get('perplexity_ctx')} tokens of an English prose corpus (llama-perplexity "
                "`--kl-divergence`).")
    return "KL divergence was not measured in this run (" + "; ".join(summary.get("notes") or []) + ")."


def _check_rows(run: Run) -> list[list[str]]:
    checks = _checks(run)
    rows = [[c["check"], str(c["status"]), f"{c['measure']} {_num(c['value'], '{:.2e}')}",
             _num(c["bound"], "{:.0e}")] for c in checks]
    if not any("text" in c["check"] for c in checks):
        rows.append(["text GGUF logits vs PyTorch", "not recorded in this run folder",
                     "see the run's 04_text_export report", "–"])
    return rows


def _machine_lines(machine: dict, build: dict) -> dict[str, str]:
    compiled = " ".join(f"{k}={v}" for k, v in (((build.get("system_info") or {}).get("backends") or {})
                                                 .get("CPU") or {}).items())
    return {"machine": describe(machine) if machine else "not recorded",
            "cpu_features": " ".join(machine.get("features") or []) or "–",
            "llama_cpp": (build.get("version") or "–") + (f", built with {build['built_with']}"
                                                          if build.get("built_with") else ""),
            "compiled": compiled or "–"}


def _run_commands(p, models: pd.DataFrame) -> dict[str, str]:
    """The "How to run" lines' parts: example file, thread and template flags, the hub line."""
    e = p.evaluate
    hf_line = (f"\n# or straight from the hub (llama.cpp fetches the mmproj too):\nllama-server -hf {p.publish.repo}:"
               f"{models['variant'].iloc[0]}" if p.publish.hub == "huggingface" and p.publish.repo and len(models) else "")
    return {"threads": f" -t {e.threads}" if e.threads else "",
            "template": f" --chat-template {e.chat_template}" if e.chat_template else "",
            "example": models["file"].iloc[0] if len(models) else "<model>.gguf", "hf_line": hf_line}


def _hub_url(repo: str, source: str) -> str:
    return f"https://modelscope.cn/models/{repo}" if source == "modelscope" else f"https://huggingface.co/{repo}"


# ----------------------------------------------------------------------------- the folder
def _place(src: Path, dest: Path) -> None:
    """dest becomes the same file as src: a hard link (no copy of gigabytes), else a symlink."""
    if dest.exists() or dest.is_symlink():
        if dest.exists() and os.path.samefile(src, dest):
            return
        dest.unlink()
    try:
        os.link(src, dest)
    except OSError:  # another filesystem (a downloaded GGUF in the hub cache)
        dest.symlink_to(src.resolve())


def write_card(run: Run) -> PublishResult:
    """outputs/<run>/publish/: the chosen GGUFs + mmproj (linked) and README.md."""
    chosen = chosen_files(run)
    _, mmproj = run_files(run)
    folder = run.sub("publish")
    wanted = {**{path.name: (variant, path) for variant, path in chosen.items()}, mmproj.name: ("mmproj", mmproj)}
    for stale in folder.glob("*.gguf"):
        if stale.name not in wanted:
            stale.unlink()
    rows = []
    for name, (variant, path) in tqdm(wanted.items(), desc="sha256", unit="file"):
        _place(path, folder / name)
        rows.append({"file": name, "variant": variant, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    files = pd.DataFrame(rows)
    card = folder / CARD
    with atomic_path(card) as tmp:
        tmp.write_text(model_card(run, files, mmproj.name), encoding="utf-8")
    run.record("publish", folder)
    log.info("model card %s (%s)", card, ", ".join(files["file"]))
    return PublishResult(folder, card, files)


# ----------------------------------------------------------------------------- the hubs
def _token(hub: str) -> str:
    for name in TOKEN_ENV[hub]:
        if os.environ.get(name):
            return os.environ[name]
    raise PublishError(f"no {hub} token: set {TOKEN_ENV[hub][0]} in the environment to a write token "
                       f"({TOKEN_PAGE[hub]}); it is never read from the params file")


class _HuggingFace:
    def __init__(self, token: str):
        import huggingface_hub

        self.api = huggingface_hub.HfApi(token=token)

    def url(self, repo: str) -> str:
        return f"https://huggingface.co/{repo}"

    def exists(self, repo: str) -> bool:
        return self.api.repo_exists(repo, repo_type="model")

    def create(self, repo: str, private: bool) -> None:
        self.api.create_repo(repo, repo_type="model", private=private, exist_ok=True)

    def remote_sha256(self, repo: str) -> dict[str, str | None]:
        info = self.api.model_info(repo, files_metadata=True)
        return {s.rfilename: (s.lfs.sha256 if s.lfs else None) for s in info.siblings or []}

    def upload(self, repo: str, folder: Path, names: list[str], message: str) -> None:
        self.api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                               allow_patterns=names, commit_message=message)


class _ModelScope:
    def __init__(self, token: str):
        from modelscope.hub.api import HubApi

        self.api, self.token = HubApi(), token
        self.api.login(token)

    def url(self, repo: str) -> str:
        return f"https://modelscope.cn/models/{repo}"

    def exists(self, repo: str) -> bool:
        return self.api.repo_exists(repo, repo_type="model", token=self.token)

    def create(self, repo: str, private: bool) -> None:
        self.api.create_repo(repo, token=self.token, visibility="private" if private else "public", exist_ok=True)

    def remote_sha256(self, repo: str) -> dict[str, str | None]:
        files = self.api.get_model_files(repo, recursive=True)
        return {f["Path"]: f.get("Sha256") or None for f in files if f.get("Type") != "tree"}

    def upload(self, repo: str, folder: Path, names: list[str], message: str) -> None:
        self.api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model", token=self.token,
                               allow_patterns=names, commit_message=message)


HUBS = {"huggingface": _HuggingFace, "modelscope": _ModelScope}


def send(run: Run, result: PublishResult) -> PublishResult:
    """Send the publish folder to publish.repo: create it if missing, skip files already there."""
    p = run.params.publish
    if not p.repo or "/" not in p.repo:
        raise PublishError(f"{run.params_file}: publish.repo is {p.repo!r}; set it to the target repository "
                           "'owner/name' (created on upload if it does not exist)")
    hub = HUBS[p.hub](_token(p.hub))
    where = f"{p.hub} repository {p.repo}"
    try:
        if not hub.exists(p.repo):
            log.info("creating %s (%s)", where, "private" if p.private else "public")
            hub.create(p.repo, p.private)
            remote = {}
        else:
            remote = hub.remote_sha256(p.repo)
    except hub_errors() as err:
        raise PublishError(f"{where}: cannot be read or created ({type(err).__name__}: {err}); check that "
                           f"the token may write to '{p.repo.split('/')[0]}' and the name is right") from None
    skipped = [r.file for r in result.files.itertuples() if remote.get(r.file) == r.sha256]
    send = [CARD] + [f for f in result.files["file"] if f not in skipped]
    log.info("uploading %s to %s (already there, same sha256: %s)", send, where, skipped or "none")
    try:
        hub.upload(p.repo, result.folder, send, f"llava-gguf run {run.params.run}: {', '.join(send)}")
    except hub_errors() as err:
        raise PublishError(f"upload to {where} failed ({type(err).__name__}: {err}); rerun `make publish UPLOAD=1`: "
                           "files already on the hub with the same sha256 are not sent again") from None
    result.uploaded, result.skipped, result.url = send, skipped, hub.url(p.repo)
    log.info("published %s", result.url)
    return result


def publish(run: Run, upload: bool = False) -> PublishResult:
    """Write the model card folder; with `upload`, send it to the hub (token from the environment)."""
    result = write_card(run)
    return send(run, result) if upload else result
