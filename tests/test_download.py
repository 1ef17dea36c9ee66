"""Step 01 offline: the hub clients are replaced only at their network calls."""
from __future__ import annotations

import importlib
import shutil
import types
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import tree_digest
from llava_gguf.steps import download
from llava_gguf.run import workspace
from llava_gguf.steps.download import DownloadError
from llava_gguf.run.workspace import sha256_file


def _hub_listing(folder: Path, corrupt: str | None = None):
    out = {}
    for f in sorted(folder.iterdir()):
        sha = sha256_file(f)
        out[f.name] = (f.stat().st_size, "0" * 64 if f.name == corrupt else sha)
    return out


@pytest.fixture
def hf_standin(monkeypatch, tiny_checkpoint, tmp_path):
    """huggingface_hub's network calls answered from a local copy of the tiny checkpoint."""
    import huggingface_hub

    calls = {}

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls["snapshot"] = (repo_id, revision, allow_patterns)
        dest = tmp_path / "hf-cache" / repo_id.replace("/", "--")
        if not dest.exists():
            shutil.copytree(tiny_checkpoint, dest)
        return str(dest)

    listing = {"corrupt": None}

    def model_info(self, repo_id, revision=None, files_metadata=False, **kw):
        files = _hub_listing(tiny_checkpoint, listing["corrupt"])
        siblings = [types.SimpleNamespace(rfilename=n, size=s, lfs=types.SimpleNamespace(sha256=h)
                                          if n.endswith(".safetensors") else None)
                    for n, (s, h) in files.items()]
        return types.SimpleNamespace(siblings=siblings)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    return types.SimpleNamespace(calls=calls, listing=listing)


def test_tiny_source_makes_and_reuses_a_checkpoint(write_params):
    run = workspace.open_run(write_params({"run": "dl-tiny", "model": {"source": "tiny"}}))
    first = download.run_download(run)
    assert first.verified and (first.path / "model.safetensors.index.json").exists()
    assert run.artifact_path("checkpoint") == first.path
    digest = tree_digest(first.path)
    second = download.run_download(run)
    assert second.path == first.path and tree_digest(second.path) == digest


def test_local_source_is_used_in_place_and_untouched(local_run, tiny_checkpoint):
    before = tree_digest(tiny_checkpoint)
    result = download.run_download(local_run())
    assert result.path == tiny_checkpoint and result.verified
    assert set(result.files["file"]) >= {"config.json", "model.safetensors.index.json",
                                          "model-00001-of-00002.safetensors"}
    assert tree_digest(tiny_checkpoint) == before


def test_huggingface_snapshot_is_checked_against_hub_sha256(hf_standin, write_params):
    run = workspace.open_run(write_params({"run": "dl-hf", "model": {
        "source": "huggingface", "repo": "liuhaotian/llava-v1.6-vicuna-7b", "revision": "main"}}))
    result = download.run_download(run)
    assert hf_standin.calls["snapshot"][:2] == ("liuhaotian/llava-v1.6-vicuna-7b", "main")
    assert "*.safetensors" in hf_standin.calls["snapshot"][2]
    shards = result.files[result.files.file.str.endswith(".safetensors")]
    assert len(shards) == 2 and shards.sha256_checked.all() and result.verified


def test_sha256_mismatch_names_the_file(hf_standin, write_params):
    hf_standin.listing["corrupt"] = "model-00002-of-00002.safetensors"
    run = workspace.open_run(write_params({"run": "dl-hf-bad", "model": {"source": "huggingface"}}))
    with pytest.raises(DownloadError, match="model-00002-of-00002.safetensors: sha256 differs"):
        download.run_download(run)
    assert "checkpoint" not in run.artifacts()


def test_no_network_names_the_params_keys_for_a_local_copy(monkeypatch, write_params):
    import huggingface_hub

    def offline(*a, **kw):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    path = write_params({"run": "dl-off", "model": {"source": "huggingface"}})
    with pytest.raises(DownloadError) as err:
        download.run_download(workspace.open_run(path))
    msg = str(err.value)
    assert "model.source: local" in msg and "model.path" in msg and str(path) in msg


def test_modelscope_gguf_prebuilt(monkeypatch, tmp_path, write_params):
    repo = tmp_path / "ms" / "radxa"
    repo.mkdir(parents=True)
    for name, ftype in (("llava-v1.6-vicuna-7B-Q5_K_M.gguf", gguf.LlamaFileType.MOSTLY_Q5_K_M),
                        ("mmproj-model-f16.gguf", gguf.LlamaFileType.MOSTLY_F16)):
        w = gguf.GGUFWriter(repo / name, "clip" if name.startswith("mmproj") else "llama")
        w.add_file_type(ftype)
        w.add_tensor("t", np.zeros(4, dtype=np.float32))
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    seen = {}

    def snapshot_download(model_id=None, revision=None, allow_patterns=None, **kw):
        seen["patterns"] = allow_patterns
        return str(repo)

    ms = importlib.import_module("modelscope.hub.snapshot_download")
    monkeypatch.setattr(ms, "snapshot_download", snapshot_download)
    from modelscope.hub.api import HubApi

    monkeypatch.setattr(HubApi, "get_model_files", lambda self, *a, **kw: [
        {"Path": f.name, "Size": f.stat().st_size, "Sha256": sha256_file(f), "Type": "blob"} for f in repo.iterdir()])
    run = workspace.open_run(write_params({"run": "dl-ms", "model": {
        "source": "modelscope", "repo": "radxa/llava-v1.6-vicuna-7b-gguf", "format": "gguf",
        "text_file": "llava-v1.6-vicuna-7B-Q5_K_M.gguf", "mmproj_file": "mmproj-model-f16.gguf"}}))
    result = download.run_download(run)
    assert seen["patterns"] == ["llava-v1.6-vicuna-7B-Q5_K_M.gguf", "mmproj-model-f16.gguf"]
    assert result.verified and result.files.sha256_checked.all()
    arts = run.artifacts()
    assert set(arts["quantized"]) == {"Q5_K_M"} and arts["mmproj"].endswith("mmproj-model-f16.gguf")


def test_gguf_format_needs_both_file_keys(tmp_path, write_params):
    run = workspace.open_run(write_params({"run": "dl-g", "model": {
        "source": "local", "path": str(tmp_path), "format": "gguf", "text_file": "a.gguf"}}))
    with pytest.raises(DownloadError, match="model.mmproj_file"):
        download.run_download(run)


def test_missing_shard_is_reported(tiny_checkpoint, tmp_path, write_params):
    copy = tmp_path / "partial"
    shutil.copytree(tiny_checkpoint, copy)
    (copy / "model-00002-of-00002.safetensors").unlink()
    run = workspace.open_run(write_params({"run": "dl-partial", "model": {"source": "local", "path": str(copy)}}))
    with pytest.raises(DownloadError, match="model-00002-of-00002.safetensors: missing"):
        download.run_download(run)


def test_cut_off_index_names_the_file(tiny_checkpoint, tmp_path, write_params):
    copy = tmp_path / "cut"
    shutil.copytree(tiny_checkpoint, copy)
    index = copy / "model.safetensors.index.json"
    index.write_text(index.read_text()[:100])
    run = workspace.open_run(write_params({"run": "dl-cut", "model": {"source": "local", "path": str(copy)}}))
    with pytest.raises(DownloadError, match="model.safetensors.index.json: not a valid index"):
        download.run_download(run)
