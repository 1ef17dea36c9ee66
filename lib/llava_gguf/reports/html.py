"""HTML reports of a run: each executed notebook rendered, and an index.html that links them.

The index opens with the evaluation summary (summary.summary_html) when the run has metrics, and
ends with the run's history (older executed notebooks and reports kept by pipeline.keep_previous).

nbconvert inlines ~260 KB of JupyterLab CSS into every page; the <style> blocks of the page's head
are written once per content to `reports/assets/notebook-<hash>.css` and linked instead (a <link>
works from file:// too). Its inline scripts stay: the MathJax config must be inline, and a
module script loaded from a file:// URL is blocked by browsers. REPORT_CSS is added to that
stylesheet: long code lines and table cells wrap, so that no element is wider than the page.

The library logs to stderr, so a step's cell shows its log as red stderr boxes (tune: ~4,000 px).
A report shows the last LOG_TAIL lines of a cell's log, with a link to the whole of it, written to
`logs/<notebook>-cell<N>.log`, and links to the tool logs it names; the executed notebook keeps
every line.
"""
from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import re
import shutil
from pathlib import Path

from . import summary
from .tables import plain, plural
from .tune import headline_html
from ..run import registry
from ..run.machine import describe
from ..run.workspace import Run, atomic_path

log = logging.getLogger(__name__)

ASSETS = "assets"
# The lab template, with an alt text on every PNG/JPEG: the output's own ("alt" in its image
# metadata, which plots.PlotFigure sets to the figure's titles), else a generic one.
TEMPLATE = """{%- extends 'index.html.j2' -%}
{% macro with_alt(img_html, output, mime) -%}
{%- set alt = output | get_metadata('alt', mime) or 'plot or image output of this cell' -%}
{{ img_html | replace('<img ', '<img alt="' ~ (alt | escape_html) ~ '" ', 1) }}
{%- endmacro %}
{% block data_png scoped %}{{ with_alt(super(), output, 'image/png') }}{% endblock data_png %}
{% block data_jpg scoped %}{{ with_alt(super(), output, 'image/jpeg') }}{% endblock data_jpg %}
"""
# Appended to the shared stylesheet (after the lab's rules, so these win).
REPORT_CSS = """/* llava-gguf reports: nothing wider than the page */
.jp-InputArea-editor pre, .jp-RenderedText pre, .highlight pre {
  white-space: pre-wrap; overflow-wrap: anywhere; }
.jp-RenderedHTMLCommon table { max-width: 100%; }
.jp-RenderedHTMLCommon td, .jp-RenderedHTMLCommon th { white-space: normal; overflow-wrap: anywhere; }
.jp-RenderedImage img, .jp-OutputArea-output img { max-width: 100%; height: auto; }
"""
LOG_TAIL = 8
STDERR = "stderr"
_LOG_PATH = re.compile(r"(/[^\s()'\"]+\.log)\b")
_HEAD_STYLE = re.compile(r"<style[^>]*>(.*?)</style>\s*", re.S | re.I)
_ASSET_LINK = re.compile(r"""href=["'](assets/[^"'/]+)["']""")


