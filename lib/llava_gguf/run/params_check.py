"""A params file checked in seconds, before `make setup` installs torch and before the llama.cpp build.

`make all` (and every step target) runs this first, in a virtual environment that holds only
pydantic and PyYAML, so a misspelt key or a missing image stops the run with the key named instead
of after a 20-minute build:

    python -m llava_gguf.run.params_check params/x.yaml

It validates every key and type (params.load_params) and that every path the file names exists.
What needs the full environment (a checkpoint's headers, the llama.cpp tools) is the pipeline's
preflight, which runs after setup and before step 01.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .params import Params, ParamsError, load_params
from .registry import repo_root


def _resolve(path: str) -> Path:
    # Params paths are absolute or relative to the repo root (workspace.resolve, which needs more
    # of the environment than this check may import).
    p = Path(path).expanduser()
    return p if p.is_absolute() else repo_root() / p


def path_problems(params: Params, where: str) -> list[str]:
    """Every path key of `params` that names something that is not there."""
    wanted: list[tuple[str, str | None, str]] = [
        ("llama_cpp.dir", params.llama_cpp.dir, "a folder holding a llama.cpp build (its bin/ or the tools)"),
        ("convert.vision_config", params.convert.vision_config, "the vision tower's CLIPVisionConfig JSON"),
    ]
    if params.model.source == "local":
        wanted.append(("model.path", params.model.path, "the local checkpoint folder"))
    wanted += [(f"evaluate.cases[{i}].image", case.image, "an image file")
               for i, case in enumerate(params.evaluate.cases)]
    problems = []
    for key, value, what in wanted:
        if value is not None and not _resolve(value).exists():
            problems.append(f"{where}: key '{key}': {_resolve(value)} does not exist (it should be {what}; "
                            "paths are absolute or relative to the repo root)")
    return problems


def check_file(path: str | Path) -> Params:
    params = load_params(path)
    problems = path_problems(params, str(path))
    if problems:
        raise ParamsError("\n".join(problems))
    return params


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m llava_gguf.run.params_check PARAMS_FILE", file=sys.stderr)
        return 2
    try:
        params = check_file(argv[0])
    except ParamsError as err:
        print(f"{err}\n(checked before setup and the llama.cpp build; nothing was installed or run)", file=sys.stderr)
        return 2
    print(f"{argv[0]}: valid (run '{params.run}', model source {params.model.source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
