"""Bad inputs and faults (issue 12, "Found"): each refusal names the file or key and gives the right fix.

Every bad input is a copy of the tiny checkpoint (or a params file) with one defect. The source is
never modified, and the error is one of the project's own classes, never a bare KeyError,
AttributeError or UnicodeDecodeError from deep inside a parser.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from conftest import tree_digest
from llava_gguf.model import manifest
from llava_gguf.run import params, workspace
from llava_gguf.steps import download, surgery
from llava_gguf.steps import text_export as text
from llava_gguf.model.checkpoint import Checkpoint, CheckpointError
from llava_gguf.model.layout import LayoutError
from llava_gguf.model.text_model import TextExportError

SHARD1 = "model-00001-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _edit_header(shard: Path, change) -> None:
    """Rewrite a safetensors header in place (same length, space padded), tensor data untouched."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header = change(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n, "the edit must not grow the header"
    shard.write_bytes(raw[:8] + new + b" " * (n - len(new)) + raw[8 + n:])


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _set_entry(key, value):
    def change(h):
        entry = h[_first_tensor(h)]
        if value is None:
            entry.pop(key)
        else:
            entry[key] = value
        return h
    return change


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def _open_and_read_all(folder: Path) -> None:
    """What the steps do with a checkpoint: headers, the split, every tensor."""
    found = surgery.analyze(folder)
    with manifest.open_checked(found) as ckpt:
        for info in ckpt:
            ckpt.load(info.name)


# ----------------------------------------------------------------------------- 6: errors naming the file
HEADER_DEFECTS = {
    "no data_offsets": (_set_entry("data_offsets", None), "has no 'data_offsets'"),
    "no dtype": (_set_entry("dtype", None), "has no 'dtype'"),
    "unknown dtype": (_set_entry("dtype", "X9"), "dtype 'X9'"),
    "shape not a list": (_set_entry("shape", "ab"), "shape 'ab'"),
    "offsets out of order": (_set_entry("data_offsets", [8, 4]), "data_offsets [8, 4]"),
    "offsets too short for the shape": (_set_entry("data_offsets", [0, 3]), "spans 3 bytes"),
    "entry not an object": (lambda h: {**h, _first_tensor(h): 5}, "has a JSON number"),
    "header a list": (lambda h: [1], "a JSON list"),
}


@pytest.mark.parametrize("defect", list(HEADER_DEFECTS))
def test_corrupt_safetensors_header_names_the_shard(defect, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "ckpt")
    change, words = HEADER_DEFECTS[defect]
    _edit_header(folder / SHARD1, change)
    before = tree_digest(folder)
    with pytest.raises(CheckpointError) as err:
        _open_and_read_all(folder)
    message = str(err.value)
    assert f"{folder / SHARD1}: corrupt safetensors header" in message and words in message, message
    assert "re-download it" in message
    assert tree_digest(folder) == before


def test_data_safetensors_rejects_is_named_when_the_header_is_read(tiny_checkpoint, tmp_path):
    # Two tensors sharing bytes: each entry is plausible alone, safetensors refuses the file.
    folder = _copy(tiny_checkpoint, tmp_path / "ckpt")

    def overlap(h):
        names = [k for k in h if k != "__metadata__"]
        same = {}
        for n in names:
            same.setdefault((h[n]["dtype"], tuple(h[n]["shape"])), []).append(n)
        a, b = next(v for v in same.values() if len(v) > 1)[:2]
        h[b]["data_offsets"] = list(h[a]["data_offsets"])
        return h
    _edit_header(folder / SHARD1, overlap)
    with pytest.raises(CheckpointError, match=rf"{SHARD1}: safetensors cannot read it"):
        Checkpoint.open(folder)


