"""Step 01: get the model: a synthetic checkpoint, a local folder, or a hub snapshot.

Sources (params `model.source`): `tiny` (made here, offline), `local` (`model.path`, used in place
and never modified), `huggingface` and `modelscope` (`model.repo`, `model.revision`; resumable
snapshot downloads with progress bars). With `model.format: gguf` the ready GGUF files
(`model.text_file`, `model.mmproj_file`) are fetched instead of a checkpoint.

What arrived is checked: every shard named by the index is present with its size, and its
sha256 where the hub publishes one (LFS files). The hub clients are only called through
`snapshot_download` and the file-listing functions below, so tests replace exactly those.
"""
from __future__ import annotations

import fnmatch
import importlib
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..llama_cpp import toolchain
from ..model.checkpoint import BIN_INDEX, SAFETENSORS_INDEX, SINGLE_FILES, Checkpoint, CheckpointError, index_weight_map
from ..model.gguf_io import GGUFError, open_gguf, quant_type_of
from ..model.tiny import SIZES, is_current, make_tiny, synthetic_tensors
from ..model.tokenizer import VOCAB_GGUF, model_problem as tokenizer_problem
from ..run import diskspace
from ..run.workspace import Run, resolve, sha256_file

log = logging.getLogger(__name__)

CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.bin", "tokenizer.model"]


class DownloadError(RuntimeError):
    pass


@dataclass
class DownloadResult:
    path: Path
    source: str
    format: str
    files: pd.DataFrame
    config: dict = field(default_factory=dict)
    products: dict = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        return bool(len(self.files)) and bool(self.files["ok"].all())


# ----------------------------------------------------------------------------- hub access
def _offline_hint(run: Run, err: Exception) -> DownloadError:
    where = run.params_file or "your params file"
    p = run.params.model
    return DownloadError(
        f"could not download {p.repo} from {p.source} ({type(err).__name__}: {err}). Without network, copy "
        f"the files to this machine and set in {where}: `model.source: local` and `model.path: <folder>` "
        f"(keeping model.format: {p.format}).")


def hub_errors() -> tuple[type[BaseException], ...]:
    """What the hub clients raise for no network, a missing repo or a refused token: OSError (their
    HTTP status errors and requests' are OSErrors), the transport errors of httpx2 (huggingface_hub's
    HTTP client), modelscope's HubError, RuntimeError and ValueError (a malformed id, an upload cut
    off). Imported only when one was raised."""
    import httpx2
    from modelscope_hub.errors import HubError

    return OSError, RuntimeError, ValueError, httpx2.HTTPError, HubError


def _snapshot(run: Run, patterns: list[str] | None) -> Path:
    p = run.params.model
    try:
        if p.source == "huggingface":
            import huggingface_hub

            path = huggingface_hub.snapshot_download(repo_id=p.repo, revision=p.revision, allow_patterns=patterns)
        else:
            ms = importlib.import_module("modelscope.hub.snapshot_download")
            path = ms.snapshot_download(model_id=p.repo, revision=p.revision, allow_patterns=patterns)
    except hub_errors() as err:  # the hub clients raise many types for "no network"
        cache = hub_cache_dir(run)
        # A full disk is reported as what it is, not as "no network" (the clients wrap the OSError).
        chain, cause = [], err
        while cause is not None and cause not in chain:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        if any(diskspace.is_full_disk(e, cache) for e in chain):
            raise diskspace.DiskFullError(
                f"no space left on {diskspace.where(cache)} for the download of {p.repo} into {cache} "
                f"(free {diskspace.size_text(diskspace.free_bytes(cache))}); free some space there, or move the "
                f"hub cache to a bigger disk ({'HF_HOME' if p.source == 'huggingface' else 'MODELSCOPE_CACHE'})"
            ) from err
        raise _offline_hint(run, err) from err
    return Path(path)


def hub_cache_dir(run: Run) -> Path:
    """Where the hub client stores what it downloads."""
    if run.params.model.source == "huggingface":
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    from modelscope.hub.utils.utils import get_cache_dir

    return Path(get_cache_dir())


def _check_download_space(run: Run, remote: dict[str, tuple[int | None, str | None]]) -> None:
    """Refuse a hub download that cannot fit: the published sizes of the files still to fetch
    (huggingface_hub keeps LFS files as blobs named by their sha256, finished or `.incomplete`)."""
    p = run.params.model
    cache = hub_cache_dir(run)
    total = sum(size or 0 for size, _ in remote.values())
    if p.source != "huggingface":
        if diskspace.free_bytes(cache) < total:
            log.warning("%s: %s free, the files are %s in all (what is already downloaded is not counted)",
                        diskspace.where(cache), diskspace.size_text(diskspace.free_bytes(cache)),
                        diskspace.size_text(total))
        return
    blobs = cache / f"models--{p.repo.replace('/', '--')}" / "blobs"
    have = 0
    for size, sha in remote.values():
        for name in (sha, f"{sha}.incomplete") if sha else ():
            if (blobs / name).is_file():
                have += min((blobs / name).stat().st_size, size or 0)
                break
    diskspace.ensure_space(blobs, total - have, f"the download of {p.repo}")


