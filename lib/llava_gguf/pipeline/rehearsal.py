"""`make arm64-rehearsal`: `make setup` and `make all` inside an emulated arm64 Debian 12 root.

No board is needed to learn whether the workflow installs and runs on aarch64: qemu-user runs the
arm64 binaries of a debootstrapped Debian 12 root (the O6's OS) on this x86-64 host, with
`QEMU_CPU` set to a 128-bit SVE core with i8mm so llama.cpp chooses the kernels it chooses on the
O6. llama.cpp itself is cross-compiled on the host (minutes, not the hours it would take under
qemu) and handed in through `LLAMA_CPP_DIR`. What this proves: setup resolves a CPU-only
environment, the patches compile for aarch64, the ARM kernels' numbers pass the x86 bounds. What it
cannot: speed; qemu timings say nothing about the board, and the run is marked emulated.

Needs root (apt-get, debootstrap, chroot, mounts) on a Debian 12 x86-64 host.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..llama_cpp import limits, toolchain
from ..reports import crosscheck
from ..run.platform_pins import GPU_PACKAGE
from ..run.workspace import cache_dir, repo_root, write_json
from .fork_watch import run_watched

log = logging.getLogger(__name__)

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
HOST_PACKAGES = ("qemu-user-static", "binfmt-support", "debootstrap", "crossbuild-essential-arm64")
# What a fresh Radxa O6 Debian 12 image needs for `make setup` / `make all` (the README lists the same).
ROOT_PACKAGES = ("python3", "python3-venv", "python3-dev", "make", "git", "patch", "ca-certificates",
                 "build-essential")
# A 128-bit SVE core with i8mm, as the O6's Cortex-A720/X4: `max` has SVE2, i8mm, dotprod and bf16;
# sve128 fixes the vector length at the O6's 128 bits (qemu's default for max is 2048): llama.cpp's
# SVE kernels branch on svcntb(), and its Q4_0 repack takes the 8x8 layout only at 256 bits
# (svcntb() == QK8_0), the 4x8 i8mm one below, as on the O6.
QEMU_CPU = "max,sve128=on"
EMULATION_ENV = "LLAVA_GGUF_EMULATION"
# Every tool limit (llama_cpp/limits.py) is multiplied by this inside the root: `make all` took ~5x
# the x86 time here overall, Python included, and the tools alone (every instruction translated) more.
QEMU_SLOWDOWN = 20
# `make all` runs again at most this often after a qemu-user fork deadlock was broken (fork_watch.py).
FORK_RETRIES = 2
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BIND_MOUNTS = ("proc", "sys", "dev")


# ----------------------------------------------------------------------------- phases
@dataclass
class Phases:
    """Wall time of each phase and whether it passed, for the closing summary."""
    seconds: dict[str, float] = field(default_factory=dict)
    results: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what happened on the way (a broken qemu fork deadlock)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        log.info("== %s", name)
        start = time.monotonic()
        try:
            yield
            self.results.setdefault(name, "PASS")
        except BaseException:
            self.results[name] = "FAIL"
            raise
        finally:
            self.seconds[name] = round(time.monotonic() - start, 1)
            log.info("== %s: %s in %.0f s", name, self.results.get(name), self.seconds[name])


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    log.debug("$ %s", " ".join(map(str, cmd)))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


# ----------------------------------------------------------------------------- host
def install_host_packages() -> None:
    missing = [p for p in HOST_PACKAGES
               if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                                 text=True).stdout != "install ok installed"]
    if missing:
        log.info("apt-get install %s", " ".join(missing))
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        _run(["apt-get", "install", "-y", "-q", *missing], env=env, stdout=subprocess.DEVNULL)


def register_binfmt() -> None:
    """aarch64 ELF files run through qemu-aarch64-static, inside a chroot too (the F flag)."""
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "status").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", misc])
    entry = misc / "qemu-aarch64"
    if not entry.exists() or "enabled" not in entry.read_text():
        _run(["update-binfmts", "--enable", "qemu-aarch64"])
    if "enabled" not in entry.read_text():
        raise RuntimeError(f"{entry}: qemu-aarch64 binfmt not enabled; reinstall qemu-user-static "
                           "and binfmt-support, then `update-binfmts --enable qemu-aarch64`")


def host_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian mirror the host's apt uses (a proxy or local mirror works for the root too)."""
    texts = [p.read_text(errors="replace") for p in
             sorted([*sources.glob("sources.list"), *sources.glob("sources.list.d/*.list"),
                     *sources.glob("sources.list.d/*.sources")]) if p.is_file()]
    for text in texts:
        # one-line format: deb [opts] URI suite components; deb822: URIs: + Suites: in one stanza
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+" + SUITE + r"\s", text, re.M):
            if not m.group(1).rstrip("/").endswith("-security"):
                return m.group(1).rstrip("/")
        for stanza in re.split(r"\n\s*\n", text):
            uri = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uri and suites and SUITE in suites.group(1).split() and "-security" not in uri.group(1):
                return uri.group(1).rstrip("/")
    return DEFAULT_MIRROR


