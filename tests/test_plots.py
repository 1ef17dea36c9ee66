"""The three evaluation plots, from small synthetic tables (no llama.cpp needed)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llava_gguf.reports import plots
from llava_gguf.run import workspace

VARIANTS = ["Q4_K_M", "F16", "Q8_0"]  # deliberately not in precision order


@pytest.fixture
def local_run(write_params, request):
    """A Run without a checkpoint (plots only need its folders)."""
    return lambda: workspace.open_run(write_params({"run": f"plots-{request.node.name}"}))


@pytest.fixture
def runs() -> pd.DataFrame:
    rows = []
    for i, v in enumerate(VARIANTS):
        for case in (0, 1):
            rows.append({"variant": v, "case": case, "load_ms": 100.0 + i, "image_encode_ms": 900.0,
                         "image_decode_ms": 2000.0 + 100 * i, "prompt_eval_ms": 3200.0 + 100 * i,
                         "eval_ms": 300.0 * (i + 1), "eval_tokens_per_s": 10.0 / (i + 1)})
    return pd.DataFrame(rows)


@pytest.fixture
def tokens() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame([{"variant": v, "case": c, "token": t, "itl_ms": None if t == 0 else float(rng.uniform(5, 50))}
                         for v in VARIANTS for c in (0, 1) for t in range(8)])


def _png_ok(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_latency_breakdown(local_run, runs):
    run = local_run()
    fig = plots.latency_breakdown(runs, run)
    assert _png_ok(run.dir / "plots" / "latency_breakdown.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["F16", "Q8_0", "Q4_K_M"]
    labels = ax.get_legend_handles_labels()[1]
    assert labels == [label for _, label in plots.STAGES]
    # Bars stack to the stage sum; prompt eval already spans the image encode and decodes.
    f16 = runs[runs.variant == "F16"].iloc[0]
    total = f16.load_ms + f16.prompt_eval_ms + f16.eval_ms
    tops = [p.get_y() + p.get_height() for p in ax.patches if abs(p.get_x() + p.get_width() / 2) < 1e-9]
    assert max(tops) == pytest.approx(total / 1000.0)
    assert fig._repr_png_()[:4] == b"\x89PNG"  # shows inline in notebooks without pyplot


def test_token_latency(local_run, tokens):
    run = local_run()
    fig = plots.token_latency(tokens, run)
    assert _png_ok(run.dir / "plots" / "token_latency.png")
    line_ax, hist_ax = fig.axes
    assert [ln.get_label() for ln in line_ax.get_lines()] == ["F16", "Q8_0", "Q4_K_M"]
    assert list(line_ax.get_lines()[0].get_xdata()) == list(range(1, 8))  # the first token has no gap
    assert hist_ax.get_legend_handles_labels()[1] == ["F16", "Q8_0", "Q4_K_M"]


def test_size_kld_speed(local_run):
    run = local_run()
    table = pd.DataFrame({"variant": VARIANTS, "size_mib": [12.3, 34.5, 18.6], "kld": [0.02, 0.0, 0.0002],
                          "eval_tokens_per_s": [30.0, 10.0, 20.0]})
    fig = plots.size_kld_speed(table, run)
    assert _png_ok(run.dir / "plots" / "size_kld_speed.png")
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == sorted(VARIANTS)
    assert len(fig.axes) == 2  # the speed colour bar
    # Missing KLD (ready-made files, perplexity off) still plots, labelled as such.
    fig = plots.size_kld_speed(table.assign(kld=float("nan")), None)
    assert all("(no KLD)" in t.get_text() for t in fig.axes[0].texts)


def test_text_prompt_is_prompt_eval_less_image_encode_and_decode():
    from llava_gguf.reports.summary import SEED
    runs = pd.DataFrame({"prompt_eval_ms": [SEED["prompt_eval_ms"], 500.0, 900.0],
                         "image_encode_ms": [SEED["image_encode_ms"], None, 400.0],
                         "image_decode_ms": [SEED["image_decode_ms"], 300.0, 800.0]})
    got = plots.with_stages(runs)["text_prompt_ms"].tolist()
    # The seed's 16 text tokens at its ~10 tokens/s prompt rate: ~1.7 s, not the 11.6 s left
    # when only the decodes are taken off. A build that books less is never negative.
    assert got[0] == pytest.approx(SEED["text_prompt_ms"]) and 1500 < got[0] < 1800
    assert got[1:] == [200.0, 0.0]
