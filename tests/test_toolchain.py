import os
import stat
import subprocess
from pathlib import Path

import pytest

from llava_gguf.llama_cpp import toolchain


def test_find_tool_error_names_tool_places_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(toolchain.ToolNotFound) as err:
        toolchain.find_tool("llama-mtmd-debug")
    msg = str(err.value)
    assert "llama-mtmd-debug" in msg and str(tmp_path / "bin" / "llama-mtmd-debug") in msg
    assert "make llama-cpp" in msg and "LLAMA_CPP_DIR" in msg


def test_llama_cpp_dir_wins_over_params_and_finds_bin_subfolders(tmp_path, monkeypatch):
    for sub in ("a/build/bin", "b/bin"):
        (tmp_path / sub).mkdir(parents=True)
    for folder in ("a/build/bin", "b/bin"):
        tool = tmp_path / folder / "llama-mtmd-cli"
        tool.write_text("#!/bin/sh\necho 'version: 9999 (abcdef0)'\n")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    assert toolchain.find_tool("llama-mtmd-cli", str(tmp_path / "a")) == tmp_path / "a/build/bin/llama-mtmd-cli"
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path / "b"))
    assert toolchain.find_tool("llama-mtmd-cli", str(tmp_path / "a")) == tmp_path / "b/bin/llama-mtmd-cli"
    info = toolchain.llama_cpp_info()
    assert info == {"bin_dir": str(tmp_path / "b/bin"), "version": "9999 (abcdef0)"}


def test_build_key_hashes_the_patches(tmp_path, monkeypatch):
    monkeypatch.setattr(toolchain, "patches_dir", lambda: tmp_path)
    empty = toolchain.build_key()
    (tmp_path / "0001-x.patch").write_text("--- a\n+++ b\n")
    one = toolchain.build_key()
    (tmp_path / "0001-x.patch").write_text("--- a\n+++ c\n")
    assert len({empty, one, toolchain.build_key()}) == 3
    assert one.startswith(toolchain.LLAMA_CPP_COMMIT)