# ----------------------------------------------------------------------------- the root
def root_dir() -> Path:
    key = hashlib.sha256(" ".join((SUITE, *ROOT_PACKAGES)).encode()).hexdigest()[:8]
    return cache_dir() / f"rootfs-debian-{SUITE}-arm64-{key}"


def build_root(mirror: str | None = None) -> Path:
    """The cached arm64 root; debootstrapped into a temp name and renamed, so a half-made root never
    looks complete."""
    target = root_dir()
    if (target / "usr/bin/python3").exists():
        log.info("arm64 root cached: %s", target)
        return target
    mirror = mirror or host_mirror()
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    log.info("debootstrap %s arm64 from %s into %s (~15 min under qemu)", SUITE, mirror, partial)
    log_file = target.with_name(target.name + ".debootstrap.log")
    with open(log_file, "w") as logf:
        try:
            _run(["debootstrap", "--arch=arm64", "--include=" + ",".join(ROOT_PACKAGES), SUITE, partial, mirror],
                 stdout=logf, stderr=subprocess.STDOUT)
        except subprocess.CalledProcessError as err:
            raise RuntimeError(f"debootstrap failed (exit {err.returncode}); see {log_file} and "
                               f"{partial}/debootstrap/debootstrap.log") from err
    os.replace(partial, target)
    return target


