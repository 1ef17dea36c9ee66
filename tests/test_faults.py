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
from llava_gguf import download, params, surgery, text, workspace
from llava_gguf.checkpoint import Checkpoint, CheckpointError
from llava_gguf.layout import LayoutError
from llava_gguf.text import TextExportError

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
    manifest = surgery.analyze(folder)
    with surgery.open_checked(manifest) as ckpt:
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
    ("text_config", [1], "key 'text_config' is a list, not an object"),
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
