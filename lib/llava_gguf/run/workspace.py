"""Where things live: the repo root, the per-run output folder, the cache, artifacts.json.

A run folder `outputs/<run>/` holds everything one params file produced: executed notebooks,
HTML reports, logs, plots, metrics, the GGUF files and `artifacts.json` (product name -> path,
relative to the run folder when inside it, absolute otherwise, so a run folder copied from another
machine still resolves). Files are written under a temporary name and renamed,
so an interrupted step never leaves a complete-looking product behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from . import partials
from .params import DEFAULT_PARAMS, Params, load_params, parse_params
from .registry import producer, repo_root
from .timeout_scale import scale

log = logging.getLogger(__name__)

PARAMS_ENV = "LLAVA_GGUF_PARAMS"
# Set (to 1) while a step runs under FORCE=1: steps that reuse their own earlier files make them again.
FORCE_ENV = "LLAVA_GGUF_FORCE"
CACHE_ENV = "LLAVA_GGUF_CACHE"
OUTPUTS_ENV = "LLAVA_GGUF_OUTPUTS"


def forced() -> bool:
    """Whether the running step was forced (FORCE=1, `run --force`): reuse nothing."""
    return os.environ.get(FORCE_ENV, "").lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def forcing(force: bool) -> Iterator[None]:
    """Set FORCE_ENV for what runs inside (notebook kernels inherit it), then restore it."""
    old = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1" if force else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = old


def outputs_dir() -> Path:
    """Where run folders go: $LLAVA_GGUF_OUTPUTS (tests use a temp folder), else outputs/."""
    env = os.environ.get(OUTPUTS_ENV)
    # abspath, not resolve(): outputs (or a run folder in it) may be a symlink to a bigger disk.
    return Path(os.path.abspath(Path(env).expanduser())) if env else repo_root() / "outputs"


def cache_dir() -> Path:
    """Shared across clones and runs: the llama.cpp source and builds, the 7B benchmark checkpoint."""
    env = os.environ.get(CACHE_ENV)
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llava-gguf"
    base.mkdir(parents=True, exist_ok=True)
    return base


# How long cache_lock waits for another holder, times $LLAVA_GGUF_TIMEOUT_SCALE: above the longest
# work done under a cache lock, a llama.cpp build (llama_cpp/limits.py: "cmake configure" 900 s +
# "cmake build" 4 h, plus copying and patching the source). run/ sits below llama_cpp/ and cannot
# read those limits, hence a constant.
CACHE_LOCK_TIMEOUT_S = 6 * 3600


class CacheBusy(RuntimeError):
    """Another process held a shared-cache entry's lock for longer than cache_lock waits."""


@contextlib.contextmanager
def cache_lock(target: Path | str, timeout: float | None = None) -> Iterator[None]:
    """Hold the lock of a shared-cache entry (the file `.<name>.lock` beside `target`).

    Whatever makes or replaces a folder under cache_dir() (the llama.cpp source and builds, the
    legacy venv) holds it, so that two checkouts (a user's clone and CI) never write one folder at
    once: the second waits, then finds the entry made. An flock: the kernel releases it when the
    holder dies, and every command the holder runs has a time limit (llama_cpp/limits.py); a holder
    still there after `timeout` seconds (default CACHE_LOCK_TIMEOUT_S, scaled like every tool limit:
    run/timeout_scale.py; stuck, or a lock a network file system kept) raises CacheBusy."""
    if timeout is None:
        timeout = CACHE_LOCK_TIMEOUT_S * scale()
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(target.parent / f".{target.name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process making %s (lock %s, for up to %.0f s)", target, lock.lock_file,
                 timeout)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise CacheBusy(f"{lock.lock_file}: another process has held this lock for over {timeout:.0f} s while "
                            f"making {target}; wait for it to finish and rerun, or, if no other llava-gguf "
                            "process runs, delete the lock file and rerun") from None
    try:
        yield
    finally:
        lock.release()


def rel_to_root(path: Path | str) -> str:
    # abspath, not resolve(): a symlinked outputs folder (a bigger disk) must keep its spelling,
    # or a recorded path would not compare equal to the one the step holds.
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(repo_root()))
    except ValueError:
        return str(path)


def resolve(path: Path | str) -> Path:
    """Paths in params are absolute or relative to the repo root (artifacts: `Run.resolve`)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else repo_root() / path


def params_vision_config(params: Params) -> Path | None:
    """params convert.vision_config as a path (relative paths: to the repo root); None when unset."""
    value = params.convert.vision_config
    return resolve(value) if value else None


@contextlib.contextmanager
def atomic_path(final: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling path; rename it to `final` only if the block succeeds.

    The temporary name carries this process's id and it stays locked while the block runs, so that
    `partials.remove_stale` can tell a leftover of a killed run from a file being written."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=partials.prefix(final), suffix=suffix + partials.SUFFIX, dir=final.parent)
    tmp_path = Path(tmp)
    try:
        partials.hold(fd)
        yield tmp_path
        if tmp_path.exists():
            # mkstemp makes owner-only files; products get the usual umask-based mode.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
        os.close(fd)


def json_safe(value: Any) -> Any:
    """numpy scalars -> Python numbers, NaN/inf -> None (JSON has neither), through dicts and lists."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path | str, data: Any) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


def write_table(df, stem: Path) -> None:
    """A pandas DataFrame as <stem>.csv and <stem>.json (records), each written whole."""
    with atomic_path(stem.with_suffix(".csv")) as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(stem.with_suffix(".json")) as tmp:
        df.to_json(tmp, orient="records", indent=1)


