"""Figures of a run: one pure function per figure (polars LazyFrames in, ``Figure`` out) and ``render_all``.

Conventions: one panel per model (ordered by size), axes labelled with units, and every table is
filtered, aggregated or hash-subsampled lazily so that only the plotted rows are collected (tables can
hold 10^7+ rows). Layers: ``layer_metrics``, ``attn_*``, ``neuron_*`` and ``rotation*`` use the block
index 1..n_layer; ``mi`` uses the ``hidden_states`` index 0..n_layer (0 = embedding output).
A figure function raises ``NoData`` (a ``ValueError``) when nothing is left to draw. Shared helpers live in
``jobs.plotting``, the token heatmap in ``jobs.token_heatmap``.
"""
from __future__ import annotations

import logging
import os
import re
import warnings

import numpy as np
import polars as pl
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from jobs.plotting import (N_BINS, NoData, add_lines, collect, density_panels, int_x, models_of, panels, pick,
                           resolve_chunk, safe, thin, wide)
from jobs.plotting import model_sort_key  # noqa: F401  (re-exported: jobs.report imports it from here)
from jobs import across_sizes
from jobs.token_heatmap import HEATMAP_TITLES, fig_token_heatmap, heatmap_name

log = logging.getLogger(__name__)

TITLES = {
    "path_cumulative": "Cumulative hidden-state path length across layers",
    "path_logit_vs_step": "Next-token logit vs final-layer path step",
    "rotation_angles": "Rotation angles across layers: target vs previous vs shuffled tokens",
    "rotation_t": "Rotation: paired t statistic per layer",
    "neurons_beta": "Proper-noun neurons: logistic-regression coefficients in one layer",
    "neurons_per_layer": "Proper-noun neurons: significant neurons per layer",
    **HEATMAP_TITLES,
    "mi_layer": "Pairwise mutual information between hidden dimensions (one layer)",
    "mi_density": "Pairwise mutual information: density per layer",
    "attn_strip": "Log attention-output norms per layer",
    "attn_hist": "Log attention-output norms: histogram per layer",
    "attn_ar_coefs": "AR(2) on log attention-output norms: pooled coefficients",
    **across_sizes.TITLES,
}
KIND_COLORS = {"target": "tab:red", "previous": "tab:blue", "shuffled": "tab:gray"}
ALPHA = 0.05

# ---------------------------------------------------------------- path
def fig_path_cumulative(layer_metrics: pl.LazyFrame, chunk: int = 0) -> Figure:
    """Cumulative path length vs layer, one line per token of ``chunk`` coloured by position; panel per model."""
    c = resolve_chunk(layer_metrics, chunk)
    df = collect(layer_metrics.filter(pl.col("chunk") == c).select("model", "pos", "layer", "path_cum"), "path")
    models = models_of(df)
    fig, axes = panels(len(models))
    for ax, m in zip(axes, models):
        keys, layers, Y = wide(df.filter(pl.col("model") == m), ["pos"], "path_cum")
        lc = add_lines(ax, layers, Y, cmap="viridis", array=keys["pos"].to_numpy().astype(float),
                        linewidths=0.6, alpha=0.6, rasterized=True)
        ax.plot(layers, np.nanmean(Y, axis=0), color="black", lw=2.2, label="mean over tokens")
        fig.colorbar(lc, ax=ax, label="token position in chunk")
        ax.set(title=f"{m}: chunk {c}, {Y.shape[0]} tokens", ylabel="cumulative path length (L2, residual units)")
        int_x(ax, "layer (block output)")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(TITLES["path_cumulative"])
    return fig


