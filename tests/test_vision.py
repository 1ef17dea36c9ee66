"""Step 03: the mmproj GGUF, compared with what llama.cpp's legacy recipe writes for the same checkpoint.

The legacy recipe (llava_surgery_v2.py + convert_image_encoder_to_gguf.py) runs in the venv that
`legacy.legacy_env()` makes once (session fixture). Every metadata key (with its GGUF type) and
every tensor (name, type, shape, bytes) must be equal; no difference is allowed.
"""
from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import pytest
from gguf import GGUFReader

from conftest import tree_digest
from llava_gguf.llama_cpp import legacy, toolchain
from llava_gguf.steps import surgery, text_export as text, vision_export as vision
from llava_gguf.run import workspace
from llava_gguf.model.manifest import ManifestError
from llava_gguf.model.layout import place
from llava_gguf.model.tiny import SIZES, llava_config, synthetic_tensors

# Metadata that may differ between our file and the legacy script's: none.
ALLOWED_DIFFERENCES: set[str] = set()


@pytest.fixture(scope="session")
def legacy_python() -> Path:
    return legacy.legacy_env()


@pytest.fixture(scope="session")
def legacy_surgeries(tmp_path_factory, legacy_python):
    """legacy_surgeries(ckpt) -> LegacySurgery, run once per checkpoint."""
    done = {}

    def _get(ckpt: Path):
        if ckpt not in done:
            done[ckpt] = legacy.legacy_surgery(ckpt, tmp_path_factory.mktemp("legacy"))
        return done[ckpt]
    return _get


def _run(folder: Path, write_params, name: str, **convert):
    run = workspace.open_run(write_params({"run": name, "model": {"source": "local", "path": str(folder)},
                                           "convert": {"verify": False, **convert}}, name=f"{name}.yaml"))
    run.record("checkpoint", folder)
    return run


def gguf_contents(path: Path) -> tuple[dict, dict]:
    """(key -> (value types, value), tensor name -> (type, shape, bytes)) of a GGUF file."""
    reader = GGUFReader(str(path))
    kv = {name: (tuple(int(t) for t in f.types), f.contents()) for name, f in reader.fields.items()
          if not name.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), t.data.tobytes()) for t in reader.tensors}
    return kv, tensors


def assert_equivalent(ours: Path, theirs: Path) -> None:
    kv_a, t_a = gguf_contents(ours)
    kv_b, t_b = gguf_contents(theirs)
    keys = (set(kv_a) | set(kv_b)) - ALLOWED_DIFFERENCES
    assert sorted(k for k in keys if k not in kv_a) == [] and sorted(k for k in keys if k not in kv_b) == []
    for key in sorted(keys):
        assert kv_a[key] == kv_b[key], key
    assert sorted(t_a) == sorted(t_b)
    for name in t_a:
        assert t_a[name][:2] == t_b[name][:2], name
        assert t_a[name][2] == t_b[name][2], f"{name}: values differ"


CASES = [("safetensors", 2, "1.6", "f16"), ("safetensors", 2, "1.6", "f32"), ("bin", 3, "1.6", "f16"),
         ("safetensors", 1, "1.5", "f16"), ("bin", 1, "1.5", "f16")]


