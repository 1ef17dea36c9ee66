"""The model card and the hub upload, offline: the hub clients are replaced only at their network calls."""
from __future__ import annotations

import hashlib
import json
import logging
import types

import pandas as pd
import pytest
import yaml
from synthetic_runs import make_evaluated_run, summary_of

from llava_gguf import cli
from llava_gguf.pipeline import publish
from llava_gguf.run import workspace
from llava_gguf.run.machine import describe

TOKEN = "hf_secret_token_value_123"


def _reopen(run, write_params, **publish_keys) -> workspace.Run:
    """The same run folder under params with a `publish` section."""
    data = yaml.safe_load(run.params_file.read_text())
    data["publish"] = publish_keys
    return workspace.open_run(write_params(data, f"{run.params.run}-publish.yaml"))


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_numbers_are_the_runs_own(write_params):
    run = make_evaluated_run(write_params, "card")
    assert cli.main(["publish", "--params", str(run.params_file)]) == 0
    folder = run.dir / "publish"
    card = (folder / "README.md").read_text()
    front = _front_matter(card)
    assert front["license"] == "llama2" and front["base_model"] == run.params.model.repo
    assert {"gguf", "llava", "llama.cpp", "vision", "image-text-to-text", "quantized"} <= set(front["tags"])
    assert front["pipeline_tag"] == "image-text-to-text"
    chosen = summary_of(run.dir)["chosen"]["variant"]
    art = run.artifacts()
    chosen_file = run.resolve(art["quantized"].get(chosen) or art["text_gguf"])
    for path in (chosen_file, run.artifact_path("mmproj")):
        assert (folder / path.name).samefile(path)  # linked, not copied
        assert hashlib.sha256(path.read_bytes()).hexdigest() in card and f"{path.stat().st_size:,}" in card
    assert sorted(p.name for p in folder.glob("*.gguf")) == sorted([chosen_file.name, run.artifact_path("mmproj").name])
    table = pd.read_csv(run.dir / "metrics" / "variants.csv")
    for _, row in table.iterrows():
        assert f"{row['kld']:.4f}" in card and f"{row['eval_tokens_per_s']:.2f}" in card
        assert f"{row['prompt_tokens_per_s']:.2f}" in card
    machine = json.loads((run.dir / "machine.json").read_text())["machine"]
    assert describe(machine) in card
    assert "| passed | NMSE 1.20e-06 |" in card and "not recorded in this run folder" in card
    assert f"llama-mtmd-cli -m {chosen_file.name} --mmproj mmproj-model-f16.gguf" in card
    assert art["publish"] == "publish"


def test_files_selection(write_params):
    run = make_evaluated_run(write_params, "card-files")
    everything = publish.publish(_reopen(run, write_params, files=["all"]))
    assert set(everything.files["variant"]) == {"F16", "Q8_0", "Q4_K_M", "Q2_K", "mmproj"}
    two = publish.publish(_reopen(run, write_params, files=["Q8_0", "Q2_K"]))
    assert set(two.files["variant"]) == {"Q8_0", "Q2_K", "mmproj"}
    assert len(list(two.folder.glob("*.gguf"))) == 3  # the earlier selection's extra links are gone
    with pytest.raises(publish.PublishError, match=r"publish.files names \['Q3_K_S'\]"):
        publish.publish(_reopen(run, write_params, files=["Q3_K_S"]))


def test_a_tuned_run_recommends_and_publishes_tunes_pick(write_params):
    """The card names one winner, the index page's: 07_tune's recommendation when the run was tuned
    (its quant type is the default file), step 06's fastest type, labelled so, when it was not."""
    run = make_evaluated_run(write_params, "card-tuned")
    evaluated = summary_of(run.dir)["chosen"]["variant"]
    untuned = publish.publish(run)
    assert set(untuned.files["variant"]) == {evaluated, "mmproj"}
    assert f"Recommended: **{evaluated}**\n(fastest quant type in evaluate, not tuned: " in untuned.card.read_text()
    tuned_type = next(v for v in ("Q2_K", "Q4_K_M", "Q8_0") if v != evaluated)
    runs = [2.0, 2.1, 2.2]
    (run.dir / "tune").mkdir(exist_ok=True)
    (run.dir / "tune" / "recommended.json").write_text(json.dumps({
        "recommended": {"budget": "full", "config": f"{tuned_type} t2", "settings": {"quant": tuned_type},
                        "answer_s": 2.1, "answer_s_all": runs},
        "baseline": {"answer_s": 4.2, "answer_s_all": [4.0, 4.2, 4.4]}, "setup": {"repetitions": 3}}))
    tuned = publish.publish(run)
    assert set(tuned.files["variant"]) == {tuned_type, "mmproj"}
    assert (f"Recommended: **{tuned_type}**\n(07_tune's recommendation, {tuned_type} t2: 2.00× faster than "
            "the seed's command)") in tuned.card.read_text()
    card = tuned.card.read_text()
    assert f"| {tuned_type} ★" in card and f"| {evaluated} ★" not in card