def remote_files(run: Run) -> dict[str, tuple[int | None, str | None]]:
    """name -> (size, sha256) as the hub publishes them; empty when it cannot be asked."""
    p = run.params.model
    try:
        if p.source == "huggingface":
            import huggingface_hub

            info = huggingface_hub.HfApi().model_info(p.repo, revision=p.revision, files_metadata=True)
            return {s.rfilename: (s.size, getattr(s.lfs, "sha256", None) if s.lfs else None)
                    for s in info.siblings or []}
        from modelscope.hub.api import HubApi

        files = HubApi().get_model_files(p.repo, revision=p.revision or "master", recursive=True)
        return {f["Path"]: (f.get("Size"), f.get("Sha256") or None) for f in files if f.get("Type") != "tree"}
    except hub_errors() as err:
        log.warning("could not list %s files on %s (%s); checking sizes against the index only",
                    p.repo, p.source, err)
        return {}


# ----------------------------------------------------------------------------- checks
def fix_hint(run: Run, folder: Path) -> str:
    """How to repair the model's files, for where they came from: a local folder is the user's to
    complete, a hub download resumes, the synthetic model is made again."""
    p = run.params.model
    if p.source == "local":
        return (f"copy the missing or damaged files into {folder} (params model.path), or point model.path at a "
                "complete copy")
    if p.source == "tiny":
        return f"delete {folder}; the next run makes it again"
    return "rerun `make download` to resume the download"


def _expected_files(folder: Path, run: Run) -> list[str]:
    extra = ["tokenizer.model"] if (folder / "tokenizer.model").exists() else []
    for index in (SAFETENSORS_INDEX, BIN_INDEX):
        if (folder / index).exists():
            try:
                shards = sorted(set(index_weight_map(folder / index).values()))
            except CheckpointError as err:
                raise DownloadError(f"{err.problem}; {fix_hint(run, folder)}") from None
            return ["config.json", index, *shards, *extra]
    singles = [f for f in SINGLE_FILES if (folder / f).exists()]
    return ["config.json", *singles, *extra]


def check_files(folder: Path, names: list[str], remote: dict[str, tuple[int | None, str | None]]) -> pd.DataFrame:
    """One row per expected file: present, size, and size/sha256 agreement with the hub."""
    rows = []
    for name in tqdm(names, desc="verify files", unit="file", disable=len(names) < 3):
        path = folder / name
        size = path.stat().st_size if path.exists() else None
        want_size, want_sha = remote.get(name, (None, None))
        sha = sha256_file(path) if (path.exists() and want_sha) else None
        problems = []
        if size is None:
            problems.append("missing")
        elif want_size is not None and size != want_size:
            problems.append(f"size {size} != {want_size} on the hub")
        if want_sha and sha and sha != want_sha:
            problems.append("sha256 differs from the hub")
        rows.append({"file": name, "bytes": size, "hub_bytes": want_size, "sha256_checked": bool(sha),
                     "ok": not problems, "problem": "; ".join(problems)})
    return pd.DataFrame(rows)


def _fail_on(table: pd.DataFrame, folder: Path, run: Run) -> None:
    bad = table[~table["ok"]]
    if len(bad):
        lines = [f"{folder / r.file}: {r.problem}" for r in bad.itertuples()]
        raise DownloadError(f"the model's files do not check out ({fix_hint(run, folder)}):\n" + "\n".join(lines))


# ----------------------------------------------------------------------------- sources
def _tiny(run: Run) -> Path:
    t = run.params.model.tiny
    hf = "-hf" if t.layout == "hf" else ""
    folder = run.sub("source") / f"llava-synthetic-{t.size}-{t.format}-{t.shards}shards-seed{t.seed}{hf}"
    current = is_current(folder, t.size) if t.layout != "hf" else (folder / "config.json").exists()
    if current:
        log.info("reusing synthetic checkpoint %s", folder)
        return folder
    if folder.exists():  # made by an older version of make-tiny: our own product, made again
        log.info("remaking synthetic checkpoint %s (its config.json is not the current one)", folder)
        shutil.rmtree(folder)
    needed = sum(2 * math.prod(shape) for _, shape in synthetic_tensors(SIZES[t.size]))  # bf16 weights
    diskspace.ensure_space(folder, needed, "the synthetic checkpoint")
    with diskspace.disk_errors(folder, needed, "the synthetic checkpoint"):
        return make_tiny(folder, size=t.size, fmt=t.format, shards=t.shards, seed=t.seed, layout=t.layout,
                         vocab_gguf=toolchain.source_asset(VOCAB_GGUF))


