"""Step 07's acceptance checks, run by `tune.run_tune` after the search: what the recommendation
promises, and `run-llava.sh` run as written (a short answer)."""
from __future__ import annotations

from ..checks.acceptance import Checks
from ..llama_cpp import toolchain
from ..reports.tables import format_seconds, plural
from ..run.workspace import Run

SCRIPT_CHECK_TOKENS = 4


def acceptance_checks(run: Run, result) -> Checks:
    """The seed's command measured as asked, a recommendation per image budget with a consistent
    spread and an image-token count from the tool's log, and run-llava.sh running as written."""
    checks, p, rec = Checks("tune"), run.params.tune, result.recommended
    base, budgets = rec["baseline"], rec["budgets"]
    checks.add("seed's command", f"{format_seconds(base.get('answer_s'))} over {plural(base.get('runs') or 0, 'run')}",
               f"an answer time over tune.repetitions = {plural(p.repetitions, 'run')}",
               bool(base.get("answer_s")) and base.get("runs") == p.repetitions)
    checks.add("image budgets", ", ".join(budgets), f"each of tune.image_budgets: {', '.join(p.image_budgets)}",
               set(budgets) == set(p.image_budgets))
    for name, v in budgets.items():
        # The median, min and max come from one list, so their order alone could not fail; the count can
        # (a configuration whose later repetitions failed is confirmed over fewer runs).
        times = [v.get(k) for k in ("answer_min_s", "answer_s", "answer_max_s")]
        checks.add(f"budget {name}: its runs",
                   f"{plural(v.get('runs') or 0, 'run')}, " + " <= ".join(format_seconds(t) for t in times),
                   f"tune.repetitions = {plural(p.repetitions, 'run')}, fastest <= median <= slowest",
                   v.get("runs") == p.repetitions and None not in times and times == sorted(times))
        checks.add(f"budget {name}: image tokens", v["image_tokens"] or "none", "read from the tool's log",
                   bool(v["image_tokens"]))
    # Every type has a screened answer at every budget or the reason it has none; the published recipe
    # is measured or says why not; each budget's bound is named with a number or says why not.
    uncovered = [f"{c.get('quant')} at {c.get('budget')}" for c in rec.get("coverage") or []
                 if c.get("answer_s") is None and not c.get("why_not")]
    checks.add("type coverage", f"unexplained: {', '.join(uncovered)}" if uncovered else
               f"{plural(len(rec.get('coverage') or []), 'type and budget pair')}",
               "a screened answer or a reason for every quant type at every image budget",
               not uncovered)
    published = rec.get("published") or {}
    checks.add("published recipe", "measured" if published.get("measured") else
               (published.get("why_not") or "neither measured nor explained"),
               "measured, or why not", bool(published.get("measured") or published.get("why_not")))
    checks.add("bound per budget", ", ".join(rec.get("bound") or {}) or "none",
               f"each of {', '.join(budgets)}", set(rec.get("bound") or {}) == set(budgets))
    scripts = ["run-llava.sh"] + ([f"run-llava-{b}.sh" for b in budgets] if len(budgets) > 1 else [])
    missing = [s for s in scripts if not (run.dir / s).exists()]
    checks.add("scripts", f"missing {', '.join(missing)}" if missing else ", ".join(scripts),
               "run-llava.sh, and run-llava-<budget>.sh for each of 2 or more budgets", not missing)
    if "run-llava.sh" not in missing:
        # As written, with a short answer (the last -n wins); bounded by the slowest measured answer.
        limit = max(600.0, 10 * max((v.get("answer_max_s") or 0.0 for v in budgets.values()), default=0.0))
        log_file = run.sub("tune") / "logs" / "run-llava-check.log"
        try:
            toolchain.run_tool(["bash", run.dir / "run-llava.sh", "-n", SCRIPT_CHECK_TOKENS], log_file, limit,
                               f"run-llava.sh -n {SCRIPT_CHECK_TOKENS}")
            found = f"exit 0 (log {log_file.name})"
        except toolchain.ToolFailed as err:
            found = str(err).splitlines()[0]
        checks.add("run-llava.sh runs", found, f"exit 0 with -n {SCRIPT_CHECK_TOKENS} within {limit:.0f} s",
                   found.startswith("exit 0"))
    return checks
