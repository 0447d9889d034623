"""Static neuron pages beside report.html: ``neuron_pages/<model>/index.html`` (the selected neurons, sortable, and
links to the layer pages), ``neuron_pages/<model>/layer-<layer>.html`` per layer (every neuron of the layer, sortable)
and ``neuron_pages/<model>/L<layer>-N<neuron>.html`` per selected neuron. Inline CSS and SVG, no external resources;
the tables' inline script only sorts (the pages read fine without it). Every text from data is HTML-escaped."""
from __future__ import annotations

import html
import math
import os
import re
import urllib.parse

import matplotlib
import polars as pl
from matplotlib.colors import Normalize

from jobs.analyses.neuron_pages.figures import neuron_index
from jobs.analyses.neuron_pages.page import KINDS, contexts, log_heights, neuron_frames, num, select_neurons, visible
from jobs.plotting import model_sort_key
from probe_core.neuron_pages import HIST_EDGES

FOLDER = "neuron_pages"  # OUT/neuron_pages/<model>/: this analysis's pages
CMAP = matplotlib.colormaps["RdBu_r"]  # the notebook's token heatmap: red positive, blue negative, white at 0
KIND_TITLES = {"top": "Top activations", "bottom": "Bottom activations", "random_active": "Random active tokens"}
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1100px;padding:1em 2em;color:#222;
line-height:1.4}
h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0 1.2em}th,td{border:1px solid #ddd;padding:.2em .5em;text-align:right}
th{background:#f3f3f3}th:last-child{text-align:left}td.s{text-align:left;white-space:pre}td.ctx{text-align:left;white-space:normal;font-family:monospace}
table.sort th{cursor:pointer}dl.meta{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dl.meta dt{font-weight:600}
dl.meta dd{margin:0}span.t{white-space:pre;padding:1px 0}span.a{outline:2px solid #000;outline-offset:-1px;font-weight:700}
.vocab{display:flex;gap:3em}p.empty{color:#888;font-style:italic}svg text{font-size:11px;fill:#333}
"""
# Sorts a table on a header click (numbers by data-v); without scripts the table reads in its written order.
SORT_JS = """document.querySelectorAll("table.sort th").forEach((th,i)=>th.addEventListener("click",()=>{
const tb=th.closest("table").tBodies[0],d=th.dataset.d=th.dataset.d==="a"?"d":"a";
const key=r=>{const c=r.cells[i],v=c.dataset.v;return v===undefined?c.textContent:(v===""?-Infinity:+v)};
[...tb.rows].sort((a,b)=>{const x=key(a),y=key(b),c=typeof x==="number"?x-y:String(x).localeCompare(String(y));
return d==="a"?c:-c}).forEach(r=>tb.appendChild(r))}));"""


def slug(model: str) -> str:
    """A model name as one safe folder name (hub ids may hold '/')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", model)


def page_name(layer: int, neuron: int) -> str:
    return f"L{layer}-N{neuron}.html"


def _document(title: str, body: str, script: str = "") -> str:
    tail = f"<script>{script}</script>" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f"<body>{body}{tail}</body></html>\n")


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _cell(v) -> str:
    """A table cell; numbers carry their raw value in data-v for sorting."""
    if isinstance(v, str):
        return f'<td class="s">{html.escape(visible(v))}</td>'
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        # 9 significant digits order every float32 exactly (and float64 p-values to 1e-9): half of repr's size
        raw = "" if isinstance(v, float) and math.isnan(v) else (f"{v:.9g}" if isinstance(v, float) else repr(v))
        return f'<td data-v="{raw}">{html.escape(num(v))}</td>'
    return f"<td>{html.escape(num(v))}</td>"


def _table(columns: list[str], rows: list[str], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def histogram_svg(hist: list[int]) -> str:
    """The fixed-edge histogram as inline SVG: one bar per bin on a log scale, under/overflow bins grey."""
    w, h, left, bottom = 8, 140, 40, 22
    heights = log_heights(hist)
    bars = []
    for i, (count, frac) in enumerate(zip(hist, heights)):
        lo = "−inf" if i == 0 else f"{HIST_EDGES[i - 1]:g}"
        hi = "inf" if i == len(hist) - 1 else f"{HIST_EDGES[i]:g}"
        colour = "#999" if i in (0, len(hist) - 1) else "#4a78b5"
        bh = frac * h
        bars.append(f'<rect x="{left + i * w}" y="{h - bh + 4:.1f}" width="{w - 1}" height="{bh:.1f}" fill="{colour}">'
                    f"<title>({lo}, {hi}{')' if i == len(hist) - 1 else ']'}: {count} tokens</title></rect>")
    ticks = "".join(f'<text x="{left + (1 + (e - HIST_EDGES[0]) * 4) * w:.0f}" y="{h + bottom - 6}" text-anchor="middle">{e:g}</text>'
                    for e in (-8, -4, 0, 4, 8))
    width = left + len(hist) * w + 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h + bottom + 4}" role="img" '
            f'aria-label="histogram of pre-activations"><line x1="{left}" y1="{h + 4}" x2="{width - 10}" y2="{h + 4}" '
            f'stroke="#333"/>{"".join(bars)}{ticks}<text x="0" y="12">log n</text></svg>')


def _context_html(tokens: list, norm: Normalize) -> str:
    spans = []
    for offset, token, value in tokens:
        r, g, b, _ = CMAP(norm(value))
        ink = "#fff" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "#000"
        cls = "t a" if offset == 0 else "t"
        spans.append(f'<span class="{cls}" style="background:#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x};'
                     f'color:{ink}" title="{offset:+d}: {value:.4g}">{html.escape(visible(token))}</span>')
    return "".join(spans)


def neuron_html(model: str, layer: int, neuron: int, why: str, frames: dict[str, pl.DataFrame], report_href: str) -> str:
    """One neuron's page (``frames``: ``neuron_frames`` rows of this neuron)."""
    s = frames["stats"].row(0, named=True)
    vmax = max(abs(s["min"]), abs(s["max"]), 1e-6)  # one colour scale for every context of the page
    norm = Normalize(-vmax, vmax)
    title = f"{model} · layer {layer} · neuron {neuron}"
    meta = {k: s[k] for k in ("n", "mean", "sd", "min", "max", "frac_active")}
    if frames["fit"].height:
        meta.update({f"neuron_logit {k}": v for k, v in frames["fit"].row(0, named=True).items() if k not in ("layer", "neuron")})
    else:
        meta["neuron_logit"] = "not fitted"
    items = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(num(v))}</dd>" for k, v in meta.items())
    parts = [f'<nav><a href="{html.escape(report_href, quote=True)}">report</a> · <a href="index.html">'
             f"{html.escape(model)} neurons</a></nav><h1>{html.escape(title)}</h1>",
             f"<p>Selected for: {html.escape(why)}. Colours: the neuron's pre-activation at each token, red positive, "
             f"blue negative (±{vmax:.3g}); the example's own token is outlined.</p>",
             f'<dl class="meta">{items}</dl><h2>Histogram of pre-activations</h2>{histogram_svg(s["hist"])}']
    examples = contexts(frames["examples"])
    for kind in KINDS:
        rows = [f'<tr><td>{e["rank"] + 1}</td>{_cell(e["activation"])}<td>{e["chunk"]}</td><td>{e["pos"]}</td>'
                f'<td class="ctx">{_context_html(e["tokens"], norm)}</td></tr>' for e in examples if e["kind"] == kind]
        parts.append(f"<h2>{KIND_TITLES[kind]}</h2>")
        parts.append(_table(["rank", "activation", "chunk", "pos", "context"], rows) if rows
                     else '<p class="empty">None (no token has a pre-activation above 0).</p>')
    vocab = []
    for kind in ("promoted", "suppressed"):
        v = frames["vocab"].filter(pl.col("kind") == kind).sort("rank")
        rows = [f"<tr><td>{rank + 1}</td>{_cell(tok)}{_cell(w)}</tr>" for rank, tok, w in zip(v["rank"], v["token"], v["weight"])]
        body = _table(["rank", "token", "weight"], rows) if rows else '<p class="empty">None.</p>'
        vocab.append(f"<div><h3>{kind.capitalize()} tokens</h3>{body}</div>")
    parts.append(f'<h2>Direct-path logits</h2><div class="vocab">{"".join(vocab)}</div>')
    return _document(title, "".join(parts))


INDEX_COLUMNS = ("layer", "neuron", "max", "frac_active", "top_promoted", "beta", "p", "q_bh")


def layer_name(layer: int) -> str:
    return f"layer-{layer}.html"


def _rows(rows: pl.DataFrame, columns: list[str]) -> list[str]:
    """One table row per neuron: the columns, then a link to its page where it has one (``why`` not null)."""
    out = []
    for r, layer, neuron, why in zip(rows.select(columns).iter_rows(), rows["layer"], rows["neuron"], rows["why"]):
        link = "" if why is None else f'<a href="{html.escape(page_name(layer, neuron), quote=True)}">page</a>'
        out.append("<tr>" + "".join(_cell(v) for v in r) + f'<td class="s">{link}</td></tr>')
    return out


def _report_link(report_href: str) -> str:
    return f'<a href="{html.escape(report_href, quote=True)}">report</a>'


def index_html(model: str, rows: pl.DataFrame, report_href: str, layers: list[int]) -> str:
    """The model's selected neurons (``rows``, with ``why``) as one sortable table, each linked to its page, after
    links to the model's layer pages."""
    columns = [c for c in (*INDEX_COLUMNS, "why") if c in rows.columns]
    head = (f"<nav>{_report_link(report_href)}</nav><h1>{html.escape(model)}: neurons</h1>"
            f"<p>{rows.height} neurons with a page: the Bonferroni-significant proper-noun neurons of largest |beta| and "
            f"the neurons of largest maximum pre-activation in each layer. Click a heading to sort.</p>")
    if layers:
        links = " ".join(f'<a href="{html.escape(layer_name(l), quote=True)}">{l}</a>' for l in layers)
        head += (f"<p>All neurons by layer: {links}</p><p>Each layer page lists every neuron of that layer (max, "
                 f"frac_active, top promoted tokens, and beta, p, q_bh where fitted), sortable, linked to its page where it "
                 f"has one.</p>")
    table = (_table(columns + ["page"], _rows(rows, columns), "sort") if rows.height
             else '<p class="empty">No neuron of this model has a page.</p>')
    return _document(f"{model}: neurons", head + table, SORT_JS)


def layer_html(model: str, layer: int, rows: pl.DataFrame, report_href: str, layers: list[int]) -> str:
    """Every neuron of one layer (``rows``: ``neuron_index`` rows in neuron order, ``why`` null where the neuron has
    no page) as one sortable table; a neuron with a page links to it."""
    columns = [c for c in INDEX_COLUMNS if c in rows.columns]
    at = layers.index(layer)
    steps = [f'<a href="{html.escape(layer_name(l), quote=True)}">{label}</a>'
             for l, label in ((layers[at - 1] if at else None, "previous layer"),
                              (layers[at + 1] if at + 1 < len(layers) else None, "next layer")) if l is not None]
    title = f"{model} · layer {layer}: every neuron"
    nav = " · ".join([_report_link(report_href), f'<a href="index.html">{html.escape(model)} neurons</a>', *steps])
    head = (f"<nav>{nav}</nav><h1>{html.escape(title)}</h1><p>{rows.height} neurons of layer {layer}: max and "
            f"frac_active of the pre-activation, the top promoted tokens, and beta, p, q_bh from neuron_logit where "
            f"fitted; a neuron selected for a page links to it. Click a heading to sort.</p>")
    return _document(title, head + _table(columns + ["page"], _rows(rows, columns), "sort"), SORT_JS)


def write_pages(t: dict, run_dir: str, report_anchor: str = "") -> list[tuple[str, str]]:
    """Write, for every model with ``neuron_stats`` rows, each selected neuron's page, one page per layer listing
    every neuron, and the model's index under ``run_dir``/neuron_pages; returns [(link title, href relative to
    run_dir)], one per model index."""
    if "neuron_stats" not in t:
        return []
    selected = select_neurons(t)
    models = t["neuron_stats"].select(pl.col("model").unique()).collect()["model"].to_list()
    index = neuron_index(t)
    report_href = "../../report.html" + report_anchor
    links = []
    for model in sorted(models, key=model_sort_key):
        folder = os.path.join(run_dir, FOLDER, slug(model))
        chosen = selected.filter(pl.col("model") == model)
        if chosen.height:
            frames = neuron_frames(t, model, chosen)
            parts = {name: df.partition_by("layer", "neuron", as_dict=True) for name, df in frames.items()}
            for layer, neuron, why in chosen.select("layer", "neuron", "why").iter_rows():
                own = {name: p.get((layer, neuron), frames[name].clear()) for name, p in parts.items()}
                _write(os.path.join(folder, page_name(layer, neuron)), neuron_html(model, layer, neuron, why, own, report_href))
        # every neuron of the model, once; why: null where the neuron has no page
        rows = (index.filter(pl.col("model") == model)
                .join(chosen.select("layer", "neuron", "why").lazy(), on=["layer", "neuron"], how="left")
                .sort("layer", "neuron").collect())
        by_layer = rows.partition_by("layer", as_dict=True, maintain_order=True)
        layers = [key[0] for key in by_layer]
        for (layer,), part in by_layer.items():
            _write(os.path.join(folder, layer_name(layer)), layer_html(model, layer, part, report_href, layers))
        _write(os.path.join(folder, "index.html"),
               index_html(model, rows.filter(pl.col("why").is_not_null()), report_href, layers))
        href = "/".join([FOLDER, urllib.parse.quote(slug(model)), "index.html"])
        links.append((f"{model}: {chosen.height} neuron pages and every neuron by layer (index, sortable)", href))
    return links