def test_sdist_checksum_is_enforced(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_GGUF_CACHE", str(tmp_path))
    (tmp_path / toolchain.SDIST_NAME).write_bytes(b"not the sdist")
    with pytest.raises(RuntimeError, match="sha256 .* != pinned"):
        toolchain.fetch_sdist()


def test_pinned_source_has_the_assets_the_project_uses():
    src = toolchain.source_dir()
    for rel in ("tools/mtmd/test-1.jpeg", "models/ggml-vocab-llama-spm.gguf",
                "tools/mtmd/legacy-models/llava_surgery_v2.py", "examples/convert_legacy_llama.py", "gguf-py"):
        assert (src / rel).exists(), rel


@pytest.mark.llama_cpp
def test_project_build_has_every_tool(llama_tool):
    for tool in toolchain.TOOLS:
        path = llama_tool(tool)
        assert os.access(path, os.X_OK)


def test_sdist_links_are_checked_without_tarfile_filters():
    import tarfile

    def link(name, target):
        m = tarfile.TarInfo(name)
        m.type, m.linkname = tarfile.SYMTYPE, target
        return m
    assert toolchain._link_inside(link("a/b/c.h", "../d.h"))
    assert not toolchain._link_inside(link("a/c.h", "../../etc/passwd"))


# ----------------------------------------------------------------------------- the shared cache
# A stand-in for cmake: configure makes the build folder, --build takes a second, prints progress and
# writes each --target into <build>/bin; every call is appended to $CMAKE_CALLS. $CMAKE_FAIL fails the build.
FAKE_CMAKE = """#!/bin/sh
echo "$*" >> "$CMAKE_CALLS"
if [ "$1" = "--build" ]; then
  dir=$2; shift 2
  while [ $# -gt 0 ] && [ "$1" != "--target" ]; do shift; done; shift
  echo "[ 10%] Building C object"; sleep 1
  if [ -n "$CMAKE_FAIL" ]; then echo "error: deliberate"; exit 2; fi
  mkdir -p "$dir/bin"
  for t in "$@"; do printf '#!/bin/sh\\necho built\\n' > "$dir/bin/$t"; chmod +x "$dir/bin/$t"; done
  echo "[100%] Built target"
else
  while [ $# -gt 0 ]; do [ "$1" = "-B" ] && mkdir -p "$2" && touch "$2/CMakeCache.txt"; shift; done
fi
"""


@pytest.fixture
def fake_toolchain(tmp_path, monkeypatch):
    """The cache root, the sdist, the patches and cmake of a tmp_path toolchain; returns (cache, calls file)."""
    import hashlib
    import io
    import tarfile

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("LLAVA_GGUF_CACHE", str(cache))
    files = {"CMakeLists.txt": "project(fake)\n", "cmake/build-info.cmake": 'set(BUILD_COMMIT "unknown")\n',
             "hello.c": "int x = 0;\n", ".git": "gitdir: nowhere\n"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(toolchain.SDIST_PREFIX + name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    (cache / toolchain.SDIST_NAME).write_bytes(buf.getvalue())
    monkeypatch.setattr(toolchain, "SDIST_SHA256", hashlib.sha256(buf.getvalue()).hexdigest())
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "0001-x.patch").write_text("--- a/hello.c\n+++ b/hello.c\n@@ -1 +1 @@\n-int x = 0;\n+int x = 1;\n")
    monkeypatch.setattr(toolchain, "patches_dir", lambda: patches)
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir()
    (fake_bin / "cmake").write_text(FAKE_CMAKE)
    (fake_bin / "cmake").chmod(0o755)
    calls = tmp_path / "cmake-calls.txt"
    calls.touch()
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CMAKE_CALLS", str(calls))
    monkeypatch.delenv("CMAKE_FAIL", raising=False)
    return cache, calls


def _partials(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.partial"))


def test_two_builds_at_once_make_one_complete_tree(fake_toolchain, caplog):
    import logging
    import threading

    cache, calls = fake_toolchain
    caplog.set_level(logging.INFO)
    results, errors = [], []

    def build():
        try:
            results.append(toolchain.build_llama_cpp(jobs=1))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and len(results) == 2
    bin_dir = toolchain.default_build_dir() / "bin"
    assert results == [bin_dir, bin_dir] and toolchain.is_built(bin_dir.parent, toolchain.build_key())
    assert all((bin_dir / t).is_file() for t in toolchain.TOOLS)
    src = bin_dir.parent / "src"
    assert (src / "hello.c").read_text() == "int x = 1;\n"  # patched
    assert (src / ".patched").read_text().split("\n")[0] == toolchain.build_key()
    assert toolchain.build_key() in (src / "cmake/build-info.cmake").read_text() and not (src / ".git").exists()
    made = calls.read_text().splitlines()
    assert sum(c.startswith("--build") for c in made) == 1 and sum(c.startswith("-S") for c in made) == 1
    assert caplog.text.count("extracting llama.cpp") == 1
    assert "made by another process meanwhile" in caplog.text  # the second one waited, then reused it
    assert _partials(cache) == []
    # A third call finds it up to date without running anything.
    assert toolchain.build_llama_cpp() == bin_dir and len(calls.read_text().splitlines()) == 2


def test_a_failed_build_is_never_taken_for_a_complete_one(fake_toolchain, monkeypatch):
    cache, calls = fake_toolchain
    monkeypatch.setenv("CMAKE_FAIL", "1")
    with pytest.raises(toolchain.ToolFailed, match=r"(?s)llama.cpp build \(cmake --build\) exited with status 2.*"
                                                   r"error: deliberate"):
        toolchain.build_llama_cpp(jobs=1)
    build_dir = toolchain.default_build_dir()
    assert not (build_dir / "bin").exists() and not toolchain.is_built(build_dir, toolchain.build_key())
    assert (build_dir / "src" / ".patched").exists()  # the patched tree is whole: it is kept
    monkeypatch.delenv("CMAKE_FAIL")
    assert toolchain.build_llama_cpp(jobs=1) == build_dir / "bin"
    assert toolchain.is_built(build_dir, toolchain.build_key())
    # A bin/ from before the stamp (or copied by hand) is not trusted: the build runs again (incrementally:
    # the patched source stays, make redoes only what is missing).
    (build_dir / "bin" / toolchain.BUILT_STAMP).unlink()
    n = len(calls.read_text().splitlines())
    assert toolchain.build_llama_cpp(jobs=1) == build_dir / "bin"
    assert len(calls.read_text().splitlines()) == n + 2 and (build_dir / "bin" / toolchain.BUILT_STAMP).exists()
    assert _partials(cache) == []


def test_an_explicit_build_folder_is_repatched_after_a_patch_edit(fake_toolchain, tmp_path):
    build_dir = tmp_path / "my-build"
    toolchain.build_llama_cpp(build_dir, jobs=1)
    (toolchain.patches_dir() / "0001-x.patch").write_text(
        "--- a/hello.c\n+++ b/hello.c\n@@ -1 +1 @@\n-int x = 0;\n+int x = 2;\n")
    assert not toolchain.is_built(build_dir, toolchain.build_key())
    toolchain.build_llama_cpp(build_dir, jobs=1)
    assert (build_dir / "src" / "hello.c").read_text() == "int x = 2;\n"
    assert (build_dir / "bin" / toolchain.BUILT_STAMP).read_text().strip() == toolchain.build_key()


def test_the_legacy_venv_is_made_once_when_two_ask_at_once(tmp_path, monkeypatch):
    import threading

    from llava_gguf.llama_cpp import legacy

    monkeypatch.setenv("LLAVA_GGUF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(legacy, "script_env", lambda **kw: dict(os.environ))
    made = []

    def stand_in(cmd, log_file, what, limit, cwd=None, env=None):
        if what == "python -m venv":  # a venv's python, after a while
            made.append(cmd[-1])
            import time

            time.sleep(1)
            (toolchain.Path(cmd[-1]) / "bin").mkdir(parents=True)
            (toolchain.Path(cmd[-1]) / "bin" / "python").touch()

    monkeypatch.setattr(legacy, "_run", stand_in)
    pythons = []
    threads = [threading.Thread(target=lambda: pythons.append(legacy.legacy_env())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    root = tmp_path / "cache" / legacy.ENV_NAME
    assert len(made) == 1 and pythons == [root / "bin" / "python"] * 2
    assert (root / legacy.STAMP).is_file() and _partials(tmp_path / "cache") == []


def test_the_unpatched_build_sits_beside_the_patched_one(tmp_path, monkeypatch):
    """One build function: `unpatched=True` keys the folder by the commit and its build fixes alone
    and wants llama-mtmd-cli only."""
    monkeypatch.setenv("LLAVA_GGUF_CACHE", str(tmp_path))
    key = toolchain.build_key(unpatched=True)
    fixes = toolchain.patch_files(unpatched=True)
    assert [p.name[:4] for p in fixes] == ["0005"]  # the AMX tile config: the published build crashes without it
    assert key.startswith(f"{toolchain.LLAMA_CPP_COMMIT}-unpatched-") and key != toolchain.build_key()
    unpatched = toolchain.default_build_dir(unpatched=True)
    assert unpatched == tmp_path / f"llama.cpp-{key}"
    assert unpatched.parent == toolchain.default_build_dir().parent != unpatched
    # A finished unpatched build (its stamp and its one tool) is used as it is: nothing is copied or built.
    (unpatched / "bin").mkdir(parents=True)
    (unpatched / "bin" / "llama-mtmd-cli").write_text("")
    (unpatched / "bin" / toolchain.BUILT_STAMP).write_text(key + "\n")
    monkeypatch.setattr(toolchain, "source_dir", lambda: pytest.fail("the cached build was rebuilt"))
    assert toolchain.build_llama_cpp(unpatched=True) == unpatched / "bin"
    assert toolchain.UNPATCHED_TOOLS == ("llama-mtmd-cli",)


def test_an_unpatched_build_applies_only_the_build_fixes(fake_toolchain):
    cache, calls = fake_toolchain
    patches = toolchain.patches_dir()
    (patches / "0002-fix.patch").write_text("ggml : a build fix\n\nBuild fix: every build\n\n"
                                           "--- a/hello.c\n+++ b/hello.c\n@@ -1 +1 @@\n-int x = 0;\n+int x = 2;\n")
    assert [p.name for p in toolchain.patch_files(unpatched=True)] == ["0002-fix.patch"]
    key = toolchain.build_key(unpatched=True)
    assert key.startswith("0c1e570-unpatched-") and key != toolchain.build_key()
    bin_dir = toolchain.build_llama_cpp(unpatched=True, jobs=1)
    assert bin_dir == cache / f"llama.cpp-{key}" / "bin"
    assert (bin_dir.parent / "src" / "hello.c").read_text() == "int x = 2;\n"  # the fix, not 0001


def test_an_unpatched_build_applies_no_patch(fake_toolchain):
    cache, calls = fake_toolchain
    bin_dir = toolchain.build_llama_cpp(unpatched=True, jobs=1)
    assert bin_dir == cache / "llama.cpp-0c1e570-unpatched" / "bin" and (bin_dir / "llama-mtmd-cli").is_file()
    assert toolchain.is_built(bin_dir.parent, toolchain.build_key(unpatched=True), toolchain.UNPATCHED_TOOLS)
    src = bin_dir.parent / "src"
    assert (src / "hello.c").read_text() == "int x = 0;\n"  # as published
    build = next(c for c in calls.read_text().splitlines() if c.startswith("--build"))
    assert build.split("--target ")[1].split() == ["llama-mtmd-cli"]
    assert 'BUILD_COMMIT "0c1e570-unpatched"' in (src / "cmake" / "build-info.cmake").read_text()
    assert _partials(cache) == []

