"""Figures of the proper-noun neurons: logistic-regression coefficients, significant neurons per layer (and
across sizes), and the token heatmap of the best neuron: a chunk's text with each token's box coloured by that
neuron's pre-GELU activation (table ``neuron_heatmap``), token text from table ``tokens``.

``neuron_heatmap`` holds, per model, one neuron (layer = block index 1..n_layer) over up to two chunks: one
from the neuron sample (``in_sample_chunk``; its sampled tokens have ``sampled``) and one held out.
"""
from __future__ import annotations

import matplotlib
import numpy as np
import polars as pl
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from jobs.analysis import FigureSpec
from jobs.plotting import (NoData, best_layer, collect, depth_legend, depth_lines, int_x, models_of, panels, pick, safe,
                           with_depth)

HEATMAP_TITLES = {
    "token_heatmap_in_sample": "Token heatmap of the best proper-noun neuron: a chunk from the neuron sample",
    "token_heatmap_held_out": "Token heatmap of the best proper-noun neuron: a held-out chunk (no sampled tokens)",
}
TITLES = {
    "neurons_beta": "Proper-noun neurons: logistic-regression coefficients in one layer",
    "neurons_per_layer": "Proper-noun neurons: significant neurons per layer",
    **HEATMAP_TITLES,
    "across_neurons_frac": "Across sizes: fraction of significant proper-noun neurons per layer",
}
_MONO_ADVANCE = 0.602  # DejaVu Sans Mono glyph advance in em: fixes the layout without measuring text
_HM_COLS = ["model", "layer", "neuron", "chunk", "pos", "activation", "sampled"]


def heatmap_name(in_sample: bool) -> str:
    """Figure name (a key of ``HEATMAP_TITLES``) of the in-sample or held-out heatmap."""
    return "token_heatmap_in_sample" if in_sample else "token_heatmap_held_out"


def _chunk_choice(hm: pl.LazyFrame, in_sample: bool) -> pl.DataFrame:
    """Per model the smallest chunk with ``in_sample_chunk == in_sample``: model, chunk, n_pos, n_sampled."""
    return (hm.filter(pl.col("in_sample_chunk") == in_sample)
            .group_by("model", "chunk").agg(pl.len().alias("n_pos"), pl.col("sampled").sum().alias("n_sampled"))
            .sort("model", "chunk").group_by("model", maintain_order=True).first().collect())


def _display_text() -> pl.Expr:
    """Token text for one text box: tabs as spaces, newlines as ↵ (they end the line), empty/missing as ∅."""
    t = pl.col("token").fill_null("").str.replace_all("\r", "", literal=True).str.replace_all("\t", " ", literal=True)
    t = t.str.replace_all("\n", "↵", literal=True)
    return pl.when(t.str.len_chars() > 0).then(t).otherwise(pl.lit("∅")).alias("text")