def fig_logit_vs_step(tokens: pl.LazyFrame, layer_metrics: pl.LazyFrame, path_summary: pl.LazyFrame | None = None,
                      max_points: int = 20_000) -> Figure:
    """Scatter of next-token logit vs the final layer's path step (<= max_points per model); r in titles."""
    tok = tokens.filter(pl.col("next_token_logit").is_not_null()).select("model", "chunk", "pos", "next_token_logit")
    tok = thin(tok, ["model"], ["chunk", "pos"], max_points)
    last = layer_metrics.group_by("model").agg(pl.col("layer").max()).collect()
    steps = layer_metrics.join(last.lazy(), on=["model", "layer"]).select("model", "chunk", "pos", "path_step")
    df = collect(tok.join(steps, on=["model", "chunk", "pos"]), "logit vs path step")
    summary = {} if path_summary is None else {
        m: (n, r) for m, n, r in path_summary.select("model", "n_tokens", "r_path_logit").collect().iter_rows()}
    models = models_of(df)
    fig, axes = panels(len(models))
    for ax, m in zip(axes, models):
        d = df.filter(pl.col("model") == m)
        x, y = d["path_step"].to_numpy().astype(float), d["next_token_logit"].to_numpy().astype(float)
        x, y = x[np.isfinite(x) & np.isfinite(y)], y[np.isfinite(x) & np.isfinite(y)]
        ax.scatter(x, y, s=3, alpha=0.25, color="tab:blue", rasterized=True, label=f"tokens ({len(x):,} plotted)")
        if len(x) > 1 and np.ptp(x) > 0:
            slope, icpt = np.polyfit(x, y, 1)
            xs = np.array([x.min(), x.max()])
            ax.plot(xs, slope * xs + icpt, color="tab:red", lw=1.5, label="least-squares line (sample)")
        n, r = summary.get(m, (None, None))
        r_txt = "r = n/a" if r is None else f"r = {r:.3f} (n = {n:,})"
        ax.set(title=f"{m}: {r_txt}", xlabel="final-layer path step (L2, residual units)",
               ylabel="next-token logit (raw logit units)")
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(TITLES["path_logit_vs_step"])
    return fig


# ---------------------------------------------------------------- rotation
def fig_rotation_angles(rotation_angles: pl.LazyFrame, max_lines: int = 150) -> Figure:
    """Thin line per occurrence and thick mean per kind (target/previous/shuffled) across layers.

    Panels: columns = models, rows = (target, source). Means use every occurrence; thin lines a sample.
    """
    ra = rotation_angles.select("model", "target", "source", "chunk", "pos", "layer", "kind", "angle_rad")
    group, occ = ["model", "target", "source"], ["chunk", "pos"]
    means = collect(ra.group_by(*group, "kind", "layer").agg(pl.col("angle_rad").mean()), "rotation angles")
    few = thin(ra, group, occ, max_lines, count=pl.struct(occ).n_unique()).collect()
    models = models_of(means)
    rows = means.select("target", "source").unique().sort("target", "source").rows()
    fig, axes = panels(len(rows) * len(models), ncols=len(models))
    for i, (target, source) in enumerate(rows):
        for ax, m in zip(axes[i * len(models):], models):
            sel = (pl.col("model") == m) & (pl.col("target") == target) & (pl.col("source") == source)
            for kind, color in KIND_COLORS.items():
                d = few.filter(sel & (pl.col("kind") == kind))
                if d.height:
                    _, layers, Y = wide(d, occ, "angle_rad")
                    add_lines(ax, layers, Y, colors=color, linewidths=0.4, alpha=0.25, rasterized=True)
                mu = means.filter(sel & (pl.col("kind") == kind)).sort("layer")
                ax.plot(mu["layer"], mu["angle_rad"], color=color, lw=2.5, label=f"{kind} (mean)")
            ax.plot([], [], color="grey", lw=0.5, label="single occurrences")
            ax.set(title=safe(f"{m}: target {target!r} ({source})"), ylabel="rotation angle (rad)")
            int_x(ax)
            ax.legend(fontsize=8)
    fig.suptitle(TITLES["rotation_angles"])
    return fig


