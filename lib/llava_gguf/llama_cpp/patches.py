"""The project's llama.cpp patches as text: header and diff apart, files and hunks, and a check
that tells, per patch and per hunk, which apply to a given llama.cpp tree.

A patch file is a header (subject, motivation, what changes, how tested; `patch` skips it as
leading text) followed by the diff. Only the diff is built: `diff_part` is what the build key
hashes (toolchain.build_key), so editing a header never invalidates a build. A header may give
each hunk a one-line purpose, one line per hunk:

    - tools/mtmd/clip.cpp:2386: load image_newline under the legacy converter's name

(the file as the diff names it, the hunk's first line in the source the patch was made against).

`check(tree, patches)` applies the patches in order with GNU patch, as the build does
(`patch -p1 --forward --batch`), to a temporary copy of only the files they touch, so the tree is
never written to; `dry_run=True` runs `patch --dry-run` in the tree itself instead (no copy;
each patch is then checked against the unpatched files, so a later patch that edits what an
earlier one added would be misreported). `python -m llava_gguf patches check --tree DIR` and
`make patch-check LLAMA_CPP_SRC=DIR` print the report.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import limits
from .runner import supervised

_HUNK = re.compile(rb"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_PURPOSE = re.compile(r"^- (?P<file>\S+?):(?P<line>\d+): (?P<purpose>\S.*)$")
# GNU patch's verdict on one hunk (LC_ALL=C), e.g. "Hunk #2 succeeded at 5968 with fuzz 1 (offset 5 lines)."
_VERDICT = re.compile(r"^Hunk #(\d+) (succeeded|FAILED|ignored) at (\d+)"
                      r"(?: with fuzz (\d+))?(?: \(offset (-?\d+) lines?\))?")


# The header line that marks a patch every build gets, the published recipe's (unpatched) one included.
BUILD_FIX = "Build fix:"


class PatchFormatError(ValueError):
    pass


class PatchCheckError(RuntimeError):
    """GNU patch did not give a verdict: it ran past its limit (limits.LIMITS["patch"])."""


# ----------------------------------------------------------------------------- reading
def _diff_start(lines: list[bytes]) -> int | None:
    """Index of the first line of the diff: a `diff --git` line, or a `--- ` line followed by `+++ `."""
    for i, line in enumerate(lines):
        if line.startswith(b"diff --git ") or (line.startswith(b"--- ") and i + 1 < len(lines)
                                                and lines[i + 1].startswith(b"+++ ")):
            return i
    return None


def split_patch(data: bytes) -> tuple[bytes, bytes]:
    """(header, diff) of a patch file's bytes; the header is b"" when the file starts with its diff."""
    lines = data.splitlines(keepends=True)
    start = _diff_start(lines)
    if start is None:
        return data, b""
    return b"".join(lines[:start]), b"".join(lines[start:])


def diff_part(data: bytes) -> bytes:
    """What `patch` applies: the file from its first diff line on (the build key hashes this)."""
    header, diff = split_patch(data)
    return diff if diff else header


@dataclass
class Hunk:
    file: str          # the path the diff names, -p1 stripped (e.g. tools/mtmd/clip.cpp)
    number: int        # 1-based within its file, as GNU patch counts
    old_start: int
    old_len: int
    header: str        # the @@ line
    text: bytes        # the @@ line and its body


@dataclass
class FileDiff:
    path: str
    preamble: bytes    # diff --git / index / --- / +++ lines
    hunks: list[Hunk] = field(default_factory=list)

    def text(self) -> bytes:
        return self.preamble + b"".join(h.text for h in self.hunks)


@dataclass
class Patch:
    path: Path
    header: str
    files: list[FileDiff]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def hunks(self) -> list[Hunk]:
        return [h for f in self.files for h in f.hunks]

    def purposes(self) -> dict[tuple[str, int], str]:
        """(file, first line) -> the header's one-line purpose of that hunk."""
        out = {}
        for line in self.header.splitlines():
            m = _PURPOSE.match(line)
            if m:
                out[(m["file"], int(m["line"]))] = m["purpose"]
        return out

    def subject(self) -> str:
        return next((line for line in self.header.splitlines() if line.strip()), "")

    @property
    def build_fix(self) -> bool:
        """The header says `Build fix: ...`: a patch that changes no result and lets the pinned source
        build or run at all on some machines, so the published recipe's build gets it too."""
        return any(line.startswith(BUILD_FIX) for line in self.header.splitlines())


