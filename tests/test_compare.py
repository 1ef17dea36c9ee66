"""Runs compared across boards: run folders made here, moved elsewhere, rendered into one page."""
from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from synthetic_runs import make_evaluated_run, move, recommended_json, summary_of

from llava_gguf import cli
from llava_gguf.run import machine, workspace
from llava_gguf.reports import compare


def _links(page: Path) -> list[str]:
    return re.findall(r"(?:src|href)='([^'#][^']*)'", page.read_text())


def test_artifacts_are_relative_to_the_run_folder_and_survive_a_move(write_params, tmp_path, monkeypatch):
    run = workspace.open_run(write_params({"run": "reloc"}))
    inside = run.sub("models") / "x.gguf"
    inside.write_bytes(b"x")
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(b"y")
    run.record("text_gguf", inside)
    run.record("quantized", {"Q4_0": inside, "ext": outside})
    recorded = json.loads(run.artifacts_file.read_text())
    assert recorded["text_gguf"] == "models/x.gguf"
    assert recorded["quantized"] == {"Q4_0": "models/x.gguf", "ext": str(outside.resolve())}
    moved_outputs = tmp_path / "board-copy"
    move(run.dir, moved_outputs)
    monkeypatch.setenv(workspace.OUTPUTS_ENV, str(moved_outputs))
    again = workspace.open_run(run.params_file)
    assert again.dir == moved_outputs / "reloc"
    assert again.artifact_path("text_gguf") == moved_outputs / "reloc" / "models" / "x.gguf"
    assert again.resolve(again.artifacts()["quantized"]["ext"]) == outside.resolve()


def test_legacy_repo_relative_artifacts_still_resolve(write_params, monkeypatch, tmp_path):
    root = tmp_path / "root"
    (root / "outputs" / "old" / "models").mkdir(parents=True)
    (root / "outputs" / "old" / "models" / "m.gguf").write_bytes(b"m")
    monkeypatch.setenv("LLAVA_GGUF_ROOT", str(root))
    run = workspace.open_run(write_params({"run": "legacy"}))
    run.artifacts_file.write_text(json.dumps({"mmproj": "outputs/old/models/m.gguf"}))
    assert run.artifact_path("mmproj") == root / "outputs" / "old" / "models" / "m.gguf"


def test_machine_info_parses_aarch64_and_x86_cpuinfo():
    arm = "".join(f"processor\t: {i}\nBogoMIPS\t: 2000.00\nFeatures\t: fp asimd asimddp i8mm sve sve2 bf16 fphp\n"
                  f"CPU implementer\t: 0x41\nCPU part\t: {'0xd81' if i < 4 else '0xd80'}\n\n" for i in range(6))
    got = machine.parse_cpuinfo(arm)
    assert got["core_types"] == {"Cortex-A720": 4, "Cortex-A520": 2}
    assert got["model"] == "4x Cortex-A720 + 2x Cortex-A520"
    assert {"dotprod", "i8mm", "sve", "sve2", "asimd", "fp16"} <= set(got["features"])
    x86 = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu pni avx avx2 fma f16c avx512f\n\n"
    got = machine.parse_cpuinfo(x86)
    assert got["model"] == "Some CPU" and {"sse3", "avx2", "fma", "f16c", "avx512f"} <= set(got["features"])
    info = machine.machine_info()
    assert info["cores"] >= 1 and info["ram_mib"] > 0 and info["kernel"] and info["arch"]


def test_system_info_line_is_parsed():
    line = ("main: system_info: n_threads = 4 (n_threads_batch = 4) / 8 | CPU : NEON = 1 | ARM_FMA = 1 | "
            "DOTPROD = 1 | SVE = 0 | REPACK = 1 |\n")
    got = machine.parse_system_info("noise\n" + line)
    assert got["n_threads"] == 4 and got["hardware_concurrency"] == 8
    assert got["backends"]["CPU"] == {"NEON": "1", "ARM_FMA": "1", "DOTPROD": "1", "SVE": "0", "REPACK": "1"}
    assert machine.parse_system_info("no such line") is None


def test_two_runs_moved_elsewhere_render_one_page(write_params, tmp_path):
    fast = make_evaluated_run(write_params, "board-fast")
    slow = make_evaluated_run(write_params, "board-slow", slowdown=3.0)
    assert (fast.dir / "machine.json").exists() and "machine" in fast.artifacts()
    elsewhere = tmp_path / "from-boards"
    dirs = [move(fast.dir, elsewhere / "o6"), move(slow.dir, elsewhere / "pi5")]
    page = tmp_path / "somewhere" / "else" / "compare.html"
    assert cli.main(["compare", *map(str, dirs), "--out", str(page)]) == 0
    text = page.read_text()
    for d in dirs:
        info = summary_of(d)
        chosen = info["chosen"]
        assert f"{chosen['variant']} ★" in text
        assert f"{chosen['eval_tokens_per_s']:.2f}" in text
    assert "board-fast" in text and "board-slow" in text
    recorded = json.loads((dirs[0] / "machine.json").read_text())
    assert recorded["machine"]["os"] in text and recorded["params"]["model"]["repo"] in text
    links = _links(page)
    assert any(link.endswith("latency_across_runs.png") for link in links)
    assert sum(link.endswith("reports/index.html") for link in links) == 2
    for link in links:
        assert not Path(link).is_absolute(), link
        assert (page.parent / unquote(link)).exists(), link
    # The runs and the page moved together: the links still hold.
    moved = move(tmp_path / "somewhere", tmp_path / "archive")
    assert all((moved / "else" / unquote(link)).exists() for link in links if "_files/" in link)