def params_problems(run: Run) -> list[str]:
    """What in the `model` params cannot work, each naming the key (nothing is read or fetched)."""
    p, where, out = run.params.model, run.params_file, []
    if p.source == "tiny" and p.format == "gguf":
        out.append(f"{where}: model.source tiny makes a checkpoint; use model.format checkpoint")
    if p.source == "local":
        if not p.path:
            out.append(f"{where}: model.source local needs model.path (the checkpoint folder)")
        elif not resolve(p.path).is_dir():
            out.append(f"{resolve(p.path)}: not a folder (params key model.path in {where})")
    if p.format == "gguf" and (not p.text_file or not p.mmproj_file):
        out.append(f"{where}: model.format gguf needs model.text_file and model.mmproj_file")
    return out


def gguf_input_problems(folder: Path, run: Run) -> list[str]:
    """What is wrong with the ready GGUF files (model.format gguf): missing, truncated, not a GGUF, or
    the text model and the mmproj swapped. These are the user's files: the fix is another copy."""
    p = run.params.model
    out = []
    for name, key, want_clip in ((p.text_file, "model.text_file", False), (p.mmproj_file, "model.mmproj_file", True)):
        f = folder / name
        if not f.is_file():
            out.append(f"{f}: not found (params key {key} in {run.params_file})")
            continue
        fix = f"replace it with a complete copy (it is params {key}; {fix_hint(run, folder)})"
        try:
            arch = open_gguf(f, f"the GGUF named by {key}", fix=fix).fields.get("general.architecture")
        except GGUFError as err:
            out.append(str(err))
            continue
        if want_clip and arch != "clip":
            out.append(f"{f}: params {key} names a {arch!r} model, not an mmproj (clip); check model.text_file "
                       "and model.mmproj_file")
        elif not want_clip and arch == "clip":
            out.append(f"{f}: params {key} names an mmproj (clip), not a text model; check model.text_file and "
                       "model.mmproj_file")
    return out


def _gguf_products(folder: Path, run: Run) -> dict:
    problems = gguf_input_problems(folder, run)
    if problems:
        raise DownloadError("\n".join(problems))
    p = run.params.model
    text = folder / p.text_file
    return {"mmproj": folder / p.mmproj_file, "quantized": {quant_type_of(text): text}}


def run_download(run: Run) -> DownloadResult:
    """Make, locate or download the model named by the params; record what later steps need."""
    p = run.params.model
    problems = params_problems(run)
    if problems:
        raise DownloadError("\n".join(problems))
    if p.source == "tiny":
        folder, remote = _tiny(run), {}
    elif p.source == "local":
        folder, remote = resolve(p.path), {}
    else:
        if p.format == "gguf":
            patterns = p.allow_patterns or [f for f in (p.text_file, p.mmproj_file) if f]
        else:
            patterns = p.allow_patterns or CHECKPOINT_PATTERNS
        remote = {k: v for k, v in remote_files(run).items()
                  if any(fnmatch.fnmatch(k, pat) for pat in patterns)}
        _check_download_space(run, remote)
        folder = _snapshot(run, patterns)

    if p.format == "gguf":
        products = _gguf_products(folder, run)
        names = [p.text_file, p.mmproj_file]
        table = check_files(folder, names, remote)
        _fail_on(table, folder, run)
        result = DownloadResult(folder, p.source, "gguf", table, {}, products)
    else:
        table = check_files(folder, _expected_files(folder, run), remote)
        _fail_on(table, folder, run)
        ckpt = Checkpoint.open(folder)  # headers: completeness, truncation, duplicates
        # The text export needs the tokenizer; a broken one is found now, not after the vision export.
        problem = tokenizer_problem(folder / "tokenizer.model")
        if problem:
            raise DownloadError(f"{folder / 'tokenizer.model'}: {problem}; {fix_hint(run, folder)}")
        result = DownloadResult(folder, p.source, "checkpoint", table, ckpt.config, {"checkpoint": folder})
    for name, value in result.products.items():
        run.record(name, value)
    return result


def config_table(config: dict) -> pd.DataFrame:
    """config.json as a two-column table for display."""
    return pd.DataFrame([{"key": k, "value": json.dumps(v) if isinstance(v, (list, dict)) else v}
                         for k, v in config.items()])
