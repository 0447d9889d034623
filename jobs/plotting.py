"""Shared figure and summary helpers: model order, lazy sampling/binning of large tables, panel grids, line
collections, the across-sizes lines on relative depth and the report's per-model summary heads.

Every table helper takes polars LazyFrames and collects only what is drawn (tables can hold 10^7+ rows).
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # headless: figures only go to files (and pyplot, if ever imported, must not pick a GUI)
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

N_BINS = 60
HEAD_ROWS = 50  # rows of a report table
DEPTH = "relative depth (layer / n_layer)"
_SIZE_RANK = {"distilgpt2": 0, "gpt2": 1, "gpt2-medium": 2, "gpt2-large": 3, "gpt2-xl": 4}


class NoData(ValueError):
    """Raised by a figure function when its (filtered) input has no rows to draw."""


def model_sort_key(name: str) -> tuple[int, str]:
    """Sort key ordering GPT-2 models by size (hub prefixes ignored; unknown names last, alphabetically)."""
    return _SIZE_RANK.get(name.rsplit("/", 1)[-1], len(_SIZE_RANK)), name


def models_of(df: pl.DataFrame) -> list[str]:
    """The frame's distinct ``model`` values, smallest model first."""
    return sorted(df["model"].unique().to_list(), key=model_sort_key)


def safe(text: str) -> str:
    """Literal text for matplotlib titles/labels ($ would start mathtext)."""
    return str(text).replace("$", r"\$")


def collect(lf: pl.LazyFrame, what: str) -> pl.DataFrame:
    """``lf`` collected; ``NoData`` naming ``what`` when it has no rows."""
    df = lf.collect()
    if df.height == 0:
        raise NoData(f"no rows to draw {what}")
    return df