def fig_rotation_t(rotation: pl.LazyFrame) -> Figure:
    """Paired t statistic per layer, one line per model, significant layers starred; panel per (target, source)."""
    if "source" not in rotation.collect_schema().names():  # tables written before per-source tests
        rotation = rotation.with_columns(source=pl.lit("pooled"))
    df = collect(rotation.select("model", "target", "source", "layer", "t", "significant").sort("layer"), "rotation t")
    models, rows = models_of(df), df.select("target", "source").unique().sort("target", "source").rows()
    fig, axes = panels(len(rows))
    for ax, (target, source) in zip(axes, rows):
        handles = []
        for m in models:
            d = df.filter((pl.col("model") == m) & (pl.col("target") == target) & (pl.col("source") == source))
            (line,) = ax.plot(d["layer"], d["t"], marker=".", label=m)
            s = d.filter(pl.col("significant"))
            ax.scatter(s["layer"], s["t"], marker="*", s=120, color=line.get_color(), edgecolors="black", zorder=3)
            handles.append(line)
        handles.append(Line2D([], [], marker="*", ls="", color="grey", mec="black", ms=11, label="significant layer"))
        ax.axhline(0, color="black", lw=0.8)
        ax.set(title=safe(f"target {target!r} ({source})"), ylabel="paired t statistic")
        int_x(ax)
        ax.legend(handles=handles, fontsize=8)
    fig.suptitle(TITLES["rotation_t"])
    return fig


# ---------------------------------------------------------------- neurons
def _best_layer(lf: pl.LazyFrame, score: pl.Expr, layer: int | None) -> dict[str, int]:
    """Per model: ``layer`` if given (models lacking it dropped), else the layer maximising ``score`` (ties: lowest)."""
    scores = lf.group_by("model", "layer").agg(score.alias("_s")).collect()
    if layer is not None:
        scores = scores.filter(pl.col("layer") == layer)
    best = scores.sort(["model", "_s", "layer"], descending=[False, True, False]).group_by(
        "model", maintain_order=True).first()
    return {m: int(lay) for m, lay in best.select("model", "layer").iter_rows()}


def neuron_layers(neuron_logit: pl.LazyFrame, layer: int | None = None) -> dict[str, int]:
    """Layer to show per model: ``layer`` if given, else the layer with most significant neurons."""
    return _best_layer(neuron_logit, pl.col("significant").sum(), layer)


def fig_neuron_betas(neuron_logit: pl.LazyFrame, layer: int | None = None) -> Figure:
    """Per model: beta by neuron index and beta vs -log10 p for one layer, significant neurons in red."""
    layers = neuron_layers(neuron_logit, layer)
    sel = pick(layers, "layer")
    df = collect(neuron_logit.filter(sel & pl.col("beta").is_finite() & pl.col("p").is_not_null())
                  .select("model", "neuron", "beta", "p", "significant"), "neuron betas")
    models = models_of(df)
    fig, axes = panels(2 * len(models), ncols=2, w=5.5)
    for i, m in enumerate(models):
        d = df.filter(pl.col("model") == m).sort("significant")  # significant drawn last, on top
        sig = d["significant"].to_numpy()
        colors = np.where(sig, "tab:red", "tab:gray")
        nlp = -np.log10(np.clip(d["p"].to_numpy(), 1e-300, 1.0))
        ax_b, ax_v = axes[2 * i], axes[2 * i + 1]
        ax_b.scatter(d["neuron"], d["beta"], s=4, c=colors, rasterized=True)
        ax_b.axhline(0, color="black", lw=0.8)
        ax_b.set(title=f"{m}, layer {layers[m]}: {int(sig.sum())} of {len(sig)} significant",
                 xlabel="neuron index (MLP c_fc)", ylabel="β (log-odds per activation unit)")
        ax_v.scatter(d["beta"], nlp, s=4, c=colors, rasterized=True)
        ax_v.set(title=f"{m}, layer {layers[m]}: volcano", xlabel="β (log-odds per activation unit)",
                 ylabel="−log10 p (Wald)")
        ax_v.legend(handles=[Line2D([], [], marker="o", ls="", color="tab:red", label="significant"),
                             Line2D([], [], marker="o", ls="", color="tab:gray", label="not significant")], fontsize=8)
    fig.suptitle(TITLES["neurons_beta"])
    return fig


