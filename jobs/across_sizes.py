"""The report's "Across model sizes" section: one row per model and per-layer lines on relative depth.

Inputs: the run's polars LazyFrames (reduced lazily to per-model or per-(model, layer) rows before
collecting) and the manifest's model entries. Relative depth = layer / n_layer: block l's output
(block-indexed tables, l = 1..n_layer) and ``hidden_states[l]`` (``mi_summary``, 0 = embeddings) sit at
the same depth. Tables or columns absent from a run (older runs, analyses not run) leave their cells
out; their figures raise ``NoData`` and are skipped.
"""
from __future__ import annotations

import polars as pl
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from jobs.plotting import NoData, collect, model_sort_key, panels, safe

TITLES = {
    "across_path_r": "Across sizes: path step vs next-token logit, r per layer",
    "across_rotation_t": "Across sizes: rotation t statistic per layer",
    "across_neurons_frac": "Across sizes: fraction of significant proper-noun neurons per layer",
    "across_mi_excess": "Across sizes: mutual information above the null per layer",
    "across_attn_ar": "Across sizes: pooled AR(2) coefficients of log attention norms per layer",
}
DEPTH = "relative depth (layer / n_layer)"
_LAYERED = ("layer_metrics", "rotation", "neuron_logit", "attn_ar", "path_layer_r", "mi_summary")


def _cols(lf: pl.LazyFrame | None) -> set[str]:
    return set() if lf is None else set(lf.collect_schema().names())


def model_info(manifest: dict | None, tables: dict[str, pl.LazyFrame]) -> pl.DataFrame:
    """model, params (Int64, null if unknown), n_layer (Int64), sorted by params then n_layer then name.

    Models and sizes come from ``manifest["models"]``; n_layer falls back to the largest layer in the tables.
    """
    entries = (manifest or {}).get("models")
    entries = entries if isinstance(entries, dict) else {}
    rows = {m: {"params": v.get("n_params"), "n_layer": v.get("n_layer")} if isinstance(v, dict) else {}
            for m, v in entries.items()}
    if not rows or any(r.get("n_layer") is None for r in rows.values()):
        for name in _LAYERED:
            lf = tables.get(name)
            if {"model", "layer"} <= _cols(lf):
                for m, top in lf.group_by("model").agg(pl.col("layer").max()).collect().iter_rows():
                    r = rows.setdefault(m, {})
                    if top is not None and (r.get("n_layer") is None or top > r.get("_max", -1)):
                        r["_max"] = int(top)
        for r in rows.values():
            if r.get("n_layer") is None:
                r["n_layer"] = r.get("_max")
    order = sorted(rows, key=lambda m: (rows[m].get("params") is None, rows[m].get("params") or 0,
                                        rows[m].get("n_layer") or 0, model_sort_key(m)))
    return pl.DataFrame({"model": order, "params": [rows[m].get("params") for m in order],
                         "n_layer": [rows[m].get("n_layer") for m in order]},
                        schema={"model": pl.String, "params": pl.Int64, "n_layer": pl.Int64})


def _mi_excess(cols: set[str]) -> pl.Expr | None:
    if "excess_mean_bits" in cols:
        return pl.col("excess_mean_bits")
    if {"mean_bits", "null_mean_bits"} <= cols:
        return pl.col("mean_bits") - pl.col("null_mean_bits")
    return None


def summary_table(tables: dict[str, pl.LazyFrame], manifest: dict | None = None) -> pl.DataFrame:
    """One row per model: model, params, n_layer and, where the run has them, r_path_logit (+ r_ci_low,
    r_ci_high), n_significant_neurons, n_neurons (rows of neuron_logit: neurons x layers),
    frac_significant_neurons, mi_excess_bits (mean over mi_summary layers of the excess over the null) and
    mean_ar_b1 (mean over layers of the pooled, finite b1). Columns no model has are left out."""
    t = {k: v for k, v in tables.items() if v is not None}
    out = model_info(manifest, t)
    parts = []
    cols = _cols(t.get("path_summary"))
    if {"model", "r_path_logit"} <= cols:
        parts.append(t["path_summary"].select("model", *[c for c in ("r_path_logit", "r_ci_low", "r_ci_high")
                                                        if c in cols]))
    if {"model", "significant"} <= _cols(t.get("neuron_logit")):
        parts.append(t["neuron_logit"].group_by("model").agg(
            pl.col("significant").sum().cast(pl.Int64).alias("n_significant_neurons"),
            pl.len().cast(pl.Int64).alias("n_neurons"),
            pl.col("significant").cast(pl.Float64).mean().alias("frac_significant_neurons")))
    excess = _mi_excess(_cols(t.get("mi_summary")))
    if excess is not None:
        parts.append(t["mi_summary"].group_by("model").agg(excess.mean().alias("mi_excess_bits")))
    if {"model", "b1", "chunk"} <= _cols(t.get("attn_ar")):
        parts.append(t["attn_ar"].filter(pl.col("chunk").is_null() & pl.col("b1").is_finite())
                     .group_by("model").agg(pl.col("b1").mean().alias("mean_ar_b1")))
    for p in parts:
        out = out.join(p.collect(), on="model", how="left", maintain_order="left")
    keep = ["model", "params", "n_layer"] + [c for c in out.columns[3:] if out[c].null_count() < out.height]
    return out.select(keep) if out.height else out