def _strip_p1(name: bytes) -> str:
    path = name.split(b"\t", 1)[0].strip().decode()
    return path.split("/", 1)[1] if "/" in path else path


def read_patch(path: str | Path) -> Patch:
    """Parse a unified diff (git or plain) with its header; PatchFormatError on a malformed hunk."""
    path = Path(path)
    header, diff = split_patch(path.read_bytes())
    lines = diff.splitlines(keepends=True)
    files: list[FileDiff] = []
    preamble: list[bytes] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(b"--- ") and i + 1 < len(lines) and lines[i + 1].startswith(b"+++ "):
            files.append(FileDiff(_strip_p1(lines[i + 1][4:]), b"".join(preamble + lines[i:i + 2])))
            preamble = []
            i += 2
            continue
        m = _HUNK.match(line)
        if m and files:
            old_len = int(m[2]) if m[2] is not None else 1
            new_len = int(m[4]) if m[4] is not None else 1
            body, old, new, j = [line], 0, 0, i + 1
            while j < len(lines) and (old < old_len or new < new_len or lines[j].startswith(b"\\")):
                b = lines[j]
                if b.startswith(b"\\"):
                    pass  # "\ No newline at end of file"
                elif b.startswith(b"-"):
                    old += 1
                elif b.startswith(b"+"):
                    new += 1
                elif b.startswith(b" ") or b in (b"\n", b"\r\n"):
                    old, new = old + 1, new + 1
                else:
                    break
                body.append(b)
                j += 1
            if (old, new) != (old_len, new_len):
                raise PatchFormatError(f"{path}: hunk {line.decode().strip()!r} of {files[-1].path} has "
                                       f"{old} old / {new} new lines, its header says {old_len} / {new_len}")
            f = files[-1]
            f.hunks.append(Hunk(f.path, len(f.hunks) + 1, int(m[1]), old_len, line.decode().rstrip("\n"),
                                b"".join(body)))
            i = j
            continue
        preamble.append(line)  # diff --git, index, mode lines of the next file
        i += 1
    if not files:
        raise PatchFormatError(f"{path}: no unified diff found")
    return Patch(path, header.decode(), files)


# ----------------------------------------------------------------------------- checking
@dataclass
class HunkResult:
    patch: str
    file: str
    number: int
    old_start: int
    status: str        # applies | fuzz | FAILED | file missing | already applied
    at: int | None = None
    offset: int = 0
    fuzz: int = 0
    purpose: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("applies", "fuzz")

    def describe(self) -> str:
        offset = f" (offset {self.offset:+d})" if self.offset else ""
        if self.status == "applies":
            return f"applies at {self.at}{offset}"
        if self.status == "fuzz":
            return f"applies at {self.at} with fuzz {self.fuzz}{offset}"
        if self.status == "FAILED":
            return f"FAILED (expected near line {self.at or self.old_start})"
        return self.status.upper()


@dataclass
class CheckReport:
    tree: Path
    mode: str                      # "temporary copy" | "dry run"
    patches: list[Patch]
    hunks: list[HunkResult]

    @property
    def ok(self) -> bool:
        return all(h.ok for h in self.hunks)

    def failed(self) -> list[HunkResult]:
        return [h for h in self.hunks if not h.ok]

    def text(self) -> str:
        files = sorted({h.file for h in self.hunks})
        out = [f"llama.cpp tree {self.tree} ({self.mode} of the {len(files)} files the patches touch)"]
        for p in self.patches:
            mine = [h for h in self.hunks if h.patch == p.name]
            bad = [h for h in mine if not h.ok]
            verdict = (f"applies ({len(mine)} of {len(mine)} hunks)" if not bad
                       else f"FAILS ({len(bad)} of {len(mine)} hunks do not apply)")
            out.append(f"{p.name}: {verdict}")
            for f in p.files:
                out.append(f"  {f.path}")
                for h in (r for r in mine if r.file == f.path):
                    line = f"    hunk {h.number} @@ -{h.old_start}: {h.describe()}"
                    out.append(line + (f"  [{h.purpose}]" if h.purpose else ""))
        failed = self.failed()
        out.append("every hunk applies" if not failed else
                   f"{len(failed)} hunk(s) do not apply: " + ", ".join(f"{h.patch} {h.file} hunk {h.number}"
                                                               for h in failed))
        return "\n".join(out)


