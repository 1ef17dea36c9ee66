"""The pinned llama.cpp toolchain: fetch its source, patch it, build it, find its tools.

The source is llama.cpp at commit 0c1e570 as vendored in the `llama-cpp-python==0.3.36` sdist on
PyPI (the one registry reachable everywhere this project runs). The sdist's sha256 is checked
before anything is extracted. Builds live in a cache outside the clone, keyed by the commit and
the hash of the project's patches, so other clones and CI reuse them.

`LLAMA_CPP_DIR` (or the params key `llama_cpp.dir`) points at an existing build instead.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..workspace import cache_dir, repo_root
from .patches import diff_part

log = logging.getLogger(__name__)

LLAMA_CPP_COMMIT = "0c1e570"
SDIST_REQUIREMENT = "llama-cpp-python==0.3.36"
SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_PREFIX = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
TOOLS = ("llama-quantize", "llama-mtmd-cli", "llama-perplexity", "llama-bench", "llama-debug",
         "llama-mtmd-debug", "llama-imatrix", "llama-tokenize", "llama-server")
ENV_DIR = "LLAMA_CPP_DIR"
# Directories within a llama.cpp folder where its tools may sit, in order of preference.
_BIN_SUBDIRS = ("", "bin", "build/bin", "build")


class ToolNotFound(FileNotFoundError):
    pass


def patches_dir() -> Path:
    return repo_root() / "patches" / "llama.cpp"


def patch_files() -> list[Path]:
    return sorted(patches_dir().glob("*.patch"))


def build_key() -> str:
    """Commit plus a hash of the diffs applied to it, in order: a changed diff means a new build.
    Only each patch's diff counts (`patches.diff_part`): its header, which `patch` skips, and its
    file name can be edited without rebuilding."""
    h = hashlib.sha256()
    for p in patch_files():
        diff = diff_part(p.read_bytes())
        h.update(b"%d\0" % len(diff) + diff)
    return f"{LLAMA_CPP_COMMIT}-{h.hexdigest()[:10]}"


@dataclass(frozen=True)
class CrossTarget:
    """A CPU to cross-compile for: the tools run there (or under qemu-user), not on this host."""
    processor: str  # CMAKE_SYSTEM_PROCESSOR
    triplet: str  # the GNU toolchain prefix, e.g. aarch64-linux-gnu
    arm_arch: str  # GGML_CPU_ARM_ARCH, passed as -march=

    @property
    def name(self) -> str:
        return f"{self.processor}-{self.arm_arch}"

    def cmake_args(self) -> list[str]:
        # GGML_NATIVE would probe the build host's CPU; the target's ISA is named instead. The
        # find-root settings keep the x86 host's libraries out of an aarch64 link.
        return ["-DCMAKE_SYSTEM_NAME=Linux", f"-DCMAKE_SYSTEM_PROCESSOR={self.processor}",
                f"-DCMAKE_C_COMPILER={self.triplet}-gcc", f"-DCMAKE_CXX_COMPILER={self.triplet}-g++",
                "-DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER", "-DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY",
                "-DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY", f"-DCMAKE_FIND_ROOT_PATH=/usr/{self.triplet}",
                "-DGGML_NATIVE=OFF", f"-DGGML_CPU_ARM_ARCH={self.arm_arch}"]


# The Radxa O6's CIX P1 (Cortex-A720/X4, Armv9.2 with 128-bit SVE2, i8mm, dotprod, bf16). GCC 12
# (Debian 12) knows no -march newer than armv9-a, which is Armv8.5 + SVE2; i8mm and bf16 (mandatory
# from Armv8.6) are added by name; dotprod and fp16 come with armv9-a.
O6 = CrossTarget(processor="aarch64", triplet="aarch64-linux-gnu", arm_arch="armv9-a+i8mm+bf16")


def default_build_dir(cross: CrossTarget | None = None) -> Path:
    return cache_dir() / (f"llama.cpp-{build_key()}" + (f"-{cross.name}" if cross else ""))


# ----------------------------------------------------------------------------- source
def fetch_sdist() -> Path:
    """The sdist in the cache, downloaded with pip when absent, its sha256 verified."""
    target = cache_dir() / SDIST_NAME
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            log.info("downloading %s (sdist, ~77 MB) with pip", SDIST_REQUIREMENT)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            SDIST_REQUIREMENT, "-d", tmp], check=True,
                           stdout=subprocess.DEVNULL)
            os.replace(Path(tmp) / SDIST_NAME, target)
    digest = _sha256(target)
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{target}: sha256 {digest} != pinned {SDIST_SHA256}; delete the file and "
                           "rerun `make llama-cpp` (a corrupted or substituted download)")
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def source_dir() -> Path:
    """The unpatched, pristine llama.cpp tree (read-only use: assets, legacy scripts, gguf vocab)."""
    target = cache_dir() / f"llama.cpp-{LLAMA_CPP_COMMIT}-src"
    if (target / "CMakeLists.txt").exists():
        return target
    sdist = fetch_sdist()
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        log.info("extracting llama.cpp %s from %s", LLAMA_CPP_COMMIT, sdist.name)
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(SDIST_PREFIX):
                    m.name = m.name[len(SDIST_PREFIX):]
                    members.append(m)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, members=members, filter="data")
            else:
                # Python before 3.11.4 (Debian 12's 3.11.2: the board's) has no extraction filters. The
                # archive's sha256 is pinned; paths leaving the tree are still refused, as "data" would.
                bad = [m.name for m in members if m.name.startswith("/") or ".." in Path(m.name).parts
                       or (m.issym() or m.islnk()) and (m.linkname.startswith("/") or ".." in Path(m.linkname).parts
                                                        and not _link_inside(m))]
                if bad:
                    raise RuntimeError(f"{sdist}: members leaving the source tree: {bad[:3]}")
                tar.extractall(tmp, members=members)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        Path(tmp).mkdir()  # let TemporaryDirectory clean up an empty folder
    return target


def _link_inside(member: tarfile.TarInfo) -> bool:
    """A relative link whose target stays inside the extracted tree."""
    depth = len(Path(member.name).parent.parts)
    for part in Path(member.linkname).parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return False
    return True


def source_asset(rel: str) -> Path:
    path = source_dir() / rel
    if not path.exists():
        raise FileNotFoundError(f"{path}: not in the pinned llama.cpp source tree")
    return path


# ----------------------------------------------------------------------------- build
def build_llama_cpp(build_dir: Path | None = None, jobs: int | None = None, force: bool = False,
                    cross: CrossTarget | None = None) -> Path:
    """Build the tools from the pinned, patched source; returns the bin/ folder. Idempotent.

    With `cross`, the tools are cross-compiled for that CPU (into their own cache folder).
    """
    build_dir = build_dir or default_build_dir(cross)
    bin_dir = build_dir / "bin"
    src = build_dir / "src"
    marker = src / ".patched"
    # The marker's first line is the build key the tree was patched for: a build folder given
    # explicitly (to rebuild incrementally after editing a patch) is re-patched when it differs.
    patched_for = marker.read_text().split("\n", 1)[0] if marker.exists() else None
    if not force and patched_for == build_key() and all((bin_dir / t).exists() for t in TOOLS):
        log.info("llama.cpp build up to date: %s", bin_dir)
        return bin_dir
    if force or patched_for != build_key():
        # A tree patched for another key (an explicit build_dir after a patch edit) is rebuilt
        # from scratch: copied sources keep their old times, so cmake would miss un-patched files.
        for stale in (src, build_dir / "cmake"):
            if stale.exists():
                shutil.rmtree(stale)
        shutil.copytree(source_dir(), src, symlinks=True)
        for patch in patch_files():
            log.info("applying %s", patch.name)
            subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(patch)], cwd=src, check=True,
                           stdout=subprocess.DEVNULL)
        _stamp_build_info(src)
        marker.write_text("\n".join([build_key(), *(p.name for p in patch_files())]) + "\n")
    cmake_dir = build_dir / "cmake"
    log_file = build_dir / "build.log"
    # The server's web page is left out (LLAMA_BUILD_UI stays OFF, no prebuilt download): the
    # sdist has no built UI and building it needs npm; the API endpoints are all there.
    configure = ["cmake", "-S", str(src), "-B", str(cmake_dir), "-DCMAKE_BUILD_TYPE=Release",
                 "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=ON",
                 "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                 *(cross.cmake_args() if cross else [])]
    jobs = jobs or os.cpu_count() or 2
    build = ["cmake", "--build", str(cmake_dir), "-j", str(jobs), "--target", *TOOLS]
    with open(log_file, "w") as logf:
        log.info("configuring llama.cpp (log: %s)", log_file)
        subprocess.run(configure, stdout=logf, stderr=subprocess.STDOUT, check=True)
        log.info("building %s%s with %d jobs (~5 min on 2 cores)", ", ".join(TOOLS),
                 f" for {cross.name}" if cross else "", jobs)
        _run_with_progress(build, logf)
    # llama.cpp's CMakeLists sets CMAKE_RUNTIME_OUTPUT_DIRECTORY to <cmake dir>/bin itself (a -D
    # value is overridden), so the tools are copied from there.
    bin_dir.mkdir(exist_ok=True)
    for tool in TOOLS:
        if (cmake_dir / "bin" / tool).exists():
            shutil.copy2(cmake_dir / "bin" / tool, bin_dir / tool)
    missing = [t for t in TOOLS if not (bin_dir / t).exists()]
    if missing:
        raise RuntimeError(f"llama.cpp build finished without {missing}; see {log_file}")
    return bin_dir


def _stamp_build_info(src: Path) -> None:
    """Let `--version` name the pinned commit and the patch set.

    llama.cpp asks git for its commit; the sdist's tree has a dangling `.git` file instead of a
    repository, so the tools would say "commit unknown".
    """
    info = src / "cmake" / "build-info.cmake"
    text = info.read_text()
    info.write_text(text.replace('set(BUILD_COMMIT "unknown")', f'set(BUILD_COMMIT "{build_key()}")', 1))
    (src / ".git").unlink(missing_ok=True)


def _run_with_progress(cmd: list[str], logf) -> None:
    percent = re.compile(r"^\[\s*(\d+)%\]")
    bar = tqdm(total=100, desc="llama.cpp build", unit="%")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        logf.write(line)
        m = percent.match(line)
        if m and int(m.group(1)) > bar.n:
            bar.update(int(m.group(1)) - bar.n)
    bar.close()
    if proc.wait() != 0:
        logf.flush()
        raise RuntimeError(f"llama.cpp build failed (exit {proc.returncode}); see {logf.name}")


# ----------------------------------------------------------------------------- locate
def candidate_dirs(configured: str | None = None) -> list[tuple[str, Path]]:
    """Where tools are looked for, in order: $LLAMA_CPP_DIR, params llama_cpp.dir, the cache build."""
    out: list[tuple[str, Path]] = []
    if os.environ.get(ENV_DIR):
        out.append((f"${ENV_DIR}", Path(os.environ[ENV_DIR]).expanduser()))
    elif configured:
        out.append(("params llama_cpp.dir", Path(configured).expanduser()))
    else:
        out.append(("project build", default_build_dir()))
    return out


def find_tool(name: str, configured: str | None = None) -> Path:
    """The path of a llama.cpp tool, or an error naming the tool, where it looked and the fix."""
    looked = []
    for label, base in candidate_dirs(configured):
        for sub in _BIN_SUBDIRS:
            path = base / sub / name
            looked.append(str(path))
            if path.is_file() and os.access(path, os.X_OK):
                return path
    raise ToolNotFound(
        f"llama.cpp tool '{name}' not found; looked in: {', '.join(looked)}. "
        f"Run `make llama-cpp` to build the pinned toolchain, or set {ENV_DIR} (or params "
        "llama_cpp.dir) to a llama.cpp build that has it.")


def tool_version(tool: Path) -> str:
    """The build string a tool prints with --version, e.g. '0.5.0-dev (build 1, commit 0c1e570)'."""
    try:
        proc = subprocess.run([str(tool), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown ({err})"
    text = proc.stdout + proc.stderr
    m = re.search(r"^version:\s*(.+)$", text, re.M)
    return m.group(1) if m else (text.strip().splitlines() or ["unknown"])[0]


def llama_cpp_info(configured: str | None = None) -> dict[str, str]:
    """What artifacts.json records as `llama_cpp`: the bin folder and the build's version."""
    # llama-quantize has no --version; the common-argument tools do.
    tool = find_tool("llama-mtmd-cli", configured)
    return {"bin_dir": str(tool.parent), "version": tool_version(tool)}


