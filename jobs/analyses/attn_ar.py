"""Attention-norm dynamics: log L2 norm of each attention block's output per token (``attn_norms``);
per layer an OLS of norm[t] on norm[t-1], norm[t-2] (``attn_ar``), per chunk and pooled over chunks."""
import numpy as np
import polars as pl
import pyarrow as pa
import ray
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from jobs.analysis import Analysis, Capture, FigureSpec, Table, Write
from jobs.plotting import (by_model, collect, density_panels, depth_legend, depth_lines, int_x, models_of, panels, thin,
                           with_depth)
from jobs.store import Store
from probe_core import attn_ar

NORMS = Table("attn_norms", pa.schema([("chunk", pa.int32()), ("pos", pa.int32()), ("layer", pa.int16()), ("log_norm", pa.float32())]))
AR = Table("attn_ar", pa.schema([
    ("layer", pa.int16()), ("chunk", pa.int32()), ("n", pa.int32()), ("b0", pa.float64()), ("b1", pa.float64()),
    ("b2", pa.float64()), ("p1", pa.float64()), ("p2", pa.float64()), ("r2", pa.float64()), ("status", pa.string()),
    ("significant1", pa.bool_()), ("significant2", pa.bool_()),
]))
TITLES = {
    "attn_strip": "Log attention-output norms per layer",
    "attn_hist": "Log attention-output norms: histogram per layer",
    "attn_ar_coefs": "AR(2) on log attention-output norms: pooled coefficients",
    "across_attn_ar": "Across sizes: pooled AR(2) coefficients of log attention norms per layer",
}


def reduce(ctx) -> list:
    chunks, pos, layer = ctx.grid(per_layer=True)
    return [Write(NORMS, pa.table({"chunk": chunks, "pos": pos, "layer": layer, "log_norm": ctx.per_token_layer("log_norm")}))]


def model_attn_ar(store_uri: str, model: str, alpha: float = 0.05, start: int = 3) -> int:
    """AR(2) OLS of log attention norms per layer and chunk, and pooled per layer; significance at
    alpha with Bonferroni over the model's layers (pooled) or its per-chunk regressions (``ar2_table``)."""
    store = Store(store_uri)
    norms = store.scan_model(NORMS, model).sort("layer", "chunk", "pos").collect()
    frames, n_layers = [], norms["layer"].n_unique()
    for (layer,), part in norms.group_by("layer", maintain_order=True):
        wide = part.pivot(on="pos", index="chunk", values="log_norm", sort_columns=False).sort("chunk")
        positions = sorted(int(c) for c in wide.columns if c != "chunk")
        y = wide.select([str(p) for p in positions]).to_numpy().astype(np.float64)
        table = attn_ar.ar2_table(y, wide["chunk"].to_numpy(), start=start, alpha=alpha, n_layers=n_layers)
        frames.append(table.with_columns(pl.lit(layer, dtype=pl.Int16).alias("layer")))
    result = pl.concat(frames)
    store.write_table(AR, "all", result.to_arrow(), model=model)
    return result.height


def stats(ctx, m) -> list:
    return [ray.remote(model_attn_ar).remote(ctx.store.uri, m.name, ctx.plan.cfg.alpha)]


# ---------------------------------------------------------------- report
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


