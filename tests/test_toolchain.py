import os
import stat

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
