"""The pinned llama.cpp toolchain: fetch its source, patch it, build it, find its tools.

The source is llama.cpp at commit 0c1e570 as vendored in the `llama-cpp-python==0.3.36` sdist on
PyPI (the one registry reachable everywhere this project runs). The sdist's sha256 is checked
before anything is extracted. Builds live in a cache outside the clone, keyed by the commit and
the hash of the project's patches, so other clones and CI reuse them.

The cache is shared, so everything that writes into it holds that entry's lock
(`workspace.cache_lock`) and writes under a temporary name that is renamed once complete: the
source tree, a build's patched `src/` and its `bin/` are there whole or not at all. A build is up to
date only when its `bin/` carries the build key it was made for (BUILT_STAMP), written last.

`LLAMA_CPP_DIR` (or the params key `llama_cpp.dir`) points at an existing build instead.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..run.topology import usable_cores
from ..run.workspace import CACHE_LOCK_TIMEOUT_S, cache_dir, cache_lock, repo_root, sha256_file
from . import limits
from .patches import diff_part, read_patch
from .runner import ToolFailed, run_tool  # noqa: F401 (the steps call toolchain.run_tool)

log = logging.getLogger(__name__)

LLAMA_CPP_COMMIT = "0c1e570"
SDIST_REQUIREMENT = "llama-cpp-python==0.3.36"
SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_PREFIX = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
TOOLS = ("llama-quantize", "llama-mtmd-cli", "llama-perplexity", "llama-bench", "llama-debug",
         "llama-mtmd-debug", "llama-imatrix", "llama-tokenize", "llama-server")
# The published recipe's build: the pinned commit without the project's patches. Only the
# seed's command runs on it (tune's second baseline), so only that tool is built.
UNPATCHED_TOOLS = ("llama-mtmd-cli",)
ENV_DIR = "LLAMA_CPP_DIR"
# Directories within a llama.cpp folder where its tools may sit, in order of preference.
_BIN_SUBDIRS = ("", "bin", "build/bin", "build")
# In a build's bin/: the build key it was made for, written before bin/ is renamed into place.
BUILT_STAMP = ".built"


class ToolNotFound(FileNotFoundError):
    pass


def patches_dir() -> Path:
    return repo_root() / "patches" / "llama.cpp"


def patch_files(unpatched: bool = False) -> list[Path]:
    """The patches a build applies, in order: all of them, or for the published recipe's build
    (`unpatched`) only the build fixes (`Build fix:` in the header: they change no result, and
    without them the pinned source crashes on some CPUs)."""
    files = sorted(patches_dir().glob("*.patch"))
    return [p for p in files if read_patch(p).build_fix] if unpatched else files


def build_key(unpatched: bool = False) -> str:
    """Commit plus a hash of the diffs applied to it, in order: a changed diff means a new build.
    Only each patch's diff counts (`patches.diff_part`): its header, which `patch` skips, and its
    file name can be edited without rebuilding.

    The unpatched build's key is the commit and the word `unpatched`, plus the hash of its build
    fixes when there are any.
    """
    h = hashlib.sha256()
    files = patch_files(unpatched)
    for p in files:
        diff = diff_part(p.read_bytes())
        h.update(b"%d\0" % len(diff) + diff)
    if unpatched:
        return f"{LLAMA_CPP_COMMIT}-unpatched" + (f"-{h.hexdigest()[:10]}" if files else "")
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


def default_build_dir(cross: CrossTarget | None = None, unpatched: bool = False) -> Path:
    return cache_dir() / (f"llama.cpp-{build_key(unpatched)}" + (f"-{cross.name}" if cross else ""))


# ----------------------------------------------------------------------------- source
def fetch_sdist() -> Path:
    """The sdist in the cache, downloaded with pip when absent, its sha256 verified."""
    target = cache_dir() / SDIST_NAME
    if not target.exists():
        with cache_lock(target):
            if not target.exists():
                _download_sdist(target)
    digest = sha256_file(target)
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{target}: sha256 {digest} != pinned {SDIST_SHA256}; delete the file and "
                           "rerun `make llama-cpp` (a corrupted or substituted download)")
    return target


def _download_sdist(target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        log.info("downloading %s (sdist, ~77 MB) with pip", SDIST_REQUIREMENT)
        run_tool([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST_REQUIREMENT,
                  "-d", tmp], cache_dir() / "sdist-download.log", limits.seconds("pip download"), "pip download")
        os.replace(Path(tmp) / SDIST_NAME, target)


def source_dir() -> Path:
    """The unpatched, pristine llama.cpp tree (read-only use: assets, legacy scripts, gguf vocab)."""
    target = cache_dir() / f"llama.cpp-{LLAMA_CPP_COMMIT}-src"
    if (target / "CMakeLists.txt").exists():
        return target
    with cache_lock(target):
        if not (target / "CMakeLists.txt").exists():  # another process may have made it meanwhile
            _extract_source(fetch_sdist(), target)
    return target


def _extract_source(sdist: Path, target: Path) -> None:
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
        if target.exists():  # a tree without CMakeLists.txt: not one this code renamed into place
            shutil.rmtree(target)
        os.replace(tmp, target)
        Path(tmp).mkdir()  # let TemporaryDirectory clean up an empty folder


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
                    cross: CrossTarget | None = None, unpatched: bool = False) -> Path:
    """Build the tools from the pinned, patched source; returns the bin/ folder. Idempotent.

    With `cross`, the tools are cross-compiled for that CPU (into their own cache folder). With
    `unpatched`, the pinned source is built as published, without the project's patches but its build
    fixes (`patch_files`), and only llama-mtmd-cli (the published recipe's tool), into
    `llama.cpp-<commit>-unpatched-<fixes hash>` beside the patched build. A process that finds another one building the same folder waits for it, then
    uses its build.
    """
    key = build_key(unpatched)
    patches = patch_files(unpatched)
    tools = UNPATCHED_TOOLS if unpatched else TOOLS
    build_dir = Path(build_dir or default_build_dir(cross, unpatched))
    if not force and is_built(build_dir, key, tools):
        log.info("llama.cpp build up to date: %s", build_dir / "bin")
        return build_dir / "bin"
    # A second process waits at least as long as this build may take on this machine (the limits
    # scale with $LLAVA_GGUF_TIMEOUT_SCALE, as the lock's own default does).
    with cache_lock(build_dir, timeout=max(CACHE_LOCK_TIMEOUT_S * limits.scale(), 1.2 * (limits.seconds("cmake configure")
                                                                     + limits.seconds("cmake build")))):
        if not force and is_built(build_dir, key, tools):
            log.info("llama.cpp build made by another process meanwhile: %s", build_dir / "bin")
            return build_dir / "bin"
        return _build_into(build_dir, key, patches, tools, jobs, cross, force)


def is_built(build_dir: Path, key: str, tools: tuple[str, ...] = TOOLS) -> bool:
    """bin/ was renamed into place by a finished build for `key` (never a half-made tree)."""
    stamp = Path(build_dir) / "bin" / BUILT_STAMP
    try:
        built_for = stamp.read_text().strip()
    except OSError:
        return False
    return built_for == key and all((stamp.parent / t).is_file() for t in tools)


def _build_into(build_dir: Path, key: str, patches: list[Path], tools: tuple[str, ...], jobs: int | None,
                cross: CrossTarget | None, force: bool) -> Path:
    """Patch, configure, build, install bin/ (the caller holds the folder's lock).

    cmake/ holds absolute paths to src/ and itself, so it is built in place (make resumes an
    interrupted build); src/ and bin/ are made under temporary names and renamed."""
    build_dir.mkdir(parents=True, exist_ok=True)
    for stale in build_dir.glob(".*.partial"):  # what a killed build left (the lock is ours)
        shutil.rmtree(stale, ignore_errors=True)
    src, cmake_dir, log_file = build_dir / "src", build_dir / "cmake", build_dir / "build.log"
    log_file.write_text("")
    # The marker's first line is the build key the tree was patched for: a build folder given
    # explicitly (to rebuild incrementally after editing a patch) is re-patched when it differs.
    marker = src / ".patched"
    patched_for = marker.read_text().split("\n", 1)[0] if marker.exists() else None
    if force or patched_for != key:
        # A tree patched for another key is rebuilt from scratch: copied sources keep their old
        # times, so cmake would miss un-patched files.
        _patched_source(build_dir, key, patches, log_file)
        shutil.rmtree(cmake_dir, ignore_errors=True)
    _configure_and_build(src, cmake_dir, tools, jobs, cross, log_file)
    return _install_bin(build_dir, cmake_dir / "bin", key, tools, log_file)


def _patched_source(build_dir: Path, key: str, patches: list[Path], log_file: Path) -> Path:
    """build_dir/src: the pinned source with the patches applied, renamed into place once complete."""
    tmp = build_dir / ".src.partial"
    shutil.copytree(source_dir(), tmp, symlinks=True)
    for patch in patches:
        log.info("applying %s", patch.name)
        run_tool(["patch", "-p1", "--forward", "--batch", "-i", patch], log_file, limits.seconds("patch"),
                 f"patch {patch.name}", cwd=tmp, append=True)
    _stamp_build_info(tmp, key)
    (tmp / ".patched").write_text("\n".join([key, *(p.name for p in patches)]) + "\n")
    src = build_dir / "src"
    if src.exists():
        shutil.rmtree(src)
    os.rename(tmp, src)
    return src


def _configure_and_build(src: Path, cmake_dir: Path, tools: tuple[str, ...], jobs: int | None,
                         cross: CrossTarget | None, log_file: Path) -> None:
    # The server's web page is not embedded (LLAMA_BUILD_UI stays OFF, no prebuilt download): the
    # sdist has no built UI, and building it in here would tie every tool build to npm. `make webui`
    # builds it on its own and serve-llava.sh serves it with --path (webui.py).
    configure = ["cmake", "-S", str(src), "-B", str(cmake_dir), "-DCMAKE_BUILD_TYPE=Release",
                 "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=ON",
                 "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                 *(cross.cmake_args() if cross else [])]
    jobs = jobs or usable_cores()
    log.info("configuring llama.cpp (log: %s)", log_file)
    run_tool(configure, log_file, limits.seconds("cmake configure"), "cmake configure", append=True)
    log.info("building %s%s with %d jobs (~5 min on 2 cores)", ", ".join(tools),
             f" for {cross.name}" if cross else "", jobs)
    percent = re.compile(r"^\[\s*(\d+)%\]")
    with tqdm(total=100, desc="llama.cpp build", unit="%") as bar:
        def progress(line: str) -> None:
            m = percent.match(line)
            if m and int(m.group(1)) > bar.n:
                bar.update(int(m.group(1)) - bar.n)
        run_tool(["cmake", "--build", str(cmake_dir), "-j", str(jobs), "--target", *tools], log_file,
                 limits.seconds("cmake build"), "llama.cpp build (cmake --build)", append=True, on_line=progress)


def _install_bin(build_dir: Path, built: Path, key: str, tools: tuple[str, ...], log_file: Path) -> Path:
    """Copy the tools into a temporary folder, stamp it with the key, rename it to bin/."""
    # llama.cpp's CMakeLists sets CMAKE_RUNTIME_OUTPUT_DIRECTORY to <cmake dir>/bin itself (a -D
    # value is overridden), so the tools are copied from there.
    missing = [t for t in tools if not (built / t).is_file()]
    if missing:
        raise RuntimeError(f"llama.cpp build finished without {missing}; see {log_file}")
    tmp = build_dir / ".bin.partial"
    tmp.mkdir()
    for tool in tools:
        shutil.copy2(built / tool, tmp / tool)
    (tmp / BUILT_STAMP).write_text(key + "\n")
    bin_dir, old = build_dir / "bin", build_dir / ".bin-old.partial"
    if bin_dir.exists():
        os.rename(bin_dir, old)
    os.rename(tmp, bin_dir)
    shutil.rmtree(old, ignore_errors=True)
    return bin_dir


def _stamp_build_info(src: Path, key: str) -> None:
    """Let `--version` name the pinned commit and the patch set.

    llama.cpp asks git for its commit; the sdist's tree has a dangling `.git` file instead of a
    repository, so the tools would say "commit unknown".
    """
    info = src / "cmake" / "build-info.cmake"
    text = info.read_text()
    info.write_text(text.replace('set(BUILD_COMMIT "unknown")', f'set(BUILD_COMMIT "{key}")', 1))
    (src / ".git").unlink(missing_ok=True)


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


def version_output(tool: Path) -> str:
    """What `tool --version` prints (stdout and stderr); ToolFailed or OSError when it cannot tell."""
    proc = run_tool([tool, "--version"], timeout=limits.seconds("--version"), capture=True,
                    what=f"{Path(tool).name} --version")
    return proc.stdout + proc.stderr


def tool_version(tool: Path) -> str:
    """The build string a tool prints with --version, e.g. '0.5.0-dev (build 1, commit 0c1e570)'."""
    try:
        text = version_output(tool)
    except (OSError, ToolFailed) as err:
        return f"unknown ({str(err).splitlines()[0]})"
    m = re.search(r"^version:\s*(.+)$", text, re.M)
    return m.group(1) if m else (text.strip().splitlines() or ["unknown"])[0]


def llama_cpp_info(configured: str | None = None) -> dict[str, str]:
    """What artifacts.json records as `llama_cpp`: the bin folder and the build's version."""
    # llama-quantize has no --version; the common-argument tools do.
    tool = find_tool("llama-mtmd-cli", configured)
    return {"bin_dir": str(tool.parent), "version": tool_version(tool)}