@pytest.mark.parametrize("content, words", [
    (b"[1, 2]", "expected a JSON object of keys (the model's config.json), got a list"),
    (b'"a string"', "got a string"),
    (b"\x80\x81" + bytes(range(256)), "is not a text file (byte 0x80 at offset 0 is not UTF-8)"),
    (b'{"hidden_size": ', "is not valid JSON"),
])
def test_config_json_that_is_not_a_mapping_names_the_file(content, words, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "ckpt")
    (folder / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        surgery.analyze(folder)
    assert f"{folder / 'config.json'}:" in str(err.value) and words in str(err.value), str(err.value)


@pytest.mark.parametrize("change, words", [
    (lambda j: {**j, "weight_map": list(j["weight_map"])}, "not a valid index"),
    (lambda j: {**j, "weight_map": {**j["weight_map"], "model.norm.weight": None}}, "'model.norm.weight': None"),
    (lambda j: {**j, "weight_map": {**j["weight_map"], "model.norm.weight": "../x.safetensors"}},
     "do not name a shard file"),
    (lambda j: [j], "not a valid index"),
])
def test_index_that_is_not_a_weight_map_names_the_file(change, words, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "ckpt")
    index = folder / INDEX
    index.write_text(json.dumps(change(json.loads(index.read_text()))))
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(folder)
    assert f"{index}:" in str(err.value) and words in str(err.value), str(err.value)


def test_index_of_random_bytes_names_the_file(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "ckpt")
    (folder / INDEX).write_bytes(b"\xff\xfe" + os.urandom(64))
    with pytest.raises(CheckpointError, match=rf"{INDEX}: not a valid index: it is not a text file"):
        Checkpoint.open(folder)


@pytest.mark.parametrize("key, value, words", [
    ("hidden_size", "abc", "key 'hidden_size' is 'abc', not a whole number"),
    ("num_hidden_layers", [2], "key 'num_hidden_layers' is [2], not a whole number"),
    ("rms_norm_eps", "small", "key 'rms_norm_eps' is 'small', not a number"),
    ("text_config", [1], "text_config is list, not an object"),
    ("rope_scaling", "linear", "rope_scaling"),
])
def test_config_values_of_the_wrong_type_name_the_key(key, value, words, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "ckpt")
    _edit_config(folder, **{key: value})
    with pytest.raises(TextExportError) as err:
        text.plan_text(folder)
    assert f"{folder / 'config.json'}" in str(err.value) and words in str(err.value), str(err.value)


@pytest.mark.parametrize("value, words", [
    (5, "key 'architectures' is 5, not a list of class names"),
    ("LlavaLlamaForCausalLM", "key 'architectures' is 'LlavaLlamaForCausalLM', not a list of class names"),
])
def test_architectures_of_the_wrong_type_name_the_key(value, words, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "ckpt")
    _edit_config(folder, architectures=value)
    with pytest.raises(LayoutError) as err:
        surgery.analyze(folder)
    assert f"{folder / 'config.json'}: {words}" in str(err.value), str(err.value)


@pytest.mark.parametrize("content, words", [
    (b"\x80" + bytes(range(255, 0, -1)), "is not a text file (byte 0x80 at offset 0 is not UTF-8)"),
    (b"run: a\n\x00\x01\x02", "not valid YAML"),
])
def test_params_file_of_random_bytes_names_the_file(content, words, tmp_path):
    path = tmp_path / "junk.yaml"
    path.write_bytes(content)
    with pytest.raises(params.ParamsError) as err:
        params.load_params(path)
    assert str(err.value).startswith(f"{path}: ") and words in str(err.value), str(err.value)


def test_params_path_that_is_a_folder_names_it(tmp_path):
    with pytest.raises(params.ParamsError, match=rf"{tmp_path}: .*a folder"):
        params.load_params(tmp_path)


# ----------------------------------------------------------------------------- 9: hints that fit the case
def test_missing_file_of_a_local_checkpoint_does_not_say_download(tiny_checkpoint, tmp_path, write_params):
    folder = _copy(tiny_checkpoint, tmp_path / "ckpt")
    (folder / "model-00002-of-00002.safetensors").unlink()
    run = workspace.open_run(write_params({"run": "local-missing", "model": {"source": "local", "path": str(folder)}}))
    with pytest.raises(download.DownloadError) as err:
        download.run_download(run)
    message = str(err.value)
    assert "model-00002-of-00002.safetensors: missing" in message
    assert "make download" not in message and "resume" not in message, message
    assert "model.path" in message and "copy" in message, message


def test_cut_off_index_of_a_local_checkpoint_does_not_say_download(tiny_checkpoint, tmp_path, write_params):
    folder = _copy(tiny_checkpoint, tmp_path / "ckpt")
    (folder / INDEX).write_text((folder / INDEX).read_text()[:100])
    run = workspace.open_run(write_params({"run": "local-cut", "model": {"source": "local", "path": str(folder)}}))
    with pytest.raises(download.DownloadError) as err:
        download.run_download(run)
    assert f"{folder / INDEX}" in str(err.value) and "make download" not in str(err.value), str(err.value)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never be printed",))


def test_pickle_refusal_does_not_quote_torchs_advice(tiny_bin_checkpoint, tmp_path, capsys):
    folder = _copy(tiny_bin_checkpoint, tmp_path / "ckpt")
    shard = folder / "pytorch_model-00003-of-00003.bin"
    state = torch.load(shard, weights_only=True)
    state["model.image_newline"] = _Payload()
    torch.save(state, shard)
    with pytest.raises(CheckpointError) as err:
        surgery.analyze(folder)
    message = str(err.value)
    assert message.startswith(f"{shard}: refused: the .bin holds objects other than tensors"), message
    assert "print" in message and "safetensors version" in message and "for safety" in message
    assert "weights_only" not in message and "trust" not in message and "\x1b[" not in message, message
    assert "this must never be printed" not in capsys.readouterr().out


def test_missing_projector_type_is_reported_as_missing(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "ckpt")
    _edit_config(folder, mm_projector_type=None)
    with pytest.raises(LayoutError) as err:
        surgery.analyze(folder)
    message = str(err.value)
    assert message.startswith(f"{folder / 'config.json'}: key 'mm_projector_type' is missing"), message
    assert "None" not in message and "mlp2x_gelu" in message


# ----------------------------------------------------------------------------- 3: FORCE and changed files
@pytest.fixture(scope="module")
def tiny_text_gguf(tiny_checkpoint, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "llava-tiny-F16.gguf"
    text.write_text_gguf(tiny_checkpoint, path)
    return path


@pytest.fixture
def counting_quantize(tmp_path, monkeypatch):
    """A stand-in llama-quantize that copies its input (quantize.types [F16]) and counts its runs."""
    from llava_gguf.llama_cpp import toolchain

    calls = tmp_path / "calls"
    fake = tmp_path / "fake-llama" / "bin" / "llama-quantize"
    fake.parent.mkdir(parents=True)
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\ncp "$1" "$2"\n')
    fake.chmod(0o755)
    monkeypatch.setenv(toolchain.ENV_DIR, str(fake.parent.parent))
    return lambda: len(calls.read_text().splitlines()) if calls.exists() else 0


def _corrupt_same_size(path: Path, keep_mtime: bool) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size - 4096)
        f.write(bytes(255 - b for b in f.read(16)))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def test_force_makes_quantized_files_again(local_run, tiny_text_gguf, counting_quantize):
    from llava_gguf.steps import quantize

    run = local_run(quantize={"types": ["F16"]})
    run.record("text_gguf", tiny_text_gguf)
    first = quantize.run_quantize(run)
    assert counting_quantize() == 1 and first.reused == []
    assert quantize.run_quantize(run).reused == ["F16"] and counting_quantize() == 1
    with workspace.forcing(True):
        forced = quantize.run_quantize(run)
    assert forced.reused == [] and counting_quantize() == 2
    assert quantize.run_quantize(run, force=True).reused == [] and counting_quantize() == 3


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["touched", "mtime-put-back"])
def test_same_size_corruption_of_a_quantized_file_is_made_again(keep_mtime, local_run, tiny_text_gguf,
                                                                 counting_quantize):
    from llava_gguf.steps import quantize

    run = local_run(quantize={"types": ["F16"]})
    run.record("text_gguf", tiny_text_gguf)
    path = quantize.run_quantize(run).quantized["F16"]
    good = stamps_sha(path)
    _corrupt_same_size(path, keep_mtime)
    assert stamps_sha(path) != good
    again = quantize.run_quantize(run)
    assert again.reused == [] and counting_quantize() == 2
    assert stamps_sha(path) == good