# ---------------------------------------------------------------- per-layer frames and figures
def _with_depth(df: pl.DataFrame, n_layers: dict[str, int] | None) -> pl.DataFrame:
    """``df`` plus n_layer (from ``n_layers``, else the model's largest layer in ``df``) and rel_depth."""
    known = {m: int(v) for m, v in (n_layers or {}).items() if v}
    df = df.with_columns(n_layer=pl.col("model").replace_strict(known, default=None, return_dtype=pl.Int64)
                         .fill_null(pl.col("layer").max().over("model").cast(pl.Int64)))
    return df.with_columns(rel_depth=pl.col("layer") / pl.col("n_layer")).sort("model", "layer")


def _order(df: pl.DataFrame) -> list[str]:
    """Models by depth then name (smallest first)."""
    depth = dict(df.group_by("model").agg(pl.col("n_layer").first()).iter_rows())
    return sorted(depth, key=lambda m: (depth[m], model_sort_key(m)))


def _need(lf: pl.LazyFrame, cols: set[str], what: str) -> None:
    missing = cols - _cols(lf)
    if missing:
        raise NoData(f"{what}: column(s) {', '.join(sorted(missing))} absent (older run)")


def _lines(ax, df: pl.DataFrame, y: str, band: tuple[str, str] | None = None, marks: str | None = None) -> None:
    """One line per model over rel_depth; optional CI band and filled markers where ``marks`` is true."""
    for m in _order(df):
        d = df.filter(pl.col("model") == m)
        (line,) = ax.plot(d["rel_depth"], d[y], marker="o", mfc="white", label=f"{m} ({d['n_layer'][0]} layers)")
        if band and band[0] in d.columns and band[1] in d.columns:
            ax.fill_between(d["rel_depth"], d[band[0]], d[band[1]], color=line.get_color(), alpha=0.15, lw=0)
        if marks and marks in d.columns:
            s = d.filter(pl.col(marks).fill_null(False))
            ax.scatter(s["rel_depth"], s[y], color=line.get_color(), s=40, zorder=3)
    ax.set_xlabel(DEPTH)
    ax.set_xlim(-0.03, 1.03)


def _legend(ax, mark_label: str | None = None) -> None:
    handles = ax.get_legend_handles_labels()[0]
    if mark_label:
        handles.append(Line2D([], [], marker="o", ls="", color="grey", label=mark_label))
    ax.legend(handles=handles, fontsize=8)


def fig_path_r(path_layer_r: pl.LazyFrame, n_layers: dict[str, int] | None = None) -> Figure:
    """Pearson r of each layer's path step with the next-token logit, CI band where present."""
    _need(path_layer_r, {"model", "layer", "r"}, "path r per layer")
    cols = [c for c in ("r_ci_low", "r_ci_high") if c in _cols(path_layer_r)]
    df = _with_depth(collect(path_layer_r.select("model", "layer", "r", *cols), "path r per layer"), n_layers)
    fig, (ax,) = panels(1, w=7.0, h=4.2)
    _lines(ax, df, "r", band=("r_ci_low", "r_ci_high"))
    ax.axhline(0, color="black", lw=0.8)
    ax.set(ylabel="Pearson r (path step, next-token logit)", title="band: CI of r" if cols else "")
    _legend(ax)
    fig.suptitle(TITLES["across_path_r"])
    return fig