def test_card_needs_evaluation_metrics(write_params):
    run = workspace.open_run(write_params({"run": "card-nometrics"}))
    with pytest.raises(publish.PublishError, match="make evaluate"):
        publish.publish(run)


@pytest.fixture
def hf_hub(monkeypatch):
    """huggingface_hub.HfApi's network calls answered by an in-memory repository."""
    import huggingface_hub

    hub = types.SimpleNamespace(repos={}, created=[], uploads=[], fail_upload=False, tokens=set())

    def repo_exists(self, repo_id, repo_type=None, **kw):
        hub.tokens.add(self.token)
        return repo_id in hub.repos

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False, **kw):
        hub.created.append((repo_id, private))
        hub.repos.setdefault(repo_id, {})

    def model_info(self, repo_id, files_metadata=False, **kw):
        return types.SimpleNamespace(siblings=[
            types.SimpleNamespace(rfilename=n, lfs=types.SimpleNamespace(sha256=h) if n.endswith(".gguf") else None)
            for n, h in hub.repos[repo_id].items()])

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, commit_message=None, **kw):
        hub.uploads.append(sorted(allow_patterns))
        if hub.fail_upload:
            raise ConnectionError("connection reset by peer")
        for name in allow_patterns:
            data = (workspace.Path(folder_path) / name).read_bytes()
            hub.repos[repo_id][name] = hashlib.sha256(data).hexdigest()

    for name, fn in [("repo_exists", repo_exists), ("create_repo", create_repo), ("model_info", model_info),
                     ("upload_folder", upload_folder)]:
        monkeypatch.setattr(huggingface_hub.HfApi, name, fn)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return hub


def test_upload_creates_the_repo_then_sends_only_what_is_missing(write_params, hf_hub, caplog):
    caplog.set_level(logging.DEBUG)
    run = _reopen(make_evaluated_run(write_params, "up-hf"), write_params, repo="me/llava-gguf", private=True,
                  files=["Q8_0", "Q4_K_M"])
    first = publish.publish(run, upload=True)
    names = sorted(first.files["file"])
    assert hf_hub.created == [("me/llava-gguf", True)] and hf_hub.tokens == {TOKEN}
    assert hf_hub.uploads == [sorted(["README.md", *names])] and first.skipped == []
    assert first.url == "https://huggingface.co/me/llava-gguf"
    # A cut-off upload: one file arrived, one is gone, one was damaged. Only the last two are sent again.
    repo = hf_hub.repos["me/llava-gguf"]
    q8 = first.files.set_index("variant").loc["Q8_0", "file"]
    q4 = first.files.set_index("variant").loc["Q4_K_M", "file"]
    del repo[q4]
    repo["mmproj-model-f16.gguf"] = "0" * 64
    second = publish.publish(run, upload=True)
    assert second.skipped == [q8]
    assert hf_hub.uploads[-1] == sorted(["README.md", q4, "mmproj-model-f16.gguf"])
    assert len(hf_hub.created) == 1  # the repo exists now: not created again
    third = publish.publish(run, upload=True)
    assert hf_hub.uploads[-1] == ["README.md"] and sorted(third.skipped) == names
    assert TOKEN not in caplog.text and TOKEN not in first.card.read_text()