def stamps_sha(path: Path) -> str:
    from llava_gguf.run import stamps

    return workspace.sha256_file(path)


@pytest.mark.llama_cpp
def test_force_and_corruption_with_llama_quantize(local_run, tiny_text_gguf, llama_tool):
    """The issue's case: bytes changed inside a finished Q8_0 file, then quantize (with and without force)."""
    from llava_gguf.steps import quantize

    llama_tool("llama-quantize")
    run = local_run(quantize={"types": ["Q8_0"]})
    run.record("text_gguf", tiny_text_gguf)
    path = quantize.run_quantize(run).quantized["Q8_0"]
    good = stamps_sha(path)
    _corrupt_same_size(path, keep_mtime=True)
    assert quantize.run_quantize(run).reused == [] and stamps_sha(path) == good
    assert quantize.run_quantize(run).reused == ["Q8_0"]
    mtime = path.stat().st_mtime_ns
    with workspace.forcing(True):
        assert quantize.run_quantize(run).reused == []
    assert path.stat().st_mtime_ns != mtime and stamps_sha(path) == good


def test_force_reaches_the_steps_notebook(tmp_path, monkeypatch, write_params):
    """`make <step> FORCE=1` -> run_steps(force=True): the step's kernel sees workspace.forced()."""
    import nbformat
    from nbformat import v4

    from llava_gguf.pipeline import runner as pipeline
    from llava_gguf.run import registry

    folder = tmp_path / "notebooks"
    folder.mkdir()
    nb = v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata[registry.METADATA_KEY] = {"step": "probe", "needs": [], "products": ["thing"], "params": ["model"]}
    cell = v4.new_code_cell("params_file = None\nparams = None")
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, v4.new_code_cell("from llava_gguf.run import workspace\n"
                                       "run = workspace.open_run(params_file, params)\n"
                                       "run.record('thing', {'forced': workspace.forced()})")]
    nbformat.write(nb, folder / "96_probe.ipynb")
    monkeypatch.setenv(registry.NOTEBOOKS_ENV, str(folder))
    monkeypatch.setenv(workspace.FORCE_ENV, "1")  # a stale value in the caller's environment is not used
    run = workspace.open_run(write_params({"run": "force-probe", "model": {"source": "tiny"}}))
    assert pipeline.run_steps(run, ["probe"]) == [("probe", "ran")]
    assert run.artifacts()["thing"] == {"forced": False}
    assert pipeline.run_steps(run, ["probe"], force=True) == [("probe", "ran")]
    assert run.artifacts()["thing"] == {"forced": True}
    assert os.environ[workspace.FORCE_ENV] == "1"