def fig_attn_ar_coefs(attn_ar: pl.LazyFrame) -> Figure:
    """b1 and b2 per layer from the pooled rows (chunk null), filled markers where significant (the table's
    significant1/significant2: the run's --alpha, Bonferroni over layers)."""
    lazy = attn_ar.filter(pl.col("chunk").is_null() & pl.col("b1").is_finite())
    df = collect(lazy.select("model", "layer", "b1", "b2", "significant1", "significant2").sort("layer"), "pooled AR rows")
    fig, axes = panels(2, ncols=2, w=6.0, h=4.2)
    for m in models_of(df):
        d = df.filter(pl.col("model") == m)
        for ax, lag in zip(axes, (1, 2)):
            (line,) = ax.plot(d["layer"], d[f"b{lag}"], marker="o", mfc="white", label=m)
            s = d.filter(pl.col(f"significant{lag}"))
            ax.scatter(s["layer"], s[f"b{lag}"], color=line.get_color(), s=40, zorder=3)
    for ax, lag in zip(axes, (1, 2)):
        ax.axhline(0, color="black", lw=0.8)
        handles = ax.get_legend_handles_labels()[0] + [
            Line2D([], [], marker="o", ls="", color="grey", label="significant at --alpha / layers (filled)")]
        ax.set(title=f"lag-{lag} coefficient b{lag}", ylabel=f"b{lag} (dimensionless)")
        int_x(ax)
        ax.legend(handles=handles, fontsize=8)
    fig.suptitle(TITLES["attn_ar_coefs"])
    return fig


def fig_across(attn_ar: pl.LazyFrame, n_layers: dict[str, int] | None = None) -> Figure:
    """Across sizes: pooled b1 and b2 per layer; filled markers where significant1 / significant2."""
    df = with_depth(collect(attn_ar.filter(pl.col("chunk").is_null() & pl.col("b1").is_finite())
                            .select("model", "layer", "b1", "b2", "significant1", "significant2"), "pooled AR rows"), n_layers)
    fig, axes = panels(2, ncols=2, w=6.0, h=4.2)
    for ax, lag in zip(axes, (1, 2)):
        depth_lines(ax, df, f"b{lag}", marks=f"significant{lag}")
        ax.axhline(0, color="black", lw=0.8)
        ax.set(title=f"lag-{lag} coefficient b{lag}", ylabel=f"b{lag} (dimensionless)")
        depth_legend(ax, "significant (filled)")
    fig.suptitle(TITLES["across_attn_ar"])
    return fig


def summaries(t: dict, manifest: dict) -> list:
    if "attn_ar" not in t:
        return []
    return [by_model("AR(2) pooled over chunks", t["attn_ar"].filter(pl.col("chunk").is_null()).drop("chunk").collect(), "layer")]


def across(t: dict) -> pl.LazyFrame | None:
    if "attn_ar" not in t:
        return None
    return (t["attn_ar"].filter(pl.col("chunk").is_null() & pl.col("b1").is_finite())
            .group_by("model").agg(pl.col("b1").mean().alias("mean_ar_b1")))


def _spec(name: str, needs: tuple[str, ...], draw) -> FigureSpec:
    return FigureSpec(name, TITLES[name], needs, draw)


ANALYSIS = Analysis(
    name="attn_ar", heading="Attention-norm autoregression", blurb="AR(2) models of log attention-output norms along positions.",
    tables=(NORMS, AR), capture=Capture(reduce=reduce, forward=lambda ctx: {"attn_norms": True}), stats=stats,
    disk_bytes=lambda plan, m: plan.corpus.n_tokens * 10 * m.n_layer, summaries=summaries,
    figures=(_spec("attn_strip", ("attn_norms",), lambda t, n_layers: fig_attn_strip(t["attn_norms"])),
             _spec("attn_hist", ("attn_norms",), lambda t, n_layers: fig_attn_hist(t["attn_norms"])),
             _spec("attn_ar_coefs", ("attn_ar",), lambda t, n_layers: fig_attn_ar_coefs(t["attn_ar"]))),
    across=across, across_figures=(_spec("across_attn_ar", ("attn_ar",), lambda t, n_layers: fig_across(t["attn_ar"], n_layers)),),
    # probe_core.attn_ar: rows t = 3..T-1, and a fit with n <= 3 rows is "too_few", so a chunk needs T - 3 >= 4.
    min_chunk_tokens=(7, "AR(2) fits 3 coefficients on positions 3..T-1 of each chunk and needs more than 3 of them"),
)
