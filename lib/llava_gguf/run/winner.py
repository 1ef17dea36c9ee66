"""The one winner rule: which measured configuration is fastest, and whether one is faster than
another beyond the spread. Step 06 (the fastest quant type in evaluate), step 07 (the
recommendation and its verdict against the seed's command), the comparison page and the index
headline all decide and word their speed claims here, and nowhere else.

- A configuration's speed is the MEDIAN of its repetitions (seconds, or ms, to a full answer).
- SIGNIFICANCE (`significance`): A is faster than B only when both have at least MIN_RUNS runs and
  A's slowest run beats B's fastest (their min..max ranges do not overlap); "slower" is the
  reverse; overlapping ranges are "same"; fewer than MIN_RUNS runs on either side are "no claim"
  (one run says nothing about the spread).
- THE WINNER (`pick`): the lowest median. A candidate that is not significantly slower than it
  ties with it; among the ties the caller's preference decides (step 07: the f16 mmproj, then the
  lower KL divergence), then the lower median.
- THE WORDS (`claim`): "2.44× faster than the seed's command" only for "faster";
  "same speed as the seed's command, within the spread"; "1.2× slower than ..."; or "no speed
  claim against ...: one run each".

Pure: no files, no tools; tests/test_winner.py holds it to these words.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from .formatting import format_ratio

MIN_RUNS = 2
FASTER, SLOWER, SAME, NO_CLAIM = "faster", "slower", "same", "no claim"
RULE = (f"medians of repetitions; A is faster than B only when both have at least {MIN_RUNS} runs and "
        "A's slowest run beats B's fastest (min..max ranges do not overlap)")


def _finite(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class Sample:
    """A configuration's repetitions as the rule reads them: median, fastest, slowest, count."""

    median: float | None
    lo: float | None
    hi: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[Any] | None) -> "Sample":
        vals = [x for x in (_finite(v) for v in (values or [])) if x is not None]
        if not vals:
            return cls(None, None, None, 0)
        return cls(statistics.median(vals), min(vals), max(vals), len(vals))

    @classmethod
    def summary(cls, median: Any, lo: Any = None, hi: Any = None, n: Any = 1) -> "Sample":
        """From a table's median/min/max/count columns. Min and max unknown: the median's for one run;
        for more they stay unknown (None), and no claim is made from a spread nobody recorded."""
        m = _finite(median)
        lo, hi = _finite(lo), _finite(hi)
        count = int(n) if _finite(n) is not None else (1 if m is not None else 0)
        if count <= 1:
            lo, hi = (m if lo is None else lo), (m if hi is None else hi)
        return cls(m, lo, hi, count if m is not None else 0)


def significance(a: Sample, b: Sample) -> str:
    """'faster' / 'slower' when A's and B's ranges do not overlap, 'same' when they do, 'no claim'
    when either has fewer than MIN_RUNS runs."""
    if a.n < MIN_RUNS or b.n < MIN_RUNS or None in (a.lo, a.hi, b.lo, b.hi):
        return NO_CLAIM
    if a.hi < b.lo:
        return FASTER
    if b.hi < a.lo:
        return SLOWER
    return SAME


@dataclass(frozen=True)
class Verdict:
    relation: str          # FASTER | SLOWER | SAME | NO_CLAIM
    ratio: float | None    # the reference's median / the candidate's: > 1 is faster
    runs: int = 0
    reference_runs: int = 0


def verdict(candidate: Sample, reference: Sample) -> Verdict:
    ratio = (reference.median / candidate.median
             if candidate.median and reference.median is not None else None)
    return Verdict(significance(candidate, reference), ratio, candidate.n, reference.n)


def claim(v: Verdict, against: str = "the seed's command") -> str:
    """The only words a page uses for a speed comparison."""
    if v.relation == FASTER and v.ratio:
        return f"{format_ratio(v.ratio)} faster than {against}"
    if v.relation == SLOWER and v.ratio:
        return f"{format_ratio(1.0 / v.ratio)} slower than {against}"
    if v.relation == SAME:
        return f"same speed as {against}, within the spread"
    few = min(v.runs, v.reference_runs)
    why = ("not measured" if few == 0 else "one run each" if max(v.runs, v.reference_runs) < MIN_RUNS
           else f"fewer than {MIN_RUNS} runs on one side" if few < MIN_RUNS else "their spread not recorded")
    return f"no speed claim against {against}: {why}"


@dataclass
class Pick:
    """What `pick` decided: the winner, the fastest median, and who could not be told apart from
    the fastest (other than the winner)."""

    name: str | None
    fastest: str | None
    ties: list[str] = field(default_factory=list)        # within the spread of the fastest
    unclaimed: list[str] = field(default_factory=list)   # too few runs to tell apart from it
    candidates: int = 0

    def how(self) -> str:
        """The pick in words, for a summary line."""
        if self.name is None:
            return "no timings"
        if self.candidates == 1:
            return "the only one timed"
        if self.name != self.fastest:
            return f"within the spread of the lowest median ({self.fastest}), and preferred to it"
        if self.ties:
            return "the lowest median, within the spread of " + ", ".join(self.ties) + ": not faster than them"
        if self.unclaimed:
            return "the lowest median; too few runs to call it faster than " + ", ".join(self.unclaimed)
        return "beyond the spread of every other"


def pick(candidates: Mapping[str, Sample], prefer: Callable[[str], Any] | None = None) -> Pick:
    """THE WINNER RULE (module doc): the lowest median; candidates not significantly slower than it
    (same, or no claim) tie with it, and `prefer(name)` (smaller is preferred) decides among them,
    then the lower median."""
    timed = {k: s for k, s in candidates.items() if s.median is not None}
    if not timed:
        return Pick(None, None)
    fastest = min(timed, key=lambda k: timed[k].median)
    rel = {k: SAME if k == fastest else significance(s, timed[fastest]) for k, s in timed.items()}
    pool = [k for k, r in rel.items() if r in (SAME, NO_CLAIM)]
    best = min(pool, key=lambda k: ((prefer(k) if prefer else 0), timed[k].median))
    return Pick(best, fastest, [k for k in pool if k != best and rel[k] == SAME],
                [k for k in pool if k != best and rel[k] == NO_CLAIM], len(timed))
