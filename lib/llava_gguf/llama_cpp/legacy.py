"""llama.cpp's legacy LLaVA recipe, run as documented, for reference outputs and benchmarks.

docs/multimodal/llava.md (LLaVA 1.6):

    python tools/mtmd/legacy-models/llava_surgery_v2.py -C -m <model>
    mkdir vit && cp <model>/llava.clip vit/pytorch_model.bin && cp <model>/llava.projector vit/
    curl .../cmp-nct/llava-1.6-gguf/raw/main/config_vit.json -o vit/config.json
    python tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py -m vit \\
        --llava-projector vit/llava.projector --output-dir vit --clip-model-is-vision
    python examples/convert_legacy_llama.py <model> --skip-unknown

Differences, all forced by running offline and never writing into the source:
- The surgery script writes llava.clip / llava.projector INTO the model folder, so it runs on a
  copy made of symlinks to the source's files (`legacy_surgery`); the copy holds no llava.*
  link, so nothing is ever written through a link into the source.
- config_vit.json cannot be downloaded: it is derived by `config_vit.config_vit` (from
  config.json, the tower's shapes in llava.clip and CLIP ViT-L/14-336's constants).
- vit/ holds symlinks to llava.clip / llava.projector instead of copies (the same bytes are read).

The image-encoder script needs transformers < 5 (`CLIPVisionModel.from_pretrained` of a .bin
with the 4.x loading path); the project runs transformers 5. `legacy_env()` makes, once per Python
version, a venv under `cache_dir()/legacy-env` holding only the pinned packages below. The scripts
it runs get PYTHONPATH = gguf-py of the pinned llama.cpp source, that venv's site-packages, then the
running project venv's (found from sys.prefix), so torch, numpy and safetensors are reused and every
checkout shares one legacy venv. Every function returns paths and sends the scripts' output to a
log file in the work folder.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import limits
from .runner import ToolFailed, run_tool
from .toolchain import source_dir
from ..model.config_vit import config_vit
from ..run.workspace import cache_dir, cache_lock, write_json

log = logging.getLogger(__name__)

# runner(cmd, log_file, cwd): how a legacy script is run (see run_logged).
Runner = Callable[[list[str], Path, Path], None]

# transformers==4.57.6 is what llama.cpp's requirements-convert_legacy_llama.txt pins at 0c1e570;
# the other two are the versions pip resolves for it (transformers 4.57 wants hub < 1.0, tokenizers <= 0.23.0).
LEGACY_PINS = ("transformers==4.57.6", "huggingface-hub==0.36.2", "tokenizers==0.22.2")
ENV_NAME = "legacy-env"
STAMP = "llava-gguf-legacy-env.json"
SURGERY_SCRIPT = "tools/mtmd/legacy-models/llava_surgery_v2.py"
IMAGE_ENCODER_SCRIPT = "tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py"
TEXT_SCRIPT = "examples/convert_legacy_llama.py"
# Files the surgery script writes into the model folder: never linked into the copy.
SURGERY_OUTPUTS = ("llava.clip", "llava.projector")


class LegacyError(RuntimeError):
    """A legacy script failed; the message names its log file."""


@dataclass(frozen=True)
class LegacySurgery:
    model_dir: Path  # the symlink copy of the checkpoint, now also holding llava.clip / llava.projector
    clip: Path
    projector: Path
    log: Path


# ----------------------------------------------------------------------------- environment
def _main_site_packages() -> list[str]:
    paths = sysconfig.get_paths()  # of the running interpreter, i.e. below sys.prefix
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def _env_python(root: Path) -> Path:
    return root / "bin" / "python"


def _env_site_packages(root: Path) -> Path:
    return root / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _env_ready(root: Path, want: dict) -> bool:
    stamp = root / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()) == want and _env_python(root).exists()


def legacy_env(force: bool = False) -> Path:
    """The python of the legacy venv (made once, ~10 s with network to the package index).

    Made under the cache entry's lock in a `.partial` folder, stamped last, then renamed into place:
    a venv without its stamp is never used."""
    root = cache_dir() / ENV_NAME
    want = {"pins": list(LEGACY_PINS), "python": sys.version.split()[0]}
    if not force and _env_ready(root, want):
        return _env_python(root)
    with cache_lock(root):
        if not _env_ready(root, want) or force:
            _make_env(root, want)
    return _env_python(root)


def _make_env(root: Path, want: dict) -> None:
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{ENV_NAME}.", suffix=".partial", dir=cache_dir()))
    log_file = cache_dir() / f"{ENV_NAME}.log"
    log_file.write_text("")
    log.info("creating the legacy-script venv %s (%s; log %s)", root, ", ".join(LEGACY_PINS), log_file)
    try:
        _run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], log_file, "python -m venv",
             limits.seconds("python -m venv"))
        python = _env_python(tmp)
        _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-input",
              "--disable-pip-version-check", *LEGACY_PINS], log_file, "pip install", limits.seconds("pip install"))
        _run([str(python), "-c", "import transformers, torch, numpy; assert transformers.__version__ == "
              f"{LEGACY_PINS[0].split('==')[1]!r}, transformers.__version__"], log_file, "the legacy venv's check",
             limits.seconds("python"), env=script_env(legacy_root=tmp))
        write_json(tmp / STAMP, want)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("legacy venv ready in %.0f s", time.monotonic() - t0)


def script_env(python: str | Path | None = None, legacy_root: Path | None = None) -> dict[str, str]:
    """The environment of a script run by `python`. For the legacy venv's python (or the venv at
    `legacy_root`, while it is made) its transformers 4.x comes first, then the project venv's torch & co."""
    if legacy_root is None and python is not None and Path(python).parent.parent == cache_dir() / ENV_NAME:
        legacy_root = cache_dir() / ENV_NAME
    env = dict(os.environ)
    paths = [str(source_dir() / "gguf-py")]
    if legacy_root is not None:
        paths += [str(_env_site_packages(legacy_root)), *_main_site_packages()]
    env["PYTHONPATH"] = os.pathsep.join([*paths, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _run(cmd: list[str], log_file: Path, what: str, limit: float, cwd: Path | None = None,
         env: dict | None = None) -> None:
    """One command into `log_file` (appended), within `limit` s; LegacyError names it, how it ended, the log."""
    try:
        run_tool(cmd, log_file, limit, what, cwd=cwd, append=True, env=env)
    except ToolFailed as err:
        raise LegacyError(str(err)) from None


def run_logged(cmd: list[str], log_file: Path, cwd: Path) -> None:
    """The default way a legacy script runs: its output to log_file, within the script limit for the
    files its arguments name (the checkpoint it reads). The benchmark passes its own `runner` with
    this signature to measure each script's process tree."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text("")
    inputs = [a for a in cmd[2:] if not a.startswith("-") and Path(a).exists()]
    _run(cmd, log_file, Path(cmd[1]).name, limits.seconds("legacy script", limits.gib(inputs)), cwd=cwd,
         env=script_env(cmd[0]))


@contextlib.contextmanager
def _removed_on_failure(*outputs: Path) -> Iterator[None]:
    """A script that failed or was stopped leaves no half-written output behind."""
    try:
        yield
    except BaseException:
        for f in outputs:
            if f.is_file() and not f.is_symlink():
                f.unlink()
        raise


def _fresh_dir(path: Path) -> Path:
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# ----------------------------------------------------------------------------- the recipe
def link_copy(ckpt_dir: str | Path, dest: str | Path) -> Path:
    """A folder of symlinks to the checkpoint's top-level files (minus the surgery's outputs)."""
    ckpt_dir, dest = Path(ckpt_dir).resolve(), _fresh_dir(Path(dest))
    for f in sorted(ckpt_dir.iterdir()):
        if f.is_file() and f.name not in SURGERY_OUTPUTS:
            (dest / f.name).symlink_to(f.resolve())
    return dest


def legacy_surgery(ckpt_dir: str | Path, work_dir: str | Path, runner: Runner = run_logged) -> LegacySurgery:
    """`llava_surgery_v2.py -C -m <copy>` on a symlink copy of the checkpoint in work_dir/model."""
    work_dir = Path(work_dir)
    python = legacy_env()
    model = link_copy(ckpt_dir, work_dir / "model")
    log_file = work_dir / "legacy-surgery.log"
    clip, projector = (model / n for n in SURGERY_OUTPUTS)
    with _removed_on_failure(clip, projector):
        runner([str(python), str(source_dir() / SURGERY_SCRIPT), "-C", "-m", str(model)], log_file, work_dir)
    for f in (clip, projector):
        if not f.is_file() or f.is_symlink():
            raise LegacyError(f"{SURGERY_SCRIPT} wrote no {f.name} in {model} (not a LLaVA checkpoint?); "
                              f"log: {log_file}")
    return LegacySurgery(model, clip, projector, log_file)


def derived_config_vit(model_dir: str | Path) -> dict:
    """config_vit.json for the checkpoint in model_dir, from config.json, llava.clip and llava.projector."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    clip = torch.load(model_dir / "llava.clip", map_location="cpu", weights_only=True, mmap=True)
    tensors = {name: {"shape": list(t.shape)} for name, t in clip.items()}
    projector = torch.load(model_dir / "llava.projector", map_location="cpu", weights_only=True)
    if any(n.endswith("image_newline") for n in projector):
        tensors["image_newline"] = {"shape": [1]}
    return config_vit(config, tensors, str(model_dir / "config.json"))


def legacy_vision_export(model_dir: str | Path, work_dir: str | Path, outtype: str = "f16",
                         runner: Runner = run_logged) -> Path:
    """The recipe's vit/ folder and `convert_image_encoder_to_gguf.py --clip-model-is-vision`.

    model_dir: `legacy_surgery(...).model_dir`. Returns vit/mmproj-model-{outtype}.gguf."""
    model_dir, work_dir = Path(model_dir), Path(work_dir)
    python = legacy_env()
    vit = _fresh_dir(work_dir / "vit")
    (vit / "pytorch_model.bin").symlink_to((model_dir / "llava.clip").resolve())
    (vit / "llava.projector").symlink_to((model_dir / "llava.projector").resolve())
    write_json(vit / "config.json", derived_config_vit(model_dir))
    cmd = [str(python), str(source_dir() / IMAGE_ENCODER_SCRIPT), "-m", str(vit), "--llava-projector",
           str(vit / "llava.projector"), "--output-dir", str(vit), "--clip-model-is-vision"]
    if outtype == "f32":
        cmd.append("--use-f32")
    out = vit / f"mmproj-model-{outtype}.gguf"
    with _removed_on_failure(out):
        runner(cmd, work_dir / "legacy-vision.log", work_dir)
    if not out.is_file():
        raise LegacyError(f"{IMAGE_ENCODER_SCRIPT} wrote no {out}; log: {work_dir / 'legacy-vision.log'}")
    return out


def legacy_text_export(model_dir: str | Path, work_dir: str | Path, outtype: str = "f16",
                       runner: Runner = run_logged) -> Path:
    """`examples/convert_legacy_llama.py <model> --outtype <t> --skip-unknown` (project venv python).

    model_dir: the symlink copy from `legacy_surgery` (or any folder it may read). Returns the GGUF."""
    work_dir = Path(work_dir)
    out = work_dir / f"ggml-model-{outtype}.gguf"
    cmd = [sys.executable, str(source_dir() / TEXT_SCRIPT), str(model_dir), "--outtype", outtype, "--skip-unknown",
           "--outfile", str(out)]
    with _removed_on_failure(out):
        runner(cmd, work_dir / "legacy-text.log", work_dir)
    if not out.is_file():
        raise LegacyError(f"{TEXT_SCRIPT} wrote no {out}; log: {work_dir / 'legacy-text.log'}")
    return out
