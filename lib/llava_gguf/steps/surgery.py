"""Step 02: split a LLaVA checkpoint into its text model, vision tower and projector.

llama.cpp's recipe (`llava_surgery_v2.py -C`) copies the vision tower into `llava.clip` and the
projector into `llava.projector` inside the model folder. Here nothing is copied and nothing is
written into the source folder: every tensor is classified from the shard headers alone (the
tensors stay where they are, in whichever shard holds them) and the result is a manifest,
`outputs/<run>/surgery/manifest.json`, that the exporters read:

    {"manifest_version": 1, "source": <folder>, "layout": "llava", "format": "safetensors",
     "index_file": ..., "llava_version": "1.6", "config": {config.json},
     "shards": {file: {"bytes": n}}, "parts": {part: {"tensors", "parameters", "bytes"}},
     "tensors": {stored name: {"shard", "dtype", "shape", "part", "canonical"}}}

Every check (index vs shards, truncation, duplicates, pickles that are not plain tensors, layout,
projector type) runs before the manifest is written; see `checkpoint.py` and `layout.py`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..model.checkpoint import Checkpoint, DTYPE_SIZES
from ..checks.acceptance import Checks
from ..model.layout import IGNORED, PROJECTOR, TEXT, VISION, Split, split_checkpoint
from ..model.manifest import MANIFEST_VERSION, ManifestError, part_tensors  # noqa: F401  (ManifestError: raised by the step)
from ..model.vision_config import resolve_vision_config
from ..run.workspace import Run, params_vision_config, rel_to_root, resolve, write_json

log = logging.getLogger(__name__)

PARTS = (TEXT, VISION, PROJECTOR, IGNORED)


@dataclass
class SurgeryResult:
    path: Path  # the manifest
    manifest: dict
    checks: Checks = field(default_factory=lambda: Checks("surgery"))

    @property
    def layout(self) -> str:
        return self.manifest["layout"]

    @property
    def source(self) -> Path:
        return resolve(self.manifest["source"])

    def table(self) -> pd.DataFrame:
        return parts_table(self.manifest)

    def tensors(self, part: str | None = None) -> pd.DataFrame:
        return tensor_table(self.manifest, part)


# ----------------------------------------------------------------------------- building
def build_manifest(ckpt: Checkpoint, split: Split) -> dict:
    """The manifest of a validated checkpoint and its split (pure: writes nothing)."""
    tensors = {}
    for part in PARTS:
        for t in split.parts.get(part, []):
            tensors[t.stored] = {"shard": t.shard, "dtype": t.dtype, "shape": list(t.shape), "part": part,
                                 "canonical": t.canonical}
    # Keep the checkpoint's own order (shard by shard), which is also the order exporters stream in.
    order = {name: i for i, name in enumerate(ckpt.tensors)}
    tensors = dict(sorted(tensors.items(), key=lambda kv: order[kv[0]]))
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "source": os.path.abspath(ckpt.path),  # the file holds it relative to the repo root (run_surgery)
        "layout": split.layout,
        "format": ckpt.format,
        "index_file": ckpt.index_file,
        "llava_version": split.llava_version,
        "config": ckpt.config,
        "shards": {s: {"bytes": (ckpt.path / s).stat().st_size} for s in ckpt.shards},
        "parts": {},
        "tensors": tensors,
    }
    manifest["parts"] = _part_totals(manifest)
    return manifest


def _part_totals(manifest: dict) -> dict:
    totals = {p: {"tensors": 0, "parameters": 0, "bytes": 0} for p in PARTS}
    for t in manifest["tensors"].values():
        n = 1
        for d in t["shape"]:
            n *= d
        entry = totals[t["part"]]
        entry["tensors"] += 1
        entry["parameters"] += n
        entry["bytes"] += n * DTYPE_SIZES.get(t["dtype"], 4)
    return totals


def analyze(folder: str | Path) -> dict:
    """Open, validate and classify a checkpoint folder; the manifest, nothing written."""
    with Checkpoint.open(folder) as ckpt:
        split = split_checkpoint(ckpt)
        manifest = build_manifest(ckpt, split)
    parts = manifest["parts"]
    log.info("layout %s (LLaVA %s, %s): %s", manifest["layout"], manifest["llava_version"], manifest["format"],
             ", ".join(f"{p} {parts[p]['tensors']} tensors" for p in PARTS if parts[p]["tensors"]))
    return manifest


def run_surgery(run: Run) -> SurgeryResult:
    """Classify the downloaded checkpoint and record the manifest (artifact `surgery`)."""
    folder = run.artifact_path("checkpoint")
    manifest = analyze(folder)
    # The vision tower's config is resolved now, so that a tower this project cannot describe is
    # refused before anything is written (step 03 resolves it again from the manifest).
    resolve_vision_config(manifest["config"], {n: t["shape"] for n, t in part_tensors(manifest, VISION).items()},
                          str(Path(folder) / "config.json"), params_vision_config(run.params))
    path = run.dir / "surgery" / "manifest.json"
    if path.resolve().is_relative_to(Path(folder).resolve()):
        raise ManifestError(f"{path}: the run folder is inside the source checkpoint {folder}; "
                            "the source is never written to, choose another outputs folder")
    write_json(path, {**manifest, "source": rel_to_root(manifest["source"])})
    run.record("surgery", path)
    result = SurgeryResult(path, manifest)
    result.checks = acceptance_checks(run, result).enforce()
    return result


def acceptance_checks(run: Run, result: SurgeryResult) -> Checks:
    """The step's promises: a known layout, the three parts found, the manifest recorded."""
    checks = Checks("surgery")
    parts = result.manifest["parts"]
    checks.add("layout", result.layout, "llava or llava-hf", result.layout in ("llava", "llava-hf"))
    n = parts[PROJECTOR]["tensors"]
    checks.add("projector tensors", n, "4 or 5 (mm_projector.0/.2 weight and bias, LLaVA 1.6's image_newline)",
               n in (4, 5))
    for part in (VISION, TEXT):
        checks.add(f"{part} tensors", parts[part]["tensors"], "at least 1", parts[part]["tensors"] > 0)
    recorded = run.artifact_path("surgery")
    checks.add("artifact surgery", rel_to_root(recorded), f"the manifest written, {rel_to_root(result.path)}",
               recorded == result.path)
    return checks


