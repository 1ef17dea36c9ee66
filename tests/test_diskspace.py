"""A full disk says so (issue 12, Found 5): free space checked before each large write, and a write
that runs out of space reported as "no space left on <where>: needed ~N, free M", not as the writer's
own words. Free space is faked through shutil.disk_usage; ENOSPC is raised from inside the writers."""
from __future__ import annotations

import errno
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from llava_gguf.run import diskspace, partials, workspace
from llava_gguf.llama_cpp import toolchain
from llava_gguf.steps import quantize, surgery
from llava_gguf.steps import text_export as text
from llava_gguf.steps import vision_export as vision
from llava_gguf.run.diskspace import DiskFullError

Usage = namedtuple("Usage", "total used free")
MiB = 2**20


@pytest.fixture
def free_space(monkeypatch):
    """free_space(n) -> every filesystem reports n bytes free (n may be a callable, asked each time)."""
    real = shutil.disk_usage

    def fake(path, n):
        free = n() if callable(n) else n
        total = real(path).total
        return Usage(total, total - free, free)

    return lambda n: monkeypatch.setattr(shutil, "disk_usage", lambda path: fake(path, n))


@pytest.fixture(scope="module")
def tiny_text_gguf(tiny_checkpoint, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "llava-tiny-F16.gguf"
    text.write_text_gguf(tiny_checkpoint, path)
    return path


def _nothing_left(folder: Path) -> None:
    assert partials.find(folder) == [], partials.find(folder)


# ----------------------------------------------------------------------------- the check itself
def test_ensure_space_names_the_filesystem_and_both_sizes(tmp_path, free_space):
    free_space(100 * MiB)
    target = tmp_path / "not-yet" / "x.gguf"  # its folder does not exist yet
    diskspace.ensure_space(target, 30 * MiB, "the x file")
    with pytest.raises(DiskFullError) as err:
        diskspace.ensure_space(target, 3 * 2**30, "the x file")
    message = str(err.value)
    assert message.startswith(f"no space left on {diskspace.mount_point(tmp_path)}")
    assert f"for the x file ({target}): needed ~3.0 GiB, free 100 MiB" in message, message
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)


def test_the_file_being_replaced_is_pointed_out(tmp_path, free_space):
    old = tmp_path / "m.gguf"
    old.write_bytes(b"x" * MiB)
    free_space(10 * MiB)
    with pytest.raises(DiskFullError, match=r"the existing m.gguf \(1 MiB\) is replaced only once the new file is "
                                            r"complete, so delete it first"):
        diskspace.ensure_space(old, 500 * MiB)


# ----------------------------------------------------------------------------- text export
def test_text_export_refused_before_writing_when_the_disk_is_too_small(tiny_checkpoint, tmp_path, free_space):
    free_space(40 * MiB)  # the tiny text GGUF is ~34 MiB: too little once the reserve is kept
    out = tmp_path / "models" / "t-F16.gguf"
    plan = text.plan_text(tiny_checkpoint)
    with pytest.raises(DiskFullError, match=rf"for the text GGUF \({out}\): needed ~{plan.nbytes / MiB:.0f} MiB, "
                                            r"free 40 MiB"):
        text.write_text_gguf(tiny_checkpoint, out, plan=plan)
    assert not out.parent.exists()


def test_enospc_from_the_text_writer_is_reported_as_a_full_disk(tiny_checkpoint, tmp_path, monkeypatch):
    def full(self, fout):
        fout.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(text._StreamedTensor, "tofile", full)
    out = tmp_path / "t-F16.gguf"
    with pytest.raises(DiskFullError) as err:
        text.write_text_gguf(tiny_checkpoint, out)
    assert f"for the text GGUF ({out}): needed ~" in str(err.value)
    assert "the write stopped with OSError: [Errno 28]" in str(err.value)
    assert not out.exists()
    _nothing_left(tmp_path)