def notebook_html(notebook: Path, run: Run | None = None) -> str:
    """The executed notebook as one HTML page (lab template, every image with an alt text; with a
    run, each cell's log cut to its tail: log_tails)."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab")
    exporter.raw_template = TEMPLATE
    nb = nbformat.read(notebook, as_version=4)
    if run is not None:
        log_tails(nb, run, notebook.stem)
    body, _ = exporter.from_notebook_node(nb)
    return body


def terminal_lines(text: str) -> list[str]:
    """Stream text as a terminal shows it: a carriage return rewrites its line (progress bars)."""
    lines = []
    for line in text.split("\n"):
        parts = [p for p in line.split("\r") if p]
        lines.append(parts[-1] if parts else "")
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _href(path: Path, run: Run) -> str | None:
    """`path` relative to reports/, None when it is not inside the run folder."""
    try:
        rel = path.resolve().relative_to(run.dir.resolve())
    except (ValueError, OSError):
        return None
    return f"../{rel.as_posix()}"


def log_tails(nb, run: Run, stem: str) -> None:
    """Each code cell's stderr outputs merged into one; a log longer than LOG_TAIL lines is written to
    logs/<stem>-cell<N>.log and shown as its last lines, after a note linking it and the tool logs it
    names. Changes `nb` in place (the rendered copy, never the executed notebook)."""
    from nbformat import v4

    for number, cell in enumerate(nb.cells):
        outputs = cell.get("outputs") or []
        logs = [o for o in outputs if o.get("output_type") == "stream" and o.get("name") == STDERR]
        if not logs:
            continue
        lines = terminal_lines("".join(o.get("text", "") for o in logs))
        first = outputs.index(logs[0])
        kept = [o for o in outputs if o not in logs]
        shown = [v4.new_output("stream", name=STDERR, text="\n".join(lines[-LOG_TAIL:]) + "\n")] if lines else []
        if len(lines) > LOG_TAIL:
            full = run.sub("logs") / f"{stem}-cell{number}.log"
            with atomic_path(full, suffix=".log") as tmp:
                tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
            tools = [p for p in dict.fromkeys(_LOG_PATH.findall("\n".join(lines))) if Path(p) != full]
            links = [(Path(p).name, _href(Path(p), run)) for p in tools]
            named = [f"<a href='{html.escape(h)}'>{html.escape(n)}</a>" for n, h in links if h]
            note = (f"<p>Log: the last {LOG_TAIL} of {len(lines):,} lines (<a href='{html.escape(_href(full, run))}'>"
                    f"the whole log</a>).</p>")
            if named:  # a tuning run names dozens: folded
                note += (f"<details><summary>{plural(len(named), 'tool log')} it names</summary>"
                         f"<p>{', '.join(named)}</p></details>")
            shown.insert(0, v4.new_output("display_data", data={"text/html": note, "text/plain": f"log: the last {LOG_TAIL} of {len(lines)} lines; all of it: {full}"}))
        first_kept = sum(1 for o in outputs[:first] if o not in logs)
        cell["outputs"] = kept[:first_kept] + shown + kept[first_kept:]


def shared_css(page: str, reports: Path) -> str:
    """`page` with its head's <style> blocks replaced by a link to one shared, content-addressed
    stylesheet under reports/assets/ (written once; the blocks keep their order in it)."""
    end = page.find("</head>")
    head = page[:end] if end >= 0 else ""
    blocks = list(_HEAD_STYLE.finditer(head))
    if not blocks:
        return page
    css = "\n".join([*(m.group(1).strip() for m in blocks), REPORT_CSS])
    name = f"notebook-{hashlib.sha256(css.encode()).hexdigest()[:16]}.css"
    path = reports / ASSETS / name
    if not path.exists():  # same content, same name: an existing file is already right
        with atomic_path(path, suffix=".css") as tmp:
            tmp.write_text(css, encoding="utf-8")
    link = f'<link rel="stylesheet" type="text/css" href="{ASSETS}/{name}">\n'
    first, last = blocks[0].start(), blocks[-1].end()
    kept = "".join(head[a.end():b.start()] for a, b in zip(blocks, blocks[1:]))  # what lay between
    return page[:first] + link + kept + page[last:]


def render_notebook(notebook: Path, run: Run) -> Path | None:
    """notebooks/NN_x.ipynb -> reports/NN_x.html (code shown, as a reviewable record)."""
    if not notebook.exists():
        return None
    reports = run.sub("reports")
    body = shared_css(notebook_html(notebook, run), reports)
    out = reports / f"{notebook.stem}.html"
    with atomic_path(out) as tmp:
        tmp.write_text(body, encoding="utf-8")
    return out


def move_report(report: Path, dest: Path) -> Path:
    """Move a rendered report into folder `dest` with the shared assets it links (hard-linked,
    else copied), so that it still renders there (pipeline.keep_previous)."""
    moved = dest / report.name
    os.replace(report, moved)
    for rel in _ASSET_LINK.findall(moved.read_text(encoding="utf-8", errors="replace")):
        src, target = report.parent / rel, dest / rel
        if target.exists() or not src.exists():
            continue
        with atomic_path(target, suffix=target.suffix) as tmp:
            tmp.unlink()
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
    return moved


def _summary(run: Run) -> str:
    try:
        return summary.summary_html(run) or ""
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # a run file missing, unreadable or of
        # an older layout must not hide the reports
        log.warning("summary failed: %s", err)
        return f"<p><b>summary unavailable:</b> {html.escape(str(err))}</p>"


def _tune_headline(run: Run) -> str:
    """Step 07's "on this machine: answer in X s ..." line, when it has run."""
    try:
        return headline_html(run) or ""
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # as in _summary
        log.warning("tune headline failed: %s", err)
        return ""


