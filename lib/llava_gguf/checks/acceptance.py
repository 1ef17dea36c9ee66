"""A step's acceptance checks: what its library function promises about what it made.

Each check is a name, what was found and the bound it had to meet. The step's library function
runs its checks after its work, so `python -m llava_gguf step <name>`, the step's notebook and
the tests check the same things. When one fails the step fails with `CheckFailed`, whose
message names every failed check, what was found and the bound; otherwise the result carries its
`Checks`, and the notebook shows `result.checks.table()`.

    checks = Checks("surgery")
    checks.add("projector tensors", n, "4 or 5 (mm_projector.0/2 weight and bias, image_newline)", n in (4, 5))
    checks.enforce()
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pandas as pd

log = logging.getLogger(__name__)


class CheckFailed(RuntimeError):
    """A step's acceptance check failed; `.checks` holds all of them (passed ones included)."""

    def __init__(self, message: str, checks: "Checks"):
        super().__init__(message)
        self.checks = checks


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    found: str
    bound: str


@dataclass
class Checks:
    step: str
    items: list[Check] = field(default_factory=list)

    def add(self, name: str, found, bound, passed: bool) -> bool:
        """Record one check: what was `found`, the `bound` it must meet (both shown as text)."""
        self.items.append(Check(name, bool(passed), _text(found), _text(bound)))
        return bool(passed)

    @property
    def ok(self) -> bool:
        return all(c.passed for c in self.items)

    def failed(self) -> list[Check]:
        return [c for c in self.items if not c.passed]

    def message(self) -> str:
        bad, n = self.failed(), len(self.items)
        checks = f"{n} check" + ("" if n == 1 else "s")
        if not bad:
            return f"step {self.step}: {checks} passed"
        lines = [f"step {self.step}: {len(bad)} of {checks} failed:"]
        lines += [f"- {c.name}: found {c.found}; required {c.bound}" for c in bad]
        return "\n".join(lines)

    def enforce(self) -> "Checks":
        """Raise CheckFailed when any check failed; log the outcome."""
        if not self.ok:
            raise CheckFailed(self.message(), self)
        log.info("%s", self.message())
        return self

    def table(self) -> pd.DataFrame:
        """One row per check: check, result (passed/FAILED), found, required."""
        return pd.DataFrame([{"check": c.name, "result": "passed" if c.passed else "FAILED", "found": c.found,
                              "required": c.bound} for c in self.items],
                            columns=["check", "result", "found", "required"])

    def __str__(self) -> str:
        return self.message()
