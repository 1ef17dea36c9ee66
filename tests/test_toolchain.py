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


def test_the_unpatched_build_sits_beside_the_patched_one(tmp_path, monkeypatch):
    """One build function: `unpatched=True` keys the folder by the commit alone and wants llama-mtmd-cli only."""
    monkeypatch.setenv("LLAVA_GGUF_CACHE", str(tmp_path))
    assert toolchain.build_key(unpatched=True) == f"{toolchain.LLAMA_CPP_COMMIT}-unpatched"
    unpatched = toolchain.default_build_dir(unpatched=True)
    assert unpatched == tmp_path / "llama.cpp-0c1e570-unpatched"
    assert unpatched.parent == toolchain.default_build_dir().parent != unpatched
    # A cached unpatched build (its marker and its one tool) is used as it is: nothing is copied or built.
    (unpatched / "src").mkdir(parents=True)
    (unpatched / "src" / ".patched").write_text(toolchain.build_key(unpatched=True) + "\n")
    (unpatched / "bin").mkdir()
    (unpatched / "bin" / "llama-mtmd-cli").write_text("")
    monkeypatch.setattr(toolchain, "source_dir", lambda: pytest.fail("the cached build was rebuilt"))
    assert toolchain.build_llama_cpp(unpatched=True) == unpatched / "bin"
    assert toolchain.UNPATCHED_TOOLS == ("llama-mtmd-cli",)


def test_an_unpatched_build_applies_no_patch(tmp_path, monkeypatch):
    """The build steps as build_llama_cpp runs them, with cmake and patch recorded instead of run."""
    monkeypatch.setenv("LLAVA_GGUF_CACHE", str(tmp_path))
    src = tmp_path / "pristine"
    (src / "cmake").mkdir(parents=True)
    (src / "cmake" / "build-info.cmake").write_text('set(BUILD_COMMIT "unknown")\n')
    monkeypatch.setattr(toolchain, "source_dir", lambda: src)
    calls = []

    def fake_run(cmd, **kw):
        calls.append([str(c) for c in cmd])
        return subprocess.CompletedProcess(cmd, 0)

    def fake_build(cmd, logf):
        calls.append([str(c) for c in cmd])
        out = Path(cmd[cmd.index("--build") + 1]) / "bin"
        out.mkdir(parents=True, exist_ok=True)
        (out / "llama-mtmd-cli").write_text("")

    monkeypatch.setattr(toolchain.subprocess, "run", fake_run)
    monkeypatch.setattr(toolchain, "_run_with_progress", fake_build)
    bin_dir = toolchain.build_llama_cpp(unpatched=True, jobs=1)
    assert bin_dir == tmp_path / "llama.cpp-0c1e570-unpatched" / "bin" and (bin_dir / "llama-mtmd-cli").exists()
    assert not any(c[0] == "patch" for c in calls)
    build = next(c for c in calls if "--build" in c)
    assert build[build.index("--target") + 1:] == ["llama-mtmd-cli"]
    info = (bin_dir.parent / "src" / "cmake" / "build-info.cmake").read_text()
    assert 'BUILD_COMMIT "0c1e570-unpatched"' in info
