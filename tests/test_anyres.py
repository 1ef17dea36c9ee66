"""The anyres rule (`anyres`) against the implementations it stands for: transformers' LlavaNext for the
llava-hf layout, LLaVA's own code for the original one, on asymmetric pinpoint lists and non-square images."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from llava_gguf.model import anyres
from llava_gguf.model.anyres import HF_DEFAULT_PINPOINTS, anyres_rule, llava_image_token_count

from test_image_sequence import _llava_count  # LLaVA's code, verbatim

# Asymmetric lists: a list and its transpose tile differently, so the order each layout reads matters.
PINPOINT_LISTS = {
    "asymmetric": [[336, 672], [672, 336], [336, 1008]],
    "tall-first": [[1008, 336], [336, 672]],
    "default": HF_DEFAULT_PINPOINTS,  # symmetric as a set, not as a list (ties keep the first)
}
# (width, height): wide, tall, square, extreme, smaller than a tile; 55x88 and 176x55 are sizes where
# transformers' unpad (int(round(x, 7))) and LLaVA's (int(x)) keep a different number of rows.
SIZES = [(240, 180), (180, 240), (640, 488), (488, 640), (1000, 300), (300, 1000), (2000, 600), (13, 997),
         (997, 13), (517, 517), (55, 88), (176, 55)]


def hf_config(pinpoints=None) -> dict:
    cfg = {"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next"}
    return cfg if pinpoints is None else {**cfg, "image_grid_pinpoints": pinpoints}


def llava_config(pinpoints) -> dict:
    return {"architectures": ["LlavaLlamaForCausalLM"], "image_aspect_ratio": "anyres",
            "mm_patch_merge_type": "spatial_unpad", "image_grid_pinpoints": pinpoints}


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    tok.add_tokens(["<image>"], special_tokens=True)  # id 32000, as in llava-hf
    return tok


def transformers_processor(tokenizer, pinpoints):
    """LlavaNextProcessor as llava-hf/llava-v1.6-vicuna-7b-hf configures it (336 px tiles, patch 14,
    strategy 'default', one additional token: the class token the strategy drops)."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    images = LlavaNextImageProcessor(image_grid_pinpoints=pinpoints, size={"shortest_edge": 336},
                                     crop_size={"height": 336, "width": 336})
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              image_token="<image>")


@pytest.mark.parametrize("name", PINPOINT_LISTS)
def test_llava_hf_count_and_grid_are_transformers(tokenizer, name):
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    pins = PINPOINT_LISTS[name]
    proc = transformers_processor(tokenizer, pins)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    rule = anyres_rule(hf_config(pins), "llava-hf")
    for w, h in SIZES:
        out = proc(images=Image.new("RGB", (w, h), (90, 120, 200)), text="<image>", return_tensors="pt")
        theirs = out["input_ids"][0].tolist().count(image_token)
        lay = anyres.anyres_layout(w, h, rule.pinpoints, rounding=rule.rounding)
        assert lay.n_tokens() == theirs, (name, w, h)
        assert out["pixel_values"].shape[1] == 1 + lay.n_tiles, (name, w, h)
        tiles_down, tiles_across = get_anyres_image_grid_shape([h, w], pins, 336)
        assert lay.grid == (tiles_across, tiles_down), (name, w, h)


def test_copying_a_transformers_list_unchanged_tiles_transposed(tokenizer):
    """What the export did before: an asymmetric llava-hf list read as (width, height) gives another
    grid and count than transformers for most non-square images."""
    pins = PINPOINT_LISTS["asymmetric"]
    proc = transformers_processor(tokenizer, pins)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    out = proc(images=Image.new("RGB", (240, 180)), text="<image>", return_tensors="pt")
    theirs = out["input_ids"][0].tolist().count(image_token)
    rule = anyres_rule(hf_config(pins), "llava-hf")
    assert llava_image_token_count(240, 180, rule.pinpoints, rounding=rule.rounding) == theirs == 1368
    assert llava_image_token_count(240, 180, pins) == 1026 != theirs


