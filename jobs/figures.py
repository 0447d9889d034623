"""Figures of a run: one pure function per figure (polars LazyFrames in, ``Figure`` out) and ``render_all``.

Conventions: one panel per model (ordered by size), axes labelled with units, and every table is
filtered, aggregated or hash-subsampled lazily so that only the plotted rows are collected (tables can
hold 10^7+ rows). Layers: ``layer_metrics``, ``attn_*``, ``neuron_logit`` and ``rotation*`` use the block
index 1..n_layer; ``mi`` uses the ``hidden_states`` index 0..n_layer (0 = embedding output).
A figure function raises ``NoData`` (a ``ValueError``) when nothing is left to draw.
"""
from __future__ import annotations

import logging
import math
import os
import re
import warnings

import matplotlib

matplotlib.use("Agg")  # headless: figures only go to files (and pyplot, if ever imported, must not pick a GUI)
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

log = logging.getLogger(__name__)

TITLES = {
    "path_cumulative": "Cumulative hidden-state path length across layers",
    "path_logit_vs_step": "Next-token logit vs final-layer path step",
    "rotation_angles": "Rotation angles across layers: target vs previous vs shuffled tokens",
    "rotation_t": "Rotation: paired t statistic per layer",
    "neurons_beta": "Proper-noun neurons: logistic-regression coefficients in one layer",
    "neurons_per_layer": "Proper-noun neurons: significant neurons per layer",
    "neurons_heatmap": "Token heatmap of the best positive proper-noun neuron",
    "mi_layer": "Pairwise mutual information between hidden dimensions (one layer)",
    "mi_density": "Pairwise mutual information: density per layer",
    "attn_strip": "Log attention-output norms per layer",
    "attn_hist": "Log attention-output norms: histogram per layer",
    "attn_ar_coefs": "AR(2) on log attention-output norms: pooled coefficients",
}
KIND_COLORS = {"target": "tab:red", "previous": "tab:blue", "shuffled": "tab:gray"}
ALPHA = 0.05
N_BINS = 60
_SIZE_RANK = {"distilgpt2": 0, "gpt2": 1, "gpt2-medium": 2, "gpt2-large": 3, "gpt2-xl": 4}
_MONO_ADVANCE = 0.602  # DejaVu Sans Mono glyph advance in em: fixes the token-heatmap layout without measuring


class NoData(ValueError):
    """Raised by a figure function when its (filtered) input has no rows to draw."""


def model_sort_key(name: str) -> tuple[int, str]:
    """Sort key ordering GPT-2 models by size (hub prefixes ignored; unknown names last, alphabetically)."""
    return _SIZE_RANK.get(name.rsplit("/", 1)[-1], len(_SIZE_RANK)), name


def _models(df: pl.DataFrame) -> list[str]:
    return sorted(df["model"].unique().to_list(), key=model_sort_key)


def _safe(text: str) -> str:
    """Literal text for matplotlib titles/labels ($ would start mathtext)."""
    return str(text).replace("$", r"\$")


def _collect(lf: pl.LazyFrame, what: str) -> pl.DataFrame:
    df = lf.collect()
    if df.height == 0:
        raise NoData(f"no rows to draw {what}")
    return df