def machine_html(run: Run) -> str:
    """The "Machine" section: where the run measured, the CPU features llama.cpp saw, what it repacked."""
    info = json.loads((run.dir / "machine.json").read_text()) if (run.dir / "machine.json").exists() else {}
    if not info:
        return ""
    m, llama = info.get("machine") or {}, info.get("llama_cpp") or {}
    warn = (f"<p><b>Emulated ({html.escape(m['emulation'])}): timings are not board speed.</b></p>"
            if m.get("emulation") else "")
    system_info = (llama.get("system_info") or {}).get("line") or "not in the logs"
    repack_file = run.dir / "repack.json"
    repacks = json.loads(repack_file.read_text()) if repack_file.exists() else None
    rows = [("machine", describe(m)), ("arch", m.get("arch")), ("CPU features", ", ".join(m.get("features") or [])),
            ("llama.cpp", llama.get("version")), ("llama.cpp system_info", system_info)]
    if repacks is not None:
        rows += [(f"repacked ({name})", ", ".join(f"{k} x{n}" for k, n in (r.get("layouts") or {}).items())
                  or "nothing") for name, r in repacks.items()]
    cells = "".join(f"<tr><td>{html.escape(str(k))}</td><td><code>{html.escape(str(v))}</code></td></tr>"
                    for k, v in rows)
    return f"<h2>Machine</h2>{warn}<table>{cells}</table>"


def history_html(run: Run) -> str:
    """The "History" section: each history/<time>/ folder, newest first, with links to the
    executed notebooks and reports it holds (relative to reports/)."""
    folder = run.dir / "history"
    stamps = sorted((p for p in folder.iterdir() if p.is_dir()), reverse=True) if folder.is_dir() else []
    rows = []
    for stamp in stamps:
        files = sorted(f for f in stamp.iterdir() if f.suffix in (".html", ".ipynb"))
        links = " ".join(f"<a href='../history/{html.escape(stamp.name)}/{html.escape(f.name)}'>"
                         f"{html.escape(f.name)}</a>" for f in files)
        rows.append(f"<tr><td>{html.escape(stamp.name)}</td><td>{links or 'empty'}</td></tr>")
    if not rows:
        return "<h2>History</h2><p>No earlier runs of a step kept yet.</p>"
    return ("<h2>History</h2><p>Earlier executed notebooks and their reports, kept before a step was "
            "rerun (newest first).</p><table><tr><th>kept at</th><th>files</th></tr>" + "".join(rows) + "</table>")


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
    art_rows = "".join(f"<tr><td>{html.escape(k)}</td><td><code>{html.escape(plain(v))}</code></td></tr>"
                       for k, v in artifacts.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>llava-gguf run {html.escape(run.params.run)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} td,th{{padding:4px 10px;
border-bottom:1px solid #ddd;text-align:left}} code{{font-size:90%}} td,th,code{{overflow-wrap:anywhere}}
img{{max-width:100%;height:auto}}</style></head><body>
{_tune_headline(run)}
<h1>Run <code>{html.escape(run.params.run)}</code></h1>
<p>params: <code>{html.escape(str(run.params_file))}</code></p>
{machine_html(run)}
{_summary(run)}
<h2>Steps</h2><table><tr><th>report</th><th>step</th><th>status</th></tr>{''.join(rows)}</table>
<h2>Artifacts</h2><table>{art_rows}</table>
{history_html(run)}
</body></html>"""
    out = run.sub("reports") / "index.html"
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
