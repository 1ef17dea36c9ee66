"""How the kernel of a step shows things when the pipeline runs it headless (papermill).

`headless_kernel()` runs first in every kernel pipeline.execute_notebook starts, before a cell:
- progress bars are tqdm's text bar. tqdm.auto picks its notebook (ipywidgets) bar in any Jupyter
  kernel, and without ipywidgets it warns "IProgress not found" (a red box in every report) before
  falling back to the text bar; a rendered report cannot show a widget anyway.
- pandas shows floats to 3 significant digits (tables.format_number), never a float's repr.
"""
from __future__ import annotations

import sys
import types

import pandas as pd
import tqdm
import tqdm.std

from .tables import format_number


def text_progress_bars() -> None:
    """Make `tqdm.auto` the text bar, as tqdm itself does in a plain console: a stand-in
    `tqdm.autonotebook` holding the text bar, which `tqdm.auto` then wraps. Must run before
    anything imports tqdm.auto (a module that already did keeps its bar)."""
    module = types.ModuleType("tqdm.autonotebook", "tqdm's text bar (a headless kernel: llava_gguf.reports.display)")
    module.tqdm, module.trange, module.__all__ = tqdm.std.tqdm, tqdm.std.trange, ["tqdm", "trange"]
    sys.modules["tqdm.autonotebook"] = module
    tqdm.autonotebook = module


def number_format() -> None:
    pd.set_option("display.float_format", format_number)


def headless_kernel() -> None:
    text_progress_bars()
    number_format()


# The kernel runs this line before the notebook's first cell (ipykernel's exec_lines); it leaves
# no name behind in the notebook's namespace.
EXEC_LINE = "__import__('llava_gguf.reports.display', fromlist=['_']).headless_kernel()"