def test_index_over_all_runs_and_clear_errors(write_params, tmp_path):
    make_evaluated_run(write_params, "index-a")
    page = compare.render_comparison()
    assert page == workspace.outputs_dir() / "index.html" and "index-a" in page.read_text()
    (tmp_path / "empty").mkdir()
    with pytest.raises(compare.CompareError, match="make evaluate"):
        compare.render_comparison([tmp_path / "empty"], tmp_path / "x.html")
    assert cli.main(["compare", str(tmp_path / "missing"), "--out", str(tmp_path / "x.html")]) == 2


def test_tuned_configuration_is_shown_when_present(write_params, tmp_path):
    run = make_evaluated_run(write_params, "tuned")
    label = "Q4_K_M, mmproj f16, budget full, t 6"
    rec = recommended_json(label, [0.41, 0.4168775620000146, 0.43], [0.98, 1.0151124179997988, 1.05])
    workspace.write_json(run.sub("tune") / "recommended.json", rec)
    page = compare.render_comparison([run.dir], tmp_path / "t.html").read_text()
    assert "tune/recommended.json" in page and "--ubatch-size 256" in page
    # The overview's column, worded by the one rule (winner.py): separated ranges, 3 runs each.
    assert f"{label}: 417 ms, 2.44× faster than the seed&#x27;s command (1.02 s)" in page
    assert "3 runs of 8 tokens" in page and "budget single: 2.32 s (2.29× slower than the seed&#x27;s command)" in page
    assert "measured at load 1.9 (1-min average), other processes 0.04 cores, 3 % steal; no run under load" in page
    assert "speedup=" not in page and "0.4168775620000146" not in page
    # Step 06's pick is labelled as such, never a second winner.
    assert "Fastest quant type in evaluate: Q4_K_M" in page and "Not the recommendation" in page
    # Overlapping ranges: the same ratio of medians is no "faster".
    workspace.write_json(run.sub("tune") / "recommended.json",
                         recommended_json(label, [0.41, 0.4168775620000146, 1.0], [0.98, 1.0151124179997988, 1.05]))
    page = compare.render_comparison([run.dir], tmp_path / "t.html").read_text()
    assert "same speed as the seed&#x27;s command, within the spread" in page and "2.44× faster" not in page
    # One run each: no claim at all.
    workspace.write_json(run.sub("tune") / "recommended.json", recommended_json(label, [0.41], [1.02], repetitions=1))
    page = compare.render_comparison([run.dir], tmp_path / "t.html").read_text()
    assert "no speed claim against the seed&#x27;s command (1.02 s): one run each" in page and "× faster" not in page


@pytest.mark.llama_cpp
def test_pipeline_run_moved_elsewhere_compares_and_publishes(write_params, llama_tool, tmp_path, monkeypatch):
    """A real run of every step on the tiny model, moved beside a synthetic one, compared and carded."""
    from llava_gguf.pipeline import runner as pipeline, publish

    llama_tool("llama-mtmd-cli")
    run = workspace.open_run(write_params({
        "run": "real", "model": {"source": "tiny"}, "quantize": {"types": ["Q4_K_M"]},
        "evaluate": {"n_predict": 4, "threads": 2, "cases": [{"prompt": "Describe this image."}]}}, "real.yaml"))
    pipeline.run_steps(run, ["evaluate"])
    recorded = json.loads((run.dir / "machine.json").read_text())
    assert recorded["llama_cpp"]["version"] and recorded["llama_cpp"]["system_info"]["backends"]["CPU"]
    assert recorded["llama_cpp"]["cmake_options"]["CMAKE_BUILD_TYPE"] == "Release"
    assert all(not Path(v).is_absolute() for v in run.artifacts()["quantized"].values())
    other = make_evaluated_run(write_params, "synthetic-board")
    dirs = [move(run.dir, tmp_path / "boards" / "a"), move(other.dir, tmp_path / "boards" / "b")]
    page = compare.render_comparison(dirs, tmp_path / "boards" / "index.html")
    text = page.read_text()
    for d in dirs:
        assert f"{summary_of(d)['chosen']['variant']} ★" in text
    assert recorded["llama_cpp"]["version"] in text
    for link in _links(page):
        assert (page.parent / unquote(link)).exists(), link
    # The moved run still resolves its own files: the card is written from the new place.
    monkeypatch.setenv(workspace.OUTPUTS_ENV, str(dirs[0].parent))
    card = publish.publish(workspace.open_run(tmp_path / "real.yaml"))
    assert card.folder == dirs[0] / "publish" and (card.folder / "mmproj-model-f16.gguf").exists()
    assert recorded["llama_cpp"]["version"] in card.card.read_text()