def test_numpys_short_write_is_a_full_disk_only_when_the_disk_is_full(tiny_checkpoint, tmp_path, monkeypatch,
                                                                       free_space):
    """numpy's tofile says "N requested and M written" with no errno: the free space decides."""
    def short(self, fout):
        raise OSError("8388608 requested and 7776704 written")

    monkeypatch.setattr(text._StreamedTensor, "tofile", short)
    out = tmp_path / "t-F16.gguf"
    plan = text.plan_text(tiny_checkpoint)
    state = {"writing": False}
    # Room for the check before writing, none once the write has started.
    real_open = text.open_checked

    def opened(manifest):
        state["writing"] = True
        return real_open(manifest)

    monkeypatch.setattr(text, "open_checked", opened)
    free_space(lambda: 0 if state["writing"] else 2**40)
    with pytest.raises(DiskFullError, match="the write stopped with OSError: 8388608 requested and 7776704 written"):
        text.write_text_gguf(tiny_checkpoint, out, plan=plan)
    _nothing_left(tmp_path)

    free_space(2**40)  # the same words on a disk with room: some other failure, passed on as it is
    with pytest.raises(OSError) as err:
        text.write_text_gguf(tiny_checkpoint, out, plan=plan)
    assert not isinstance(err.value, DiskFullError)


# ----------------------------------------------------------------------------- vision export
def test_vision_export_refused_before_writing(tiny_checkpoint, tmp_path, free_space):
    manifest = surgery.analyze(tiny_checkpoint)
    free_space(10 * MiB)
    out = tmp_path / "mmproj-model-f16.gguf"
    with pytest.raises(DiskFullError, match=rf"for the mmproj GGUF \({out}\): needed ~\d+ MiB, free 10 MiB"):
        vision.export_mmproj(manifest, out)
    assert not out.exists()


# ----------------------------------------------------------------------------- llama-quantize
def _fake_quantize(tmp_path: Path, monkeypatch, script: str) -> Path:
    fake = tmp_path / "fake-llama" / "bin" / "llama-quantize"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(0o755)
    monkeypatch.setenv(toolchain.ENV_DIR, str(fake.parent.parent))
    return fake


def test_quantize_refused_before_the_tool_runs(local_run, tiny_text_gguf, tmp_path, monkeypatch, free_space):
    marker = tmp_path / "ran"
    _fake_quantize(tmp_path, monkeypatch, f"touch {marker}\n")
    run = local_run(quantize={"types": ["Q4_K_M"]})
    run.record("text_gguf", tiny_text_gguf)
    need = quantize.estimated_size(tiny_text_gguf, "Q4_K_M")
    assert 0.25 * tiny_text_gguf.stat().st_size < need < 0.45 * tiny_text_gguf.stat().st_size  # 4.9 of 16 bits
    free_space(need)  # the file alone would fit, not with the reserve
    with pytest.raises(DiskFullError, match=r"for the Q4_K_M file .*llava-tiny-Q4_K_M.gguf\): needed ~\d+ MiB"):
        quantize.run_quantize(run)
    assert not marker.exists() and "quantized" not in run.artifacts()


def test_llama_quantize_iostream_error_on_a_full_disk_is_named(local_run, tiny_text_gguf, tmp_path, monkeypatch,
                                                               free_space):
    """llama-quantize's own words for a full disk: "basic_ios::clear: iostream error" (exit 1)."""
    full = tmp_path / "disk-is-full"
    _fake_quantize(tmp_path, monkeypatch, f"head -c 100000 \"$1\" > \"$2\"\ntouch {full}\n"
                   "echo 'llama_model_quantize: failed to quantize: basic_ios::clear: iostream error'\nexit 1\n")
    free_space(lambda: 0 if full.exists() else 2**40)
    run = local_run(quantize={"types": ["Q8_0"]})
    run.record("text_gguf", tiny_text_gguf)
    with pytest.raises(DiskFullError) as err:
        quantize.run_quantize(run)
    message = str(err.value)
    assert "no space left on" in message and "for the Q8_0 file" in message and "llava-tiny-Q8_0.gguf" in message
    assert "ToolFailed: llama-quantize Q8_0 exited with status 1" in message
    assert (run.dir / "logs" / "quantize-Q8_0.log").exists()
    _nothing_left(run.dir)
    assert list((run.dir / "models").iterdir()) == []


