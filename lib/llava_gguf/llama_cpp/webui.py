"""llama-server's own chat page, built from the pinned tree's tools/ui with npm, served with `--path`.

The pinned tree's CMake build would embed the page in the binary, from an npm build or a prebuilt
archive it downloads (LLAMA_USE_PREBUILT_UI): the download is not reachable here, and an npm build
inside the llama.cpp build would tie every tool build to npm. So the tools are built without it
(LLAMA_BUILD_UI off, toolchain.py) and the page is built once on its own, into the cache beside the
llama.cpp build (`ui_dir()`), by `make webui` (`build_ui`):

- the sources are copied to a temporary folder in the cache, `npm ci` installs the exact packages of
  the pinned package-lock.json, and `npm run build` (vite, @sveltejs/adapter-static) writes the page;
- the output is a folder of plain static files (index.html, _app/, sw.js, icons; `precompress: false`
  in svelte.config.js), which llama-server serves as they are with `--path DIR` (server-http.cpp:
  `set_mount_point`), so no rebuild of llama-server is needed;
- it is renamed into place only once complete, with a `.built` record last (a build stopped half way
  leaves nothing that looks built); node_modules (~700 MB) is deleted with the temporary folder.

On 2 cores: `npm ci` about 45 s (1060 packages), `npm run build` about 3 min 20 s; 10 MB of page.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..run.workspace import cache_dir, cache_lock
from . import limits
from .runner import ToolFailed, run_tool
from .toolchain import LLAMA_CPP_COMMIT, source_dir

log = logging.getLogger(__name__)

MARKER = ".built"
# vite 7 (the lock file's) asks for Node.js ^20.19.0 || >=22.12.0.
MIN_NODE = (20, 19)
BUILD_HINT = "make webui builds it (npm and Node.js >= 20.19, about 4 min on 2 cores)"  # no backticks: bash echoes it


class WebUIError(RuntimeError):
    """The page could not be built: no npm, an old Node.js, or a failed npm step (names its log)."""


def ui_dir() -> Path:
    """Where the built page lives: beside the llama.cpp builds, one per pinned commit."""
    return cache_dir() / f"llama-ui-{LLAMA_CPP_COMMIT}"


def log_path() -> Path:
    return cache_dir() / f"llama-ui-{LLAMA_CPP_COMMIT}.log"


def built_ui(folder: Path | None = None) -> Path | None:
    """The page's folder if a complete build is there (its index.html and the `.built` record), else None."""
    folder = Path(folder) if folder else ui_dir()
    return folder if (folder / "index.html").is_file() and (folder / MARKER).is_file() else None


def build_info(folder: Path | None = None) -> dict:
    """The `.built` record: commit, Node.js and npm versions, seconds per stage."""
    folder = built_ui(folder)
    return json.loads((folder / MARKER).read_text()) if folder else {}


def node_problem() -> str | None:
    """Why this machine cannot build the page (None: it can)."""
    missing = [t for t in ("node", "npm") if shutil.which(t) is None]
    if missing:
        return (f"{' and '.join(missing)} not found: install Node.js >= {MIN_NODE[0]}.{MIN_NODE[1]} with npm "
                "(Debian: apt-get install nodejs npm, where its nodejs is new enough)")
    version = _node_version()
    if version is None or version < MIN_NODE:
        return (f"Node.js {'.'.join(map(str, version)) if version else '(unknown version)'} is too old for the "
                f"page's build tools (vite 7 needs >= {MIN_NODE[0]}.{MIN_NODE[1]})")
    return None


def _node_version() -> tuple[int, int] | None:
    try:
        out = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.match(r"v(\d+)\.(\d+)", out.strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


def _npm_version() -> str:
    try:
        return subprocess.run(["npm", "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# The stages, with what they take on 2 cores (for the progress line).
STAGES = (("npm ci", ["npm", "ci", "--no-audit", "--no-fund"], "~45 s"),
          ("npm run build", ["npm", "run", "build"], "~3.5 min"))


def build_ui(force: bool = False) -> Path:
    """Build the page into `ui_dir()` unless a complete build is there; returns the folder."""
    target = ui_dir()
    if built_ui(target) and not force:
        log.info("llama-server's chat page is up to date: %s", target)
        return target
    # Two checkouts building at once would both replace the folder (workspace.cache_lock).
    with cache_lock(target):
        if built_ui(target) and not force:
            log.info("llama-server's chat page built by another process meanwhile: %s", target)
            return target
        return _build(target)


def _build(target: Path) -> Path:
    problem = node_problem()
    if problem:
        raise WebUIError(f"cannot build llama-server's chat page: {problem}. The server's API works without it.")
    src = source_dir() / "tools" / "ui"
    if not (src / "package-lock.json").is_file():
        raise WebUIError(f"{src}: the pinned llama.cpp tree has no tools/ui/package-lock.json")
    logfile = log_path()
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".llama-ui-build-") as tmp:
        work, out = Path(tmp) / "ui", Path(tmp) / "dist"
        shutil.copytree(src, work, ignore=shutil.ignore_patterns("node_modules", "dist"))
        env = {  # added to the environment (run_tool)
            # The packages' own test browsers (playwright) are not needed to build, and not reachable.
            "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1",
            "npm_config_update_notifier": "false",
            # Where svelte.config.js and the vite plugins write the page (what CMake passes them).
            "LLAMA_UI_OUT_DIR": str(out), "LLAMA_BUILD_NUMBER": LLAMA_CPP_COMMIT}
        seconds: dict[str, float] = {}
        log.info("building llama-server's chat page from %s (log: %s)", src, logfile)
        logfile.write_text("")
        with tqdm(total=len(STAGES), desc="llama-server chat page", unit="stage") as bar:
            for name, cmd, expect in STAGES:
                bar.set_postfix_str(f"{name} ({expect} on 2 cores)")
                t0 = time.perf_counter()
                try:
                    # A limit like every tool's: npm waits on an unreachable registry for a long time.
                    run_tool(cmd, logfile, limits.seconds(name), f"{name} (llama-server's chat page)", env=env,
                             cwd=work, append=True)
                except ToolFailed as err:
                    raise WebUIError(str(err)) from None
                seconds[name] = round(time.perf_counter() - t0, 1)
                log.info("%s: %.0f s", name, seconds[name])
                bar.update()
        if not (out / "index.html").is_file():
            raise WebUIError(f"npm run build finished without {out / 'index.html'}; log {logfile}")
        info = {"commit": LLAMA_CPP_COMMIT, "node": ".".join(map(str, _node_version() or ())),
                "npm": _npm_version(), "seconds": seconds,
                "size_mb": round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6, 1)}
        (out / MARKER).write_text(json.dumps(info, indent=1) + "\n")
        if target.exists():
            old = Path(tmp) / "old"
            os.replace(target, old)  # removed with the temporary folder
        os.replace(out, target)
    log.info("llama-server's chat page built in %.0f s (%s MB): %s", sum(seconds.values()), info["size_mb"], target)
    return target
