from pathlib import Path

import pytest
import yaml

from llava_gguf.run.params import ParamsError, load_params, parse_params
from llava_gguf.run.workspace import repo_root


def test_minimal_file_is_valid(write_params):
    p = load_params(write_params({"run": "x", "model": {"source": "tiny"}}))
    assert p.run == "x" and p.model.source == "tiny"
    assert p.convert.outtype == "f16" and p.quantize.types == ["Q5_K_M"] and p.model.format == "checkpoint"


def test_unknown_key_names_key_and_file(write_params):
    path = write_params({"run": "x", "model": {"source": "tiny", "sorce": 1}})
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert "model.sorce" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("data, key", [
    ({"run": "x", "convert": {"outtype": "q4"}}, "convert.outtype"),
    ({"run": "x", "quantize": {"types": "Q5_K_M"}}, "quantize.types"),
    ({"run": "x", "quantize": {"types": ["Q9_Z"]}}, "quantize.types"),
    ({"run": "x", "model": {"source": "http"}}, "model.source"),
    ({"run": "a/b"}, "run"),
    ({"model": {"source": "tiny"}}, "run"),
    ({"run": "x", "tune": {"image_budgets": {"single": []}}}, "tune.image_budgets"),
])
def test_wrong_values_name_the_key(data, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        parse_params(data, "f.yaml")


def test_tune_budgets_without_the_full_one_say_how_to_fix():
    with pytest.raises(ParamsError, match="add `full: null`"):
        parse_params({"run": "x", "tune": {"image_budgets": {"single": [], "wide": [[672, 336]]}}}, "f.yaml")


def test_not_a_mapping_and_bad_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="a.yaml.*mapping"):
        load_params(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("run: [\n")
    with pytest.raises(ParamsError, match="b.yaml.*YAML"):
        load_params(tmp_path / "b.yaml")
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in (repo_root() / "params").glob("*.yaml")))
def test_shipped_params_are_valid(name):
    load_params(repo_root() / "params" / name)


def test_readme_documents_every_key():
    """The keys are a contract: each one appears in the README's params table."""
    from llava_gguf.run.params import Params

    readme = (repo_root() / "README.md").read_text()

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                yield from keys(ann, f"{prefix}{name}.")
            else:
                yield prefix + name

    missing = [k for k in keys(Params) if f"`{k}`" not in readme]
    assert not missing, f"README.md does not document {missing}"
