"""The whole-image check: LLaVA 1.6's image embedding sequence vs llama.cpp's (patch 0002)."""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llava_gguf.reference import image_sequence
from llava_gguf.checks import image_sequence as image_sequence_check
from llava_gguf.reference import clip as clip_reference
from llava_gguf.checks import vision as vision_check
from llava_gguf.llama_cpp import toolchain
from llava_gguf.steps import download, surgery
from llava_gguf.steps import vision_export as vision
from llava_gguf.model.anyres import AnyresLayout, anyres_layout, flat_token_count, llava_image_token_count, unpad_box
from llava_gguf.reference.image_sequence import ARRANGEMENTS
from llava_gguf.model.tiny import GRID_PINPOINTS

UNPATCHED_ENV = "LLAMA_CPP_UNPATCHED_DIR"  # a build without patch 0002, as in test_vision_check


# ----------------------------------------------------------------------------- LLaVA's own code
# Verbatim from the original LLaVA (llava/mm_utils.py, llava/model/llava_arch.py), the oracle for
# the module's arithmetic: the count is taken from the shape of a real unpadded tensor.
def _llava_select_best_resolution(original_size, possible_resolutions):
    original_width, original_height = original_size
    best_fit = None
    max_effective_resolution = 0
    min_wasted_resolution = float('inf')
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
                effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (width, height)
    return best_fit


def _llava_unpad_image(tensor, original_size):
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    original_aspect_ratio = original_width / original_height
    current_aspect_ratio = current_width / current_height
    if original_aspect_ratio > current_aspect_ratio:
        scale_factor = current_width / original_width
        new_height = int(original_height * scale_factor)
        padding = (current_height - new_height) // 2
        unpadded_tensor = tensor[:, padding:current_height - padding, :]
    else:
        scale_factor = current_height / original_height
        new_width = int(original_width * scale_factor)
        padding = (current_width - new_width) // 2
        unpadded_tensor = tensor[:, :, padding:current_width - padding]
    return unpadded_tensor