def sha256_file(path: Path | str, chunk: int = 1 << 22) -> str:
    """sha256 of a file (the project's one file hash), with a progress bar for big ones (a 7B
    quantized file is 4+ GB)."""
    path = Path(path)
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
                                     disable=size < 1 << 28, leave=False) as bar:
        while block := f.read(chunk):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


@dataclass
class Run:
    """One params file's run: its folder layout and its artifacts.json."""

    params: Params

    @property
    def dir(self) -> Path:
        return outputs_dir() / self.params.run

    def sub(self, name: str) -> Path:
        path = self.dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def params_file(self) -> Path | None:
        return self.params.source_file

    # artifacts.json ---------------------------------------------------------------------------
    @property
    def artifacts_file(self) -> Path:
        return self.dir / "artifacts.json"

    def artifacts(self) -> dict[str, Any]:
        if not self.artifacts_file.exists():
            return {}
        return self.read_json(self.artifacts_file)

    def record(self, name: str, value: Any) -> None:
        """Record a product (a path, a mapping of paths, or plain data) in artifacts.json."""
        data = self.artifacts()
        data[name] = _relativize(value, self.dir)
        write_json(self.artifacts_file, data)
        shown = data[name]
        if isinstance(shown, dict):  # "Q4_K_M: models/x.gguf, ...", not a dict's repr, in the notebook's log
            shown = ", ".join(f"{k}: {v}" for k, v in shown.items())
        log.info("artifact %s -> %s", name, shown)

    def forget(self, *names: str) -> None:
        data = self.artifacts()
        if any(n in data for n in names):
            write_json(self.artifacts_file, {k: v for k, v in data.items() if k not in names})

    def artifact(self, name: str) -> Any:
        data = self.artifacts()
        if name not in data:
            raise FileNotFoundError(
                f"{self.artifacts_file}: no '{name}' recorded yet; run the step that makes it "
                f"(e.g. `make {producer(name)} PARAMS={self.params_file or DEFAULT_PARAMS}`)")
        return data[name]

    def resolve(self, path: Path | str) -> Path:
        """A path read from artifacts.json: absolute, or relative to the run folder."""
        return resolve_in_run(self.dir, path)

    def artifact_path(self, name: str) -> Path:
        path = self.resolve(self.artifact(name))
        if not path.exists():
            raise FileNotFoundError(f"artifact '{name}' points at {path}, which does not exist; "
                                    f"rerun `make {producer(name)} FORCE=1`")
        return path

    @staticmethod
    def read_json(path: Path) -> Any:
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise RunStateError(f"{path}: unreadable ({err}); delete it and rerun with FORCE=1") from None

    # one pipeline per run at a time ---------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold outputs/<run>/.lock (flock: released by the kernel when the holder dies)."""
        path = self.dir / ".lock"
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise RunBusy(f"run '{self.params.run}' ({self.dir}) is in use by {holder}; "
                              "wait for it to finish or stop it, then rerun") from None
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                    f" ({' '.join(sys.argv[:4])})\n")
            f.flush()
            try:
                yield
            finally:
                f.seek(0)
                f.truncate()

    def remove_stale_partials(self) -> list[Path]:
        """Delete what interrupted writers left (`.<name>.<pid>-<start>.XXXX.partial`), keeping the
        files of writers still at work (a notebook open in JupyterLab holds no run lock); see partials.py."""
        return partials.remove_stale(self.dir)


class RunBusy(RuntimeError):
    """Another process holds the run's lock."""


class RunStateError(RuntimeError):
    """A file of the run folder (artifacts.json, steps.json) cannot be read."""


def rel_to_run(path: Path | str, run_dir: Path | str) -> str:
    """`path` relative to the run folder when inside it (the folder can then move), else absolute."""
    # abspath, not resolve(): a symlinked outputs folder (a bigger disk) keeps its spelling, so a
    # recorded path compares equal to the one the step holds.
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(os.path.abspath(run_dir)))
    except ValueError:
        return str(path)


def resolve_in_run(run_dir: Path | str, path: Path | str) -> Path:
    """A recorded path: absolute, or relative to the run folder.

    Runs recorded before paths were run-relative hold repo-root-relative ones
    (`outputs/<run>/...`); those are still found when they exist under the repo root.
    """
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    inside = Path(run_dir) / path
    if not inside.exists() and (repo_root() / path).exists():
        return repo_root() / path
    return inside


def _relativize(value: Any, run_dir: Path) -> Any:
    if isinstance(value, Path):
        return rel_to_run(value, run_dir)
    if isinstance(value, dict):
        return {k: _relativize(v, run_dir) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_relativize(v, run_dir) for v in value]
    return value


def open_run(params_file: str | Path | None = None, params: dict | None = None) -> Run:
    """The run for a params file: the argument, else $LLAVA_GGUF_PARAMS, else params/default.yaml.

    `params`: the resolved values papermill injects into an executed notebook; when given they are
    what the run uses (validated again), so the executed notebook shows exactly what it ran with."""
    chosen = params_file or os.environ.get(PARAMS_ENV) or DEFAULT_PARAMS
    if params is not None:
        loaded = parse_params(params, f"{chosen} (as injected)")
        loaded._source_file = resolve(chosen).resolve()
    else:
        loaded = load_params(resolve(chosen))
    run = Run(params=loaded)
    run.dir.mkdir(parents=True, exist_ok=True)
    return run


def setup_logging(level: int = logging.INFO) -> None:
    """Library messages to stderr (shown in notebooks and in papermill's log)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
