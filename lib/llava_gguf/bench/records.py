"""The benchmark's records: what one measured step cost, the targets, and bench.json's rows."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .procmon import GiB, Measurement

MiB = 2**20
# Issue 6's targets for the project's conversion (surgery + vision + text) of the 7B to f16.
TARGET_PEAK_ANON = 1.5 * GiB
TARGET_LEFT_FACTOR = 1.1  # of the f16 size of the model (2 bytes per parameter)
TARGET_VS_LEGACY = 0.5  # of the legacy recipe's time for the same steps
TARGET_VS_COPY = 2.0  # of the plain copy's time for the same bytes
CONVERT_STEPS = ("surgery", "vision", "text")

PROJECT, LEGACY, REFERENCE = "project", "legacy", "reference"


class BenchError(RuntimeError):
    """The benchmark cannot start or go on; the message names the cause and the fix."""


@dataclass
class StepRecord:
    recipe: str
    step: str
    m: Measurement
    outputs: dict[str, int] = field(default_factory=dict)  # file -> bytes left by the step
    flush_s: float = 0.0
    note: str = ""

    @property
    def output_bytes(self) -> int:
        return sum(self.outputs.values())

    def row(self) -> dict[str, Any]:
        m = self.m
        return {"recipe": self.recipe, "step": self.step, "wall_s": round(m.wall_s, 2),
                "cpu_s": round(m.cpu_s, 2), "cores_busy": round(m.cpu_s / m.wall_s, 2) if m.wall_s else None,
                "peak_anon_GiB": _gib(m.peak_anon), "peak_file_GiB": _gib(m.peak_file),
                "written_GiB": _gib(m.write_bytes), "output_GiB": _gib(self.output_bytes),
                "write_MiB_s": round(m.write_bytes / MiB / m.wall_s, 1) if m.wall_s else None,
                "flush_s": round(self.flush_s, 2), "note": self.note}


@dataclass
class BenchResult:
    dir: Path
    conversion: pd.DataFrame
    totals: pd.DataFrame
    targets: pd.DataFrame
    inference: pd.DataFrame
    mtmd: pd.DataFrame
    quant_files: pd.DataFrame
    report: Path
    plots: dict[str, Path]


def _gib(n: float) -> float:
    return round(n / GiB, 3)


def record_json(r: StepRecord) -> dict[str, Any]:
    return {"recipe": r.recipe, "step": r.step, "measurement": {**r.m.row(), "timeline": r.m.timeline},
            "outputs": r.outputs, "flush_s": r.flush_s, "note": r.note}


def record_from_json(d: dict[str, Any]) -> StepRecord:
    m = dict(d["measurement"])
    m["timeline"] = [tuple(x) for x in m.get("timeline", [])]
    return StepRecord(d["recipe"], d["step"], Measurement(**m), d.get("outputs", {}), d.get("flush_s", 0.0),
                      d.get("note", ""))