# ----------------------------------------------------------------------------- tables
def parts_table(manifest: dict) -> pd.DataFrame:
    """One row per part: tensors, parameters, bytes (and MiB), with the layout as a column."""
    rows = [{"part": p, **manifest["parts"][p]} for p in PARTS]
    df = pd.DataFrame(rows).set_index("part")
    df["MiB"] = (df["bytes"] / 2**20).round(1)
    df["layout"] = manifest["layout"]
    df["format"] = manifest["format"]
    df.loc["total", ["tensors", "parameters", "bytes", "MiB"]] = df[["tensors", "parameters", "bytes", "MiB"]].sum()
    df.loc["total", ["layout", "format"]] = [manifest["layout"], manifest["format"]]
    df[["tensors", "parameters", "bytes"]] = df[["tensors", "parameters", "bytes"]].astype("int64")
    return df


def tensor_table(manifest: dict, part: str | None = None) -> pd.DataFrame:
    """One row per stored tensor: shard, dtype, shape, part and canonical name."""
    rows = [{"tensor": name, **t, "shape": tuple(t["shape"])} for name, t in manifest["tensors"].items()
            if part is None or t["part"] == part]
    return pd.DataFrame(rows, columns=["tensor", "part", "canonical", "shard", "dtype", "shape"])


def shard_table(manifest: dict) -> pd.DataFrame:
    """Tensors of each part per shard: where the parts lie in the files."""
    df = tensor_table(manifest)
    return df.pivot_table(index="shard", columns="part", values="tensor", aggfunc="count", fill_value=0)