# ----------------------------------------------------------------------------- what pip needs inside
# pip settings that make sense inside the root. Local find-links and file:// indexes are left out:
# they hold this host's x86-64 wheels (useless on aarch64) on paths the root does not have, and so
# is a constraint file of the host's own (it caps what this host has on disk, not what the project pins).
_PIP_KEYS = ("index-url", "extra-index-url", "trusted-host", "timeout", "default-timeout", "retries", "proxy")
_PROXY_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def host_pip_settings() -> dict[str, str]:
    """The host's pip configuration (files and PIP_* variables, as `pip config list` shows it) that
    carries over: network settings, never local paths."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    out: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^(?:global|install|:env:)\.([\w-]+)='(.*)'$", line)
        if m and m.group(1) in _PIP_KEYS:
            values = [v for v in m.group(2).split() if not (v.startswith("file:") or v.startswith("/"))]
            if values:
                out[m.group(1)] = " ".join(values)
    return out


def provision_network(root: Path) -> None:
    """DNS, the host's CA bundle (a TLS-inspecting proxy's CA is in it) and pip's settings.

    A board has its own resolver, bundle and index; this gives the root what this host uses.
    """
    shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
    if CA_BUNDLE.exists():
        shutil.copy2(CA_BUNDLE, root / CA_BUNDLE.relative_to("/"))
    settings = {**host_pip_settings(), "cert": str(CA_BUNDLE)}
    (root / "etc/pip.conf").write_text("# written by `make arm64-rehearsal` from the host's pip settings\n"
                                       "[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(settings.items())))
    log.info("pip inside the root: %s", ", ".join(f"{k}={v}" for k, v in sorted(settings.items())))


def install_llama_cpp(root: Path, bin_dir: Path) -> str:
    """Copy the cross-built tools (and their CMakeCache, which machine.json reads) into the root;
    the LLAMA_CPP_DIR to give inside."""
    inside = Path("/opt") / bin_dir.parent.name
    target = root / inside.relative_to("/")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(bin_dir, target / "bin")
    cache = bin_dir.parent / "cmake" / "CMakeCache.txt"
    if cache.exists():
        shutil.copy2(cache, target / "CMakeCache.txt")
    # The pinned source's assets (test image, vocab) come from the sdist; its sha256 is checked inside
    # as on any machine, so the host's verified copy saves a 77 MB download under qemu.
    sdist = toolchain.fetch_sdist()
    (root / "root/.cache/llava-gguf").mkdir(parents=True, exist_ok=True)
    shutil.copy2(sdist, root / "root/.cache/llava-gguf" / sdist.name)
    return str(inside)


def clone_into(root: Path, checkout: Path, keep: bool = False, keep_run: bool = False) -> Path:
    """A fresh clone of the checkout's committed HEAD at /root/llava-gguf (what a board user gets).

    `keep` (make arm64-rehearsal KEEP_CLONE=1, for reruns after a fix): the earlier clone is moved to
    HEAD instead, so its .venv (24 min of `make setup` under qemu here) is reused. The run folder is
    deleted, unless `keep_run` (KEEP_RUN=1) keeps it too: `make all` then skips every step whose
    inputs and code did not change, as it does for a user rerunning after a fix.
    """
    target = root / "root/llava-gguf"
    head = _run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = _run(["git", "-C", checkout, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                 text=True).stdout.strip()
    if dirty:
        log.warning("uncommitted changes in %s are not in the rehearsal (it clones HEAD %s)", checkout, head[:10])
    if keep and (target / ".git").exists():
        log.info("reusing the clone in the root (its .venv included), moved to %s", head[:10])
        _run(["git", "-C", target, "fetch", "--quiet", checkout, head])
        _run(["git", "-C", target, "checkout", "--quiet", "--force", head])
        if not keep_run:
            shutil.rmtree(target / "outputs" / RUN_NAME, ignore_errors=True)
        return target
    if target.exists():
        shutil.rmtree(target)
    _run(["git", "clone", "--quiet", "--no-local", checkout, target])
    _run(["git", "-C", target, "checkout", "--quiet", head])
    return target


# ----------------------------------------------------------------------------- the chroot
def _mounts_under(root: Path) -> list[str]:
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    prefix = str(root.resolve()) + "/"
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def unmount_all(root: Path) -> None:
    """Every mount under the root, deepest first (also those a killed earlier rehearsal left)."""
    for point in _mounts_under(root):
        subprocess.run(["umount", "-l", point], check=False)
    left = _mounts_under(root)
    if left:
        raise RuntimeError(f"could not unmount {left}; unmount them by hand before deleting {root}")


@contextlib.contextmanager
def mounted(root: Path) -> Iterator[Path]:
    """/proc, /sys and /dev inside the root for the time of the block, unmounted however it ends
    (an exception, Ctrl-C, or SIGTERM, which the CLI turns into an exception)."""
    unmount_all(root)
    try:
        _run(["mount", "-t", "proc", "proc", root / "proc"])
        for name in ("sys", "dev"):
            # rslave: an unmount inside never propagates back to the host's /dev/pts or /sys/fs/cgroup.
            _run(["mount", "--rbind", f"/{name}", root / name])
            _run(["mount", "--make-rslave", root / name])
        yield root
    finally:
        unmount_all(root)


def chroot_env(llama_cpp_dir: str) -> dict[str, str]:
    env = {"HOME": "/root", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C.UTF-8", "TERM": os.environ.get("TERM", "dumb"), "QEMU_CPU": QEMU_CPU,
           EMULATION_ENV: "qemu-user", limits.SCALE_ENV: str(QEMU_SLOWDOWN), "LLAMA_CPP_DIR": llama_cpp_dir,
           "PIP_CERT": str(CA_BUNDLE),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_DEFAULT_TIMEOUT": "180"}
    env.update({k: os.environ[k] for k in _PROXY_ENV if k in os.environ})
    return env


def in_root(root: Path, script: str, env: dict[str, str], log_file: Path) -> None:
    """Run a bash script in the root (cwd: the clone), output appended to `log_file`."""
    with open(log_file, "a") as logf:
        logf.write(f"\n$ {script}\n")
        logf.flush()
        proc = subprocess.run(["chroot", root, "/bin/bash", "-c", f"cd /root/llava-gguf && {script}"], env=env,
                              stdout=logf, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"in the arm64 root: `{script}` exited {proc.returncode}; see {log_file}")


# ----------------------------------------------------------------------------- the rehearsal
PARAMS = "params/rehearsal.yaml"
RUN_NAME = "rehearsal"
OUT_NAME = "arm64-rehearsal"
RECORDED = Path("tests/data/rehearsal")


def gpu_packages(pip_list: str) -> list[str]:
    """Names in `pip list --format=freeze` output that are CUDA / NVIDIA / triton packages."""
    names = (line.split("==")[0].strip() for line in pip_list.splitlines())
    return [n for n in names if n and GPU_PACKAGE.match(n.replace("_", "-"))]


def rehearse(jobs: int | None = None, record: bool = False, keep_clone: bool = False, keep_run: bool = False) -> bool:
    """The whole rehearsal; True when every phase and every check passed. See the module doc."""
    checkout = repo_root()
    out_dir = checkout / "outputs" / OUT_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = out_dir / "rehearsal.log"
    log_file.write_text("")
    phases = Phases()
    checks: list[tuple[str, bool, str]] = []
    try:
        with phases.timed("host packages and binfmt"):
            install_host_packages()
            register_binfmt()
        with phases.timed("arm64 Debian 12 root"):
            root = build_root()
        with phases.timed("llama.cpp cross build"):
            bin_dir = toolchain.build_llama_cpp(cross=toolchain.O6, jobs=jobs)
        with phases.timed("provision and clone"):
            provision_network(root)
            env = chroot_env(install_llama_cpp(root, bin_dir))
            clone_into(root, checkout, keep=keep_clone, keep_run=keep_run)
        with mounted(root):
            with phases.timed("make setup (in the root)"):
                in_root(root, "make setup", env, log_file)
            with phases.timed("no CUDA packages (pip list)"):
                listing = root / "root/pip-list.txt"
                in_root(root, f".venv/bin/python -m pip list --format=freeze > /{listing.relative_to(root)}",
                        env, log_file)
                shutil.copy2(listing, out_dir / "pip-list.txt")
                found = gpu_packages(listing.read_text())
                checks.append(("no nvidia/cuda/triton package", not found, ", ".join(found) or "none"))
                if found:
                    raise RuntimeError(f"CUDA packages installed in the arm64 root: {found}")
            with phases.timed("make all (in the root)"):
                watch = run_watched(lambda: in_root(root, f"make all PARAMS={PARAMS}", env, log_file), FORK_RETRIES)
            phases.notes += [f"qemu-user fork deadlock broken: pid {p.pid} (fork of {p.ppid}) killed after "
                             f"{p.age_s:.0f} s, make all run again" for p in watch.killed]
            with phases.timed("repack probe and report (in the root)"):
                in_root(root, f".venv/bin/python -m llava_gguf repacks --params {PARAMS} && "
                        f".venv/bin/python -m llava_gguf report --params {PARAMS}", env, log_file)
        with phases.timed("checks against x86"):
            run_dir = out_dir / "run"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            shutil.copytree(root / "root/llava-gguf/outputs" / RUN_NAME, run_dir, symlinks=True)
            summary = crosscheck.record(run_dir, out_dir / "arm64.json")
            if record:
                crosscheck.record(run_dir, checkout / RECORDED / "arm64.json")
            x86 = json.loads((checkout / RECORDED / "x86_64.json").read_text())
            checks += crosscheck.compare(summary, x86)
            checks.append(("reports say aarch64 and emulated", summary["arch"] == "aarch64"
                           and summary["emulation"] == "qemu-user", f"{summary['arch']}, {summary['emulation']}"))
            if not all(ok for _, ok, _ in checks):
                phases.results["checks against x86"] = "FAIL"
    # A phase's command failed or ran past its limit, a file is missing: the summary below still says
    # what passed. Anything else is a bug and propagates (after the summary).
    except (subprocess.SubprocessError, OSError, RuntimeError, ValueError) as err:
        log.error("%s", err)
    finally:
        report = _closing_summary(phases, checks)
        (out_dir / "summary.txt").write_text(report + "\n")
        write_json(out_dir / "phases.json", {"seconds": phases.seconds, "results": phases.results})
        log.info("rehearsal summary (also %s):\n%s", out_dir / "summary.txt", report)
    return bool(phases.results) and all(r == "PASS" for r in phases.results.values()) and len(phases.results) == 9 \
        and all(ok for _, ok, _ in checks)


def _closing_summary(phases: Phases, checks: list[tuple[str, bool, str]]) -> str:
    lines = ["phases (wall time; qemu-user timings are not board speed):"]
    lines += [f"{phases.results.get(n, '?'):4}  {n}: {s:.0f} s" for n, s in phases.seconds.items()]
    lines += [f"note: {n}" for n in phases.notes]
    lines += [f"total: {sum(phases.seconds.values()) / 60:.1f} min", "checks:",
              crosscheck.format_checks(checks) or "none ran"]
    return "\n".join(lines)
