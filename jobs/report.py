"""Offline HTML report of a run: one self-contained page (inline CSS, PNG figures as base64 data URIs,
no scripts, no external resources). Every text that comes from data is HTML-escaped."""
from __future__ import annotations

import base64
import html
import json
import os

import polars as pl

from jobs.across_sizes import summary_table
from jobs.figures import model_sort_key

HEAD_ROWS = 50
SECTIONS = [  # (key, heading, what it shows)
    ("across", "Across model sizes", "Each model's headline statistics side by side; per-layer figures on relative "
                                     "depth (layer / n_layer), one line per model."),
    ("path", "Path length", "Hidden-state path length across layers and its relation to the next-token logit."),
    ("rotation", "Rotation", "Residual-stream rotation angles of target tokens vs previous and shuffled tokens."),
    ("neurons", "Proper-noun neurons", "Per-neuron logistic regression of the proper-noun label on pre-GELU MLP "
                                       "activations."),
    ("mi", "Mutual information", "Pairwise mutual information between hidden dimensions per layer."),
    ("attn_ar", "Attention-norm autoregression", "AR(2) models of log attention-output norms along positions."),
]
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


def _by_model(caption: str, df: pl.DataFrame, *cols: str) -> tuple[str, pl.DataFrame]:
    """(caption, frame) sorted by model size then ``cols``; each model keeps an equal share of the HEAD_ROWS."""
    models = sorted(df["model"].unique().to_list(), key=model_sort_key)
    share = max(1, HEAD_ROWS // max(len(models), 1))
    head = (df.with_columns(_r=pl.col("model").replace_strict({m: i for i, m in enumerate(models)}))
            .sort("_r", *cols).group_by("_r", maintain_order=True).head(share).drop("_r"))
    if head.height < df.height:
        caption += f" (first {share} rows per model: {head.height} of {df.height} shown)"
    return caption, head


def _summaries(key: str, t: dict[str, pl.LazyFrame], manifest: dict | None = None) -> list[tuple[str, pl.DataFrame]]:
    """(caption, small frame) summary tables of one section; large tables are reduced lazily before collecting."""
    out = []
    if key == "across":
        df = summary_table(t, manifest)
        if df.width > 3 or any(v is not None for v in df["params"]):
            out.append(("One row per model (params: GPT-2 weights, tied LM head once; n_neurons: neurons x layers "
                        "fitted; mi_excess_bits and mean_ar_b1: means over layers)", df))
    if key == "path" and "path_summary" in t:
        out.append(_by_model("Path length vs next-token logit", t["path_summary"].collect()))
    if key == "rotation" and "rotation" in t:
        rot = t["rotation"].collect()
        keys = [c for c in ("target", "source", "layer") if c in rot.columns]
        out.append(_by_model("Rotation tests per layer", rot, *keys))
    if key == "neurons" and "neuron_logit" in t:
        top = (t["neuron_logit"].filter(pl.col("significant")).sort("p", pl.col("z").abs(), descending=[False, True])
               .group_by("model", "layer", maintain_order=True).head(3)
               .select("model", "layer", "neuron", "n", "beta", "se", "z", "p", "q_bh", "status").collect())
        out.append(_by_model("Top 3 significant neurons per model and layer (smallest p)", top, "layer", "p"))
    if key == "mi" and "mi_summary" in t:
        ms = t["mi_summary"].collect()
        out.append(_by_model(_mi_bias_sentence(ms), ms, "layer"))
    if key == "attn_ar" and "attn_ar" in t:
        pooled = t["attn_ar"].filter(pl.col("chunk").is_null()).drop("chunk").collect()
        out.append(_by_model("AR(2) pooled over chunks", pooled, "layer"))
    return [(c, df) for c, df in out if df.height]


def _mi_bias_sentence(ms: pl.DataFrame) -> str:
    """The plug-in bias at the run's N in one sentence: theory (B-1)^2/(2N ln 2) at 15 bins and the measured null."""
    from probe_core.mutual_info import plugin_bias_bits

    n = int(ms["n_tokens"].max()) if ms.height else 0
    null = ms["null_mean_bits"].drop_nans().mean() if "null_mean_bits" in ms.columns else None
    measured = f"; the measured null (dimensions permuted independently) averages {null:.4f} bits" if null is not None else ""
    return (f"MI per layer (bits; layer = hidden_states index). At N = {n} tokens the plug-in estimator's bias for "
            f"independent dimensions is (B−1)²/(2N ln 2) = {plugin_bias_bits(max(n, 1)):.4f} bits at 15 bins{measured}; "
            "mi_bits_mm and excess_mean_bits correct for it.")


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


def _stages(stages) -> str:
    """Timings table from manifest["stages"]: {stage: {field: value}}, {stage: value} or [{...}, ...]."""
    if isinstance(stages, dict):
        rows = [{"stage": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in stages.items()]
    elif isinstance(stages, list):
        rows = [r if isinstance(r, dict) else {"value": r} for r in stages]
    else:
        return ""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    return _table(cols, [[r.get(c) for c in cols] for r in rows], "Stages")


def _models_text(models) -> str:
    """manifest["models"]: {name: {"n_layer": ...}} (as jobs.run writes it) or a list of names/dicts."""
    if isinstance(models, dict):
        return ", ".join(f"{m} ({v['n_layer']} layers)" if isinstance(v, dict) and "n_layer" in v else str(m)
                         for m, v in models.items())
    if isinstance(models, (list, tuple)):
        return ", ".join(str(m.get("name", m)) if isinstance(m, dict) else str(m) for m in models)
    return "" if models is None else str(models)


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
    nav = "".join(f'<a href="#{k}">{html.escape(h)}</a>' for k, h, _ in SECTIONS)
    return (f"<header><h1>gpt2-probe report: {html.escape(str(run_id))}</h1><dl class=\"meta\">{items}</dl>"
            f"{_stages(manifest.get('stages'))}<nav>{nav}</nav></header>")


def _section(key: str, heading: str, blurb: str, figs: list[dict], tables: list, run_dir: str) -> str:
    parts = [f'<section id="{key}"><h2>{html.escape(heading)}</h2><p>{html.escape(blurb)}</p>']
    figs_html = [_figure(f, run_dir) for f in figs]
    tables_html = [_table(df.columns, df.rows(), cap) for cap, df in tables]
    parts += tables_html + figs_html if key == "across" else figs_html + tables_html  # overview: table first
    if not figs and not tables:
        parts.append('<p class="empty">Not run: its tables are absent or empty.</p>')
    return "".join(parts) + "</section>"


def write_report(run_dir_local: str, manifest: dict, tables: dict[str, pl.LazyFrame], figures: list[dict]) -> str:
    """Write ``<run_dir_local>/report.html`` (atomically) and return its path.

    ``figures``: entries of ``jobs.figures.render_all``; ``tables``: the run's LazyFrames (absent or None = not run).
    """
    manifest = manifest or {}
    present = {k: v for k, v in tables.items() if v is not None}
    body = [_header(run_dir_local, manifest)]
    for key, heading, blurb in SECTIONS:
        figs = [f for f in figures if f.get("section") == key]
        body.append(_section(key, heading, blurb, figs, _summaries(key, present, manifest), run_dir_local))
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
