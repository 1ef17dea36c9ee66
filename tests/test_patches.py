"""The llama.cpp patches ready to rebase: headers that say what each part is for, a build key that
follows the diffs (not the prose), and a check that reports per patch and hunk what applies to a tree."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest

from llava_gguf import cli
from llava_gguf.run import registry
from llava_gguf.llama_cpp import limits, patches, toolchain

ROOT = registry.repo_root()

# A fake tree and two patches: patch 1 edits a.c (two hunks) and b.c; patch 2 edits what patch 1
# added to a.c, so it applies only after patch 1.
A_C = "".join(f"line {i}\n" for i in range(1, 31))
B_C = "int b(void) {\n    return 1;\n}\n"
PATCH_1 = """demo : two fixes

- src/a.c:2: say hello near the top
- src/a.c:19: line 21 says more
- src/b.c:1: b returns 2

diff --git a/src/a.c b/src/a.c
--- a/src/a.c
+++ b/src/a.c
@@ -2,4 +2,5 @@
 line 2
 line 3
+hello
 line 4
 line 5
@@ -19,5 +20,5 @@
 line 19
 line 20
-line 21
+line 21, changed
 line 22
 line 23
diff --git a/src/b.c b/src/b.c
--- a/src/b.c
+++ b/src/b.c
@@ -1,3 +1,3 @@
 int b(void) {
-    return 1;
+    return 2;
 }
"""
PATCH_2 = """demo : a follow-up to patch 1

--- a/src/a.c
+++ b/src/a.c
@@ -3,3 +3,3 @@
 line 3
-hello
+hello, world
 line 4
