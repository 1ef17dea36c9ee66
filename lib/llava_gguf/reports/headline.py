"""The run's one headline, and every other page line that names a winner or a speed claim.

The index page opens with ONE winner: step 07's recommendation when the run was tuned (its
median, its spread, its verdict against the seed's command by winner.py's rule, and the load it
was measured under). Step 06's pick appears only as "fastest quant type in evaluate", labelled so
(summary.py and compare.py use EVALUATE_LABEL). The comparison page words each run's recommendation
with `tune_claim` too, so a page never says "faster" where the rule does not.

recommended.json is read as written by reports/tune.py; files from before the load records or the
repetition lists are read from their median/min/max/runs (and with one run, no claim is made).
"""
from __future__ import annotations

import html
import json
from typing import Any, Mapping

from .serve import memory_line
from .tables import format_seconds, plural
from ..run import machine_load as load, winner
from ..run.workspace import Run


def sample(entry: Mapping[str, Any] | None, repetitions: Any = None) -> winner.Sample:
    """A recommended.json entry (a budget's recommendation or the baseline) as the rule reads it."""
    e = entry or {}
    if e.get("answer_s_all"):
        return winner.Sample.of(e["answer_s_all"])
    return winner.Sample.summary(e.get("answer_s"), e.get("answer_min_s"), e.get("answer_max_s"),
                                 e.get("runs") or repetitions or 1)


def spread_parts(entry: Mapping[str, Any] | None, repetitions: Any = None) -> tuple[str, str]:
    """('2.31 s', 'median of 3 runs, 2.20 s .. 2.47 s'); one run: ('2.31 s', 'one run')."""
    s = sample(entry, repetitions)
    if s.median is None:
        return "–", "not measured"
    if s.n < 2:
        return format_seconds(s.median), "one run"
    if s.lo is None or s.hi is None:
        return format_seconds(s.median), f"median of {plural(s.n, 'run')}, spread not recorded"
    return format_seconds(s.median), f"median of {plural(s.n, 'run')}, {format_seconds(s.lo)} .. {format_seconds(s.hi)}"


def spread_text(entry: Mapping[str, Any] | None, repetitions: Any = None) -> str:
    """'2.31 s (median of 3 runs, 2.20 s .. 2.47 s)'."""
    median, detail = spread_parts(entry, repetitions)
    return f"{median} ({detail})"


def tune_verdict(info: Mapping[str, Any], budget: str | None = None) -> winner.Verdict:
    """A budget's recommendation (default: the main one) against the seed's command, by the rule."""
    rec = (info.get("budgets") or {}).get(budget) if budget else info.get("recommended")
    reps = (info.get("setup") or {}).get("repetitions")
    base = info.get("baseline") or {"answer_s": info.get("seed_answer_s")}
    return winner.verdict(sample(rec or info, reps), sample(base, reps))


def tune_load(info: Mapping[str, Any], budget: str | None = None) -> dict[str, Any]:
    """The load over the runs a headline compares: the recommendation's and the seed's command's."""
    rec = (info.get("budgets") or {}).get(budget) if budget else info.get("recommended")
    return load.merge((rec or {}).get("load"), (info.get("baseline") or {}).get("load"))


def tune_claim(info: Mapping[str, Any], budget: str | None = None, seed: str | None = None,
               name: str = "the seed's command") -> str:
    """'2.44× faster than the seed's command' / 'same speed as the seed's command, within the spread' ...;
    `seed`: the seed's command's time, in parentheses after its `name`."""
    return winner.claim(tune_verdict(info, budget), name + (f" ({seed})" if seed else ""))


def threshold(info: Mapping[str, Any]) -> float:
    return load.threshold_of(info.get("setup"))


