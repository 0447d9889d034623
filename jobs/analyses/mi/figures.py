"""Figures and report tables of the MI analysis. ``mi.layer`` is the hidden_states index 0..n_layer (0 = embeddings)."""
import numpy as np
import polars as pl
from matplotlib.figure import Figure

from jobs.analysis import FigureSpec
from jobs.plotting import (N_BINS, best_layer, by_model, collect, density_panels, depth_legend, depth_lines, models_of, panels,
                           pick, with_depth)
from probe_core.mutual_info import plugin_bias_bits

TITLES = {
    "mi_layer": "Pairwise mutual information between hidden dimensions (one layer)",
    "mi_density": "Pairwise mutual information: density per layer",
    "across_mi_excess": "Across sizes: mutual information above the null per layer",
}


def mi_layers(mi: pl.LazyFrame, layer: int | None = None) -> dict[str, int]:
    """Layer to show per model: ``layer`` if given, else the hidden_states index with the largest mean MI."""
    return best_layer(mi, pl.col("mi_bits").mean(), layer)


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


def fig_mi_excess(mi_summary: pl.LazyFrame, n_layers: dict[str, int] | None = None) -> Figure:
    """Across sizes: mean pairwise MI minus the null mean per hidden_states layer (0 = embeddings)."""
    df = with_depth(collect(mi_summary.select("model", "layer", pl.col("excess_mean_bits").alias("excess")), "MI excess"), n_layers)
    fig, (ax,) = panels(1, w=7.0, h=4.2)
    depth_lines(ax, df, "excess")
    ax.axhline(0, color="black", lw=0.8)
    ax.set(ylabel="mean MI − null mean MI (bits)")
    depth_legend(ax)
    fig.suptitle(TITLES["across_mi_excess"])
    return fig


def bias_sentence(ms: pl.DataFrame) -> str:
    """The plug-in bias at the run's N in one sentence: theory (B-1)^2/(2N ln 2) at 15 bins and the measured null."""
    n = int(ms["n_tokens"].max()) if ms.height else 0
    null = ms["null_mean_bits"].drop_nans().mean()
    measured = f"; the measured null (dimensions permuted independently) averages {null:.4f} bits" if null is not None else ""
    return (f"MI per layer (bits; layer = hidden_states index). At N = {n} tokens the plug-in estimator's bias for "
            f"independent dimensions is (B−1)²/(2N ln 2) = {plugin_bias_bits(max(n, 1)):.4f} bits at 15 bins{measured}; "
            "mi_bits_mm and excess_mean_bits correct for it.")


def summaries(t: dict, manifest: dict) -> list:
    if "mi_summary" not in t:
        return []
    ms = t["mi_summary"].collect()
    return [by_model(bias_sentence(ms), ms, "layer")]


def across(t: dict) -> pl.LazyFrame | None:
    if "mi_summary" not in t:
        return None
    return t["mi_summary"].group_by("model").agg(pl.col("excess_mean_bits").mean().alias("mi_excess_bits"))


FIGURES = (
    FigureSpec("mi_layer", TITLES["mi_layer"], ("mi",), lambda t, n_layers: fig_mi_layer(t["mi"])),
    FigureSpec("mi_density", TITLES["mi_density"], ("mi",), lambda t, n_layers: fig_mi_density(t["mi"], t.get("mi_null"))),
)
ACROSS_FIGURES = (
    FigureSpec("across_mi_excess", TITLES["across_mi_excess"], ("mi_summary",),
               lambda t, n_layers: fig_mi_excess(t["mi_summary"], n_layers)),
)
