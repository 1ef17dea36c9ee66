"""Which pinned constraints file fits this Python and platform, and how those files are made.

`make setup` runs this file with the system Python, before any virtual environment exists, so it
uses the standard library alone:

    python3 lib/llava_gguf/run/platform_pins.py constraints-file   # path for this interpreter, or exit 2
    python3 lib/llava_gguf/run/platform_pins.py compile [--torch-find-links DIR]   # regenerate them all

Each file pins every package, transitive ones included, for one (machine, Python) pair. They are
compiled by uv, which evaluates environment markers for the target platform; pip's `--platform`
only filters wheels and still evaluates markers for the machine it runs on.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CONSTRAINTS_DIR = ROOT / "constraints"
REQUIREMENTS = ROOT / "requirements.txt"
# (machine as platform.machine() says it, uv's target triple, Python version)
TARGETS = (
    ("x86_64", "x86_64-unknown-linux-gnu", "3.11"),
    ("aarch64", "aarch64-unknown-linux-gnu", "3.11"),
)
# PyPI's x86_64 torch is a CUDA build; the CPU build 2.13.0+cpu is served by PyTorch's own index.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Packages that mean a CUDA build of torch came in: none of them belongs on a CPU board.
GPU_PACKAGE = re.compile(r"^(nvidia-|cuda-|triton\b)", re.I)


class UnsupportedPlatform(RuntimeError):
    pass


def constraints_name(machine: str, python: str) -> str:
    return f"linux-{machine}-py{python}.txt"


def constraints_file(system: str | None = None, machine: str | None = None,
                     python: str | None = None) -> Path:
    """The constraints file for this interpreter and platform, or an error naming the supported ones."""
    system = system or platform.system()
    machine = machine or platform.machine()
    python = python or "{}.{}".format(*sys.version_info[:2])
    supported = ", ".join(f"Linux {m} with Python {p}" for m, _, p in TARGETS)
    if system != "Linux":
        raise UnsupportedPlatform(f"{system} is not supported: the pinned environments are for {supported}.")
    path = CONSTRAINTS_DIR / constraints_name(machine, python)
    if not path.exists():
        raise UnsupportedPlatform(
            f"no pinned environment for Linux {machine} with Python {python} ({path.relative_to(ROOT)} "
            f"does not exist). Supported: {supported}. Run `make setup PYTHON=python3.11` with one of "
            "those, or add the target to TARGETS in lib/llava_gguf/run/platform_pins.py and run `make constraints`.")
    return path


def pinned(path: Path) -> dict[str, str]:
    """name -> exact version, from a constraints or requirements file (comments and markers dropped)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.match(r"^([A-Za-z0-9_.\-]+)\s*==\s*([^;\s]+)", line)
        if not m:
            raise ValueError(f"{path}: '{line}' is not pinned with ==; pin every package exactly")
        out[normalize(m.group(1))] = m.group(2)
    return out


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def compile_all(torch_find_links: str | None = None, uv: str | None = None) -> list[Path]:
    """Regenerate every constraints file from requirements.txt with uv (written whole, then renamed)."""
    uv = uv or shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not Path(uv).exists() and not shutil.which(uv):
        raise UnsupportedPlatform("uv is not installed: `make constraints` installs it into .venv and runs this")
    CONSTRAINTS_DIR.mkdir(exist_ok=True)
    written = []
    for machine, triple, python in TARGETS:
        out = CONSTRAINTS_DIR / constraints_name(machine, python)
        tmp = out.with_name(out.name + ".partial")
        cmd = [uv, "pip", "compile", str(REQUIREMENTS.relative_to(ROOT)), "--python-platform", triple,
               "--python-version", python, "--no-progress", "--quiet",
               "--custom-compile-command", "make constraints", "-o", str(tmp.relative_to(ROOT))]
        if machine == "x86_64":
            cmd += (["--find-links", torch_find_links] if torch_find_links else
                    ["--extra-index-url", TORCH_CPU_INDEX, "--index-strategy", "unsafe-best-match"])
        subprocess.run(cmd, cwd=ROOT, check=True)
        gpu = [n for n in pinned(tmp) if GPU_PACKAGE.match(n)]
        if gpu:
            tmp.unlink()
            raise RuntimeError(f"{out.name}: the resolution pulls GPU packages {gpu}; pin a CPU build of torch "
                               "for this platform in requirements.txt")
        os.replace(tmp, out)
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("constraints-file", help="print the constraints file for this Python and platform")
    comp = sub.add_parser("compile", help="regenerate every constraints file with uv")
    comp.add_argument("--torch-find-links", help="a folder holding the torch CPU wheel (instead of PyTorch's "
                                                 "CPU index)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "constraints-file":
            print(constraints_file().relative_to(ROOT))
        else:
            for path in compile_all(args.torch_find_links):
                print(f"wrote {path.relative_to(ROOT)}")
    except UnsupportedPlatform as err:
        print(f"make setup: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