@pytest.mark.parametrize("fmt,shards,variant,outtype", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_mmproj_equals_legacy_recipe(fmt, shards, variant, outtype, tiny_variant, legacy_surgeries, tmp_path,
                                     write_params):
    ckpt = tiny_variant(fmt, shards, variant)
    before = tree_digest(ckpt)
    run = _run(ckpt, write_params, f"vision-{fmt}-{shards}-{variant}-{outtype}", mmproj_outtype=outtype)
    surgery.run_surgery(run)
    result = vision.run_vision(run)

    assert result.path == run.dir / "models" / f"mmproj-model-{outtype}.gguf"
    assert run.artifact_path("mmproj") == result.path
    layers = SIZES["tiny"].v_layers - 1  # select layer -2: the last layer is dropped
    assert result.n_tensors == 4 + (variant == "1.6") + 5 + 16 * layers == len(result.table())
    assert result.size_bytes == result.path.stat().st_size

    reference = legacy.legacy_vision_export(legacy_surgeries(ckpt).model_dir, tmp_path / "legacy", outtype)
    assert_equivalent(result.path, reference)
    assert tree_digest(ckpt) == before

    kv, tensors = gguf_contents(result.path)
    assert kv["clip.vision.block_count"][1] == layers and kv["clip.use_gelu"][1] is False
    assert kv["general.file_type"][1] == {"f16": 1, "f32": 0}[outtype]
    assert ("clip.vision.image_grid_pinpoints" in kv) == (variant == "1.6")
    assert tensors["v.blk.0.ffn_down.weight"][1] == (128, 256)  # fc1: hidden -> intermediate, ggml order
    assert "v.post_ln.weight" not in tensors and f"v.blk.{layers}.ln1.weight" not in tensors
    assert tensors["v.patch_embd.weight"][0] == "F16" and tensors["mm.0.weight"][0] == "F16"
    assert tensors["v.blk.0.attn_q.weight"][0] == outtype.upper()


# What the recipe's config_vit.json (cmp-nct/llava-1.6-gguf) says, for every key that reaches the GGUF.
# Written out here, independently of vision.py, because the legacy run on tiny checkpoints gets its
# config from config_vit.config_vit too. 24 layers: the script drops the last, giving 23 (378 tensors).
CONFIG_VIT_7B = {
    "_name_or_path": "vit-large336-custom", "hidden_act": "quick_gelu", "hidden_size": 1024, "image_size": 336,
    "intermediate_size": 4096, "layer_norm_eps": 1e-05, "num_attention_heads": 16, "num_hidden_layers": 24,
    "patch_size": 14, "projection_dim": 768, "image_aspect_ratio": "anyres", "image_crop_resolution": 224,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_split_resolution": 224, "mm_patch_merge_type": "spatial_unpad", "mm_projector_type": "mlp2x_gelu",
}


def test_7b_shapes_give_378_tensors_of_595_mib():
    """The real LLaVA 1.6 Vicuna 7B, planned from its shapes (nothing is read)."""
    s = SIZES["7b"]
    tensors = {}
    for name, shape in synthetic_tensors(s):
        p = place(name, "llava")
        tensors[name] = {"shard": "-", "dtype": "BF16", "shape": list(shape), "part": p.part, "canonical": p.canonical}
    manifest = {"source": "7b", "config": llava_config(s), "tensors": tensors}
    vcfg, plan = vision.plan_mmproj(manifest, "f16")
    assert {k: vcfg.get(k) for k in CONFIG_VIT_7B} == CONFIG_VIT_7B
    assert len(plan) == 378
    assert 590 < sum(t.nbytes for t in plan) / 2**20 < 600
    meta = {k: v for k, _, v in vision.metadata(vcfg)}
    assert meta["clip.vision.block_count"] == 23 and meta["clip.vision.attention.head_count"] == 16
    assert (meta["clip.vision.embedding_length"], meta["clip.vision.feed_forward_length"]) == (1024, 4096)
    assert (meta["clip.vision.image_size"], meta["clip.vision.patch_size"]) == (336, 14)
    assert meta["clip.vision.image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert meta["clip.vision.image_std"] == [0.26862954, 0.26130258, 0.27577711]
    assert meta["clip.use_gelu"] is False and meta["general.name"] == "vit-large336-custom"
    assert sum(t.dtype == "float16" for t in plan) == 2 + 2 + 6 * 23  # mm.{0,2}, patch+pos embd, 6 per layer


@pytest.mark.parametrize("change,words", [
    (lambda m: m["config"].update(mm_vision_select_feature="cls_patch"), "mm_vision_select_feature"),
    (lambda m: m["config"].update(mm_vision_select_layer=-9), "mm_vision_select_layer"),
    (lambda m: m["config"].update(mm_hidden_size=1024), "mm_hidden_size"),
    (lambda m: m["tensors"].pop("model.image_newline"), "image_newline"),
    (lambda m: m["tensors"].pop("model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias"),
     "layers.1.mlp.fc2.bias"),
    (lambda m: m["tensors"]["model.mm_projector.0.weight"].update(shape=[256, 64]), "mm_projector.0"),
], ids=["select-feature", "select-layer", "mm-hidden-size", "no-newline", "missing-layer-tensor", "projector-width"])
def test_bad_vision_inputs_are_refused_before_writing(change, words, tiny_checkpoint, tmp_path):
    manifest = copy.deepcopy(surgery.analyze(tiny_checkpoint))
    change(manifest)
    out = tmp_path / "mmproj-model-f16.gguf"
    with pytest.raises(vision.VisionExportError, match=re.escape(words)):
        vision.export_mmproj(manifest, out)
    assert list(tmp_path.iterdir()) == []


def test_changed_checkpoint_needs_a_new_surgery(tiny_checkpoint, tmp_path):
    manifest = copy.deepcopy(surgery.analyze(tiny_checkpoint))
    manifest["tensors"]["model.mm_projector.2.bias"]["shard"] = "model-00001-of-00002.safetensors"
    with pytest.raises(ManifestError, match="rerun `make surgery`"):
        vision.export_mmproj(manifest, tmp_path / "mmproj-model-f16.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.llama_cpp
def test_mtmd_cli_turns_the_test_image_into_llavas_2340_tokens(llama_tool, tiny_checkpoint, tmp_path, write_params):
    cli = llama_tool("llama-mtmd-cli")
    run = _run(tiny_checkpoint, write_params, "vision-mtmd")
    surgery.run_surgery(run)
    mmproj = vision.run_vision(run).path
    text_gguf = text.run_text(run).path
    cmd = [str(cli), "-m", str(text_gguf), "--mmproj", str(mmproj), "--image",
           str(toolchain.source_asset("tools/mtmd/test-1.jpeg")), "-p", "Describe the image.", "-n", "1",
           "--temp", "0", "-c", "4096", "-t", "2", "--chat-template", "vicuna", "-v"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    (tmp_path / "mtmd-cli.log").write_text(out)
    assert proc.returncode == 0, out[-3000:]
    # -v prints one "output embedding shape [n_embd, n_tokens, 1]" per encoded slice (overview + 2x2 grid).
    slices = [int(n) for n in re.findall(r"output embedding shape \[\d+, (\d+), 1\]", out)]
    decoded = sum(int(n) for n in re.findall(r"decoding image batch \d+/\d+, n_tokens_batch = (\d+)", out))
    assert slices == [576] * 5, out[-3000:]
    # Patch 0002: LLaVA 1.6's sequence, overview + 36 unpadded rows of 48 + image_newline (not 5 x 576).
    assert decoded == 2340