def heatmap_rows(neuron_heatmap: pl.LazyFrame, tokens: pl.LazyFrame, in_sample: bool,
                 max_tokens: int = 400) -> pl.DataFrame:
    """Rows to draw for the in-sample (or held-out) chunk of each model: its first ``max_tokens`` positions.

    Columns: model, layer, neuron, chunk, pos, activation, sampled, n_pos, n_sampled (whole chunk), vmax
    (max |activation| of the model's neuron over both chunks, so the two figures share one colour scale), text.
    Only the chosen chunks of ``tokens`` are read (model/chunk/pos filter pushed down to the scan).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    hm = neuron_heatmap.select(*_HM_COLS, "in_sample_chunk")
    chosen = _chunk_choice(hm, in_sample)
    if chosen.height == 0:
        raise NoData(f"no {'in-sample' if in_sample else 'held-out'} chunk in neuron_heatmap")
    choice = {m: int(c) for m, c in chosen.select("model", "chunk").iter_rows()}
    scale = hm.group_by("model").agg(pl.col("activation").cast(pl.Float64).abs().max().alias("vmax"))
    rows = collect(hm.filter(pick(choice, "chunk") & (pl.col("in_sample_chunk") == in_sample)).select(_HM_COLS)
                   .sort("model", "pos").group_by("model", maintain_order=True).head(max_tokens)
                   .join(chosen.lazy().drop("chunk"), on="model").join(scale, on="model"), "token heatmap")
    last = int(rows["pos"].max())
    text = (tokens.filter(pick(choice, "chunk") & (pl.col("pos") <= last))
            .select("model", "chunk", "pos", _display_text()).collect())
    rows = rows.join(text, on=["model", "chunk", "pos"], how="left", maintain_order="left")
    return rows.with_columns(pl.col("text").fill_null("∅"))


def _layout_tokens(texts: list[str], width: int):
    """Monospace wrap: (x start, line index, width) in character cells; a token with a newline ends its line."""
    x, line, cur = [], [], [0, 0]
    for t in texts:  # layout only (one chunk, <= max_tokens), not an analysis hot path
        n = max(len(t), 1)
        if cur[0] + n > width and cur[0] > 0:
            cur = [0, cur[1] + 1]
        x.append(cur[0])
        line.append(cur[1])
        cur[0] += n
        if t.endswith("↵"):
            cur = [0, cur[1] + 1]
    return np.array(x), np.array(line), np.array([max(len(t), 1) for t in texts])


def _draw_tokens(fig, ax, texts: list[str], act: np.ndarray, sampled: np.ndarray, vmax: float, width: int,
                 fs: float) -> None:
    """Tokens as monospace text on boxes coloured by ``act`` on the diverging scale [-vmax, vmax]; sampled
    boxes outlined."""
    vmax = vmax if np.isfinite(vmax) and vmax > 0 else 1.0
    x, line, w = _layout_tokens(texts, width)
    norm, cmap = Normalize(-vmax, vmax), matplotlib.colormaps["RdBu_r"]
    ax.bar(x, 0.9, width=w, bottom=line - 0.45, align="edge", color=cmap(norm(np.nan_to_num(act))),
           edgecolor=np.where(sampled, "black", "none"), linewidth=0.8)
    ink = np.where(np.abs(np.nan_to_num(act)) > 0.6 * vmax, "white", "black")  # legible on dark boxes
    for xi, li, t, c in zip(x, line, texts, ink):  # one artist per token: text cannot be batched
        ax.text(xi, li, t, color=c, fontfamily="DejaVu Sans Mono", fontsize=fs, va="center", ha="left",
                parse_math=False)
    ax.set(xlim=(0, width), ylim=(max(line.max() + 1, 4) - 0.5, -0.5))
    ax.axis("off")
    fig.colorbar(ScalarMappable(norm, cmap), ax=ax, label="pre-GELU activation (c_fc)", fraction=0.03)


def _fits(neuron_logit: pl.LazyFrame | None, df: pl.DataFrame) -> dict[str, tuple[float, bool]]:
    """Per model (beta, significant) of the drawn neuron, when ``neuron_logit`` has it."""
    if neuron_logit is None:
        return {}
    sel = pl.lit(False)
    for m, lay, n in df.select("model", "layer", "neuron").unique().iter_rows():
        sel = sel | ((pl.col("model") == m) & (pl.col("layer") == lay) & (pl.col("neuron") == n))
    fits = neuron_logit.filter(sel).select("model", "beta", "significant").collect()
    return {m: (b, bool(s)) for m, b, s in fits.iter_rows()}


def _panel_title(m: str, d: pl.DataFrame, fit, in_sample: bool) -> str:
    """Which neuron, which chunk and whether that chunk is in the neuron sample."""
    r = d.row(0, named=True)
    who = f"layer {r['layer']} neuron {r['neuron']}"
    if fit is not None and fit[0] is not None:
        who += f" (β = {fit[0]:.3g}, {'significant' if fit[1] else 'not significant'})"
    where = (f"chunk {r['chunk']} in the neuron sample ({r['n_sampled']} sampled tokens, outlined)" if in_sample
             else f"chunk {r['chunk']} held out (no sampled tokens)")
    shown = f"first {d.height} of {r['n_pos']} tokens" if d.height < r["n_pos"] else f"all {d.height} tokens"
    return safe(f"{m}: {who}; {where}; {shown}")


def fig_token_heatmap(neuron_heatmap: pl.LazyFrame, tokens: pl.LazyFrame, neuron_logit: pl.LazyFrame | None = None,
                      *, in_sample: bool = True, max_tokens: int = 400, width: int = 120) -> Figure:
    """One panel per model: the in-sample (or held-out) chunk's first ``max_tokens`` tokens, wrapped at ``width``
    characters, each on a box coloured by the heatmap neuron's activation (scale shared by both chunks)."""
    df = heatmap_rows(neuron_heatmap, tokens, in_sample, max_tokens)
    fits = _fits(neuron_logit, df)
    models = models_of(df)
    texts = {m: df.filter(pl.col("model") == m)["text"].to_list() for m in models}
    fs = 0.9 * 11.0 * 72 / (width * _MONO_ADVANCE)  # ~11 in of axes hold ``width`` character cells
    heights = [max(1.4, (_layout_tokens(texts[m], width)[1].max() + 1) * fs * 1.6 / 72) + 0.5 for m in models]
    fig = Figure(figsize=(13.0, sum(heights) + 0.5), layout="constrained")
    axes = fig.subplots(len(models), 1, squeeze=False, height_ratios=heights).ravel()
    for ax, m in zip(axes, models):
        d = df.filter(pl.col("model") == m)
        act = d["activation"].cast(pl.Float64).fill_null(np.nan).to_numpy()
        _draw_tokens(fig, ax, texts[m], act, d["sampled"].fill_null(False).to_numpy(), float(d["vmax"][0] or 0.0),
                     width, fs)
        ax.set_title(_panel_title(m, d, fits.get(m), in_sample), fontsize=10)
    fig.suptitle(HEATMAP_TITLES[heatmap_name(in_sample)])
    return fig


