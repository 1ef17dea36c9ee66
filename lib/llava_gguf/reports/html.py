"""HTML reports of a run: each executed notebook rendered, and an index.html that links them.

The index opens with the evaluation summary (summary.summary_html) when the run has metrics.
"""
from __future__ import annotations

import html
import json
import logging
from pathlib import Path

from .. import registry
from ..workspace import Run, atomic_path
from . import summary

log = logging.getLogger(__name__)


def render_notebook(notebook: Path, run: Run) -> Path | None:
    """notebooks/NN_x.ipynb -> reports/NN_x.html (code shown, as a reviewable record)."""
    if not notebook.exists():
        return None
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    out = run.sub("reports") / f"{notebook.stem}.html"
    with atomic_path(out) as tmp:
        tmp.write_text(body, encoding="utf-8")
    return out


def _summary(run: Run) -> str:
    try:
        return summary.summary_html(run) or ""
    except Exception as err:  # a broken summary must not hide the reports
        log.warning("summary failed: %s", err)
        return f"<p><b>summary unavailable:</b> {html.escape(str(err))}</p>"


def render_index(run: Run) -> Path:
    reports = sorted(run.sub("reports").glob("[0-9][0-9]_*.html"))
    steps_file = run.dir / "steps.json"
    steps = json.loads(steps_file.read_text()) if steps_file.exists() else {}
    by_nb = {s.source.stem: s.name for s in registry.steps().values()}
    rows = []
    for r in reports:
        step = by_nb.get(r.stem, "")
        st = steps.get(step)
        status = f"done in {st['seconds']} s ({st['finished']})" if st else "failed or incomplete"
        rows.append(f"<tr><td><a href='{html.escape(r.name)}'>{html.escape(r.stem)}</a></td>"
                    f"<td>{html.escape(step)}</td><td>{html.escape(status)}</td></tr>")
    artifacts = run.artifacts()
    art_rows = "".join(f"<tr><td>{html.escape(k)}</td><td><code>{html.escape(json.dumps(v))}</code></td></tr>"
                       for k, v in artifacts.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>llava-gguf run {html.escape(run.params.run)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} td,th{{padding:4px 10px;
border-bottom:1px solid #ddd;text-align:left}} code{{font-size:90%}}</style></head><body>
<h1>Run <code>{html.escape(run.params.run)}</code></h1>
<p>params: <code>{html.escape(str(run.params_file))}</code></p>
{_summary(run)}
<h2>Steps</h2><table><tr><th>report</th><th>step</th><th>status</th></tr>{''.join(rows)}</table>
<h2>Artifacts</h2><table>{art_rows}</table>
</body></html>"""
    out = run.sub("reports") / "index.html"
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
