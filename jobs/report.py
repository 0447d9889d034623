"""Offline HTML report of a run: one self-contained page (inline CSS, PNG figures as base64 data URIs,
no scripts, no external resources), linking the static pages analyses write beside it (``Analysis.pages``).
Every text that comes from data is HTML-escaped."""
from __future__ import annotations

import base64
import html
import json
import os

import polars as pl

from jobs import analyses
from jobs.across_sizes import summary_table
from jobs.plotting import HEAD_ROWS

ACROSS = ("across", "Across model sizes", "Each model's headline statistics side by side; per-layer figures on relative "
                                          "depth (layer / n_layer), one line per model.")


def sections() -> list[tuple[str, str, str]]:
    """(key, heading, what it shows): the across-sizes overview, then one per analysis."""
    return [ACROSS] + [(a.name, a.heading, a.blurb) for a in analyses.REGISTRY.values()]


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#222;line-height:1.4}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:2em}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dl.meta dt{font-weight:600}
dl.meta dd{margin:0}nav a{margin-right:1em}
figure{margin:1.2em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#555}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0 1.2em}
th,td{border:1px solid #ddd;padding:.2em .5em;text-align:right}th{background:#f3f3f3}
td.s{text-align:left;white-space:pre}caption{text-align:left;font-weight:600;padding:.3em 0}
p.empty{color:#888;font-style:italic}
"""


def _fmt(v) -> str:
    """One cell as escaped text: floats to 4 significant digits (scientific when tiny or huge)."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6) else f"{v:.4g}"
    if isinstance(v, (list, tuple, dict)):
        v = json.dumps(v, default=str)
    return html.escape(str(v))


def _table(columns: list[str], rows: list, caption: str = "") -> str:
    """HTML table of at most HEAD_ROWS rows (rows: sequences aligned with ``columns``)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(
        f'<td class="s">{_fmt(v)}</td>' if isinstance(v, str) else f"<td>{_fmt(v)}</td>" for v in r) + "</tr>"
        for r in rows[:HEAD_ROWS])
    more = len(rows) - HEAD_ROWS
    note = f"<p>… {more} more rows not shown.</p>" if more > 0 else ""
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def _summaries(key: str, t: dict[str, pl.LazyFrame], manifest: dict | None = None) -> list[tuple[str, pl.DataFrame]]:
    """(caption, small frame) summary tables of one section; large tables are reduced lazily before collecting."""
    out = []
    if key == ACROSS[0]:
        df = summary_table(t, manifest)
        if df.width > 3 or any(v is not None for v in df["params"]):
            out.append(("One row per model (params: GPT-2 weights, tied LM head once; n_neurons: neurons x layers "
                        "fitted; mi_excess_bits and mean_ar_b1: means over layers)", df))
    elif analyses.REGISTRY[key].summaries:
        out = analyses.REGISTRY[key].summaries(t, manifest or {})
    return [(c, df) for c, df in out if df.height]


def _figure(fig: dict, run_dir: str) -> str:
    """<figure> with the PNG embedded; a relative SVG link when the SVG lies inside the run folder."""
    with open(fig["png"], "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    title = html.escape(fig.get("title", fig["name"]))
    link = ""
    svg = os.path.abspath(fig.get("svg", ""))
    if fig.get("svg") and svg.startswith(os.path.abspath(run_dir) + os.sep):
        link = f' · <a href="{html.escape(os.path.relpath(svg, run_dir), quote=True)}">SVG</a>'
    return (f'<figure id="fig-{html.escape(fig["name"], quote=True)}"><img src="data:image/png;base64,{data}" '
            f'alt="{title}"><figcaption>{title}{link}</figcaption></figure>')


def _stages(stages: dict | None) -> str:
    """Timings table from manifest["stages"]: {stage: {field: value}}."""
    if not stages:
        return ""
    rows = [{"stage": k, **v} for k, v in stages.items()]
    cols = list(dict.fromkeys(c for r in rows for c in r))
    return _table(cols, [[r.get(c) for c in cols] for r in rows], "Stages")


def _models_text(models: dict | None) -> str:
    """manifest["models"]: {name: {"n_layer": ...}} as the manifest writes it."""
    return ", ".join(f"{m} ({v['n_layer']} layers)" for m, v in (models or {}).items())


def _meta_value(v) -> str:
    """A header value: dicts as 'key: value' pairs, the rest through ``_fmt`` (escaped)."""
    if isinstance(v, dict):
        return " · ".join(f"{html.escape(str(k))}: {_fmt(x)}" for k, x in v.items())
    return _fmt(v)


def _header(run_dir: str, manifest: dict) -> str:
    run_id = manifest.get("run_id") or os.path.basename(os.path.normpath(run_dir))
    meta = {"run id": run_id, "models": _models_text(manifest.get("models")), "data": manifest.get("data")}
    meta.update({k.replace("_", " "): manifest[k] for k in ("created", "git_commit", "versions") if k in manifest})
    items = "".join(f"<dt>{html.escape(k)}</dt><dd>{_meta_value(v)}</dd>"
                    for k, v in meta.items() if v not in (None, ""))
    nav = "".join(f'<a href="#{k}">{html.escape(h)}</a>' for k, h, _ in sections())
    return (f"<header><h1>gpt2-probe report: {html.escape(str(run_id))}</h1><dl class=\"meta\">{items}</dl>"
            f"{_stages(manifest.get('stages'))}<nav>{nav}</nav></header>")


def _links(links: list) -> str:
    """The section's static pages as a list of relative links."""
    if not links:
        return ""
    items = "".join(f'<li><a href="{html.escape(href, quote=True)}">{html.escape(title)}</a></li>' for title, href in links)
    return f'<ul class="pages">{items}</ul>'


def _section(key: str, heading: str, blurb: str, figs: list[dict], tables: list, run_dir: str, links: list = ()) -> str:
    parts = [f'<section id="{key}"><h2>{html.escape(heading)}</h2><p>{html.escape(blurb)}</p>{_links(links)}']
    figs_html = [_figure(f, run_dir) for f in figs]
    tables_html = [_table(df.columns, df.rows(), cap) for cap, df in tables]
    parts += tables_html + figs_html if key == ACROSS[0] else figs_html + tables_html  # overview: table first
    if not figs and not tables and not links:
        parts.append('<p class="empty">Not run: its tables are absent or empty.</p>')
    return "".join(parts) + "</section>"


def write_report(run_dir_local: str, manifest: dict, tables: dict[str, pl.LazyFrame], figures: list[dict],
                 pages: dict[str, list] | None = None) -> str:
    """Write ``<run_dir_local>/report.html`` (atomically) and return its path.

    ``figures``: entries of ``jobs.figures.render_all``; ``tables``: the run's LazyFrames (absent or None = not run);
    ``pages``: {section: [(title, href relative to the run folder)]} from the analyses' ``pages``.
    """
    manifest = manifest or {}
    present = {k: v for k, v in tables.items() if v is not None}
    body = [_header(run_dir_local, manifest)]
    for key, heading, blurb in sections():
        figs = [f for f in figures if f.get("section") == key]
        body.append(_section(key, heading, blurb, figs, _summaries(key, present, manifest), run_dir_local,
                             (pages or {}).get(key, [])))
    title = html.escape(f"gpt2-probe report: {manifest.get('run_id', '')}")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
            f"<body>{''.join(body)}</body></html>\n")
    os.makedirs(run_dir_local, exist_ok=True)
    path = os.path.join(run_dir_local, "report.html")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path