def test_llama_quantize_failure_with_room_left_is_not_called_a_full_disk(local_run, tiny_text_gguf, tmp_path,
                                                                         monkeypatch):
    _fake_quantize(tmp_path, monkeypatch, "echo 'basic_ios::clear: iostream error'\nexit 1\n")
    run = local_run(quantize={"types": ["Q8_0"]})
    run.record("text_gguf", tiny_text_gguf)
    with pytest.raises(toolchain.ToolFailed):
        quantize.run_quantize(run)


# ----------------------------------------------------------------------------- downloads
def test_synthetic_7b_refused_before_writing(write_params, monkeypatch, free_space):
    from llava_gguf.model import tiny
    from llava_gguf.steps import download

    monkeypatch.setattr(tiny, "make_tiny", lambda *a, **k: pytest.fail("must not start writing 13 GB"))
    free_space(5 * 2**30)
    run = workspace.open_run(write_params({"run": "dl-7b-small-disk", "model": {"source": "tiny",
                                                                                 "tiny": {"size": "7b"}}}))
    with pytest.raises(DiskFullError, match=r"for the synthetic checkpoint .*needed ~13\.\d GiB, free 5\.0 GiB"):
        download.run_download(run)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub answering from nothing: a listing, a cache folder, a scripted snapshot_download."""
    import types

    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    files = {"config.json": (700, None), "model-00001-of-00002.safetensors": (4 * 2**30, "a" * 64),
             "model-00002-of-00002.safetensors": (3 * 2**30, "b" * 64)}

    def model_info(self, repo_id, revision=None, files_metadata=False, **kw):
        return types.SimpleNamespace(siblings=[types.SimpleNamespace(
            rfilename=n, size=s, lfs=types.SimpleNamespace(sha256=h) if h else None) for n, (s, h) in files.items()])

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    state = {"snapshot": lambda **kw: pytest.fail("must not download")}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: state["snapshot"](**kw))
    return types.SimpleNamespace(cache=tmp_path / "hf-cache", state=state)


def test_hub_download_that_cannot_fit_is_refused_counting_what_is_there(hub, write_params, free_space):
    run = workspace.open_run(write_params({"run": "dl-hub-space", "model": {"source": "huggingface"}}))
    free_space(5 * 2**30)
    from llava_gguf.steps import download

    with pytest.raises(DiskFullError, match=r"for the download of liuhaotian/llava-v1.6-vicuna-7b .*needed ~7\.0 GiB"):
        download.run_download(run)
    # The first shard finished earlier, the second half-way: what is left fits.
    blobs = hub.cache / "models--liuhaotian--llava-v1.6-vicuna-7b" / "blobs"
    blobs.mkdir(parents=True)
    for name, size in (("a" * 64, 4 * 2**30), ("b" * 64 + ".incomplete", 2**30)):
        with open(blobs / name, "wb") as f:
            f.truncate(size)  # sparse: no real disk used
    hub.state["snapshot"] = lambda **kw: (_ for _ in ()).throw(RuntimeError("offline"))
    with pytest.raises(download.DownloadError, match="could not download"):
        download.run_download(run)


def test_full_disk_during_a_hub_download_is_not_called_offline(hub, write_params, free_space):
    from llava_gguf.steps import download

    run = workspace.open_run(write_params({"run": "dl-hub-enospc", "model": {"source": "huggingface"}}))

    def snapshot(**kw):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise RuntimeError("An error happened while trying to download") from err

    hub.state["snapshot"] = snapshot
    with pytest.raises(DiskFullError) as err:
        download.run_download(run)
    assert "for the download of liuhaotian/llava-v1.6-vicuna-7b" in str(err.value)
    assert "Without network" not in str(err.value) and "HF_HOME" in str(err.value)
