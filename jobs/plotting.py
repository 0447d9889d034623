"""Shared figure helpers: model order, lazy sampling/binning of large tables, panel grids and line collections.

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
from matplotlib.ticker import MaxNLocator  # noqa: E402

N_BINS = 60
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