def published_claim(info: Mapping[str, Any], budget: str | None = None) -> str:
    """The recommendation against the published recipe (tune/published.py) by the same rule:
    '1.37× faster than the published recipe (<how>: 159.6 s, median of 2 runs, ...)', or why it
    was not measured; '' for files from before that baseline existed."""
    pub = info.get("published") or {}
    if not pub:
        return ""
    name = pub.get("name") or "the published recipe"
    if not pub.get("measured"):
        return f"{name}: {pub.get('why_not') or 'not measured'}"
    rec = (info.get("budgets") or {}).get(budget) if budget else info.get("recommended")
    reps = (info.get("setup") or {}).get("repetitions")
    against = f"{name} ({pub.get('description')}: {', '.join(spread_parts(pub, reps))})"
    return winner.claim(winner.verdict(sample(rec or info, reps), sample(pub, reps)), against)


def tune_headline(info: Mapping[str, Any]) -> str | None:
    """The headline in plain text (HTML-escaped by the caller), None when it cannot be stated:
    'on this machine: answer in 2.1 s (median of 3 runs, ...) with <config>: 1.71× faster than the
    published recipe (...), 1.45× faster than the seed's command on this build (3.05 s, median of 3
    runs, ...) — measured at load 1.9 ...'."""
    rec, base = info.get("recommended") or {}, info.get("baseline") or {"answer_s": info.get("seed_answer_s")}
    if not rec.get("answer_s"):
        return None
    reps = (info.get("setup") or {}).get("repetitions")
    seed = ", ".join(spread_parts(base, reps))
    published = published_claim(info)
    # With the published recipe beside it, the seed's command is named by its build.
    vs_seed = tune_claim(info, seed=seed, name="the seed's command" + (" on this build" if published else ""))
    return (f"on this machine: answer in {spread_text(rec, reps)} with {rec.get('config')}: "
            + (f"{published}; " if published else "")
            + f"{vs_seed} — {load.describe(tune_load(info), threshold(info))}")


def headline_html(run: Run) -> str | None:
    """The first line of index.html, None before step 07 has run."""
    path = run.dir / "tune" / "recommended.json"
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    text = tune_headline(info)
    if text is None:
        return None
    parts = [f"<p><b>{html.escape(text)}</b>"]
    rec = info.get("recommended") or {}
    others = [f"{html.escape(b)}: {html.escape(format_seconds(v.get('answer_s')))} "
              f"({html.escape('; '.join(c for c in (published_claim(info, b), tune_claim(info, b)) if c))}"
              f"{'; ' + load.MARK if tune_load(info, b)['runs_under_load'] else ''})"
              for b, v in (info.get("budgets") or {}).items() if b != rec.get("budget") and v.get("answer_s")]
    if others:
        parts.append("<br>smaller image budgets: " + "; ".join(others))
    setup = info.get("setup") or {}
    parts.append(f"<br>{setup.get('n_predict')} tokens, {plural(int(setup.get('repetitions') or 0), 'repetition')} "
                 f"per configuration; {html.escape(winner.RULE)} (<a href='../run-llava.sh'>run-llava.sh</a>)")
    if info.get("notes"):
        parts.append("<br><small>" + html.escape("; ".join(info["notes"])) + "</small>")
    served = run.dir / "conversation" / "summary.json"
    if served.exists():  # step 08: a conversation with serve-llava.sh
        s = json.loads(served.read_text())
        parts.append(f"<br><b>follow-up answer in {s['follow_up_total_s']:.1f} s (first answer {s['first_total_s']:.1f} s, "
                     f"one-shot run-llava.sh {s['one_shot_s']:.1f} s)</b> with <a href='../serve-llava.sh'>serve-llava.sh</a>: {s['follow_up_prompt_n']} new prompt "
                     f"tokens per follow-up instead of {s['first_prompt_n']} (median over {plural(int(s['cases']), 'case')})")
        if memory_line(s):
            parts.append("; " + memory_line(s))
        if s.get("load"):
            parts.append(f"; {html.escape(load.describe(s['load'], s.get('load_threshold') or load.DEFAULT_THRESHOLD))}")
    return "".join(parts) + "</p>"


# ----------------------------------------------------------------------------- step 06's pick
EVALUATE_LABEL = "Fastest quant type in evaluate"