def _llava_count(width, height, pinpoints=GRID_PINPOINTS, image_size=336, patch=14):
    side = image_size // patch
    w, h = _llava_select_best_resolution((width, height), pinpoints)
    feature = torch.zeros(1, (h // image_size) * side, (w // image_size) * side)
    unpadded = _llava_unpad_image(feature, (width, height))
    return side * side + unpadded.shape[1] * (unpadded.shape[2] + 1)


# Sizes no other test uses: odd, extreme aspect ratios, exact pinpoint sizes, tiny images.
ODD_SIZES = [(1, 1), (13, 997), (997, 13), (335, 337), (337, 335), (336, 672), (672, 336), (1007, 335),
             (1009, 1009), (4032, 3024), (3024, 4032), (777, 555), (101, 303), (2000, 600), (457, 1371)]


@pytest.mark.parametrize("size", ODD_SIZES)
def test_token_count_is_llavas(size):
    assert llava_image_token_count(*size, GRID_PINPOINTS) == _llava_count(*size)


def test_token_count_of_the_seed_image():
    # tools/mtmd/test-1.jpeg: 2x2 grid, 36 rows of 48 after unpad: 576 + 36 * (48 + 1).
    lay = anyres_layout(640, 488, GRID_PINPOINTS)
    assert lay.grid == (2, 2) and lay.box == (0, 6, 48, 36)
    assert lay.n_tokens() == 576 + 36 * 49 == 2340
    assert flat_token_count(640, 488, GRID_PINPOINTS) == 2880
    assert flat_token_count(300, 200, GRID_PINPOINTS) == 576  # no tiles when it fits in one


def test_token_count_with_other_pinpoints_and_tile_sizes():
    pins = [[448, 448], [896, 448], [448, 896], [1344, 448]]
    for size in [(1000, 400), (400, 1000), (100, 100), (1500, 480)]:
        assert llava_image_token_count(*size, pins, patch=14, image_size=448) == \
            _llava_count(*size, pinpoints=pins, image_size=448)


# ----------------------------------------------------------------------------- the reference
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    return image_sequence_check.sample_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, images) -> dict[str, image_sequence.ReferenceSequence]:
    with clip_reference.ReferenceModel(tiny_checkpoint) as ref:
        return {name: image_sequence.reference_sequence(ref, path) for name, path in images.items()}


def test_test_images_pick_different_grids(images, reference):
    sizes = {name: Image.open(p).size for name, p in images.items()}
    assert sizes["test-1"] == (640, 488)
    assert max(sizes["small"]) < 336
    grids = {name: r.layout.grid for name, r in reference.items()}
    assert grids == {"test-1": (2, 2), "wide": (2, 1), "tall": (1, 2), "small": (1, 2)}
    for name, r in reference.items():
        assert r.sequence().shape == (r.layout.n_tokens(), 256)
        assert r.layout.n_tokens() == _llava_count(*sizes[name])


def test_reference_views_are_llavas_preprocessing(images):
    img = Image.open(images["wide"]).convert("RGB")  # 640x200 -> pinpoint 672x336
    lay = anyres_layout(*img.size, GRID_PINPOINTS)
    views = image_sequence.anyres_views(img, lay)
    assert [v.size for v in views] == [(336, 336)] * 3
    # Resized to 672x210 (ceil), centred on black: rows 0..62 and 273..335 of each tile are black.
    tile = torch.from_numpy(np.array(views[1])).float()
    assert tile[:63].abs().max() == 0 and tile[273:].abs().max() == 0 and tile[63:273].mean() > 10
    # The overview is squashed, not padded: no black band.
    ov = torch.from_numpy(np.array(views[0])).float()
    assert ov[:20].mean() > 10 and ov[-20:].mean() > 10


def test_reference_sequence_is_built_from_the_views(tiny_checkpoint, reference):
    r = reference["test-1"]
    lay = r.layout
    seq = r.sequence()
    assert torch.equal(seq[:576], r.overview)
    # First kept grid row is feature row 6 of the merged grid: tile 0 then tile 1, then the newline.
    row = seq[576:576 + 49]
    assert torch.equal(row[:24], r.tiles[0][6 * 24:7 * 24]) and torch.equal(row[24:48], r.tiles[1][6 * 24:7 * 24])
    assert torch.equal(row[48], r.newline)
    # Last kept row: feature row 41 = row 17 of tiles 2 and 3.
    last = seq[-49:]
    assert torch.equal(last[:24], r.tiles[2][17 * 24:18 * 24]) and torch.equal(last[48], r.newline)
    assert lay.box == (0, 6, 48, 36)


def test_llava_15_checkpoint_is_refused_clearly(tiny_variant, images):
    with clip_reference.ReferenceModel(tiny_variant(variant="1.5")) as ref:
        with pytest.raises(clip_reference.VisionCheckError, match="LLaVA 1.6 only"):
            image_sequence.reference_sequence(ref, images["small"])


# ----------------------------------------------------------------------------- wrong arrangements
@pytest.mark.parametrize("name", ["test-1", "wide", "tall", "small"])
def test_every_wrong_arrangement_fails_loudly(reference, name):
    r = reference[name]
    ok = image_sequence_check.compare_sequence(r, r.sequence(), name)
    assert ok.ok and ok.nmse == 0 and ok.arrangement == "llava"
    for wrong in ARRANGEMENTS:
        if wrong == "llava" or (wrong == "wrong_grid" and 1 in r.layout.grid):
            continue  # a one-row/one-column grid reads the same either way
        res = image_sequence_check.compare_sequence(r, r.sequence(wrong), name)
        assert res.status == "failed" and not res.ok, wrong
        assert "LLaVA 1.6" in res.message or "arranged as" in res.message
        if res.n_tokens == res.n_tokens_llava:
            assert res.nmse > 1e-2 and res.arrangement == wrong, (wrong, res.nmse)
            assert repr(wrong) in res.message
        else:
            assert res.arrangement in (wrong, None) or r.layout.n_tokens(res.arrangement) == res.n_tokens


def test_a_wrong_grid_shape_fails(reference):
    r = reference["test-1"]  # 2x2; llama.cpp using 2x1 (the 672x336 pinpoint) instead
    other = AnyresLayout(640, 488, (672, 336), (2, 1), 24,
                                        unpad_box(48, 24, 640, 488))
    wrong = image_sequence.arrange(r.overview, r.tiles[:2], r.newline, other)
    res = image_sequence_check.compare_sequence(r, wrong, "test-1")
    assert res.status == "failed" and res.n_tokens != res.n_tokens_llava


def test_small_differences_pass_and_large_ones_fail(reference):
    r = reference["test-1"]
    seq = r.sequence()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(seq.shape, generator=g) * seq.std()
    assert image_sequence_check.compare_sequence(r, seq + 1e-3 * noise).ok
    bad = image_sequence_check.compare_sequence(r, seq + 0.3 * noise)
    assert bad.status == "failed" and bad.arrangement == "llava" and "disagrees" in bad.message


# ----------------------------------------------------------------------------- with llama.cpp
@pytest.fixture(scope="module")
def mmproj(tiny_checkpoint, tmp_path_factory) -> Path:
    manifest = surgery.analyze(tiny_checkpoint)
    return vision.export_mmproj(manifest, tmp_path_factory.mktemp("mmproj") / "mmproj-model-f16.gguf").path


def _patched_tool(llama_tool) -> Path:
    tool = llama_tool(vision_check.TOOL)
    if not any("0002" in p.name for p in toolchain.patch_files()):
        pytest.skip("patch 0002 not in this checkout")
    return tool


@pytest.mark.llama_cpp
def test_patched_build_gives_llavas_sequence(tiny_checkpoint, mmproj, images, llama_tool, tmp_path):
    tool = _patched_tool(llama_tool)
    checks = image_sequence_check.check_image_sequence(tiny_checkpoint, mmproj, images, tool=tool, workdir=tmp_path)
    report = image_sequence_check.ImageSequenceReport(checks)
    assert report.ok, report.message
    table = report.table()
    assert table.loc["test-1", "tokens (llama.cpp)"] == table.loc["test-1", "tokens (LLaVA 1.6)"] == 2340
    assert (table["arrangement"] == "llava").all()
    assert (table["newline max |diff|"] == 0).all()  # the newline is copied, not computed


@pytest.mark.llama_cpp
def test_llama_cpp_token_count_is_llavas_on_unseen_sizes(tiny_checkpoint, mmproj, llama_tool, tmp_path):
    tool = _patched_tool(llama_tool)
    rng = torch.Generator().manual_seed(1)
    # 553x1107 and 13x78: sizes where float arithmetic (the pinned llama.cpp) picks another grid or
    # resizes 1 px differently from LLaVA's Python doubles.
    for w, h in [(1003, 297), (97, 401), (517, 517), (1400, 350), (553, 1107), (13, 78)]:
        path = tmp_path / f"noise-{w}x{h}.png"
        Image.frombytes("RGB", (w, h), torch.randint(0, 256, (w * h * 3,), generator=rng,
                                                     dtype=torch.uint8).numpy().tobytes()).save(path)
        emb = image_sequence_check.mtmd_sequence(mmproj, path, tool=tool, workdir=tmp_path)
        assert emb.shape[0] == llava_image_token_count(w, h, GRID_PINPOINTS) == _llava_count(w, h), (w, h)
        assert image_sequence_check.llava_tokens_for_image(path, mmproj) == emb.shape[0]


@pytest.mark.llama_cpp
def test_llava_15_mmproj_keeps_one_view(tiny_variant, images, llama_tool, tmp_path):
    """No spatial_unpad / image_newline: the patch changes nothing, one 576-token view as before."""
    tool = llama_tool(vision_check.TOOL)
    manifest = surgery.analyze(tiny_variant(variant="1.5"))
    mm = vision.export_mmproj(manifest, tmp_path / "mmproj-15.gguf").path
    if not any("0002" in p.name for p in toolchain.patch_files()):
        pytest.skip("patch 0002 not in this checkout")
    emb = image_sequence_check.mtmd_sequence(mm, images["test-1"], tool=tool, workdir=tmp_path)
    assert emb.shape[0] == 576
    assert image_sequence_check.llava_tokens_for_image(images["test-1"], mm) is None


# ----------------------------------------------------------------------------- unpatched builds
@pytest.fixture
def seq_run(local_run, mmproj):
    run = local_run()
    download.run_download(run)
    run.record("mmproj", mmproj)
    return run


def _fake_old_tool(tmp_path: Path) -> Path:
    """A llama-mtmd-debug without `-p sequence`, answering as the pinned one does."""
    bin_dir = tmp_path / "old-build" / "bin"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / vision_check.TOOL
    fake.write_text("#!/bin/sh\necho 'ERR: Invalid mode specified with -p' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return tmp_path / "old-build"


def test_build_without_sequence_mode_reports_flat(seq_run, tmp_path, monkeypatch):
    monkeypatch.setenv(toolchain.ENV_DIR, str(_fake_old_tool(tmp_path)))
    report = image_sequence_check.verify_image_sequence(seq_run)
    assert not report.ok and report.export_ok  # the build's fault, said loudly, not the GGUF's
    table = report.table()
    assert set(table["status"]) == {"failed"} and set(table["arrangement"]) == {"flat_tiles_first"}
    assert table.loc["test-1", "tokens (llama.cpp)"] == 2880 and table.loc["test-1", "tokens (LLaVA 1.6)"] == 2340
    assert table.loc["small", "tokens (llama.cpp)"] == 576
    assert "without patch 0002" in report.message and "make llama-cpp" in report.message
    recorded = seq_run.artifacts()["image_sequence_check"]
    assert json.loads(seq_run.resolve(recorded["wide"]).read_text())["arrangement"] == "flat_tiles_first"


@pytest.mark.llama_cpp
@pytest.mark.skipif(not os.environ.get(UNPATCHED_ENV), reason=f"{UNPATCHED_ENV} (a build without 0002) not set")
def test_real_unpatched_build_reports_flat(tiny_checkpoint, mmproj, images, tmp_path, monkeypatch):
    monkeypatch.setenv(toolchain.ENV_DIR, os.environ[UNPATCHED_ENV])
    checks = image_sequence_check.check_image_sequence(tiny_checkpoint, mmproj, images, workdir=tmp_path)
    assert all(c.status == "failed" and c.arrangement == "flat_tiles_first" for c in checks)


def test_llava_15_checkpoint_is_skipped_not_failed(tiny_variant, images, tmp_path):
    fake = _fake_old_tool(tmp_path) / "bin" / vision_check.TOOL
    ckpt = tiny_variant(variant="1.5")
    mm = vision.export_mmproj(surgery.analyze(ckpt), tmp_path / "mmproj-15.gguf").path
    checks = image_sequence_check.check_image_sequence(ckpt, mm, images, tool=fake)
    report = image_sequence_check.ImageSequenceReport(checks)
    assert {c.status for c in checks} == {"skipped"} and report.export_ok and not report.ok
    # The reason names what the written mmproj holds, as llama.cpp will read it.
    meta = vision.read_metadata(mm)
    assert "clip.vision.image_grid_pinpoints" not in meta and meta["clip.vision.mm_patch_merge_type"] == "flat"
    assert "not LLaVA 1.6 (mmproj-15.gguf holds clip.vision.mm_patch_merge_type 'flat' and 0 grid pinpoints" \
        in report.message


def test_missing_tool_is_skipped(seq_run, tmp_path, monkeypatch):
    monkeypatch.setenv(toolchain.ENV_DIR, str(tmp_path / "empty"))
    report = image_sequence_check.verify_image_sequence(seq_run)
    assert not report.ok and set(report.table()["status"]) == {"skipped"}


def test_verify_false_skips(local_run):
    report = image_sequence_check.verify_image_sequence(local_run(convert={"verify": False}))
    assert not report.ok and "convert.verify" in report.message


# ----------------------------------------------------------------------------- evaluate helpers
def test_arrangement_from_count(mmproj, images):
    assert image_sequence_check.llava_tokens_for_image(images["test-1"], mmproj) == 2340
    assert image_sequence_check.arrangement_from_count(2340, images["test-1"], mmproj).startswith("llava 1.6")
    assert image_sequence_check.arrangement_from_count(2880, images["test-1"], mmproj).startswith("flat")
    assert image_sequence_check.arrangement_from_count(576, images["small"], mmproj).startswith("flat")
    assert image_sequence_check.arrangement_from_count(None, images["small"], mmproj) is None
    assert math.isfinite(image_sequence.NMSE_TOL)