def fig_neurons_per_layer(neuron_logit: pl.LazyFrame) -> Figure:
    """Number of significant neurons per layer, one line per model."""
    df = collect(neuron_logit.group_by("model", "layer").agg(pl.col("significant").sum().alias("n_sig"))
                  .sort("layer"), "significant neurons per layer")
    fig, (ax,) = panels(1, w=7.0, h=4.2)
    for m in models_of(df):
        d = df.filter(pl.col("model") == m)
        ax.plot(d["layer"], d["n_sig"], marker="o", label=m)
    ax.set(ylabel="significant neurons (count)", ylim=(0, None), title="neurons with significant = true")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    int_x(ax)
    ax.legend()
    fig.suptitle(TITLES["neurons_per_layer"])
    return fig


# ---------------------------------------------------------------- mi
def mi_layers(mi: pl.LazyFrame, layer: int | None = None) -> dict[str, int]:
    """Layer to show per model: ``layer`` if given, else the hidden_states index with the largest mean MI."""
    return _best_layer(mi, pl.col("mi_bits").mean(), layer)


def fig_mi_layer(mi: pl.LazyFrame, layer: int | None = None) -> Figure:
    """Per model: histogram of one layer's pairwise MI and the symmetric dim x dim MI image."""
    layers = mi_layers(mi, layer)
    sel = pick(layers, "layer")
    df = collect(mi.filter(sel).select("model", "dim_i", "dim_j", "mi_bits"), "mi layer")
    models = models_of(df)
    fig, axes = panels(2 * len(models), ncols=2, w=5.5, h=4.4)
    for i, m in enumerate(models):
        d = df.filter(pl.col("model") == m)
        v, di, dj = d["mi_bits"].to_numpy(), d["dim_i"].to_numpy(), d["dim_j"].to_numpy()
        ax_h, ax_i = axes[2 * i], axes[2 * i + 1]
        ax_h.hist(v, bins=N_BINS, color="tab:purple")
        ax_h.set_yscale("log")
        ax_h.set(title=f"{m}, hidden_states[{layers[m]}]: {len(v):,} pairs", xlabel="mutual information (bits)",
                 ylabel="dimension pairs (count)")
        dims = np.unique(np.concatenate([di, dj]))
        ii, jj = np.searchsorted(dims, di), np.searchsorted(dims, dj)
        img = np.full((len(dims), len(dims)), np.nan)
        img[ii, jj] = v
        img[jj, ii] = v
        im = ax_i.imshow(img, cmap="magma")  # default interpolation antialiases large matrices
        contiguous = dims[0] == 0 and dims[-1] == len(dims) - 1
        lab = "hidden dimension" if contiguous else f"analysed dimension (rank among {len(dims)})"
        ax_i.set(title=f"{m}, hidden_states[{layers[m]}]: MI matrix", xlabel=lab + " j", ylabel=lab + " i")
        fig.colorbar(im, ax=ax_i, label="mutual information (bits)")
    fig.suptitle(TITLES["mi_layer"])
    return fig


def fig_mi_density(mi: pl.LazyFrame, mi_null: pl.LazyFrame | None = None) -> Figure:
    """Per model: MI density per layer overlaid, coloured by hidden_states index; with ``mi_null`` each
    layer's permutation null (same estimator, tokens shuffled per dimension) is drawn dashed in its colour."""
    fig = density_panels(mi, "mi_bits", 0.0, 0.999, "mutual information (bits)",
                         "density (per bit)", "layer (hidden_states index, 0 = embeddings)", TITLES["mi_density"])
    if mi_null is None:
        return fig
    null = collect(mi_null.select("model", "layer", "mi_bits"), "mi null")
    for ax in fig.axes:
        lines = [c for c in ax.collections if c.get_array() is not None]
        m = ax.get_title().split(" (values")[0]
        d = null.filter(pl.col("model") == m)
        if not lines or d.height == 0:
            continue  # a colorbar's axes, or a model without a null (KSG)
        lo, hi = ax.get_xlim()
        for layer in np.sort(d["layer"].unique().to_numpy()):
            v = d.filter(pl.col("layer") == layer)["mi_bits"].to_numpy()
            counts, edges = np.histogram(v, bins=N_BINS, range=(lo, hi))
            # the same normalisation as the real densities: out-of-range values count in the denominator
            ax.plot((edges[:-1] + edges[1:]) / 2, counts / len(v) / np.diff(edges), ls="--", lw=0.8,
                    color=lines[0].cmap(lines[0].norm(float(layer))))
        ax.plot([], [], ls="--", color="grey", label="permutation null, per layer")
        ax.legend(loc="upper right", fontsize="small")
    return fig


