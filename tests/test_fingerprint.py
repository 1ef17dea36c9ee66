"""Fingerprints follow code, not comments: a comment or docstring edit reruns nothing, a code edit
reruns the steps whose notebooks import the module (directly or through other modules) and the
steps after them."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from llava_gguf.run import fingerprint as fpmod
from llava_gguf.run.registry import Step

MODULES = {
    "__init__.py": "",
    "helpers.py": '''\
        """Helpers."""
        # a comment
        def scale(x):
            """Double it."""
            return x * 2
        ''',
    "first.py": "from .helpers import scale\n\ndef run():\n    return scale(1)\n",
    "second.py": "def run():\n    return 3\n",
}


@pytest.fixture()
def package(tmp_path, monkeypatch) -> Path:
    pkg = tmp_path / "llava_gguf"
    pkg.mkdir()
    for name, text in MODULES.items():
        (pkg / name).write_text(textwrap.dedent(text))
    monkeypatch.setattr(fpmod, "_PKG_DIR", pkg)
    return pkg


def _step(tmp_path: Path, name: str, module: str, needs: tuple[str, ...] = ()) -> Step:
    nb = {"cells": [{"cell_type": "code", "source": [f"from llava_gguf import {module}\n", f"{module}.run()"],
                     "metadata": {}, "outputs": [], "execution_count": None}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / f"{name}.ipynb"
    path.write_text(json.dumps(nb))
    return Step(name=name, source=path, description=name, needs=needs, products=("thing",), params=("model",))


def _chain(tmp_path: Path) -> tuple[str, str]:
    """Fingerprints of step A (imports first -> helpers) and step B (imports second, needs A)."""
    a = _step(tmp_path, "a", "first")
    b = _step(tmp_path, "b", "second", needs=("a",))
    fa = fpmod.fingerprint(a, {"model": 1}, [])
    return fa, fpmod.fingerprint(b, {"model": 1}, [fa])


def test_comment_and_docstring_edits_rerun_nothing(package, tmp_path):
    before = _chain(tmp_path)
    helpers = package / "helpers.py"
    helpers.write_text(helpers.read_text().replace("# a comment", "# another comment, longer\n# and a second")
                       .replace('"""Double it."""', '"""Double the value (docs rewritten)."""')
                       .replace('"""Helpers."""', '"""Helpers, described anew."""'))
    assert _chain(tmp_path) == before
    # Blank lines and a removed docstring move every line number: still the same code.
    helpers.write_text("\n\n" + helpers.read_text().replace('    """Double the value (docs rewritten)."""\n', ""))
    assert _chain(tmp_path) == before


def test_code_edit_reruns_the_step_that_imports_it_and_the_steps_after(package, tmp_path):
    fa, fb = _chain(tmp_path)
    helpers = package / "helpers.py"
    helpers.write_text(helpers.read_text().replace("x * 2", "x * 3"))
    fa2, fb2 = _chain(tmp_path)
    assert fa2 != fa and fb2 != fb  # helpers is imported by first only; B changes through A


def test_code_edit_in_a_later_steps_module_leaves_the_earlier_step(package, tmp_path):
    fa, fb = _chain(tmp_path)
    (package / "second.py").write_text("def run():\n    return 4\n")
    fa2, fb2 = _chain(tmp_path)
    assert fa2 == fa and fb2 != fb


def test_a_string_that_is_not_a_docstring_is_code(tmp_path):
    src = "def f():\n    x = 1\n    'an expression after code'\n    return x\n"
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text(src)
    b.write_text(src.replace("an expression", "another expression"))
    assert fpmod.normalized_code(a) != fpmod.normalized_code(b)
