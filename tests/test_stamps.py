"""A product's record (size, times, sha256): an untouched file is reused, any change is noticed."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from llava_gguf.run import stamps, workspace


@pytest.fixture
def product(tmp_path):
    path = tmp_path / "m-Q8_0.gguf"
    path.write_bytes(bytes(range(256)) * 4096)
    stamps.record(path, tool="build-1")
    return path


def test_untouched_file_is_unchanged_without_reading_it(product, monkeypatch):
    record = json.loads(stamps.sidecar(product).read_text())
    assert record["tool"] == "build-1" and record["size"] == product.stat().st_size
    assert record["sha256"] == workspace.sha256_file(product)
    monkeypatch.setattr(stamps, "sha256_file", lambda p: pytest.fail("an untouched file must not be read"))
    assert stamps.unchanged(product, tool="build-1") == (True, "unchanged since it was written")


def test_same_size_corruption_is_noticed_even_with_its_mtime_put_back(product):
    st = product.stat()
    with open(product, "r+b") as f:
        f.seek(st.st_size // 2)
        f.write(b"\xde\xad\xbe\xef")
    os.utime(product, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert product.stat().st_size == st.st_size and product.stat().st_mtime_ns == st.st_mtime_ns
    ok, why = stamps.unchanged(product, tool="build-1")
    assert not ok and "sha256 differs" in why


def test_size_change_and_another_build_are_noticed(product):
    assert stamps.unchanged(product, tool="build-2") == (False, "made with another tool ('build-1', now 'build-2')")
    with open(product, "ab") as f:
        f.write(b"x")
    ok, why = stamps.unchanged(product, tool="build-1")
    assert not ok and "size changed" in why


def test_a_copy_with_the_same_bytes_is_accepted_and_re_recorded(product, tmp_path):
    moved = tmp_path / "other-disk" / product.name
    moved.parent.mkdir()
    shutil.copy(product, moved)
    shutil.copy(stamps.sidecar(product), stamps.sidecar(moved))
    ok, why = stamps.unchanged(moved, tool="build-1")
    assert ok and "new file times recorded" in why
    assert stamps.unchanged(moved, tool="build-1") == (True, "unchanged since it was written")


def test_missing_or_old_records(product):
    stamps.sidecar(product).write_text("/old/llama-quantize:123:456")  # the format before hashes
    assert stamps.read(product) == {"tool": "/old/llama-quantize:123:456"}
    assert stamps.unchanged(product, tool="/old/llama-quantize:123:456") == \
        (False, "made before content hashes were recorded")
    stamps.forget(product)
    assert stamps.unchanged(product) == (False, "no record of how it was made")