def panels(n: int, ncols: int = 3, w: float = 4.8, h: float = 3.6):
    """Figure with ``n`` axes on a grid of ``ncols`` columns (unused cells hidden)."""
    ncols = max(1, min(n, ncols))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(max(w * ncols, 7.0), h * nrows + 0.5), layout="constrained")  # room for the suptitle
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def thin(lf: pl.LazyFrame, group: list[str], keys: list[str], max_n: int, count=None, seed=0) -> pl.LazyFrame:
    """Keep about ``max_n`` distinct ``keys`` per ``group``: deterministic hash-stride sampling, lazy.

    ``count`` is the expression counting keys per group (default ``pl.len()``, right when keys are unique).
    """
    counts = lf.group_by(group).agg((pl.len() if count is None else count).alias("_n")).collect()
    stride = counts.select(*group, ((pl.col("_n") + max_n - 1) // max_n).clip(1).cast(pl.UInt64).alias("_s"))
    return (lf.join(stride.lazy(), on=group, maintain_order="left")  # same sample, same order: stable figures
            .filter(pl.struct(keys).hash(seed) % pl.col("_s") == 0).drop("_s"))


def wide(df: pl.DataFrame, keys: list[str], values: str, on: str = "layer"):
    """Long rows -> (key frame, sorted ``on`` values, matrix (n_keys, n_on) with NaN where missing)."""
    w = df.pivot(on=on, index=keys, values=values, aggregate_function="first")
    cols = sorted(w.columns[len(keys):], key=int)
    mat = w.select(pl.col(cols).cast(pl.Float64)).to_numpy()
    return w.select(keys), np.array([int(c) for c in cols]), mat


def pick(choice: dict[str, int], col: str) -> pl.Expr:
    """Rows where ``col`` equals the value chosen for their model (one term per model: pushes down to scans)."""
    sel = pl.lit(False)
    for m, v in choice.items():
        sel = sel | ((pl.col("model") == m) & (pl.col(col) == v))
    return sel


def int_x(ax, label: str = "layer") -> None:
    """Integer ticks and ``label`` on the x axis."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(label)


def resolve_chunk(lf: pl.LazyFrame, chunk: int) -> int:
    """``chunk`` if the table has it, else its smallest chunk."""
    if lf.filter(pl.col("chunk") == chunk).select(pl.len()).collect().item() > 0:
        return chunk
    found = lf.select(pl.col("chunk").min()).collect().item()
    if found is None:
        raise NoData("no chunk to draw")
    return int(found)


def add_lines(ax, x: np.ndarray, Y: np.ndarray, **kw) -> LineCollection:
    """One line per row of ``Y`` (n_lines, len(x)) over ``x`` as a single collection (NaN = gap)."""
    lc = LineCollection(np.stack([np.broadcast_to(x, Y.shape), Y], axis=-1), **kw)
    ax.add_collection(lc)
    ax.autoscale_view()
    return lc


def layer_lines(fig, ax, x: np.ndarray, Y: np.ndarray, layers: np.ndarray, label: str) -> None:
    """One line per layer (rows of ``Y`` over ``x``) coloured by layer, with a colorbar."""
    lc = add_lines(ax, x, Y, cmap="viridis", array=layers.astype(float), linewidths=1.2)
    fig.colorbar(lc, ax=ax, label=label, ticks=MaxNLocator(integer=True))


def binned_density(lf: pl.LazyFrame, col: str, lo_q: float, hi_q: float, bins: int = N_BINS):
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


def density_panels(lf: pl.LazyFrame, col: str, lo_q: float, hi_q: float, xlabel: str, ylabel: str, clabel: str,
                   title: str) -> Figure:
    """Panel per model: ``binned_density`` of ``col`` per layer overlaid, coloured by layer."""
    centres, dens = binned_density(lf, col, lo_q, hi_q)
    if dens.height == 0:
        raise NoData(f"no {col} values")
    models = models_of(dens)
    fig, axes = panels(len(models))
    for ax, m in zip(axes, models):
        d = dens.filter(pl.col("model") == m)
        layers = np.sort(d["layer"].unique().to_numpy())
        Y = np.zeros((len(layers), N_BINS))
        Y[np.searchsorted(layers, d["layer"].to_numpy()), d["bin"].to_numpy()] = d["density"].to_numpy()
        layer_lines(fig, ax, centres[m], Y, layers, clabel)
        ax.set(title=f"{m} (values in quantiles {lo_q:g}-{hi_q:g})", xlabel=xlabel, ylabel=ylabel)
    fig.suptitle(title)
    return fig


def by_model(caption: str, df: pl.DataFrame, *cols: str) -> tuple[str, pl.DataFrame]:
    """(caption, frame) sorted by model size then ``cols``; each model keeps an equal share of the HEAD_ROWS."""
    models = sorted(df["model"].unique().to_list(), key=model_sort_key)
    share = max(1, HEAD_ROWS // max(len(models), 1))
    head = (df.with_columns(_r=pl.col("model").replace_strict({m: i for i, m in enumerate(models)}))
            .sort("_r", *cols).group_by("_r", maintain_order=True).head(share).drop("_r"))
    if head.height < df.height:
        caption += f" (first {share} rows per model: {head.height} of {df.height} shown)"
    return caption, head


# ---------------------------------------------------------------- across sizes: one line per model on relative depth
def with_depth(df: pl.DataFrame, n_layers: dict[str, int] | None) -> pl.DataFrame:
    """``df`` plus n_layer (from ``n_layers``, else the model's largest layer in ``df``) and rel_depth."""
    known = {m: int(v) for m, v in (n_layers or {}).items() if v}
    df = df.with_columns(n_layer=pl.col("model").replace_strict(known, default=None, return_dtype=pl.Int64)
                         .fill_null(pl.col("layer").max().over("model").cast(pl.Int64)))
    return df.with_columns(rel_depth=pl.col("layer") / pl.col("n_layer")).sort("model", "layer")


def _by_depth(df: pl.DataFrame) -> list[str]:
    """Models by depth then name (smallest first)."""
    depth = dict(df.group_by("model").agg(pl.col("n_layer").first()).iter_rows())
    return sorted(depth, key=lambda m: (depth[m], model_sort_key(m)))


def depth_lines(ax, df: pl.DataFrame, y: str, band: tuple[str, str] | None = None, marks: str | None = None) -> None:
    """One line per model over rel_depth; optional CI band and filled markers where ``marks`` is true."""
    for m in _by_depth(df):
        d = df.filter(pl.col("model") == m)
        (line,) = ax.plot(d["rel_depth"], d[y], marker="o", mfc="white", label=f"{m} ({d['n_layer'][0]} layers)")
        if band and band[0] in d.columns and band[1] in d.columns:
            ax.fill_between(d["rel_depth"], d[band[0]], d[band[1]], color=line.get_color(), alpha=0.15, lw=0)
        if marks and marks in d.columns:
            s = d.filter(pl.col(marks).fill_null(False))
            ax.scatter(s["rel_depth"], s[y], color=line.get_color(), s=40, zorder=3)
    ax.set_xlabel(DEPTH)
    ax.set_xlim(-0.03, 1.03)


def depth_legend(ax, mark_label: str | None = None) -> None:
    handles = ax.get_legend_handles_labels()[0]
    if mark_label:
        handles.append(Line2D([], [], marker="o", ls="", color="grey", label=mark_label))
    ax.legend(handles=handles, fontsize=8)


def best_layer(lf: pl.LazyFrame, score: pl.Expr, layer: int | None) -> dict[str, int]:
    """Per model: ``layer`` if given (models lacking it dropped), else the layer maximising ``score`` (ties: lowest)."""
    scores = lf.group_by("model", "layer").agg(score.alias("_s")).collect()
    if layer is not None:
        scores = scores.filter(pl.col("layer") == layer)
    best = scores.sort(["model", "_s", "layer"], descending=[False, True, False]).group_by(
        "model", maintain_order=True).first()
    return {m: int(lay) for m, lay in best.select("model", "layer").iter_rows()}
