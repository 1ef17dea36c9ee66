"""Each step's acceptance checks run in its library function (what `python -m llava_gguf step`, the
notebook and the tests call): a failed check fails the step, naming what failed and the bound."""
from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

from llava_gguf import cli
from llava_gguf.run import workspace
from llava_gguf.checks.acceptance import CheckFailed, Checks
from llava_gguf.steps import evaluate, quantize, surgery, tune_checks


def test_checks_table_message_and_enforce():
    checks = Checks("demo")
    assert checks.add("answer", 42, "42", True)
    assert not checks.add("rate", 0.123456789, "above 1", False)
    assert checks.table().to_dict("records") == [
        {"check": "answer", "result": "passed", "found": "42", "required": "42"},
        {"check": "rate", "result": "FAILED", "found": "0.1235", "required": "above 1"}]
    with pytest.raises(CheckFailed) as err:
        checks.enforce()
    assert str(err.value) == "step demo: 1 of 2 checks failed:\n- rate: found 0.1235; required above 1"
    assert err.value.checks is checks
    ok = Checks("demo")
    ok.add("answer", 42, "42", True)
    assert ok.enforce() is ok and str(ok) == "step demo: 1 check passed"


# ----------------------------------------------------------------------------- 02 surgery
def _surgery_run(tiny_checkpoint, write_params, name):
    run = workspace.open_run(write_params({"run": name, "model": {"source": "local", "path": str(tiny_checkpoint)}}))
    run.record("checkpoint", tiny_checkpoint)
    return run


def test_surgery_passes_its_checks_and_carries_them(tiny_checkpoint, write_params):
    run = _surgery_run(tiny_checkpoint, write_params, "accept-surgery")
    result = surgery.run_surgery(run)
    table = result.checks.table()
    assert list(table["check"]) == ["layout", "projector tensors", "vision tensors", "text tensors",
                                    "artifact surgery"]
    assert set(table["result"]) == {"passed"} and table.loc[1, "found"] == "5"


def test_surgery_checks_name_the_part_and_the_bound(tiny_checkpoint, write_params):
    run = _surgery_run(tiny_checkpoint, write_params, "accept-surgery-bad")
    good = surgery.run_surgery(run)
    manifest = json.loads(json.dumps(good.manifest))
    manifest["parts"]["projector"]["tensors"] = 3
    manifest["parts"]["vision"]["tensors"] = 0
    with pytest.raises(CheckFailed) as err:
        surgery.acceptance_checks(run, surgery.SurgeryResult(good.path, manifest)).enforce()
    assert str(err.value).splitlines() == [
        "step surgery: 2 of 5 checks failed:",
        "- projector tensors: found 3; required 4 or 5 (mm_projector.0/.2 weight and bias, LLaVA 1.6's image_newline)",
        "- vision tensors: found 0; required at least 1"]


# ----------------------------------------------------------------------------- 05 quantize
def _quant_files(rows):
    return pd.DataFrame(rows, columns=["variant", "file_type", "bpw", "params"])


def test_quantize_checks_name_the_wrong_file_type_and_the_parameter_counts():
    good = quantize.QuantizeResult({"Q8_0": Path("q8.gguf"), "Q4_K_M": Path("q4.gguf")}, _quant_files(
        [("F16", "F16", 16.0, 1000), ("Q8_0", "Q8_0", 8.5, 1000), ("Q4_K_M", "Q4_K_M", 4.9, 1000)]))
    assert quantize.acceptance_checks(good).ok
    bad = quantize.QuantizeResult({"Q8_0": Path("q8.gguf"), "Q4_K_M": Path("q4.gguf")}, _quant_files(
        [("F16", "F16", 16.0, 1000), ("Q8_0", "Q8_0", 8.5, 1000), ("Q4_K_M", "Q6_K", 0.0, 999)]))
    checks = quantize.acceptance_checks(bad)
    assert [(c.name, c.found, c.bound) for c in checks.failed()] == [
        ("Q4_K_M file type", "Q6_K", "Q4_K_M, as asked"),
        ("bits per weight", "0.00 to 16.00", "above 0 in every file"),
        ("parameters", "999, 1,000", "one count in every file, the source's (1,000)")]
    nothing = quantize.acceptance_checks(quantize.QuantizeResult({}, _quant_files([])))
    assert [c.name for c in nothing.failed()] == ["files made"]


# ----------------------------------------------------------------------------- 06 evaluate
def _eval_report(tmp_path, runs, kld=None, chosen=("Q4_K_M",), written=evaluate.METRICS_FILES):
    for name in written:
        (tmp_path / f"{name}.csv").write_text("x\n")
    variants = pd.DataFrame({"variant": sorted(set(runs["variant"]))})
    return evaluate.EvalReport(runs, pd.DataFrame(), variants, pd.DataFrame(), kld, pd.DataFrame(),
                               {"chosen": {"variant": chosen[0]} if chosen else None}, metrics_dir=tmp_path)