def test_upload_errors_are_clear(write_params, hf_hub, monkeypatch, caplog):
    base = make_evaluated_run(write_params, "up-errors")
    with pytest.raises(publish.PublishError, match="publish.repo"):
        publish.publish(base, upload=True)
    run = _reopen(base, write_params, repo="me/x")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with pytest.raises(publish.PublishError, match="set HF_TOKEN in the environment"):
        publish.publish(run, upload=True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hf_hub.fail_upload = True
    with pytest.raises(publish.PublishError, match="failed .*connection reset.*rerun `make publish UPLOAD=1`") as err:
        publish.publish(run, upload=True)
    assert TOKEN not in str(err.value)

    def forbidden(self, repo_id, **kw):
        raise PermissionError("403 Forbidden: you cannot create a repo in namespace 'someone'")

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", forbidden)
    other = _reopen(base, write_params, repo="someone/x")
    with pytest.raises(publish.PublishError, match="cannot be read or created.*403"):
        publish.publish(other, upload=True)
    caplog.set_level(logging.INFO)
    assert cli.main(["publish", "--upload", "--params", str(other.params_file)]) == 1
    assert "cannot be read or created" in caplog.text and TOKEN not in caplog.text


def test_upload_to_modelscope(write_params, monkeypatch):
    from modelscope.hub.api import HubApi

    calls = {"files": []}
    monkeypatch.setattr(HubApi, "login", lambda self, token: calls.setdefault("login", token))
    monkeypatch.setattr(HubApi, "repo_exists", lambda self, repo_id, **kw: True)
    monkeypatch.setattr(HubApi, "create_repo", lambda self, *a, **kw: pytest.fail("the repo exists"))
    monkeypatch.setattr(HubApi, "get_model_files", lambda self, repo, **kw: calls["files"])
    monkeypatch.setattr(HubApi, "upload_folder",
                        lambda self, repo_id, folder_path=None, **kw: calls.setdefault("upload", (repo_id, kw)))
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "ms-token")
    run = _reopen(make_evaluated_run(write_params, "up-ms"), write_params, repo="me/llava-gguf", hub="modelscope")
    card = publish.write_card(run)
    mmproj = card.files.set_index("variant").loc["mmproj"]
    calls["files"] = [{"Path": mmproj["file"], "Sha256": mmproj["sha256"], "Type": "blob"}, {"Path": "x", "Type": "tree"}]
    result = publish.publish(run, upload=True)
    assert calls["login"] == "ms-token" and result.skipped == [mmproj["file"]]
    repo, kw = calls["upload"]
    assert repo == "me/llava-gguf" and kw["token"] == "ms-token"
    assert sorted(kw["allow_patterns"]) == sorted(["README.md", *(f for f in result.files["file"] if f != mmproj["file"])])
    assert result.url == "https://modelscope.cn/models/me/llava-gguf"


# ----------------------------------------------------------------------------- the card's template
def test_the_card_is_its_template_filled_with_every_value_and_nothing_else(write_params):
    import string
    from importlib import resources

    run = make_evaluated_run(write_params, "card-template")
    files = publish.write_card(run).files
    values = publish.card_values(run, files, "mmproj-model-f16.gguf")
    template = string.Template((resources.files("llava_gguf.pipeline") / "templates" / "model_card.md").read_text())
    assert set(template.get_identifiers()) == set(values)  # no placeholder unfilled, no value unused
    assert all(isinstance(v, str) for v in values.values())
    card = publish.model_card(run, files, "mmproj-model-f16.gguf")
    assert card == template.substitute(values) and "${" not in card
    assert card.startswith("---\nlicense: llama2\n") and "\n# card-template GGUF\n" not in card
    assert "## How to run" in card and card.endswith("reads the word as the template).\n")
    with pytest.raises(KeyError, match="front_matter"):
        publish.render_template("model_card.md", {k: v for k, v in values.items() if k != "front_matter"})


def test_the_template_ships_in_the_wheel(tmp_path):
    """package data (pyproject.toml): a wheel built from the sources holds templates/model_card.md."""
    import shutil
    import subprocess
    import sys
    import zipfile

    from llava_gguf.run import registry

    root = registry.repo_root()
    src = tmp_path / "src"
    shutil.copytree(root / "lib", src / "lib", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(root / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "llava_gguf/pipeline/templates/model_card.md" in names
    assert zipfile.ZipFile(wheel).read("llava_gguf/pipeline/templates/model_card.md").decode() == \
        (root / "lib" / "llava_gguf" / "pipeline" / "templates" / "model_card.md").read_text()