# ---------------------------------------------------------------- attention AR
def fig_attn_strip(attn_norms: pl.LazyFrame, max_per_layer: int = 300, seed: int = 0) -> Figure:
    """Strip plot: jittered log norms per layer (sample) with the per-layer median of all tokens."""
    pts = collect(thin(attn_norms, ["model", "layer"], ["chunk", "pos"], max_per_layer)
                   .select("model", "layer", "log_norm"), "attention norms")
    med = attn_norms.group_by("model", "layer").agg(pl.col("log_norm").median()).sort("layer").collect()
    rng = np.random.default_rng(seed)
    models = models_of(pts)
    fig, axes = panels(len(models), ncols=2, w=6.5)
    for ax, m in zip(axes, models):
        d, md = pts.filter(pl.col("model") == m), med.filter(pl.col("model") == m)
        x = d["layer"].to_numpy() + rng.uniform(-0.3, 0.3, d.height)
        ax.scatter(x, d["log_norm"], s=3, alpha=0.3, c=d["layer"], cmap="viridis", rasterized=True)
        ax.scatter(md["layer"], md["log_norm"], marker="_", s=200, color="black", label="median (all tokens)")
        ax.set(title=f"{m}: ≤{max_per_layer} tokens per layer", ylabel="log ‖attention output‖₂ (log L2 norm)")
        int_x(ax)
        ax.legend(fontsize=8)
    fig.suptitle(TITLES["attn_strip"])
    return fig


def fig_attn_hist(attn_norms: pl.LazyFrame) -> Figure:
    """Per model: histogram density of log norms per layer overlaid, coloured by layer."""
    return density_panels(attn_norms, "log_norm", 0.001, 0.999, "log ‖attention output‖₂ (log L2 norm)",
                           "density (per log unit)", "layer", TITLES["attn_hist"])


def fig_attn_ar_coefs(attn_ar: pl.LazyFrame, alpha: float = ALPHA) -> Figure:
    """b1 and b2 per layer from the pooled rows (chunk null), filled markers where significant.

    Significance is the table's significant1/significant2 (the run's --alpha, Bonferroni over layers);
    tables written before those columns existed fall back to p < alpha / n_layers.
    """
    lazy = attn_ar.filter(pl.col("chunk").is_null() & pl.col("b1").is_finite())
    has_flags = {"significant1", "significant2"} <= set(attn_ar.collect_schema().names())
    flags = ["significant1", "significant2"] if has_flags else []
    df = collect(lazy.select("model", "layer", "b1", "b2", "p1", "p2", *flags).sort("layer"), "pooled AR rows")
    fig, axes = panels(2, ncols=2, w=6.0, h=4.2)
    for m in models_of(df):
        d = df.filter(pl.col("model") == m)
        for ax, lag in zip(axes, (1, 2)):
            b = f"b{lag}"
            (line,) = ax.plot(d["layer"], d[b], marker="o", mfc="white", label=m)
            # Fallback: Bonferroni over this model's layers at the given alpha.
            sig = pl.col(f"significant{lag}") if has_flags else pl.col(f"p{lag}") < alpha / d.height
            s = d.filter(sig)
            ax.scatter(s["layer"], s[b], color=line.get_color(), s=40, zorder=3)
    label = "significant at --alpha / layers (filled)" if has_flags else f"p < {alpha:g} / layers (filled)"
    for ax, lag in zip(axes, (1, 2)):
        ax.axhline(0, color="black", lw=0.8)
        handles = ax.get_legend_handles_labels()[0] + [Line2D([], [], marker="o", ls="", color="grey", label=label)]
        ax.set(title=f"lag-{lag} coefficient b{lag}", ylabel=f"b{lag} (dimensionless)")
        int_x(ax)
        ax.legend(handles=handles, fontsize=8)
    fig.suptitle(TITLES["attn_ar_coefs"])
    return fig


