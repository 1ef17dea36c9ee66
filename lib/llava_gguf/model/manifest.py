"""The surgery manifest (`outputs/<run>/surgery/manifest.json`, written by step 02): every tensor
of the checkpoint with its shard, dtype, shape, part (text / vision / projector / ignored) and
canonical name, plus the checkpoint's config. Steps 03 and 04 plan their exports from it and
read tensors only through `open_checked`, which refuses a checkpoint changed since.

The file holds the checkpoint folder (`source`) relative to the repo root when it lies inside it, so
a run folder copied to another checkout still finds it; `load_manifest` makes it absolute against the
root it is given. A manifest in memory always holds an absolute `source`.
"""
from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import Checkpoint
from .layout import SplitTensor

MANIFEST_VERSION = 1
# convert_legacy_llama.py leaves these out of general.size_label's parameter count.
_UNCOUNTED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


class ManifestError(ValueError):
    """The manifest is missing, unreadable, of another version, or no longer matches the checkpoint."""


def load_manifest(path: str | Path, root: str | Path) -> dict:
    """The manifest at `path` (a run's `surgery` artifact), its `source` made absolute against `root`
    (the repo root, which a relative one is stored against)."""
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: unreadable surgery manifest ({err}); rerun `make surgery`") from None
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ManifestError(f"{path}: manifest version {manifest.get('manifest_version')} != {MANIFEST_VERSION}; "
                            "rerun `make surgery`")
    source = Path(manifest["source"]).expanduser()
    manifest["source"] = str(source if source.is_absolute() else Path(root) / source)
    return manifest


def open_checked(manifest: dict) -> Checkpoint:
    """Open the manifest's checkpoint and check it still holds what the manifest says."""
    ckpt = Checkpoint.open(source_folder(manifest))
    changed = []
    for name, t in manifest["tensors"].items():
        info = ckpt.tensors.get(name)
        if info is None or info.shard != t["shard"] or info.dtype != t["dtype"] or list(info.shape) != t["shape"]:
            changed.append(name)
    changed += [n for n in ckpt.tensors if n not in manifest["tensors"]]
    if changed:
        ckpt.close()
        raise ManifestError(f"{ckpt.path}: changed since the surgery step ({len(changed)} tensor(s) differ, e.g. "
                            f"{changed[0]}); rerun `make surgery`")
    return ckpt


def part_tensors(manifest: dict, part: str) -> dict[str, dict]:
    """canonical name -> manifest entry (with 'stored' added), for one part."""
    return {t["canonical"]: {**t, "stored": name} for name, t in manifest["tensors"].items() if t["part"] == part}


def split_part(manifest: dict, part: str) -> dict[str, SplitTensor]:
    """canonical name -> tensor, for one part, as `layout.Split.part` gives it."""
    return {c: SplitTensor(t["stored"], c, part, t["shard"], t["dtype"], tuple(t["shape"]))
            for c, t in part_tensors(manifest, part).items()}


def source_folder(manifest: dict) -> Path:
    return Path(manifest["source"])


def parameter_count(manifest: dict) -> int:
    """Every tensor of the checkpoint (the vision tower and projector included), as the legacy
    converter counts them for general.size_label."""
    total = 0
    for name, t in manifest["tensors"].items():
        if not name.endswith(_UNCOUNTED_SUFFIXES):
            n = 1
            for d in t["shape"]:
                n *= d
            total += n
    return total