# ----------------------------------------------------------------------------- run
class ToolFailed(RuntimeError):
    """A llama.cpp tool exited non-zero, crashed or timed out; its log is kept."""

    def __init__(self, message: str, log_file: Path | None):
        super().__init__(message)
        self.log_file = log_file


def _ended(rc: int | None, timeout: float | None) -> str:
    import signal

    if rc is None:
        return f"timed out after {timeout} s"
    if rc < 0:
        return f"crashed ({signal.Signals(-rc).name})" if -rc in signal.valid_signals() else f"killed ({rc})"
    return f"exited with status {rc}"


def run_tool(cmd: list, log_file: Path | None = None, timeout: float | None = None, what: str = "", *,
             env: dict | None = None, stdin_text: str | None = None, capture: bool = False,
             expect: str | None = None):
    """Run a llama.cpp tool, the one way every step does.

    With `log_file` (the default use), stdout+stderr go to that file, kept also on failure, and the
    log text is returned. With `capture=True` (tools whose stdout is the result: token ids, a chat
    template) the CompletedProcess is returned with stdout and stderr apart. Either way a non-zero
    exit, a crash or a timeout raises ToolFailed naming the command, how it ended and the output's tail.
    `expect` names text the finished log must hold (the result line a caller parses). A build
    without patch 0003 can exit 0 with its last log lines lost (llama.cpp's log worker is never
    joined, upstream #22142), so when it is missing the tool runs once more.
    """
    cmd = [str(c) for c in cmd]
    what = what or Path(cmd[0]).name
    env = {**os.environ, **env} if env else None
    stdin = subprocess.DEVNULL if stdin_text is None else None
    log.debug("running %s", " ".join(cmd))
    if capture:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, input=stdin_text, stdin=stdin,
                                  timeout=timeout, env=env)
            rc, tail = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as err:
            proc, rc, tail = None, None, (err.stderr or b"").decode(errors="replace")
        if rc == 0:
            return proc
        tail = "\n".join(tail.strip().splitlines()[-8:])
        raise ToolFailed(f"{what} {_ended(rc, timeout)}\ncommand: {' '.join(cmd)}\nlast lines:\n{tail}", None)
    text = _run_logged(cmd, Path(log_file), timeout, what, env, stdin, stdin_text)
    if expect is not None and expect not in text:
        log.warning("%s exited 0 but its log %s lacks %r: llama.cpp's log can drop its last lines at exit "
                    "(a build without patches/llama.cpp/0003); running it once more", what, log_file, expect)
        text = _run_logged(cmd, Path(log_file), timeout, what, env, stdin, stdin_text)
    return text


def _run_logged(cmd: list[str], log_file: Path, timeout, what: str, env, stdin, stdin_text) -> str:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w", encoding="utf-8", errors="replace") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=stdin, input=stdin_text,
                                timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = None
    text = log_file.read_text(encoding="utf-8", errors="replace")
    if rc == 0:
        return text
    tail = "\n".join(text.strip().splitlines()[-8:])
    raise ToolFailed(f"{what} {_ended(rc, timeout)}; full log kept at {log_file}\ncommand: {' '.join(cmd)}\n"
                     f"last lines:\n{tail}", log_file)
