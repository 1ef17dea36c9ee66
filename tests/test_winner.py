"""The one winner rule (winner.py): medians of repetitions, "faster" only beyond the spread, no claim
from one run, and the words every page uses for it."""
from __future__ import annotations

import pytest

from llava_gguf.run import winner
from llava_gguf.run.winner import Sample

# Answer times (s) of three confirmation runs each, recorded on this project's 2-core machine.
SEED = [2.91, 3.40, 3.05]
FAST = [2.20, 2.31, 2.47]       # every run below the seed's fastest
CLOSE = [2.85, 3.62, 3.10]      # overlaps the seed's range
OUTLIER = [0.88, 0.93, 4.40]    # one outlier run reaches into everyone's range


def test_sample_is_median_min_max_count():
    s = Sample.of(SEED)
    assert (s.median, s.lo, s.hi, s.n) == (3.05, 2.91, 3.40, 3)
    assert Sample.of([None, float("nan")]) == Sample(None, None, None, 0)
    assert Sample.summary(3.0, 2.9, 3.1, 3) == Sample(3.0, 2.9, 3.1, 3)
    assert Sample.summary(3.0) == Sample(3.0, 3.0, 3.0, 1)  # a table without a spread: one run
    assert Sample.summary(None, n=3).n == 0
    # Three runs whose min and max nobody recorded (a file from before them): no spread, so no claim.
    assert Sample.summary(3.0, n=3) == Sample(3.0, None, None, 3)
    unknown = winner.verdict(Sample.summary(2.0, n=3), Sample.summary(3.0, n=3))
    assert unknown.relation == "no claim"
    assert winner.claim(unknown) == "no speed claim against the seed's command: their spread not recorded"


def test_separated_spreads_are_faster_overlapping_ones_the_same():
    assert winner.significance(Sample.of(FAST), Sample.of(SEED)) == "faster"
    assert winner.significance(Sample.of(SEED), Sample.of(FAST)) == "slower"
    assert winner.significance(Sample.of(CLOSE), Sample.of(SEED)) == "same"
    assert winner.significance(Sample.of(OUTLIER), Sample.of(SEED)) == "same"  # a lower median is not enough


def test_a_single_run_makes_no_claim():
    assert winner.significance(Sample.of([1.0]), Sample.of(SEED)) == "no claim"
    assert winner.significance(Sample.of([1.0]), Sample.of([9.0])) == "no claim"  # 9x apart, still one run each
    assert winner.significance(Sample.of([]), Sample.of(SEED)) == "no claim"


def test_the_words():
    v = winner.verdict(Sample.of(FAST), Sample.of(SEED))
    assert v.relation == "faster" and v.ratio == pytest.approx(3.05 / 2.31)
    assert winner.claim(v) == "1.32× faster than the seed's command"
    assert winner.claim(winner.verdict(Sample.of(SEED), Sample.of(FAST))) == "1.32× slower than the seed's command"
    same = winner.verdict(Sample.of(CLOSE), Sample.of(SEED))
    assert winner.claim(same) == "same speed as the seed's command, within the spread"
    assert winner.claim(winner.verdict(Sample.of(OUTLIER), Sample.of(SEED))) == \
        "same speed as the seed's command, within the spread"  # medians 3.3x apart
    one = winner.verdict(Sample.of([1.0]), Sample.of([3.0]))
    assert winner.claim(one, "the seed's command (3.00 s)") == "no speed claim against the seed's command (3.00 s): one run each"
    assert winner.claim(winner.verdict(Sample.of([1.0]), Sample.of(SEED))).endswith("fewer than 2 runs on one side")
    for v in (same, one):
        assert "faster" not in winner.claim(v) and "×" not in winner.claim(v)


def test_the_winner_is_the_lowest_median_unless_a_tie_is_preferred():
    runs = {"seed": Sample.of(SEED), "fast": Sample.of(FAST), "close": Sample.of(CLOSE)}
    p = winner.pick(runs)
    assert (p.name, p.fastest, p.ties, p.unclaimed) == ("fast", "fast", [], [])
    assert p.how() == "beyond the spread of every other"
    # An outlier's low median wins only the median: within the spread of the others, not faster.
    p = winner.pick({**runs, "outlier": Sample.of(OUTLIER)})
    assert p.name == "outlier" and set(p.ties) == {"seed", "fast", "close"}
    assert p.how().startswith("the lowest median, within the spread of")
    # A preference (step 07: the f16 mmproj, then the lower KLD) decides among the ties only.
    precise = {"fast": 2, "seed": 0, "close": 1, "outlier": 3}
    assert winner.pick({**runs, "outlier": Sample.of(OUTLIER)}, prefer=precise.get).name == "seed"
    assert winner.pick(runs, prefer=precise.get).name == "fast"  # beyond the spread: the preference is moot
    # One run each: the lowest median is named, with no claim against the rest.
    p = winner.pick({"a": Sample.of([1.0]), "b": Sample.of([2.0])})
    assert (p.name, p.unclaimed) == ("a", ["b"]) and "too few runs" in p.how()
    assert winner.pick({"only": Sample.of(SEED)}).how() == "the only one timed"
    assert winner.pick({}).name is None and winner.pick({"x": Sample.of([])}).how() == "no timings"