@pytest.mark.parametrize("name", PINPOINT_LISTS)
def test_original_layout_count_is_llavas(name):
    pins = PINPOINT_LISTS[name]
    rule = anyres_rule(llava_config(pins), "llava")
    assert rule.pinpoints == tuple(map(tuple, pins)) and rule.rounding == "int(x)"
    for w, h in SIZES:
        assert llava_image_token_count(w, h, rule.pinpoints, rounding=rule.rounding) == \
            _llava_count(w, h, pinpoints=pins), (name, w, h)


@pytest.mark.parametrize("name", PINPOINT_LISTS)
def test_original_layout_count_is_llava_packages(name):
    """The same against LLaVA's installed code (llava-torch, not a project dependency:
    `pip install --no-deps llava-torch==1.2.2.post1` to run it)."""
    mm_utils = pytest.importorskip("llava.mm_utils", reason="llava-torch not installed")
    llava_arch = pytest.importorskip("llava.model.llava_arch", reason="llava-torch not installed")
    pins = PINPOINT_LISTS[name]
    rule = anyres_rule(llava_config(pins), "llava")
    for w, h in SIZES:
        across, down = mm_utils.get_anyres_image_grid_shape((w, h), pins, 336)
        # prepare_inputs_labels_for_multimodal: 24x24 features per tile merged, unpadded, a newline per row.
        kept = llava_arch.unpad_image(torch.zeros(1, down * 24, across * 24), (w, h))
        lay = anyres.anyres_layout(w, h, rule.pinpoints, rounding=rule.rounding)
        assert lay.grid == (across, down), (name, w, h)
        assert lay.n_tokens() == 576 + kept.shape[1] * (kept.shape[2] + 1), (name, w, h)


def test_the_two_layouts_differ_only_in_order_and_rounding():
    pins = PINPOINT_LISTS["asymmetric"]  # (height, width) for llava-hf; the same pairs transposed for LLaVA
    hf, orig = anyres_rule(hf_config(pins), "llava-hf"), anyres_rule(llava_config(anyres.transpose(pins)), "llava")
    assert hf.pinpoints == orig.pinpoints == tuple(anyres.transpose(pins))
    same = [s for s in SIZES if s not in ((55, 88), (176, 55))]
    for w, h in same:
        assert llava_image_token_count(w, h, hf.pinpoints, rounding=hf.rounding) == \
            llava_image_token_count(w, h, orig.pinpoints, rounding=orig.rounding)
    assert llava_image_token_count(55, 88, hf.pinpoints, rounding=hf.rounding) != \
        llava_image_token_count(55, 88, orig.pinpoints, rounding=orig.rounding)


def test_missing_llava_hf_pinpoints_take_transformers_default_and_say_so():
    from transformers import LlavaNextConfig

    rule = anyres_rule(hf_config(), "llava-hf")
    default = LlavaNextConfig().image_grid_pinpoints
    assert rule.default_pinpoints and rule.is_llava_16
    assert rule.pinpoints == tuple((w, h) for h, w in default)
    warning = anyres.missing_pinpoints_warning(hf_config(), "ckpt/config.json")
    assert warning.startswith("ckpt/config.json has no image_grid_pinpoints") and str(default) in warning
    assert "LlavaNextConfig's default" in rule.describe()
    assert anyres.missing_pinpoints_warning(hf_config(default)) is None


def test_pinpoints_are_parsed_or_refused_naming_the_key():
    assert anyres.parse_pinpoints("[(336, 672), (672, 336)]") == [(336, 672), (672, 336)]  # LLaVA's string form
    for bad in ([[336, 672, 1]], [[0, 336]], "[[336, 'a']]", "not a list", [[336.5, 672]], {"a": 1}):
        with pytest.raises(ValueError, match="image_grid_pinpoints"):
            anyres.parse_pinpoints(bad)
    with pytest.raises(ValueError, match="empty"):
        anyres_rule(hf_config([]), "llava-hf")