def _patch_cmd(dry_run: bool) -> list[str]:
    if shutil.which("patch") is None:
        raise FileNotFoundError("GNU patch is not installed (apt-get install patch)")
    return ["patch", "-p1", "--forward", "--batch", "--verbose", "--no-backup-if-mismatch", "--reject-file=-",
            *(["--dry-run"] if dry_run else [])]


def _apply_file(fdiff: FileDiff, patch: Patch, workdir: Path, dry_run: bool, tree: Path) -> list[HunkResult]:
    """One file's hunks through GNU patch in `workdir` (`tree` or its copy); a result per hunk from patch's
    own verdicts."""
    purposes = patch.purposes()

    def result(h: Hunk, status: str, **kw) -> HunkResult:
        return HunkResult(patch.name, h.file, h.number, h.old_start, status,
                          purpose=purposes.get((h.file, h.old_start)), **kw)

    if not (workdir / fdiff.path).is_file():
        return [result(h, "file missing") for h in fdiff.hunks]
    with tempfile.NamedTemporaryFile("wb", suffix=".patch", delete=False) as tmp:
        tmp.write(fdiff.text())
    # Not runner.run_tool: a non-zero exit (a hunk that fails) is a verdict to read here, not a failure.
    # The runner's supervision still bounds it and kills patch's process group at the limit.
    limit = limits.seconds("patch")
    try:
        with supervised([*_patch_cmd(dry_run), "-i", tmp.name], limit, cwd=workdir, stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                        env={**os.environ, "LC_ALL": "C"}) as run:
            output, _ = run.proc.communicate()
    finally:
        os.unlink(tmp.name)
    if run.expired:
        raise PatchCheckError(f"{patch.path}: GNU patch on {fdiff.path} of the llama.cpp tree {tree} ran past its "
                              f"limit of {limit:.3g} s (llama_cpp/limits.py LIMITS['patch'], times "
                              f"${limits.SCALE_ENV}) and was stopped; check that the `patch` on PATH is GNU patch "
                              f"(patch --version), or on a slow machine set ${limits.SCALE_ENV} above 1")
    if "Reversed (or previously applied) patch detected" in output:
        return [result(h, "already applied") for h in fdiff.hunks]
    verdicts = {}
    for line in output.splitlines():
        m = _VERDICT.match(line.strip())
        if m:
            verdicts[int(m[1])] = m
    out = []
    for h in fdiff.hunks:
        m = verdicts.get(h.number)
        if m is None:
            # patch names only the hunks it did not apply cleanly when not verbose; verbose names all.
            out.append(result(h, "applies" if run.proc.returncode == 0 else "FAILED"))
        elif m[2] == "succeeded":
            fuzz = int(m[4] or 0)
            out.append(result(h, "fuzz" if fuzz else "applies", at=int(m[3]), offset=int(m[5] or 0), fuzz=fuzz))
        else:
            out.append(result(h, "FAILED" if m[2] == "FAILED" else "already applied", at=int(m[3])))
    return out


def check(tree: str | Path, patch_files: list[Path], dry_run: bool = False) -> CheckReport:
    """Which patches and hunks apply to `tree`, in order; the tree itself is never written to."""
    tree = Path(tree)
    if not tree.is_dir():
        raise FileNotFoundError(f"{tree}: no such llama.cpp tree (a folder holding tools/, common/, ...)")
    patches = [read_patch(p) for p in patch_files]
    touched = sorted({f.path for p in patches for f in p.files})
    hunks: list[HunkResult] = []
    if dry_run:
        for p in patches:
            for f in p.files:
                hunks += _apply_file(f, p, tree, dry_run=True, tree=tree)
        return CheckReport(tree, "dry run", patches, hunks)
    with tempfile.TemporaryDirectory(prefix="llava-gguf-patch-check-") as tmp:
        work = Path(tmp)
        for rel in touched:
            if (tree / rel).is_file():
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(tree / rel, work / rel)
        for p in patches:
            for f in p.files:
                hunks += _apply_file(f, p, work, dry_run=False, tree=tree)
    return CheckReport(tree, "temporary copy", patches, hunks)