# ---------------------------------------------------------------- render
def _present(tables: dict[str, pl.LazyFrame]) -> dict[str, pl.LazyFrame]:
    """Tables that exist and have at least one row."""
    return {k: v for k, v in tables.items() if v is not None and v.head(1).collect().height > 0}


def _specs(t: dict, chunk: int, neuron_layer, mi_layer, n_layers=None):
    """(name, section, needed tables, builder) for every figure, in report order."""
    get = t.get
    return [
        *across_sizes.specs(t, n_layers),
        ("path_cumulative", "path", ["layer_metrics"], lambda: fig_path_cumulative(t["layer_metrics"], chunk)),
        ("path_logit_vs_step", "path", ["tokens", "layer_metrics"],
         lambda: fig_logit_vs_step(t["tokens"], t["layer_metrics"], get("path_summary"))),
        ("rotation_angles", "rotation", ["rotation_angles"], lambda: fig_rotation_angles(t["rotation_angles"])),
        ("rotation_t", "rotation", ["rotation"], lambda: fig_rotation_t(t["rotation"])),
        ("neurons_beta", "neurons", ["neuron_logit"], lambda: fig_neuron_betas(t["neuron_logit"], neuron_layer)),
        ("neurons_per_layer", "neurons", ["neuron_logit"], lambda: fig_neurons_per_layer(t["neuron_logit"])),
        *[(heatmap_name(flag), "neurons", ["neuron_heatmap", "tokens"], lambda flag=flag: fig_token_heatmap(
            t["neuron_heatmap"], t["tokens"], get("neuron_logit"), in_sample=flag)) for flag in (True, False)],
        ("mi_layer", "mi", ["mi"], lambda: fig_mi_layer(t["mi"], mi_layer)),
        ("mi_density", "mi", ["mi"], lambda: fig_mi_density(t["mi"], get("mi_null"))),
        ("attn_strip", "attn_ar", ["attn_norms"], lambda: fig_attn_strip(t["attn_norms"])),
        ("attn_hist", "attn_ar", ["attn_norms"], lambda: fig_attn_hist(t["attn_norms"])),
        ("attn_ar_coefs", "attn_ar", ["attn_ar"], lambda: fig_attn_ar_coefs(t["attn_ar"])),
    ]


def render_all(tables: dict[str, pl.LazyFrame], fig_dir: str, *, chunk: int = 0, neuron_layer: int | None = None,
               mi_layer: int | None = None, n_layers: dict[str, int] | None = None) -> list[dict]:
    """Write every figure whose tables are present and non-empty as ``<name>.png`` and ``<name>.svg``.

    Returns entries {"name", "title", "section", "png", "svg"} in report order; figures with nothing to
    draw (``NoData``) are skipped and logged. ``n_layers`` (model -> n_layer, e.g. from the manifest) sets the
    relative depth of the "across" figures; without it a model's largest layer in the tables is used.
    """
    present = _present(tables)
    os.makedirs(fig_dir, exist_ok=True)
    out = []
    for name, section, needs, build in _specs(present, chunk, neuron_layer, mi_layer, n_layers):
        if not all(n in present for n in needs):
            continue
        try:
            fig = build()
        except NoData as e:
            log.info("figure %s skipped: %s", name, e)
            continue
        paths = {ext: os.path.join(fig_dir, f"{name}.{ext}") for ext in ("png", "svg")}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=re.escape("Glyph") + ".*missing")  # rare Unicode tokens
            fig.savefig(paths["png"], dpi=110)
            fig.savefig(paths["svg"])
        out.append({"name": name, "title": TITLES[name], "section": section, **paths})
    return out