def neuron_layers(neuron_logit: pl.LazyFrame, layer: int | None = None) -> dict[str, int]:
    """Layer to show per model: ``layer`` if given, else the layer with most significant neurons."""
    return best_layer(neuron_logit, pl.col("significant").sum(), layer)


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


def fig_neurons_frac(neuron_logit: pl.LazyFrame, n_layers: dict[str, int] | None = None) -> Figure:
    """Across sizes: fraction of the layer's neurons with significant = true."""
    df = with_depth(collect(neuron_logit.group_by("model", "layer").agg(
        pl.col("significant").cast(pl.Float64).mean().alias("frac")), "significant neurons"), n_layers)
    fig, (ax,) = panels(1, w=7.0, h=4.2)
    depth_lines(ax, df, "frac")
    ax.set(ylabel="significant neurons (fraction of the layer)", ylim=(0, None))
    depth_legend(ax)
    fig.suptitle(TITLES["across_neurons_frac"])
    return fig


def _spec(name: str, needs: tuple[str, ...], draw) -> FigureSpec:
    return FigureSpec(name, TITLES[name], needs, draw)


FIGURES = (
    _spec("neurons_beta", ("neuron_logit",), lambda t, n_layers: fig_neuron_betas(t["neuron_logit"])),
    _spec("neurons_per_layer", ("neuron_logit",), lambda t, n_layers: fig_neurons_per_layer(t["neuron_logit"])),
    *[_spec(heatmap_name(flag), ("neuron_heatmap", "tokens"), lambda t, n_layers, flag=flag: fig_token_heatmap(
        t["neuron_heatmap"], t["tokens"], t.get("neuron_logit"), in_sample=flag)) for flag in (True, False)],
)
ACROSS_FIGURES = (_spec("across_neurons_frac", ("neuron_logit",), lambda t, n_layers: fig_neurons_frac(t["neuron_logit"], n_layers)),)