def _panels(n: int, ncols: int = 3, w: float = 4.8, h: float = 3.6):
    """Figure with ``n`` axes on a grid of ``ncols`` columns (unused cells hidden)."""
    ncols = max(1, min(n, ncols))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(max(w * ncols, 7.0), h * nrows + 0.5), layout="constrained")  # room for the suptitle
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _thin(lf: pl.LazyFrame, group: list[str], keys: list[str], max_n: int, count=None, seed=0) -> pl.LazyFrame:
    """Keep about ``max_n`` distinct ``keys`` per ``group``: deterministic hash-stride sampling, lazy.

    ``count`` is the expression counting keys per group (default ``pl.len()``, right when keys are unique).
    """
    counts = lf.group_by(group).agg((pl.len() if count is None else count).alias("_n")).collect()
    stride = counts.select(*group, ((pl.col("_n") + max_n - 1) // max_n).clip(1).cast(pl.UInt64).alias("_s"))
    return (lf.join(stride.lazy(), on=group, maintain_order="left")  # same sample, same order: stable figures
            .filter(pl.struct(keys).hash(seed) % pl.col("_s") == 0).drop("_s"))


def _wide(df: pl.DataFrame, keys: list[str], values: str, on: str = "layer"):
    """Long rows -> (key frame, sorted ``on`` values, matrix (n_keys, n_on) with NaN where missing)."""
    w = df.pivot(on=on, index=keys, values=values, aggregate_function="first")
    cols = sorted(w.columns[len(keys):], key=int)
    mat = w.select(pl.col(cols).cast(pl.Float64)).to_numpy()
    return w.select(keys), np.array([int(c) for c in cols]), mat


def _pick(choice: dict[str, int], col: str) -> pl.Expr:
    """Rows where ``col`` equals the value chosen for their model (one term per model)."""
    sel = pl.lit(False)
    for m, v in choice.items():
        sel = sel | ((pl.col("model") == m) & (pl.col(col) == v))
    return sel


def _int_x(ax, label: str = "layer") -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(label)


def _resolve_chunk(lf: pl.LazyFrame, chunk: int) -> int:
    """``chunk`` if the table has it, else its smallest chunk."""
    if lf.filter(pl.col("chunk") == chunk).select(pl.len()).collect().item() > 0:
        return chunk
    found = lf.select(pl.col("chunk").min()).collect().item()
    if found is None:
        raise NoData("no chunk to draw")
    return int(found)


def _add_lines(ax, x: np.ndarray, Y: np.ndarray, **kw) -> LineCollection:
    """One line per row of ``Y`` (n_lines, len(x)) over ``x`` as a single collection (NaN = gap)."""
    lc = LineCollection(np.stack([np.broadcast_to(x, Y.shape), Y], axis=-1), **kw)
    ax.add_collection(lc)
    ax.autoscale_view()
    return lc


def _layer_lines(fig, ax, x: np.ndarray, Y: np.ndarray, layers: np.ndarray, label: str) -> None:
    """One line per layer (rows of ``Y`` over ``x``) coloured by layer, with a colorbar."""
    lc = _add_lines(ax, x, Y, cmap="viridis", array=layers.astype(float), linewidths=1.2)
    fig.colorbar(lc, ax=ax, label=label, ticks=MaxNLocator(integer=True))


def _binned_density(lf: pl.LazyFrame, col: str, lo_q: float, hi_q: float, bins: int = N_BINS):
    """Histogram density of ``col`` per (model, layer) on a per-model range [q(lo_q), q(hi_q)].

    Returns (centres per model: dict model -> (bins,), long frame model, layer, bin, density); values
    outside the range count in the denominator only, so densities stay comparable across layers.
    """
    v = pl.col(col).cast(pl.Float64)  # float32 columns: bin in float64 like numpy
    rng = (lf.group_by("model").agg(v.quantile(lo_q).alias("lo"), v.quantile(hi_q).alias("hi")).collect()
           .with_columns(hi=pl.max_horizontal("hi", pl.col("lo") + 1e-9)))
    raw = ((v - pl.col("lo")) / (pl.col("hi") - pl.col("lo")) * bins).floor().clip(0, bins - 1).cast(pl.Int32)
    counts = (lf.select("model", "layer", col).join(rng.lazy(), on="model")
              .with_columns(bin=pl.when(v.is_between(pl.col("lo"), pl.col("hi"))).then(raw))
              .group_by("model", "layer", "bin").agg(pl.len().alias("n")).collect())
    dens = (counts.with_columns(total=pl.col("n").sum().over("model", "layer"))
            .filter(pl.col("bin").is_not_null()).join(rng, on="model")
            .with_columns(density=pl.col("n") / pl.col("total") / ((pl.col("hi") - pl.col("lo")) / bins)))
    centres = {m: lo + (np.arange(bins) + 0.5) * (hi - lo) / bins for m, lo, hi in rng.iter_rows()}
    return centres, dens


def _density_panels(lf: pl.LazyFrame, col: str, lo_q: float, hi_q: float, xlabel: str, ylabel: str, clabel: str,
                    title: str) -> Figure:
    centres, dens = _binned_density(lf, col, lo_q, hi_q)
    if dens.height == 0:
        raise NoData(f"no {col} values")
    models = _models(dens)
    fig, axes = _panels(len(models))
    for ax, m in zip(axes, models):
        d = dens.filter(pl.col("model") == m)
        layers = np.sort(d["layer"].unique().to_numpy())
        Y = np.zeros((len(layers), N_BINS))
        Y[np.searchsorted(layers, d["layer"].to_numpy()), d["bin"].to_numpy()] = d["density"].to_numpy()
        _layer_lines(fig, ax, centres[m], Y, layers, clabel)
        ax.set(title=f"{m} (values in quantiles {lo_q:g}-{hi_q:g})", xlabel=xlabel, ylabel=ylabel)
    fig.suptitle(title)
    return fig


# ---------------------------------------------------------------- path
def fig_path_cumulative(layer_metrics: pl.LazyFrame, chunk: int = 0) -> Figure:
    """Cumulative path length vs layer, one line per token of ``chunk`` coloured by position; panel per model."""
    c = _resolve_chunk(layer_metrics, chunk)
    df = _collect(layer_metrics.filter(pl.col("chunk") == c).select("model", "pos", "layer", "path_cum"), "path")
    models = _models(df)
    fig, axes = _panels(len(models))
    for ax, m in zip(axes, models):
        keys, layers, Y = _wide(df.filter(pl.col("model") == m), ["pos"], "path_cum")
        lc = _add_lines(ax, layers, Y, cmap="viridis", array=keys["pos"].to_numpy().astype(float),
                        linewidths=0.6, alpha=0.6, rasterized=True)
        ax.plot(layers, np.nanmean(Y, axis=0), color="black", lw=2.2, label="mean over tokens")
        fig.colorbar(lc, ax=ax, label="token position in chunk")
        ax.set(title=f"{m}: chunk {c}, {Y.shape[0]} tokens", ylabel="cumulative path length (L2, residual units)")
        _int_x(ax, "layer (block output)")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(TITLES["path_cumulative"])
    return fig


def fig_logit_vs_step(tokens: pl.LazyFrame, layer_metrics: pl.LazyFrame, path_summary: pl.LazyFrame | None = None,
                      max_points: int = 20_000) -> Figure:
    """Scatter of next-token logit vs the final layer's path step (<= max_points per model); r in titles."""
    tok = tokens.filter(pl.col("next_token_logit").is_not_null()).select("model", "chunk", "pos", "next_token_logit")
    tok = _thin(tok, ["model"], ["chunk", "pos"], max_points)
    last = layer_metrics.group_by("model").agg(pl.col("layer").max()).collect()
    steps = layer_metrics.join(last.lazy(), on=["model", "layer"]).select("model", "chunk", "pos", "path_step")
    df = _collect(tok.join(steps, on=["model", "chunk", "pos"]), "logit vs path step")
    summary = {} if path_summary is None else {
        m: (n, r) for m, n, r in path_summary.select("model", "n_tokens", "r_path_logit").collect().iter_rows()}
    models = _models(df)
    fig, axes = _panels(len(models))
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
    means = _collect(ra.group_by(*group, "kind", "layer").agg(pl.col("angle_rad").mean()), "rotation angles")
    thin = _thin(ra, group, occ, max_lines, count=pl.struct(occ).n_unique()).collect()
    models = _models(means)
    rows = means.select("target", "source").unique().sort("target", "source").rows()
    fig, axes = _panels(len(rows) * len(models), ncols=len(models))
    for i, (target, source) in enumerate(rows):
        for ax, m in zip(axes[i * len(models):], models):
            sel = (pl.col("model") == m) & (pl.col("target") == target) & (pl.col("source") == source)
            for kind, color in KIND_COLORS.items():
                d = thin.filter(sel & (pl.col("kind") == kind))
                if d.height:
                    _, layers, Y = _wide(d, occ, "angle_rad")
                    _add_lines(ax, layers, Y, colors=color, linewidths=0.4, alpha=0.25, rasterized=True)
                mu = means.filter(sel & (pl.col("kind") == kind)).sort("layer")
                ax.plot(mu["layer"], mu["angle_rad"], color=color, lw=2.5, label=f"{kind} (mean)")
            ax.plot([], [], color="grey", lw=0.5, label="single occurrences")
            ax.set(title=_safe(f"{m}: target {target!r} ({source})"), ylabel="rotation angle (rad)")
            _int_x(ax)
            ax.legend(fontsize=8)
    fig.suptitle(TITLES["rotation_angles"])
    return fig


def fig_rotation_t(rotation: pl.LazyFrame) -> Figure:
    """Paired t statistic per layer, one line per model, significant layers starred; panel per (target, source)."""
    if "source" not in rotation.collect_schema().names():  # tables written before per-source tests
        rotation = rotation.with_columns(source=pl.lit("pooled"))
    df = _collect(rotation.select("model", "target", "source", "layer", "t", "significant").sort("layer"), "rotation t")
    models, rows = _models(df), df.select("target", "source").unique().sort("target", "source").rows()
    fig, axes = _panels(len(rows))
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
        ax.set(title=_safe(f"target {target!r} ({source})"), ylabel="paired t statistic")
        _int_x(ax)
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


def best_neurons(neuron_logit: pl.LazyFrame, layers: dict[str, int]) -> dict[str, tuple[int, int, float]]:
    """Per model (layer, neuron, beta) of the significant neuron with the largest positive beta in its layer."""
    sel = _pick(layers, "layer")
    df = (neuron_logit.filter(sel & pl.col("significant") & (pl.col("beta") > 0) & pl.col("beta").is_finite())
          .sort("beta", descending=True).group_by("model").first().select("model", "layer", "neuron", "beta").collect())
    return {m: (int(lay), int(n), float(b)) for m, lay, n, b in df.iter_rows()}


def fig_neuron_betas(neuron_logit: pl.LazyFrame, layer: int | None = None) -> Figure:
    """Per model: beta by neuron index and beta vs -log10 p for one layer, significant neurons in red."""
    layers = neuron_layers(neuron_logit, layer)
    sel = _pick(layers, "layer")
    df = _collect(neuron_logit.filter(sel & pl.col("beta").is_finite() & pl.col("p").is_not_null())
                  .select("model", "neuron", "beta", "p", "significant"), "neuron betas")
    models = _models(df)
    fig, axes = _panels(2 * len(models), ncols=2, w=5.5)
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
    df = _collect(neuron_logit.group_by("model", "layer").agg(pl.col("significant").sum().alias("n_sig"))
                  .sort("layer"), "significant neurons per layer")
    fig, (ax,) = _panels(1, w=7.0, h=4.2)
    for m in _models(df):
        d = df.filter(pl.col("model") == m)
        ax.plot(d["layer"], d["n_sig"], marker="o", label=m)
    ax.set(ylabel="significant neurons (count)", ylim=(0, None), title="neurons with significant = true")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _int_x(ax)
    ax.legend()
    fig.suptitle(TITLES["neurons_per_layer"])
    return fig


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


def _heatmap_chunks(heatmap: pl.LazyFrame, activations: pl.LazyFrame | None, chunk: int) -> dict[str, int]:
    """Per model the in-sample chunk to draw: ``chunk`` if in sample, else the smallest in-sample chunk."""
    have = heatmap.select("model", "chunk").unique()
    if activations is not None:
        have = have.join(activations.select("model", "chunk").unique(), on=["model", "chunk"])
    elif "sampled" in heatmap.collect_schema().names():
        have = heatmap.filter(pl.col("sampled")).select("model", "chunk").unique()
    df = have.collect().with_columns(pref=pl.col("chunk") != chunk).sort("model", "pref", "chunk")
    first = df.group_by("model", maintain_order=True).first()
    return {m: int(c) for m, c in first.select("model", "chunk").iter_rows()}


def _draw_tokens(fig, ax, texts: list[str], act: np.ndarray, sampled: np.ndarray, width: int, fs: float) -> None:
    """Tokens as monospace text on boxes coloured by ``act`` (symmetric diverging scale); sampled boxes outlined."""
    x, line, w = _layout_tokens(texts, width)
    vmax = float(np.nanmax(np.abs(act))) if np.isfinite(act).any() else 0.0
    norm, cmap = Normalize(-(vmax or 1.0), vmax or 1.0), matplotlib.colormaps["RdBu_r"]
    ax.bar(x, 0.9, width=w, bottom=line - 0.45, align="edge", color=cmap(norm(np.nan_to_num(act))),
           edgecolor=np.where(sampled, "black", "none"), linewidth=0.6)
    ink = np.where(np.abs(np.nan_to_num(act)) > 0.6 * (vmax or 1.0), "white", "black")  # legible on dark boxes
    for xi, li, t, c in zip(x, line, texts, ink):  # one artist per token: text cannot be batched
        ax.text(xi, li, t, color=c, fontfamily="DejaVu Sans Mono", fontsize=fs, va="center", ha="left",
                parse_math=False)
    ax.set(xlim=(0, width), ylim=(max(line.max() + 1, 4) - 0.5, -0.5))
    ax.axis("off")
    fig.colorbar(ScalarMappable(norm, cmap), ax=ax, label="pre-GELU activation", fraction=0.03)


def fig_token_heatmap(heatmap: pl.LazyFrame, neuron_logit: pl.LazyFrame | None = None,
                      activations: pl.LazyFrame | None = None, *, chunk: int = 0, layer: int | None = None,
                      max_tokens: int = 400, width: int = 120) -> Figure:
    """The chunk's text as tokens whose background is the best positive neuron's activation (panel per model).

    ``heatmap`` rows: model, chunk, pos, token, activation[, sampled]; the chunk is ``chunk`` when it is in
    sample (has ``activations`` rows, else ``sampled`` rows), else the smallest in-sample chunk.
    """
    chunks = _heatmap_chunks(heatmap, activations, chunk)
    if not chunks:
        raise NoData("no in-sample chunk in heatmap")
    best = {} if neuron_logit is None else best_neurons(neuron_logit, neuron_layers(neuron_logit, layer))
    names = heatmap.collect_schema().names()
    cols = [c for c in ("model", "pos", "token", "activation", "sampled") if c in names]
    df = _collect(heatmap.filter(_pick(chunks, "chunk")).select(cols).sort("model", "pos")
                  .group_by("model", maintain_order=True).head(max_tokens), "token heatmap")
    models = _models(df)
    texts = {m: [t.replace("\r", "").replace("\t", " ").replace("\n", "↵") or "∅"
                 for t in df.filter(pl.col("model") == m)["token"].fill_null("∅").to_list()] for m in models}
    fs = 0.9 * 11.0 * 72 / (width * _MONO_ADVANCE)  # ~11 in of axes hold ``width`` character cells
    heights = [max(1.4, (_layout_tokens(texts[m], width)[1].max() + 1) * fs * 1.6 / 72) + 0.5 for m in models]
    fig = Figure(figsize=(13.0, sum(heights) + 0.5), layout="constrained")
    axes = fig.subplots(len(models), 1, squeeze=False, height_ratios=heights).ravel()
    for ax, m in zip(axes, models):
        d = df.filter(pl.col("model") == m)
        sampled = d["sampled"].fill_null(False).to_numpy() if "sampled" in d.columns else np.zeros(d.height, bool)
        _draw_tokens(fig, ax, texts[m], d["activation"].cast(pl.Float64).fill_null(np.nan).to_numpy(), sampled,
                     width, fs)
        lay, neuron, beta = best.get(m, (layer, None, None))
        who = "best neuron n/a" if neuron is None else f"layer {lay} neuron {neuron} (β = {beta:.3g})"
        note = "; outlined = sampled" if "sampled" in d.columns else ""
        ax.set_title(f"{m}: chunk {chunks[m]}, {who}; first {d.height} tokens{note}", fontsize=10)
    fig.suptitle(TITLES["neurons_heatmap"])
    return fig


# ---------------------------------------------------------------- mi
def mi_layers(mi: pl.LazyFrame, layer: int | None = None) -> dict[str, int]:
    """Layer to show per model: ``layer`` if given, else the hidden_states index with the largest mean MI."""
    return _best_layer(mi, pl.col("mi_bits").mean(), layer)


def fig_mi_layer(mi: pl.LazyFrame, layer: int | None = None) -> Figure:
    """Per model: histogram of one layer's pairwise MI and the symmetric dim x dim MI image."""
    layers = mi_layers(mi, layer)
    sel = _pick(layers, "layer")
    df = _collect(mi.filter(sel).select("model", "dim_i", "dim_j", "mi_bits"), "mi layer")
    models = _models(df)
    fig, axes = _panels(2 * len(models), ncols=2, w=5.5, h=4.4)
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


def fig_mi_density(mi: pl.LazyFrame) -> Figure:
    """Per model: MI density per layer overlaid, coloured by hidden_states index."""
    return _density_panels(mi, "mi_bits", 0.0, 0.999, "mutual information (bits)",
                           "density (per bit)", "layer (hidden_states index, 0 = embeddings)", TITLES["mi_density"])


# ---------------------------------------------------------------- attention AR
def fig_attn_strip(attn_norms: pl.LazyFrame, max_per_layer: int = 300, seed: int = 0) -> Figure:
    """Strip plot: jittered log norms per layer (sample) with the per-layer median of all tokens."""
    pts = _collect(_thin(attn_norms, ["model", "layer"], ["chunk", "pos"], max_per_layer)
                   .select("model", "layer", "log_norm"), "attention norms")
    med = attn_norms.group_by("model", "layer").agg(pl.col("log_norm").median()).sort("layer").collect()
    rng = np.random.default_rng(seed)
    models = _models(pts)
    fig, axes = _panels(len(models), ncols=2, w=6.5)
    for ax, m in zip(axes, models):
        d, md = pts.filter(pl.col("model") == m), med.filter(pl.col("model") == m)
        x = d["layer"].to_numpy() + rng.uniform(-0.3, 0.3, d.height)
        ax.scatter(x, d["log_norm"], s=3, alpha=0.3, c=d["layer"], cmap="viridis", rasterized=True)
        ax.scatter(md["layer"], md["log_norm"], marker="_", s=200, color="black", label="median (all tokens)")
        ax.set(title=f"{m}: ≤{max_per_layer} tokens per layer", ylabel="log ‖attention output‖₂ (log L2 norm)")
        _int_x(ax)
        ax.legend(fontsize=8)
    fig.suptitle(TITLES["attn_strip"])
    return fig


def fig_attn_hist(attn_norms: pl.LazyFrame) -> Figure:
    """Per model: histogram density of log norms per layer overlaid, coloured by layer."""
    return _density_panels(attn_norms, "log_norm", 0.001, 0.999, "log ‖attention output‖₂ (log L2 norm)",
                           "density (per log unit)", "layer", TITLES["attn_hist"])


def fig_attn_ar_coefs(attn_ar: pl.LazyFrame, alpha: float = ALPHA) -> Figure:
    """b1 and b2 per layer from the pooled rows (chunk null), filled markers where p < alpha / n_layers."""
    df = _collect(attn_ar.filter(pl.col("chunk").is_null() & pl.col("b1").is_finite())
                  .select("model", "layer", "b1", "b2", "p1", "p2").sort("layer"), "pooled AR rows")
    fig, axes = _panels(2, ncols=2, w=6.0, h=4.2)
    for m in _models(df):
        d = df.filter(pl.col("model") == m)
        thr = alpha / d.height  # Bonferroni over this model's layers
        for ax, b, p in zip(axes, ("b1", "b2"), ("p1", "p2")):
            (line,) = ax.plot(d["layer"], d[b], marker="o", mfc="white", label=m)
            s = d.filter(pl.col(p) < thr)
            ax.scatter(s["layer"], s[b], color=line.get_color(), s=40, zorder=3)
    for ax, lag in zip(axes, (1, 2)):
        ax.axhline(0, color="black", lw=0.8)
        handles = ax.get_legend_handles_labels()[0] + [
            Line2D([], [], marker="o", ls="", color="grey", label=f"p < {alpha:g} / layers (filled)")]
        ax.set(title=f"lag-{lag} coefficient b{lag}", ylabel=f"b{lag} (dimensionless)")
        _int_x(ax)
        ax.legend(handles=handles, fontsize=8)
    fig.suptitle(TITLES["attn_ar_coefs"])
    return fig


# ---------------------------------------------------------------- render
def _present(tables: dict[str, pl.LazyFrame]) -> dict[str, pl.LazyFrame]:
    """Tables that exist and have at least one row."""
    return {k: v for k, v in tables.items() if v is not None and v.head(1).collect().height > 0}


def _specs(t: dict, chunk: int, neuron_layer, mi_layer):
    """(name, section, needed tables, builder) for every figure, in report order."""
    get = t.get
    return [
        ("path_cumulative", "path", ["layer_metrics"], lambda: fig_path_cumulative(t["layer_metrics"], chunk)),
        ("path_logit_vs_step", "path", ["tokens", "layer_metrics"],
         lambda: fig_logit_vs_step(t["tokens"], t["layer_metrics"], get("path_summary"))),
        ("rotation_angles", "rotation", ["rotation_angles"], lambda: fig_rotation_angles(t["rotation_angles"])),
        ("rotation_t", "rotation", ["rotation"], lambda: fig_rotation_t(t["rotation"])),
        ("neurons_beta", "neurons", ["neuron_logit"], lambda: fig_neuron_betas(t["neuron_logit"], neuron_layer)),
        ("neurons_per_layer", "neurons", ["neuron_logit"], lambda: fig_neurons_per_layer(t["neuron_logit"])),
        ("neurons_heatmap", "neurons", ["heatmap"], lambda: fig_token_heatmap(
            t["heatmap"], get("neuron_logit"), get("activations"), chunk=chunk, layer=neuron_layer)),
        ("mi_layer", "mi", ["mi"], lambda: fig_mi_layer(t["mi"], mi_layer)),
        ("mi_density", "mi", ["mi"], lambda: fig_mi_density(t["mi"])),
        ("attn_strip", "attn_ar", ["attn_norms"], lambda: fig_attn_strip(t["attn_norms"])),
        ("attn_hist", "attn_ar", ["attn_norms"], lambda: fig_attn_hist(t["attn_norms"])),
        ("attn_ar_coefs", "attn_ar", ["attn_ar"], lambda: fig_attn_ar_coefs(t["attn_ar"])),
    ]


def render_all(tables: dict[str, pl.LazyFrame], fig_dir: str, *, chunk: int = 0, neuron_layer: int | None = None,
               mi_layer: int | None = None) -> list[dict]:
    """Write every figure whose tables are present and non-empty as ``<name>.png`` and ``<name>.svg``.

    Returns entries {"name", "title", "section", "png", "svg"} in report order; figures with nothing to
    draw (``NoData``) are skipped and logged.
    """
    present = _present(tables)
    os.makedirs(fig_dir, exist_ok=True)
    out = []
    for name, section, needs, build in _specs(present, chunk, neuron_layer, mi_layer):
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