def test_evaluate_checks_name_the_silent_run_the_divergence_and_the_missing_table(local_run, tmp_path):
    run = local_run(evaluate={"cases": [{"prompt": "a"}, {"prompt": "b"}]})
    runs = pd.DataFrame({"variant": ["F16", "F16", "Q4_K_M", "Q4_K_M"], "case": [0, 1, 0, 1],
                         "n_tokens": [8, 8, 8, 8]})
    assert evaluate.acceptance_checks(run, _eval_report(tmp_path, runs)).ok
    runs.loc[3, "n_tokens"] = 0
    kld = pd.DataFrame({"variant": ["Q4_K_M"], "kld": [-0.5]})
    (tmp_path / "bad").mkdir()
    report = _eval_report(tmp_path / "bad", runs.iloc[:3], kld, chosen=None, written=("runs",))
    failed = {c.name: (c.found, c.bound) for c in evaluate.acceptance_checks(run, report).failed()}
    assert failed["runs"] == ("3", "2 variants x 2 cases = 4")
    assert failed["KL divergence"] == ("-0.5 to -0.5", "0 or more for every variant")
    assert failed["chosen variant"] == ("none", "a variant chosen for the summary")
    assert failed["metrics tables"][0] == "missing variants.csv, agreement.csv"
    report = _eval_report(tmp_path, runs)
    with pytest.raises(CheckFailed, match=r"- generated tokens: found fewest 0 \(none: Q4_K_M case 1\); "
                                          r"required at least 1 in every run"):
        evaluate.acceptance_checks(run, report).enforce()


# ----------------------------------------------------------------------------- 07 tune
def _tune_result(budgets, base_runs=2, coverage=None, published=None, bound=None):
    class Result:
        recommended = {"baseline": {"answer_s": 1.5, "runs": base_runs}, "budgets": budgets,
                       "coverage": [{"quant": "Q4_0", "budget": b, "answer_s": 1.0, "why_not": None} for b in budgets]
                       if coverage is None else coverage,
                       "published": {"measured": True} if published is None else published,
                       "bound": {b: {"bound": "prefill"} for b in budgets} if bound is None else bound}
    return Result()


def _budget(lo=0.4, med=0.5, hi=0.6, tokens=2340, runs=2):
    return {"answer_min_s": lo, "answer_s": med, "answer_max_s": hi, "image_tokens": tokens, "runs": runs}


def test_tune_checks_run_the_script_and_name_what_failed(local_run):
    run = local_run(tune={"repetitions": 2, "image_budgets": {"full": None, "single": []}})
    script = run.dir / "run-llava.sh"
    script.write_text('#!/bin/bash\n[ "${@: -1}" = 4 ] && [ "${@: -2:1}" = -n ] && echo answered\n')
    (run.dir / "run-llava-full.sh").write_text("")
    (run.dir / "run-llava-single.sh").write_text("")
    good = tune_checks.acceptance_checks(run, _tune_result({"full": _budget(), "single": _budget(tokens=576)}))
    assert good.ok, good.message()
    assert good.table()["found"].iloc[-1] == "exit 0 (log run-llava-check.log)"
    assert (run.dir / "tune" / "logs" / "run-llava-check.log").read_text().endswith("answered\n")

    script.write_text("#!/bin/bash\necho 'error: unknown argument' >&2\nexit 3\n")
    (run.dir / "run-llava-single.sh").unlink()
    bad = tune_checks.acceptance_checks(run, _tune_result(
        {"full": _budget(runs=1), "single": _budget(tokens=None)}, base_runs=1,
        coverage=[{"quant": "Q5_K", "budget": "single", "answer_s": None, "why_not": None}],
        published={"measured": False, "why_not": None}, bound={"full": {}}))
    failed = {c.name: (c.found, c.bound) for c in bad.failed()}
    assert set(failed) == {"seed's command", "budget full: its runs", "budget single: image tokens",
                           "scripts", "run-llava.sh runs", "type coverage", "published recipe", "bound per budget"}
    assert failed["type coverage"][0] == "unexplained: Q5_K at single"
    assert failed["published recipe"][0] == "neither measured nor explained"
    assert failed["bound per budget"] == ("full", "each of full, single")
    assert failed["seed's command"] == ("1.50 s over 1 run", "an answer time over tune.repetitions = 2 runs")
    assert failed["budget full: its runs"] == ("1 run, 400 ms <= 500 ms <= 600 ms",
                                               "tune.repetitions = 2 runs, fastest <= median <= slowest")
    assert failed["scripts"][0] == "missing run-llava-single.sh"
    # No recommendation at all is a failed check, not a crash.
    none = tune_checks.acceptance_checks(run, _tune_result({}))
    assert {c.name for c in none.failed()} >= {"image budgets", "run-llava.sh runs"}
    assert failed["run-llava.sh runs"] == (
        f"run-llava.sh -n 4 exited with status 3; full log kept at {run.dir / 'tune' / 'logs' / 'run-llava-check.log'}",
        "exit 0 with -n 4 within 600 s")


# ----------------------------------------------------------------------------- the CLI
CHECKED_MODULE = '''
from llava_gguf.checks.acceptance import Checks


def run_checked(run):
    checks = Checks("checked")
    checks.add("greeting", "hullo", "hello", False)
    checks.enforce()
'''


def test_the_cli_step_fails_with_the_checks_message(tmp_path, declare_step, monkeypatch, caplog):
    (tmp_path / "checked_step.py").write_text(textwrap.dedent(CHECKED_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    declare_step("checked", "import checked_step", number=98, entry="checked_step:run_checked")
    params = tmp_path / "checked.yaml"
    params.write_text(yaml.safe_dump({"run": "checked", "model": {"source": "tiny"}}))
    with caplog.at_level(logging.ERROR):
        assert cli.main(["step", "checked", "--params", str(params)]) == 1
    assert "step checked: 1 of 1 check failed:\n- greeting: found hullo; required hello" in caplog.text