def fig_rotation_t(rotation: pl.LazyFrame, n_layers: dict[str, int] | None = None) -> Figure:
    """Paired t per layer, one line per model, panel per (target, source); filled = significant."""
    _need(rotation, {"model", "target", "layer", "t", "significant"}, "rotation t")
    if "source" not in _cols(rotation):
        rotation = rotation.with_columns(source=pl.lit("pooled"))
    df = _with_depth(collect(rotation.select("model", "target", "source", "layer", "t", "significant"),
                             "rotation t"), n_layers)
    keys = df.select("target", "source").unique().sort("target", "source").rows()
    fig, axes = panels(len(keys))
    for ax, (target, source) in zip(axes, keys):
        _lines(ax, df.filter((pl.col("target") == target) & (pl.col("source") == source)), "t", marks="significant")
        ax.axhline(0, color="black", lw=0.8)
        ax.set(title=safe(f"target {target!r} ({source})"), ylabel="paired t statistic")
        _legend(ax, "significant layer (filled)")
    fig.suptitle(TITLES["across_rotation_t"])
    return fig


def fig_neurons_frac(neuron_logit: pl.LazyFrame, n_layers: dict[str, int] | None = None) -> Figure:
    """Fraction of the layer's neurons with significant = true."""
    _need(neuron_logit, {"model", "layer", "significant"}, "significant neurons")
    df = _with_depth(collect(neuron_logit.group_by("model", "layer").agg(
        pl.col("significant").cast(pl.Float64).mean().alias("frac")), "significant neurons"), n_layers)
    fig, (ax,) = panels(1, w=7.0, h=4.2)
    _lines(ax, df, "frac")
    ax.set(ylabel="significant neurons (fraction of the layer)", ylim=(0, None))
    _legend(ax)
    fig.suptitle(TITLES["across_neurons_frac"])
    return fig


def fig_mi_excess(mi_summary: pl.LazyFrame, n_layers: dict[str, int] | None = None) -> Figure:
    """Mean pairwise MI minus the null mean per hidden_states layer (0 = embeddings)."""
    excess = _mi_excess(_cols(mi_summary))
    if excess is None:
        raise NoData("MI excess: column excess_mean_bits absent (older run)")
    df = _with_depth(collect(mi_summary.select("model", "layer", excess.alias("excess")), "MI excess"), n_layers)
    fig, (ax,) = panels(1, w=7.0, h=4.2)
    _lines(ax, df, "excess")
    ax.axhline(0, color="black", lw=0.8)
    ax.set(ylabel="mean MI − null mean MI (bits)")
    _legend(ax)
    fig.suptitle(TITLES["across_mi_excess"])
    return fig


def fig_attn_ar(attn_ar: pl.LazyFrame, n_layers: dict[str, int] | None = None) -> Figure:
    """Pooled b1 and b2 per layer; filled markers where significant1 / significant2 (when present)."""
    _need(attn_ar, {"model", "layer", "chunk", "b1", "b2"}, "AR coefficients")
    sig = [c for c in ("significant1", "significant2") if c in _cols(attn_ar)]
    df = _with_depth(collect(attn_ar.filter(pl.col("chunk").is_null() & pl.col("b1").is_finite())
                             .select("model", "layer", "b1", "b2", *sig), "pooled AR rows"), n_layers)
    fig, axes = panels(2, ncols=2, w=6.0, h=4.2)
    for ax, lag in zip(axes, (1, 2)):
        _lines(ax, df, f"b{lag}", marks=f"significant{lag}")
        ax.axhline(0, color="black", lw=0.8)
        ax.set(title=f"lag-{lag} coefficient b{lag}", ylabel=f"b{lag} (dimensionless)")
        _legend(ax, "significant (filled)" if sig else None)
    fig.suptitle(TITLES["across_attn_ar"])
    return fig


def specs(t: dict[str, pl.LazyFrame], n_layers: dict[str, int] | None):
    """(name, section, needed tables, builder) of this section's figures, for ``jobs.figures.render_all``."""
    return [
        ("across_path_r", "across", ["path_layer_r"], lambda: fig_path_r(t["path_layer_r"], n_layers)),
        ("across_rotation_t", "across", ["rotation"], lambda: fig_rotation_t(t["rotation"], n_layers)),
        ("across_neurons_frac", "across", ["neuron_logit"], lambda: fig_neurons_frac(t["neuron_logit"], n_layers)),
        ("across_mi_excess", "across", ["mi_summary"], lambda: fig_mi_excess(t["mi_summary"], n_layers)),
        ("across_attn_ar", "across", ["attn_ar"], lambda: fig_attn_ar(t["attn_ar"], n_layers)),
    ]