"""


@pytest.fixture
def fake(tmp_path):
    tree = tmp_path / "tree"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "a.c").write_text(A_C)
    (tree / "src" / "b.c").write_text(B_C)
    pdir = tmp_path / "patches"
    pdir.mkdir()
    (pdir / "0001-demo.patch").write_text(PATCH_1)
    (pdir / "0002-follow-up.patch").write_text(PATCH_2)
    return tree, sorted(pdir.glob("*.patch"))


def _digest(tree, rels):
    return {r: hashlib.sha256((tree / r).read_bytes()).hexdigest() for r in rels if (tree / r).exists()}


def _statuses(report):
    return [(h.patch[:4], h.file, h.number, h.status) for h in report.hunks]


# ----------------------------------------------------------------------------- reading
def test_header_and_diff_apart_and_hunks_with_their_purposes(fake):
    _, (p1, p2) = fake
    header, diff = patches.split_patch(p1.read_bytes())
    assert header.startswith(b"demo : two fixes") and diff.startswith(b"diff --git a/src/a.c")
    patch = patches.read_patch(p1)
    assert [(f.path, [h.old_start for h in f.hunks]) for f in patch.files] == [("src/a.c", [2, 19]), ("src/b.c", [1])]
    assert patch.purposes() == {("src/a.c", 2): "say hello near the top", ("src/a.c", 19): "line 21 says more",
                                ("src/b.c", 1): "b returns 2"}
    assert patch.subject() == "demo : two fixes"
    assert patches.split_patch(p2.read_bytes())[1].startswith(b"--- a/src/a.c")  # a plain (not git) diff


def test_a_hunk_whose_length_disagrees_with_its_header_is_refused(tmp_path):
    bad = tmp_path / "bad.patch"
    bad.write_text("--- a/x\n+++ b/x\n@@ -1,3 +1,3 @@\n a\n-b\n+c\n")
    with pytest.raises(patches.PatchFormatError, match="2 old / 2 new lines, its header says 3 / 3"):
        patches.read_patch(bad)


# ----------------------------------------------------------------------------- the build key
def test_the_build_key_follows_the_diffs_not_the_headers_or_names(tmp_path, monkeypatch):
    monkeypatch.setattr(toolchain, "patches_dir", lambda: tmp_path)
    (tmp_path / "0001-demo.patch").write_text(PATCH_1)
    (tmp_path / "0002-follow-up.patch").write_text(PATCH_2)
    key = toolchain.build_key()
    assert key.startswith(toolchain.LLAMA_CPP_COMMIT + "-")

    (tmp_path / "0001-demo.patch").write_text(PATCH_1.replace("demo : two fixes", "demo : two fixes, reworded\n\n"
                                                              "Motivation\n\nA longer story.\n"))
    (tmp_path / "0002-follow-up.patch").write_text(PATCH_2.replace("demo : a follow-up to patch 1\n\n", ""))
    assert toolchain.build_key() == key  # header edits, a header removed: the same build
    (tmp_path / "0002-follow-up.patch").rename(tmp_path / "0002-renamed.patch")
    assert toolchain.build_key() == key  # the same diffs in the same order

    (tmp_path / "0002-renamed.patch").write_text(PATCH_2.replace("+hello, world", "+hello, there"))
    assert toolchain.build_key() != key  # a changed diff line: a new build
    (tmp_path / "0002-renamed.patch").rename(tmp_path / "0000-first.patch")
    (tmp_path / "0000-first.patch").write_text(PATCH_2)
    assert toolchain.build_key() != key  # the same diffs in another order


def test_the_project_patches_headers_changed_nothing_that_is_built():
    """Every byte from the first diff line on is what `patch` applies; the headers lie before it."""
    for path in toolchain.patch_files():
        header, diff = patches.split_patch(path.read_bytes())
        assert header and diff.startswith((b"diff --git ", b"--- ")), path.name
        assert patches.diff_part(path.read_bytes()) == diff


# ----------------------------------------------------------------------------- the check on a fake tree
def test_every_hunk_applies_to_a_clean_tree_which_stays_untouched(fake):
    tree, files = fake
    before = _digest(tree, ["src/a.c", "src/b.c"])
    report = patches.check(tree, files)
    assert report.ok and report.mode == "temporary copy"
    assert _statuses(report) == [("0001", "src/a.c", 1, "applies"), ("0001", "src/a.c", 2, "applies"),
                                 ("0001", "src/b.c", 1, "applies"), ("0002", "src/a.c", 1, "applies")]
    assert _digest(tree, ["src/a.c", "src/b.c"]) == before and sorted(p.name for p in tree.rglob("*")) == \
        ["a.c", "b.c", "src"]
    text = report.text()
    assert "0001-demo.patch: applies (3 of 3 hunks)" in text and "[line 21 says more]" in text
    assert text.splitlines()[-1] == "every hunk applies"


def test_a_moved_hunk_is_reported_with_its_offset_and_a_changed_one_as_failed(fake):
    tree, files = fake
    # Three lines more at the top (every hunk of a.c moves by 3), hunk 1's first context line and
    # the line hunk 2 replaces edited.
    (tree / "src" / "a.c").write_text("new 1\nnew 2\nnew 3\n" + A_C.replace("line 2\n", "line two\n")
                                      .replace("line 21\n", "line twenty-one\n"))
    (tree / "src" / "b.c").unlink()
    report = patches.check(tree, files)
    assert not report.ok
    assert _statuses(report) == [("0001", "src/a.c", 1, "fuzz"), ("0001", "src/a.c", 2, "FAILED"),
                                 ("0001", "src/b.c", 1, "file missing"), ("0002", "src/a.c", 1, "applies")]
    first = report.hunks[0]
    assert (first.at, first.offset, first.fuzz, first.ok) == (5, 3, 1, True)
    assert first.describe() == "applies at 5 with fuzz 1 (offset +3)"
    text = report.text()
    assert "0001-demo.patch: FAILS (2 of 3 hunks do not apply)" in text
    assert "hunk 2 @@ -19: FAILED (expected near line" in text and "[line 21 says more]" in text
    assert "hunk 1 @@ -1: FILE MISSING  [b returns 2]" in text
    assert text.splitlines()[-1] == ("2 hunk(s) do not apply: 0001-demo.patch src/a.c hunk 2, "
                                     "0001-demo.patch src/b.c hunk 1")


def test_a_tree_that_has_the_patches_already_is_not_clean(fake):
    tree, files = fake
    subprocess.run(["patch", "-p1", "--batch", "-i", str(files[0])], cwd=tree, check=True, capture_output=True)
    report = patches.check(tree, files[:1])
    assert {h.status for h in report.hunks} == {"already applied"} and not report.ok
    assert "hunk 1 @@ -1: ALREADY APPLIED" in report.text()


def test_dry_run_checks_in_the_tree_each_patch_against_the_unpatched_files(fake):
    tree, files = fake
    before = _digest(tree, ["src/a.c", "src/b.c"])
    assert patches.check(tree, files[:1], dry_run=True).ok
    report = patches.check(tree, files, dry_run=True)
    assert report.mode == "dry run" and _digest(tree, ["src/a.c", "src/b.c"]) == before
    assert sorted(p.name for p in tree.rglob("*")) == ["a.c", "b.c", "src"]  # no .orig, no .rej
    # Patch 2 needs patch 1's line, which a dry run never wrote: the documented limit.
    assert _statuses(report)[-1] == ("0002", "src/a.c", 1, "FAILED")


def test_a_missing_tree_is_named(tmp_path, fake):
    with pytest.raises(FileNotFoundError, match="no such llama.cpp tree"):
        patches.check(tmp_path / "nowhere", fake[1])


def test_a_patch_that_hangs_is_stopped_at_its_limit_and_named(tmp_path, fake, monkeypatch):
    tree, files = fake
    # A `patch` that never answers, first on PATH, under a limit scaled down to a fraction of a second.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "patch").write_text("#!/bin/sh\nexec sleep 600\n")
    (fake_bin / "patch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    monkeypatch.setenv(limits.SCALE_ENV, "0.005")
    with pytest.raises(patches.PatchCheckError, match=r"0001-demo.patch: GNU patch on src/a.c of the llama.cpp "
                                                      rf"tree {re.escape(str(tree))} ran past its limit of 0.6 s"):
        patches.check(tree, files)
    args = ["patches", "check", "--tree", str(tree)] + [a for f in files for a in ("--patch", str(f))]
    assert cli.main(args) == 2  # neither "applies" (0) nor "fails" (1): no verdict


def test_the_cli_and_make_report_and_fail_on_a_failing_hunk(fake, capsys):
    tree, files = fake
    args = ["patches", "check", "--tree", str(tree)] + [a for f in files for a in ("--patch", str(f))]
    assert cli.main(args) == 0
    assert "every hunk applies" in capsys.readouterr().out
    (tree / "src" / "b.c").write_text(B_C.replace("return 1", "return 0"))
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    assert "src/b.c" in out and "hunk 1 @@ -1: FAILED" in out

    made = subprocess.run(["make", "-s", "-C", str(ROOT), "patch-check", f"LLAMA_CPP_SRC={tree}"],
                          capture_output=True, text=True, timeout=300)
    # make runs the project's own patches: the fake tree has none of their files.
    assert made.returncode != 0 and "FILE MISSING" in made.stdout, made.stdout + made.stderr


# ----------------------------------------------------------------------------- the project's patches
def test_the_project_patches_apply_hunk_by_hunk_to_the_pinned_source():
    src = toolchain.source_dir()
    files = toolchain.patch_files()
    touched = sorted({f.path for p in map(patches.read_patch, files) for f in p.files})
    before = _digest(src, touched)
    for dry_run in (False, True):
        report = patches.check(src, files, dry_run=dry_run)
        assert report.ok, report.text()
        assert [(h.status, h.offset) for h in report.hunks] == [("applies", 0)] * len(report.hunks)  # no fuzz
        assert len(report.hunks) == sum(len(p.hunks) for p in report.patches) == 19
    assert _digest(src, touched) == before


def test_the_whole_patch_files_headers_included_apply_as_the_build_applies_them(tmp_path):
    """`patch` skips each header as leading text: the build's command on the files as they are."""
    src = toolchain.source_dir()
    files = toolchain.patch_files()
    for rel in sorted({f.path for p in map(patches.read_patch, files) for f in p.files}):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, tmp_path / rel)
    for path in files:
        done = subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(path)], cwd=tmp_path,
                              capture_output=True, text=True, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0 and "garbage" not in done.stdout, done.stdout + done.stderr
        n_files = len(patches.read_patch(path).files)
        assert done.stdout.count("patching file ") == n_files, done.stdout


def test_every_hunk_of_0002_has_its_one_line_purpose():
    patch = patches.read_patch(next(p for p in toolchain.patch_files() if p.name.startswith("0002-")))
    purposes = patch.purposes()
    hunks = {(h.file, h.old_start) for h in patch.hunks}
    assert len(hunks) == 13
    assert set(purposes) == hunks, {"no purpose": sorted(hunks - set(purposes)),
                                    "no such hunk": sorted(set(purposes) - hunks)}


@pytest.mark.parametrize("prefix", ["0001-", "0003-", "0004-", "0005-"])
def test_every_patch_but_0002_is_laid_out_as_an_upstream_pull_request(prefix):
    patch = patches.read_patch(next(p for p in toolchain.patch_files() if p.name.startswith(prefix)))
    lines = patch.header.splitlines()
    assert re.match(r"^[a-z][a-z0-9-]* : \S", lines[0]) and len(lines[0]) <= 100 and lines[1] == "", lines[0]
    sections = [line for line in lines if line in ("Motivation", "What changes", "How it was tested")]
    assert sections == ["Motivation", "What changes", "How it was tested"]


def test_the_patch_check_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "llava_gguf", "patches", "check", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--tree" in done.stdout and "--dry-run" in done.stdout
